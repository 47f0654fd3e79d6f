"""Export a pruned model: safetensors weights, tokenizer, masks and a report JSON.

Two weight formats:
- ``hf`` (the default): the pruned weights as ordinary dense safetensors, which every
  ``from_pretrained`` reads;
- ``compressed-tensors``: what llm-compressor writes for sparse models, written by the
  compressed-tensors library itself: ``sparse-24-bitmask`` for a 2:4 model (the layout of
  vLLM's former 2:4 kernels), ``sparse-bitmask`` for any other pattern, with the
  ``quantization_config`` entry in config.json that names the format. Its reader is the same
  library (``ModelCompressor.from_pretrained(folder).decompress(folder, model)``). The sparse
  compressors exist up to compressed-tensors 0.13 (later releases dropped them, and vLLM
  0.19.1+ no longer runs Sparse24 models), hence the pinned optional dependency.

Everything is written into a temporary sibling folder that is renamed into place at the end,
so an interrupted export never leaves a half-written folder that looks like a model.
Overwriting replaces only what mlprune wrote: an empty folder or an earlier export (its report
is there, and it holds no file that export did not write); any other folder is refused, and
nothing in it is touched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch import nn

from mlprune import MlpruneError, __version__
from mlprune.models import LoadedModel, is_offloaded, linear_modules
from mlprune.prune import MaskSet, pruned

# Re-exported: atomic_write_text lived here first, and other modules import it from here.
from mlprune.storage import atomic_folder, atomic_write_text  # noqa: F401

REPORT = "mlprune_report.json"
MASKS = "masks.safetensors"
FORMATS = ("hf", "compressed-tensors")


def build_report(loaded: LoadedModel, masks: MaskSet, *, spec: dict | None = None,
                 calibration_texts: list[str] | None = None, timings: dict | None = None,
                 metrics: dict | None = None) -> dict:
    """The report saved beside a pruned model: what was done, with what, and what came out."""
    return {
        "mlprune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": loaded.name, "source": loaded.source,
                  "dequantized_from": loaded.dequantized_from},
        "spec": spec or {},
        "method": masks.meta.get("method"),
        "invert": masks.meta.get("invert"),
        "calibration": masks.meta.get("calibration"),
        "pattern": masks.pattern,
        "sparsity_target": masks.target,
        "sparsity_reached": masks.overall_sparsity(),
        "sparsity_per_module": masks.sparsity(),
        # layer-adaptive runs: the kind, its settings, and per layer the allocated sparsity
        "allocation": masks.meta.get("allocation"),
        "protected_dims": masks.meta.get("protected_dims", {}),
        "calibration_texts": calibration_texts or [],
        "timings_s": timings or {},
        "metrics": metrics or {},
    }


def export_pruned(loaded: LoadedModel, masks: MaskSet, out_dir: str | Path, report: dict, *,
                  overwrite: bool = False, format: str = "hf") -> Path:
    """Write the pruned model to ``out_dir`` (atomically) in one of :data:`FORMATS`; the
    in-memory model stays dense. With ``overwrite``, an existing folder is replaced only when
    :func:`check_export_target` allows it."""
    if format not in FORMATS:
        raise MlpruneError(f"Unknown export format '{format}': use {' or '.join(FORMATS)}.")
    out = check_export_target(out_dir, overwrite)
    offloaded = is_offloaded(loaded.model)
    if offloaded and format != "hf":
        raise MlpruneError("This model is offloaded (loaded with a device map), which only the hf "
                           "export format reads weight by weight: export it with --format hf.")
    compressor = _sparse_compressor(loaded, masks) if format == "compressed-tensors" else None

    def fill(tmp: Path) -> None:
        with pruned(loaded.model, masks):
            if compressor is None:
                # an offloaded model is written a shard at a time, each shard held in memory:
                # small shards, so that writing never needs the memory the model did not fit in
                loaded.model.save_pretrained(tmp, **({"max_shard_size": "2GB"} if offloaded
                                                     else {}))
            else:
                loaded.model.save_pretrained(tmp, state_dict=compressor.compress(loaded.model))
        if compressor is not None:
            compressor.update_config(str(tmp))  # config.json names the format and its targets
        loaded.tokenizer.save_pretrained(tmp)
        masks.save(tmp / MASKS)
        # the files this export wrote: what a later overwrite may replace, and nothing else
        files = sorted([p.name for p in tmp.iterdir()] + [REPORT])
        (tmp / REPORT).write_text(json.dumps({**report, "format": format, "files": files},
                                             indent=2, ensure_ascii=False, allow_nan=False),
                                  encoding="utf-8")

    # an earlier export at ``out`` is checked again just before it is replaced
    return atomic_folder(out, fill, replace=lambda existing: check_export_target(existing,
                                                                                overwrite))


def check_export_target(out_dir: str | Path, overwrite: bool) -> Path:
    """The export folder ``out_dir``, or MlpruneError when exporting there could lose
    something: it exists and ``overwrite`` is off, or it is not a folder mlprune may replace
    (empty, or an earlier export holding only the files that export wrote). Reads only."""
    out = Path(out_dir).expanduser()
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise MlpruneError(f"{out} already exists; choose another folder or allow overwriting.")
    if out.is_symlink() or not out.is_dir():
        raise MlpruneError(f"{out} is not a folder; overwriting replaces only an earlier "
                           "export's folder, so choose another folder.")
    names = {p.name for p in out.iterdir()}
    if not names:
        return out
    try:
        report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if not isinstance(report, dict) or "mlprune_version" not in report:
        raise MlpruneError(f"{out} is not an earlier mlprune export (it has no {REPORT}); "
                           "overwriting replaces only those, so choose another folder.")
    listed = report.get("files")
    if not isinstance(listed, list):  # an export from before reports listed their files
        listed = names
    foreign = sorted(names - set(listed))
    if foreign:
        raise MlpruneError(f"{out} holds {foreign[0]}, which its earlier export did not write; "
                           "move it out or choose another folder.")
    return out


def _sparse_compressor(loaded: LoadedModel, masks: MaskSet):
    """compressed-tensors' compressor for these masks: 2:4 bitmask for 2:4, bitmask otherwise.

    Only the pruned modules are targets (by their paths in the model, not mlprune's readable
    names), so embeddings, norms and the LM head stay dense."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    except ImportError as e:
        raise MlpruneError("The compressed-tensors format needs the compressed-tensors library "
                           "with its sparse compressors: pip install 'mlprune[deploy]' "
                           "(compressed-tensors 0.13).") from e
    infos = linear_modules(loaded.model)
    if not masks.modules:
        raise MlpruneError("These masks prune no module; there is nothing to compress.")
    if any(infos[n].transposed for n in masks.modules):
        raise MlpruneError("This model stores its weights as GPT-2-style Conv1D (inputs x "
                           "outputs); compressed-tensors' sparse formats are for Linear layers. "
                           "Export it with --format hf.")
    targets = [infos[n].path for n in masks.modules]
    if masks.pattern == "2:4":
        config = Sparse24BitMaskConfig(global_sparsity=masks.overall_sparsity(), targets=targets,
                                       sparsity_structure="2:4")
    else:
        config = BitmaskConfig(global_sparsity=masks.overall_sparsity(), targets=targets,
                                     sparsity_structure=masks.pattern)
    return ModelCompressor(sparsity_config=config)


def load_compressed_tensors(folder: str | Path, model: nn.Module) -> None:
    """Fill ``model`` (the same architecture, e.g. ``from_config``) with the weights of a
    compressed-tensors export, decompressed by the library that wrote them."""
    try:
        from compressed_tensors.compressors import ModelCompressor
    except ImportError as e:
        raise MlpruneError("Reading the compressed-tensors format needs the compressed-tensors "
                           "library: pip install 'mlprune[deploy]'.") from e
    compressor = ModelCompressor.from_pretrained(str(folder))
    if compressor is None or compressor.sparsity_config is None:
        raise MlpruneError(f"{folder} holds no compressed-tensors sparse model.")
    compressor.decompress(str(folder), model)
    if hasattr(model, "tie_weights"):  # decompression sets new embedding tensors: re-tie the head
        model.tie_weights()


def read_report(folder: str | Path) -> dict:
    """The report of an exported model (empty dict if there is none)."""
    path = Path(folder) / REPORT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
