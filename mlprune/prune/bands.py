"""Moving pruned values, fast: zero a band of columns (saving what it held) and put it back.

A :class:`_Band` is some pruned columns of one module and the values they held. Zeroing and
putting back run in blocks of rows, through :mod:`~mlprune.kernels`' compiled moves where they
can run, else torch's index ops, spread over torch's threads (:func:`_run_parallel`), and
record each finished block, so an interrupt leaves a band whose saved rows are exactly those
zeroed. The saved values live in a few shared buffers (:func:`_value_slots`), reused from the
last restored set. :mod:`~mlprune.prune.apply` decides what to move; this module moves it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass

import numpy as np
import torch

from mlprune import kernels


@dataclass
class _Band:
    """Some pruned columns of one module, ``cols`` [out, w] (columns j0 to j0 + w of its set's
    columns), and the values they held [out, w]. Rows below ``rows_done`` are zeroed: a
    failure half-way puts back exactly what was taken, never values not yet read."""

    cols: torch.Tensor
    values: torch.Tensor
    j0: int = 0
    rows_done: int = 0

    @property
    def j1(self) -> int:
        """The set column after this band's last."""
        return self.j0 + self.cols.shape[1]

    def narrowed(self, width: int) -> _Band:
        """This band less its columns from ``width`` (in set columns) on."""
        w = min(self.cols.shape[1], width - self.j0)
        return _Band(self.cols[:, :w], self.values[:, :w], self.j0, self.rows_done)


# Pruned positions go through torch's index ops in blocks of at most this many: under torch's
# grain size (32768), so each op runs on the thread that calls it (the work is spread over
# threads here; OpenMP, on a machine busy with other work, stalls at every op), and a block's
# int64 positions (256 KiB) stay in cache instead of a 400 MB index for a 50% mask.
_BLOCK = 1 << 15
_NATIVE_BLOCK = 1 << 20  # weights per compiled call: few calls, and an interrupt waits < 10 ms


def _column_blocks(cols: torch.Tensor, start: int, buffer: torch.Tensor):
    """Rows ``start``.. of ``cols`` in blocks: (first row, end row, their columns as int64
    [rows, k], in ``buffer``)."""
    out, k = cols.shape
    if k == 0:
        return
    step = max(1, buffer.numel() // k)
    for r0 in range(start, out, step):
        r1 = min(out, r0 + step)
        yield r0, r1, buffer[:(r1 - r0) * k].view(r1 - r0, k).copy_(cols[r0:r1])


def _positions(weight: torch.Tensor, cols: torch.Tensor, start: int, buffer: torch.Tensor):
    """:func:`_column_blocks` as flat int64 positions in the storage of ``weight``."""
    s0, s1 = weight.stride()
    first = weight.storage_offset()
    rows = torch.arange(first, first + cols.shape[0] * s0, s0, dtype=torch.int64,
                        device=buffer.device).unsqueeze(1)  # where each row starts
    for r0, r1, idx in _column_blocks(cols, start, buffer):
        if s1 != 1:  # int64 first (above): a same-dtype add is far faster than a mixed one
            idx.mul_(s1)
        yield r0, r1, idx.add_(rows[r0:r1]).view(-1)


def _storage(weight: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``weight`` as one flat tensor (what positions index)."""
    return weight.as_strided((weight.untyped_storage().nbytes() // weight.element_size(),), (1,), 0)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array of same-sized integers: numpy's indexed write
    is faster than torch's index_fill_, and bits zero any float type alike."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
                  ).numpy()


def _index_buffer(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Room for one block's positions: on one thread, blocks 4x as large (fewer calls; no
    OpenMP team to stall), a whole module on a GPU."""
    if weight.device.type != "cpu":
        return torch.empty(max(weight.numel(), 1), dtype=torch.int64, device=weight.device)
    block = _BLOCK if torch.get_num_threads() > 1 else 4 * _BLOCK
    return torch.empty(max(block, k), dtype=torch.int64)


def _zero_band(weight: torch.Tensor, band: _Band) -> None:
    """Save the band's values, then zero them: in one compiled pass per block of rows where
    :mod:`~mlprune.kernels` can run, else one index_select and one indexed write per block."""
    if _native_blocks(kernels.take, weight, band.cols, band.values, band.rows_done, band):
        return
    flat, buffer = _storage(weight), _index_buffer(weight, band.cols.shape[1])
    cpu = flat.device.type == "cpu"
    flat_bits, index = (_bits(flat), buffer.numpy()) if cpu else (None, None)
    values = band.values.view(-1)  # a new band's values are contiguous
    k = band.cols.shape[1]
    with torch.no_grad():
        for r0, r1, idx in _positions(weight, band.cols, band.rows_done, buffer):
            torch.index_select(flat, 0, idx, out=values[r0 * k:r1 * k])
            if cpu:
                flat_bits[index[:idx.numel()]] = 0
            else:
                flat.index_fill_(0, idx, 0)
            band.rows_done = r1


def _put_back_band(weight: torch.Tensor, band: _Band, first: int) -> None:
    """Write back the band's saved values from its column ``first`` on (rows done only),
    one scatter_ per block of rows (faster here than any flat indexed write)."""
    if first >= band.cols.shape[1] or band.rows_done == 0:
        return
    cols, values = band.cols[:band.rows_done, first:], band.values[:band.rows_done, first:]
    if _native_blocks(kernels.put, weight, cols, values, 0):
        return
    with torch.no_grad():
        for r0, r1, idx in _column_blocks(cols, 0, _index_buffer(weight, cols.shape[1])):
            weight[r0:r1].scatter_(1, idx, values[r0:r1])


def _native_blocks(move: Callable[..., bool], weight: torch.Tensor, cols: torch.Tensor,
                   values: torch.Tensor, start: int, band: _Band | None = None) -> bool:
    """Run a compiled move (:func:`kernels.take` or :func:`kernels.put`) over rows ``start``..
    in blocks of ~1M weights, recording each finished block in ``band.rows_done`` (an
    interrupt lands between blocks). False, with nothing done, where it cannot run."""
    step = max(1, _NATIVE_BLOCK // max(cols.shape[1], 1))
    for r0 in range(start, cols.shape[0], step):
        r1 = min(cols.shape[0], r0 + step)
        if not move(weight, cols, values, r0, r1):
            if r0 == start:
                return False
            raise RuntimeError("a compiled mask move stopped half-way")  # cannot happen: same arguments
        if band is not None:
            band.rows_done = r1
    return True


def _put_back_tasks(items: list[tuple[torch.Tensor, _Band, int]]
                    ) -> list[tuple[Callable[[], None], int]]:
    """(work, size) tasks for :func:`_run_parallel` that put back (weight, band, from column)."""
    return [(lambda w=w, b=b, f=f: _put_back_band(w, b, f), b.rows_done * b.cols.shape[1])
            for w, b, f in items]


def _run_parallel(tasks: list[tuple[Callable[[], None], int]], on_cpu: bool = True) -> None:
    """Run (work, size) tasks on torch's number of threads, split by size (one thread for
    GPU work, whose ops are launched, not run). Waits for every task even when one fails or
    the caller is interrupted: no weight changes after this returns."""
    threads = min(torch.get_num_threads(), len(tasks)) if on_cpu else 1
    if threads <= 1 or sum(size for _, size in tasks) < 4 * _BLOCK:
        for work, _ in tasks:
            work()
        return
    parts: list[list[Callable[[], None]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for work, size in sorted(tasks, key=lambda t: -t[1]):
        i = loads.index(min(loads))
        parts[i].append(work)
        loads[i] += size
    pool = kernels.helper_pool(threads - 1)
    futures = [pool.submit(lambda p=p: [w() for w in p]) for p in parts[1:]]
    try:
        for work in parts[0]:
            work()
    finally:
        wait(futures)
    for f in futures:
        f.result()  # a worker's error, raised here


def _value_slots(weights: list[torch.Tensor], counts: list[int],
                 spare: dict[tuple, list[torch.Tensor]] | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Room for ``counts[i]`` pruned values of ``weights[i]``: slices of a few buffers per
    device and dtype (returned too). Few allocations, freed whole: a tensor per module would
    leave ~100 freed blocks between other allocations, which the C allocator keeps (+0.2 GB
    resident memory on Gemma 3 270M). Buffers in ``spare`` (those of the last restored set)
    are filled first and one new buffer takes the rest: a fresh 200 MB costs ~0.1 s in
    first-touch page faults, as much as the apply itself. Spares left unused are freed."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((w.device, w.dtype), []).append(i)
    slots: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    buffers = []
    for (device, dtype), members in groups.items():
        pool = sorted(spare.pop((device, dtype), []) if spare is not None else [],
                      key=lambda b: -b.numel())
        used, rest = [0] * len(pool), []
        for i in members:
            room = next((b for b, buffer in enumerate(pool)
                         if buffer.numel() - used[b] >= counts[i]), None)
            if room is None:
                rest.append(i)
                continue
            slots[i] = pool[room][used[room]:used[room] + counts[i]]
            used[room] += counts[i]
        buffers += [buffer for buffer, n in zip(pool, used) if n]
        if rest:
            fresh = torch.empty(sum(counts[i] for i in rest), dtype=dtype, device=device)
            buffers.append(fresh)
            for i, piece in zip(rest, fresh.split([counts[i] for i in rest])):
                slots[i] = piece
    return slots, buffers
