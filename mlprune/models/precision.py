"""Precisions: the dtypes a model may load in, named after a spec's ``@`` or given as --dtype.

``embedded:gemma3-270m@bfloat16`` names a model and its precision in one string (the dashboard's
model box and ``--model`` take it); :func:`parse_dtype` turns a --dtype value into a torch dtype
and refuses bfloat16 on a GPU without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlprune import MlpruneError

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
