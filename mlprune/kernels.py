"""CPU fast paths where torch's own kernels sit far from the memory-bandwidth limit.

- :func:`take` / :func:`put` move the pruned weights of a mask: for each row, save the values
  at its pruned columns and zero them, or write saved values back. Torch needs four passes for
  this (int16 columns -> int64 positions, a gather, an indexed fill, and the positions' own
  memory), which ran at 3-13% of the read bandwidth (bench/live.py). Here it is one pass of a
  few lines of C, compiled on first use with the system C compiler and cached in
  ``MLPRUNE_CACHE``. Without a compiler (or with ``MLPRUNE_NATIVE=0``) both return False and
  the caller keeps its torch path; results are identical, bit for bit (tested). No Python
  or torch headers: plain C called through ctypes (which releases the GIL, so the callers'
  threads run it in parallel), built in well under a second where a torch extension takes a
  minute.

- :class:`WeightMajorHead` computes a CPU model's output head (Gemma 3's 262k-token head is
  two thirds of a decoding step's weights) in the forms MKL runs fast: for one row, its
  single-threaded GEMV split over torch's threads (bit-identical, ~1.5-2x); for a few rows,
  ``(W @ x.T).T``, which packs the few rows instead of the whole weight (~2.5x at 8 rows;
  a summation order of its own, as any other batch size has).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlprune import cache_dir

NATIVE_ENV = "MLPRUNE_NATIVE"  # "0" turns the compiled paths off (tests compare both)

_SOURCE = r"""
#include <stdint.h>

/* Row r of the weights starts at w + r*ws0 and its column c is at + c*ws1 (elements). Row r
   of cols holds k column numbers (row stride cs0), row r of vals k values (row stride vs0).
   take: vals <- w at the columns, then w <- 0 there. put: w <- vals at the columns. */
#define LOOPS(W, C)                                                                         \
static void take_##W##_##C(W *restrict w, int64_t ws0, int64_t ws1, const C *restrict cols, int64_t cs0, \
                           int64_t k, int64_t r0, int64_t r1, W *restrict vals, int64_t vs0) { \
    for (int64_t r = r0; r < r1; r++) {                                                     \
        W *row = w + r * ws0; const C *c = cols + r * cs0; W *v = vals + r * vs0;           \
        for (int64_t j = 0; j < k; j++) { W *p = row + (int64_t)c[j] * ws1; v[j] = *p; *p = 0; } \
    }                                                                                       \
}                                                                                           \
static void put_##W##_##C(W *w, int64_t ws0, int64_t ws1, const C *cols, int64_t cs0,      \
                          int64_t k, int64_t r0, int64_t r1, const W *vals, int64_t vs0) {  \
    for (int64_t r = r0; r < r1; r++) {                                                     \
        W *row = w + r * ws0; const C *c = cols + r * cs0; const W *v = vals + r * vs0;     \
        for (int64_t j = 0; j < k; j++) row[(int64_t)c[j] * ws1] = v[j];                    \
    }                                                                                       \
}

#define FOR_COLS(W) LOOPS(W, int16_t) LOOPS(W, int32_t) LOOPS(W, int64_t)
FOR_COLS(uint16_t) FOR_COLS(uint32_t) FOR_COLS(uint64_t)

#define CALL(op, W, C) op##_##W##_##C((W *)w, ws0, ws1, (const C *)cols, cs0, k, r0, r1, (W *)vals, vs0)
#define BY_COLS(op, W)                                        \
    switch (cs) {                                             \
        case 2: CALL(op, W, int16_t); return 0;               \
        case 4: CALL(op, W, int32_t); return 0;               \
        case 8: CALL(op, W, int64_t); return 0;               \
    }                                                         \
    return -1;

/* es, cs: bytes per weight and per column number. Returns 0, or -1 for sizes it lacks. */
int mlprune_move(int put, void *w, int es, int64_t ws0, int64_t ws1, const void *cols, int cs,
                 int64_t cs0, int64_t k, int64_t r0, int64_t r1, void *vals, int64_t vs0) {
    if (es == 2) { if (put) { BY_COLS(put, uint16_t) } else { BY_COLS(take, uint16_t) } }
    if (es == 4) { if (put) { BY_COLS(put, uint32_t) } else { BY_COLS(take, uint32_t) } }
    if (es == 8) { if (put) { BY_COLS(put, uint64_t) } else { BY_COLS(take, uint64_t) } }
    return -1;
}
"""

_I64 = ctypes.c_int64
_LIBRARY: ctypes.CDLL | None = None
_TRIED = False
_GUARD = threading.Lock()


def _build(folder: Path) -> Path | None:
    """The compiled library in ``folder`` (built now if missing), or None without a compiler.

    Named by a hash of the source, compiler and platform; written to a temporary name and
    renamed, so processes building at once never load half a file."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    key = hashlib.sha256(f"{_SOURCE}|{compiler}|{platform.platform()}".encode()).hexdigest()[:16]
    target = folder / f"mlprune_move-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source, built = Path(tmp) / "move.c", Path(tmp) / "move.so"
        source.write_text(_SOURCE)
        # no -march=native: a cache folder may be shared by machines of different CPUs, and
        # scattered single-element moves gain nothing from wider vectors
        result = subprocess.run([compiler, "-O3", "-funroll-loops", "-shared", "-fPIC", "-o", str(built), str(source)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0 or not built.is_file():
            return None
        os.replace(built, target)
    return target


def _library() -> ctypes.CDLL | None:
    """The compiled moves, built on first use; None where they cannot be (then never retried)."""
    global _LIBRARY, _TRIED
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    if _TRIED:  # every call after the first: no lock on the mask moves' path
        return _LIBRARY
    with _GUARD:
        if not _TRIED:
            try:
                path = _build(cache_dir() / "kernels")
                if path is not None:
                    lib = ctypes.CDLL(str(path))
                    lib.mlprune_move.restype = ctypes.c_int
                    lib.mlprune_move.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, _I64, _I64,
                                                 ctypes.c_void_p, ctypes.c_int, _I64, _I64, _I64, _I64,
                                                 ctypes.c_void_p, _I64]
                    _LIBRARY = lib
            except (OSError, subprocess.SubprocessError):
                _LIBRARY = None  # no compiler that works here: the torch paths serve
            finally:
                _TRIED = True  # only now: a lock-free reader then sees the library as well
        return _LIBRARY


def available() -> bool:
    """Whether the compiled moves can run here (builds them on first call)."""
    return _library() is not None


def _move(put: bool, weight: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
          r0: int, r1: int) -> bool:
    lib = _library()
    if (lib is None or weight.device.type != "cpu" or cols.device.type != "cpu"
            or values.device.type != "cpu" or values.dtype != weight.dtype
            or cols.dtype not in (torch.int16, torch.int32, torch.int64)
            or cols.dim() != 2 or values.shape != cols.shape
            or (cols.shape[1] > 1 and (cols.stride(1) != 1 or values.stride(1) != 1))):
        return False
    if not 0 <= r0 <= r1 <= cols.shape[0]:
        raise ValueError(f"rows {r0}..{r1} are outside 0..{cols.shape[0]}")
    if r0 == r1 or cols.shape[1] == 0:
        return True
    done = lib.mlprune_move(int(put), weight.data_ptr(), weight.element_size(), weight.stride(0),
                            weight.stride(1), cols.data_ptr(), cols.element_size(), cols.stride(0),
                            cols.shape[1], r0, r1, values.data_ptr(), values.stride(0))
    return done == 0


def take(weight: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, r0: int, r1: int) -> bool:
    """For rows ``r0``..``r1``: ``values[r, j] = weight[r, cols[r, j]]``, then zero those weights.

    ``weight`` [out, in] (any strides), ``cols`` [out, k] integers and ``values`` [out, k] of the
    weight's dtype, both with unit column stride. Columns must be in range (the caller checks).
    Returns False, changing nothing, where the compiled path cannot run."""
    return _move(False, weight, cols, values, r0, r1)


def put(weight: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, r0: int, r1: int) -> bool:
    """For rows ``r0``..``r1``: ``weight[r, cols[r, j]] = values[r, j]`` (the inverse of :func:`take`)."""
    return _move(True, weight, cols, values, r0, r1)


# --------------------------------------------------------------------------- output head

_FEW_ROWS = 16  # up to here a matmul with the head is a decoding step's (batch x 1 position)
_HEAD_MIN = 1 << 24  # weights: only a vocabulary-sized head (Gemma 3 270M: 168M) gains
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_GUARD = threading.Lock()


def helper_pool(threads: int) -> ThreadPoolExecutor:
    """Helper threads shared by mlprune's CPU work (at least ``threads``; made on first use).
    Torch ops release the GIL, so work split over them runs in parallel."""
    global _POOL, _POOL_SIZE
    with _POOL_GUARD:
        if _POOL is None or _POOL_SIZE < threads:
            _POOL_SIZE = max(threads, 1)
            _POOL = ThreadPoolExecutor(_POOL_SIZE, "mlprune-helper")
        return _POOL


def _split_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for one row, its output split over torch's threads (each a GEMV on
    its own rows of ``weight``; the same kernel per element, so the same bits)."""
    threads = torch.get_num_threads()
    out = torch.empty(1, weight.shape[0], dtype=x.dtype)
    bounds = [weight.shape[0] * i // threads for i in range(threads + 1)]
    inference = torch.is_inference_mode_enabled()

    def rows(a: int, b: int) -> None:
        # grad and inference modes are per thread: the helpers take the caller's
        with torch.inference_mode(inference), torch.no_grad():
            torch.mm(x, weight[a:b].T, out=out[:, a:b])

    pool = helper_pool(threads - 1)
    futures = [pool.submit(rows, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    try:
        rows(0, bounds[1])
    finally:
        for f in futures:
            f.result()
    return out


class WeightMajorHead(nn.Linear):
    """An ``nn.Linear`` output head whose few-row fp32 CPU matmuls take MKL's fast forms
    (module docstring); any other call is ``nn.Linear``'s. Made by :func:`speed_up_head`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // max(x.shape[-1], 1)
        if (w.device.type != "cpu" or x.device.type != "cpu" or w.dtype != torch.float32
                or x.dtype != torch.float32 or not 0 < rows <= _FEW_ROWS):
            return F.linear(x, w, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows > 1:
            out = torch.mm(w, flat.T).T
        elif torch.get_num_threads() > 1 and not (torch.is_grad_enabled() and w.requires_grad):
            out = _split_gemv(flat, w)
        else:
            return F.linear(x, w, self.bias)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], w.shape[0])


def speed_up_head(model: nn.Module) -> bool:
    """Make a CPU model's vocabulary-sized ``nn.Linear`` output head a :class:`WeightMajorHead`
    (the same module and parameters, tied or not; only its forward changes). False, changing
    nothing, for other heads, devices, or a head an offload hook manages."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (type(head) is not nn.Linear or head.weight.device.type != "cpu"
            or head.weight.numel() < _HEAD_MIN or hasattr(head, "_hf_hook")):
        return False
    head.__class__ = WeightMajorHead  # in place: hooks, ties and state-dict names all stay
    return True
