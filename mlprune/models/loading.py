"""Loading: a causal LM and its tokenizer from a hub id, a local folder (an mlprune export
included), a ``.gguf`` file or the embedded default, refusing plainly what cannot be loaded.

Weights load from safetensors only: a folder or hub model with nothing but pickle weights
(``.bin``/``.pt``/``.pth``/``.ckpt``, which can run code when read) is refused unless the caller
passes ``allow_pickle=True`` (the CLI's ``--allow-pickle``). A ``device_map`` load is checked
first against its :func:`~mlprune.models.memory.memory_plan`; a folder too large for memory is
refused before anything is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlprune import MlpruneError, Progress, kernels, no_progress
from mlprune.models.gguf import (
    MARKER,
    _embedded_folder,
    _gguf_quant_type,
    _gguf_to_safetensors,
    _read_marker,
)
from mlprune.models.memory import (
    STREAM_ADVICE,
    MemoryPlan,
    check_fits,
    free_memory,
    memory_plan,
)
from mlprune.models.offload import placement
from mlprune.models.precision import parse_dtype, split_precision
from mlprune.models.sites import LinearInfo, decoder_layers, hidden_size, linear_modules

DEFAULT_MODEL = "embedded:gemma3-270m"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str  # "embedded" | "gguf" | "local" | "hub"
    dequantized_from: str | None = None  # e.g. "Q4_K_M": figures must say so
    plan: MemoryPlan | None = None  # loaded with a device_map: the plan it was checked against

    @property
    def layers(self) -> list[nn.Module]:
        """The model's decoder layers, in order."""
        return decoder_layers(self.model)

    @property
    def linears(self) -> dict[str, LinearInfo]:
        """The model's prunable linear modules, by readable name."""
        return linear_modules(self.model)

    def facts(self) -> dict:
        """Parameters, layers, hidden size, device and dtype, for display."""
        p = next(self.model.parameters())
        return {
            "model": self.name,
            "source": self.source,
            "parameters": sum(t.numel() for t in self.model.parameters()),
            "layers": len(self.layers),
            "hidden_size": hidden_size(self.model),
            "linear_modules": len(self.linears),
            "device": placement(self.model) or str(p.device),
            "dtype": str(p.dtype).replace("torch.", ""),
            "dequantized_from": self.dequantized_from,
        }


def load_model(
    spec: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: Progress = no_progress,
) -> LoadedModel:
    """Load a causal LM and tokenizer from a hub id, a folder, a .gguf file or the embedded default.

    The spec may end in a precision (``...@bfloat16``, :func:`split_precision`), the same as
    ``dtype``.

    Weights are read from safetensors only; ``allow_pickle=True`` also accepts pickle weights
    (``.bin``, ``.pt``...), which can run code when read: only for files you trust.
    ``device_map`` ("auto", "sequential", a device, or accelerate's {module: device} dict),
    with ``max_memory`` ({0: "20GiB", "cpu": "60GiB"}) and ``offload_folder``, spreads the
    model over GPUs, the CPU and disk; it is checked first against :func:`memory_plan`
    (kept as ``.plan``), and refused in one sentence when it cannot fit even so.
    ``progress(stage, fraction)`` is told each step, the stage a sentence saying what is
    happening. Raises MlpruneError with one sentence naming what was tried when the model
    cannot be found or read.
    """
    if device_map is not None and device:
        raise MlpruneError("Give a device or a device map, not both: the device map places "
                           "every module itself.")
    spec, named = split_precision((spec or DEFAULT_MODEL).strip())
    if named is not None:
        if dtype is not None and parse_dtype(dtype) != parse_dtype(named):
            raise MlpruneError(f"The model spec asks for {named} and the dtype for {dtype}: "
                               "give the precision once.")
        dtype = named
    dtype = parse_dtype(dtype, device)
    folder, source, name, dequantized_from = _resolve(spec, allow_pickle, progress,
                                                      check_memory=device_map is None)
    plan = None
    if device_map is not None:
        plan = memory_plan(_config(folder, trust_remote_code), dtype,
                           free=free_memory(offload_folder), caps=max_memory, name=name).check()
    progress(f"Loading weights from {folder}", 0.8)
    model, tokenizer = _from_pretrained(folder, spec, dtype, device,
                                        trust_remote_code, allow_pickle, device_map=device_map,
                                        max_memory=max_memory, offload_folder=offload_folder)
    if dequantized_from is None and source == "local":
        dequantized_from = _read_marker(Path(folder))
    progress("Model ready", 1.0)
    return LoadedModel(model, tokenizer, name, source, dequantized_from, plan)


def plan_load(spec: str | None = None, *, dtype: torch.dtype | str | None = None,
              max_memory: dict | None = None, offload_folder: str | Path | None = None,
              samples: int = 0, tokens_per_sample: int = 512, batch_size: int = 8,
              trust_remote_code: bool = False, allow_pickle: bool = False,
              progress: Progress = no_progress) -> MemoryPlan:
    """The :func:`memory_plan` of a model spec (hub id, folder, .gguf or the embedded default)
    on this machine, from its config alone: nothing is loaded."""
    folder, _, name, _ = _resolve(spec, allow_pickle, progress, check_memory=False)
    return memory_plan(_config(folder, trust_remote_code), parse_dtype(dtype),
                       free=free_memory(offload_folder), caps=max_memory, samples=samples,
                       tokens_per_sample=tokens_per_sample, batch_size=batch_size, name=name)


def _resolve(spec: str | None, allow_pickle: bool, progress: Progress = no_progress,
             check_memory: bool = True) -> tuple[str | Path, str, str, str | None]:
    """(folder or hub id, source, display name, quantization it was de-quantized from) of a
    model spec; refuses clearly what cannot be a model (``check_memory``: also a folder
    whose weights exceed the memory available)."""
    spec = (spec or DEFAULT_MODEL).strip()
    dequantized_from = None
    if spec in (DEFAULT_MODEL, "embedded", "default"):
        folder = _embedded_folder(progress)
        source, name, dequantized_from = "embedded", "Gemma 3 270M (embedded)", "Q4_K_M"
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MlpruneError(f"No GGUF file at {path}.")
        folder = _gguf_to_safetensors(path, progress)
        source, name, dequantized_from = "gguf", path.name, _gguf_quant_type(path)
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        _check_folder(folder, allow_pickle, check_memory)
        source, name = "local", str(folder)
    elif Path(spec).expanduser().exists():
        raise MlpruneError(
            f"{spec} is a file, not a model: give a model folder, a .gguf file or a hub id."
        )
    elif spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        raise MlpruneError(f"No model folder or .gguf file at {spec}.")
    else:
        folder, source, name = spec, "hub", spec
        _check_hub(spec)
    return folder, source, name, dequantized_from


def _config(folder: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # the hub and config parsing raise their own types
        raise MlpruneError(f"Could not read the config of {folder}: {_first_line(e)}") from e


def _from_pretrained(folder, spec, dtype, device, trust_remote_code, allow_pickle=False, *,
                     device_map=None, max_memory=None, offload_folder=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    placement_kwargs = {}  # only when asked: a plain load stays exactly as before
    if device_map is not None:
        placement_kwargs = {"device_map": device_map, "max_memory": max_memory,
                            "offload_folder": str(offload_folder) if offload_folder else None}
    try:
        tokenizer = (_converted_tokenizer(Path(folder)) if not trust_remote_code else None) \
            or AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
            # None lets transformers fall back to pickle weights; True never reads them
            use_safetensors=None if allow_pickle else True, **placement_kwargs,
        )
    except MlpruneError:
        raise
    except Exception as e:  # safetensors, tokenizers and the hub each raise their own types
        if not allow_pickle and "cannot be loaded with `safetensors`" in str(e):
            raise MlpruneError(pickle_refusal(f"The hub model '{spec}'")) from e
        if device_map is not None and "offload" in str(e).lower():
            raise MlpruneError(f"Some of {spec} must go to disk under this device map and "
                               "memory caps: give an --offload-folder (offload_folder=).") from e
        raise MlpruneError(_explain_load_failure(spec, e)) from e
    if device:
        model.to(device)
    model.eval()
    kernels.speed_up_decoding(model)  # CPU decoding: few-row matmuls near the memory bound
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    decoder_layers(model)  # fail now, clearly, if the architecture is not recognised
    return model, tokenizer


def _converted_tokenizer(folder: Path):
    """The tokenizer of a model mlprune converted from GGUF, built straight from its
    tokenizer.json with the class and settings its tokenizer_config.json names; None for any
    other folder, or when that fails (then AutoTokenizer loads it).

    1.1 s where ``AutoTokenizer.from_pretrained`` takes 3.3 s on the embedded model:
    transformers 5 parses the 33 MB file in Python, rebuilds the vocabulary and merges, then
    deep-copies the result. A real-model test checks both give the same ids on the corpus."""
    files = [folder / MARKER, folder / "tokenizer.json", folder / "tokenizer_config.json"]
    if not all(f.is_file() for f in files):
        return None
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        config = json.loads(files[2].read_text())
        cls = tokenizer_class_from_name(config.pop("tokenizer_class", None) or "PreTrainedTokenizerFast")
        if cls is None or config.get("added_tokens_decoder"):
            return None  # tokens added on top of the file: AutoTokenizer's job
        for key in ("backend", "is_local", "local_files_only", "added_tokens_decoder", "auto_map"):
            config.pop(key, None)
        return cls(tokenizer_file=str(files[1]), name_or_path=str(folder), **config)
    except Exception:  # noqa: BLE001 - any failure: the slow, general path
        return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on its HTTPS port (False when HF_HUB_OFFLINE is set)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_hub(repo_id: str) -> None:
    """Fail fast and plainly for a hub id that is neither cached nor reachable."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception as e:  # malformed ids
        raise MlpruneError(f"'{repo_id}' is not a model folder, a .gguf file or a hub id.") from e
    if hub_reachable():
        return
    if isinstance(cached, str):
        # Cached but offline: read the cache instead of retrying the network for a minute.
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    raise MlpruneError(
        f"Could not find the model '{repo_id}': it is not a local folder or .gguf file, it is "
        "not in the Hugging Face cache, and the hub cannot be reached from this machine."
    )


def _first_line(err: Exception) -> str:
    """An error's first line, or its type when it says nothing."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _explain_load_failure(spec: str, err: Exception) -> str:
    text = _first_line(err)
    if Path(spec).expanduser().exists():
        return f"Could not read the model at {spec}: {text}"
    if os.environ.get("HF_HUB_OFFLINE") or "offline" in text.lower() or "connect" in text.lower():
        return (
            f"Could not find the model '{spec}': it is not a local folder or .gguf file, and the "
            "Hugging Face hub could not be reached (offline) nor had it cached."
        )
    return (
        f"Could not find the model '{spec}': tried it as a local folder, a .gguf file and a hub id "
        f"({text})."
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_refusal(what: str) -> str:
    """The one sentence refusing weights that exist only as pickle files."""
    return (f"{what} has weights only as pickle files (.bin/.pt/.pth/.ckpt), which can run code "
            "when loaded: convert them to safetensors, or pass --allow-pickle "
            "(allow_pickle=True) if you trust the files.")


def _check_folder(folder: Path, allow_pickle: bool = False, check_memory: bool = True) -> None:
    """Refuse, before anything is read, a folder that is not a model or has only pickle weights
    (their names are listed, never opened), or (``check_memory``) whose weights cannot fit in
    memory."""
    if not (folder / "config.json").is_file():
        raise MlpruneError(f"{folder} has no config.json, so it is not a Hugging Face model folder.")
    safe = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safe and not pickles:
        raise MlpruneError(f"{folder} has a config.json but no weight files (*.safetensors, *.bin).")
    if not safe and not allow_pickle:
        raise MlpruneError(pickle_refusal(str(folder)))
    if check_memory:
        check_fits(sum(p.stat().st_size for p in (safe or pickles)), str(folder),
                   advice=STREAM_ADVICE)
