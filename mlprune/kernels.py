"""CPU fast paths where torch's own kernels sit far from the memory-bandwidth limit.

- :func:`take` / :func:`put` move the pruned weights of a mask: for each row, save the values
  at its pruned columns and zero them, or write saved values back. Torch needs four passes for
  this (int16 columns -> int64 positions, a gather, an indexed fill, and the positions' own
  memory), which ran at 3-13% of the read bandwidth (bench/live.py). Here it is one pass of a
  few lines of C, compiled on first use with the system C compiler (``CC``, flags allowed)
  and cached in ``MLPRUNE_CACHE``. Without a compiler (or with ``MLPRUNE_NATIVE=0``) both
  return False and the caller keeps its torch path; results are identical, bit for bit
  (tested), and one logged line says why the fast path is off. No Python or torch headers:
  plain C called through ctypes (which releases the GIL, so the callers' threads run it in
  parallel), built in about a second where a torch extension takes a minute. The C
  code checks its own bounds (rows and every column, before anything moves).

  Built at run time, not at install time: the package stays pure Python (one wheel for every
  platform, installable without a compiler, with the torch path as the fallback), and a
  cache folder shared by machines gets a library per compiler and platform. The price is a
  file loaded from a cache, so the cache is guarded: the library is loaded only from a
  folder of this user that no one else can write (others could plant code there that every
  mlprune process, Ray workers included, would run), and only when its sha256 matches the
  one recorded beside it; it is written with fsync and rename, and built again when torn
  (loading a torn library kills the process with SIGBUS), emptied or replaced.

- :func:`few_rows` computes a decoding step's matmuls (1 to 16 rows, fp32): torch sends
  them to MKL's single-threaded GEMV (one row) or a GEMM that packs the whole weight (a few
  rows), far from the bandwidth limit. The C kernel reads each weight row once, split over
  helper threads it keeps (they spin briefly for the next linear of a step, then sleep), and
  picks AVX-512, AVX2 or plain code at load time. :func:`speed_up_decoding` gives a loaded
  CPU model's linears this path (:class:`FewRowLinear`); the kernel reads the weights at
  each call, so masks applied in place are seen at once. bench/decode.py measures it.

- :class:`WeightMajorHead` computes a CPU model's output head (Gemma 3's 262k-token head is
  two thirds of a decoding step's weights) in the forms MKL runs fast: for one row, its
  single-threaded GEMV split over torch's threads (bit-identical, ~1.5-2x); for a few rows,
  ``(W @ x.T).T``, which packs the few rows instead of the whole weight (~2.5x at 8 rows;
  a summation order of its own, as any other batch size has).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlprune import MlpruneError, cache_dir
from mlprune.storage import atomic_save

NATIVE_ENV = "MLPRUNE_NATIVE"  # "0" turns the compiled paths off (tests compare both)

_SOURCE = (Path(__file__).with_name("kernels.c")).read_text()  # the C code, beside this file

_I64 = ctypes.c_int64
_ARGTYPES = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, _I64, _I64, _I64, _I64,
             ctypes.c_void_p, ctypes.c_int, _I64, _I64, _I64, _I64, ctypes.c_void_p, _I64]
_FEW_ROWS_ARGTYPES = [ctypes.c_void_p, _I64, ctypes.c_void_p, _I64, _I64, _I64,
                      ctypes.c_void_p, _I64, _I64, ctypes.c_int]
_LIBRARY: ctypes.CDLL | None = None
_TRIED = False
_GUARD = threading.Lock()
_SAID: set[str] = set()  # reasons already logged: one line each per process

log = logging.getLogger("mlprune")


def _off(reason: str) -> None:
    """Say once per process why the compiled paths are off (results are the same, only slower)."""
    if reason not in _SAID:
        _SAID.add(reason)
        log.warning("mlprune's compiled paths (mask moves, few-row matmuls) are off (%s); "
                    "torch's ops are used instead, with the same results, more slowly.", reason)


def _compiler() -> list[str] | None:
    """The C compiler's command line: ``CC`` (flags allowed, split like a shell would), else
    cc, gcc or clang from the PATH; None, saying why, where there is none."""
    cc = os.environ.get("CC")
    if cc:
        try:
            argv = shlex.split(cc)
        except ValueError as e:
            _off(f"CC={cc!r} cannot be split into a command ({e})")
            return None
        found = shutil.which(argv[0]) if argv else None
        if found is None:
            _off(f"the compiler in CC={cc!r} was not found")
            return None
        return [found, *argv[1:]]
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if found is None:
        _off("no C compiler (cc, gcc or clang) on the PATH; set CC to use one")
        return None
    return [found]


def _unsafe(folder: Path) -> str | None:
    """Why ``folder`` must not hold a library this process loads (None where it may): it
    must be a folder of this user that no one else can write into, in a parent no one else
    can rename it out of. Made (private) here when missing."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)  # private from the start: no window where others may write
        except FileExistsError:
            pass
        st, parent = folder.stat(), folder.parent.stat()
    except OSError as e:
        return f"the cache folder {folder} cannot be made or read ({e})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder"
    if os.name != "posix":  # no owners and modes to check; the hash still guards the file
        return None
    if st.st_uid != os.getuid():
        return f"the cache folder {folder} belongs to another user"
    if st.st_mode & 0o022:
        return (f"the cache folder {folder} is writable by other users, who could plant a "
                f"library there (run: chmod go-w {folder})")
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        return f"{folder.parent} is writable by every user, who could swap {folder.name} out"
    return None


def _recorded(library: Path, record: Path) -> bool:
    """Whether ``library`` is whole and ours: a file of this user, not writable by others,
    whose sha256 is the one recorded beside it when it was built."""
    try:
        st = library.stat()
        data = library.read_bytes()
        want = record.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    if os.name == "posix" and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        return False
    return hashlib.sha256(data).hexdigest() == want


def _write_durably(path: Path, data: bytes, mode: int) -> None:
    """``data`` under ``path``: written to a private temporary name, flushed to disk, then
    renamed, so a reader (or a crash) never meets half a file."""
    atomic_save(path, lambda partial: partial.write_bytes(data), prefix=f".{path.name}.",
                fsync=True, mode=mode)


def _build(folder: Path) -> Path | None:
    """The compiled library in ``folder`` (built now if missing or not as recorded), or None,
    saying why, where it cannot be had safely.

    Named by a hash of the source, compiler and platform. Loaded only from a private folder
    and only when its sha256 matches the one recorded beside it: a file torn by a crash (which
    would kill the process at load with SIGBUS), an empty one or one put there by anyone else
    is built over instead."""
    compiler = _compiler()
    if compiler is None:
        return None
    key = hashlib.sha256(f"{_SOURCE}|{compiler}|{platform.platform()}".encode()).hexdigest()[:16]
    target = folder / f"mlprune_move-{key}.so"
    record = Path(f"{target}.sha256")
    why = _unsafe(folder)
    if why is not None:
        _off(why)
        return None
    if _recorded(target, record):
        return target
    if target.exists():
        log.warning("mlprune: %s is not the library recorded beside it (torn, emptied or "
                    "replaced); rebuilding it.", target)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source, built = Path(tmp) / "move.c", Path(tmp) / "move.so"
        source.write_text(_SOURCE)
        # no -march=native: a cache folder may be shared by machines of different CPUs
        # the few-row matmuls pick AVX-512, AVX2 or plain code at load time (target_clones)
        result = subprocess.run([*compiler, "-O3", "-funroll-loops", "-shared", "-fPIC", "-pthread",
                                 "-o", str(built), str(source)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0 or not built.is_file():
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            _off(f"{shlex.join(compiler)} failed to build them: {first}")
            return None
        data = built.read_bytes()
    # the library first, then its hash: a reader between the two sees a mismatch and builds
    # again, never a library it did not check
    _write_durably(target, data, 0o700)
    _write_durably(record, hashlib.sha256(data).hexdigest().encode(), 0o600)
    try:  # the renames themselves survive a crash only once the folder is flushed too
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # a platform that cannot flush folders: the files are whole, at worst rebuilt
    return target


def _library() -> ctypes.CDLL | None:
    """The compiled moves, built on first use; None where they cannot be (then never retried),
    with one logged line saying why."""
    global _LIBRARY, _TRIED
    if os.environ.get(NATIVE_ENV, "1") == "0":
        _off(f"{NATIVE_ENV}=0")
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
                    lib.mlprune_move.argtypes = _ARGTYPES
                    lib.mlprune_few_rows.restype = ctypes.c_int
                    lib.mlprune_few_rows.argtypes = _FEW_ROWS_ARGTYPES
                    _LIBRARY = lib
            except (OSError, AttributeError, subprocess.SubprocessError) as e:
                # no compiler that works here, or a library without mlprune_move: torch serves
                _off(f"{type(e).__name__}: {e}")
                _LIBRARY = None
            finally:
                _TRIED = True  # only now: a lock-free reader then sees the library as well
        return _LIBRARY


def available() -> bool:
    """Whether the compiled paths can run here (builds them on first call)."""
    return _library() is not None


def _move(put: bool, weight: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
          r0: int, r1: int) -> bool:
    lib = _library()
    if (lib is None or weight.device.type != "cpu" or cols.device.type != "cpu"
            or values.device.type != "cpu" or values.dtype != weight.dtype or weight.dim() != 2
            or cols.dtype not in (torch.int16, torch.int32, torch.int64)
            or cols.dim() != 2 or values.shape != cols.shape
            or (cols.shape[1] > 1 and (cols.stride(1) != 1 or values.stride(1) != 1))):
        return False
    # rows are checked here against the columns (the C code cannot see their length) and in
    # the C code against the weights, with every column, before anything moves
    if not 0 <= r0 <= r1 <= min(cols.shape[0], weight.shape[0]):
        raise MlpruneError(f"Rows {r0} to {r1} of a mask move are outside the {cols.shape[0]} rows "
                           f"of its columns or the {weight.shape[0]} rows of its weights.")
    if r0 == r1 or cols.shape[1] == 0:
        return True
    done = lib.mlprune_move(int(put), weight.data_ptr(), weight.element_size(), weight.stride(0),
                            weight.stride(1), weight.shape[0], weight.shape[1], cols.data_ptr(),
                            cols.element_size(), cols.stride(0), cols.shape[1], r0, r1,
                            values.data_ptr(), values.stride(0))
    if done == -3:
        raise MlpruneError(f"A mask move names a column outside 0 to {weight.shape[1] - 1} in rows "
                           f"{r0} to {r1}; nothing was moved.")
    if done == -2:
        raise MlpruneError(f"Rows {r0} to {r1} of a mask move are outside the weights' "
                           f"{weight.shape[0]} rows; nothing was moved.")
    return done == 0


def take(weight: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, r0: int, r1: int) -> bool:
    """For rows ``r0``..``r1``: ``values[r, j] = weight[r, cols[r, j]]``, then zero those weights.

    ``weight`` [out, in] (any strides), ``cols`` [out, k] integers and ``values`` [out, k] of the
    weight's dtype, both with unit column stride. Rows and columns outside the weight raise
    :class:`~mlprune.MlpruneError` before anything moves (checked here and in the C code).
    Returns False, changing nothing, where the compiled path cannot run."""
    return _move(False, weight, cols, values, r0, r1)


def put(weight: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, r0: int, r1: int) -> bool:
    """For rows ``r0``..``r1``: ``weight[r, cols[r, j]] = values[r, j]`` (the inverse of
    :func:`take`; the same checks)."""
    return _move(True, weight, cols, values, r0, r1)


# --------------------------------------------------------------------------- decoding

_FEW_ROWS = 16  # up to here a matmul is a decoding step's (batch x 1 position)
_HEAD_MIN = 1 << 24  # weights: only a vocabulary-sized head (Gemma 3 270M: 168M) gains
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_GUARD = threading.Lock()


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` for a decoding step's 1 to 16 rows of a CPU fp32 linear, by
    the compiled kernel over torch's threads (each weight row read once); None where it does
    not apply (other shapes, devices or dtypes, autograd, no compiler), and the caller uses
    torch. It reads the weights at each call, so masks applied in place are seen at once.
    Its summation order is its own (bench/decode.py: the same greedy tokens as torch's).
    bf16 stays with torch, whose GEMM was faster from 8 rows here (bench/decode.py)."""
    k = x.shape[-1] if x.dim() else 0
    rows = x.numel() // max(k, 1)
    if (not 0 < rows <= _FEW_ROWS or weight.dim() != 2 or weight.shape[1] != k
            or weight.device.type != "cpu" or x.device.type != "cpu" or x.dtype != weight.dtype
            or weight.dtype != torch.float32 or weight.stride(1) != 1
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return None
    lib = _library()
    if lib is None:
        return None
    flat = x.reshape(rows, k).contiguous()
    n = weight.shape[0]
    out = torch.empty(rows, n, dtype=torch.float32)
    lib.mlprune_few_rows(weight.data_ptr(), weight.stride(0),
                         flat.data_ptr(), k, rows, k, out.data_ptr(), n, n,
                         torch.get_num_threads())
    return out.reshape(*x.shape[:-1], n)


class FewRowLinear(nn.Linear):
    """An ``nn.Linear`` whose decoding-step calls (1 to 16 rows, CPU) run :func:`few_rows`;
    any other call is ``nn.Linear``'s. Made by :func:`speed_up_decoding`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)``, as the Linear it replaces computes it."""
        out = few_rows(x, self.weight)
        if out is None:
            return F.linear(x, self.weight, self.bias)
        return out if self.bias is None else out + self.bias


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
    """An ``nn.Linear`` output head whose few-row CPU matmuls run :func:`few_rows`, or where
    that cannot run, for fp32, MKL's fast forms (module docstring); any other call is
    ``nn.Linear``'s. Made by :func:`speed_up_head`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)``, as the Linear it replaces computes it."""
        w = self.weight
        out = few_rows(x, w)
        if out is not None:
            return out if self.bias is None else out + self.bias
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


def speed_up_decoding(model: nn.Module) -> int:
    """Give a CPU model's decoding fast paths: its head as :func:`speed_up_head` does, and
    every other plain ``nn.Linear`` as a :class:`FewRowLinear` (in place: parameters, hooks,
    ties and state-dict names stay). Modules an offload hook manages keep theirs. Returns
    how many linears changed."""
    changed = int(speed_up_head(model))
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.device.type == "cpu"
                and not hasattr(module, "_hf_hook")):
            module.__class__ = FewRowLinear
            changed += 1
    return changed
