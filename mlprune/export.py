"""Export a pruned model: safetensors weights, tokenizer, masks and a report JSON.

Everything is written into a temporary sibling folder that is renamed into place at the end,
so an interrupted export never leaves a half-written folder that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from mlprune import MlpruneError, __version__
from mlprune.models import LoadedModel
from mlprune.prune import MaskSet, pruned

REPORT = "mlprune_report.json"
MASKS = "masks.safetensors"


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
                  overwrite: bool = False) -> Path:
    """Write the pruned model to ``out_dir`` (atomically); the in-memory model stays dense."""
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise MlpruneError(f"{out} already exists; choose another folder or allow overwriting.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with pruned(loaded.model, masks):
            loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        masks.save(tmp / MASKS)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_report(folder: str | Path) -> dict:
    """The report of an exported model (empty dict if there is none)."""
    path = Path(folder) / REPORT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file via a temporary sibling and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
