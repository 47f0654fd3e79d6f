"""Applying and restoring masks, and the registry of what each model has applied now.

:func:`apply_masks` zeroes a :class:`~mlprune.prune.masks.MaskSet`'s weights in place and keeps
only the pruned values (no second copy of the model); ``.restore()`` puts them back bit for
bit. A model holds one set at a time: a new set replaces the last by touching only what
differs (a slider move zeroes or puts back a few columns). :data:`REGISTRY` records which set
each model has applied, beside the lock whoever changes it holds; :func:`pruned` runs a block
on the pruned (or checked dense) model under that lock. An offloaded module is never written:
its accelerate hook reads the weights through :class:`PrunedWeights`. The values themselves
are moved by :mod:`~mlprune.prune.bands`.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mlprune import MlpruneError
from mlprune.models import LinearInfo, linear_modules, offload_hook
from mlprune.prune.bands import _Band, _put_back_tasks, _run_parallel, _value_slots, _zero_band
from mlprune.prune.masks import MaskSet, _check_columns


@dataclass
class _ModelEntry:
    """What the registry knows of one model: its lock, the masks applied to it now, and a
    value buffer kept for the next apply."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    applied: AppliedMasks | None = None
    # (device, dtype) -> the value buffers the last restored set left, for the next apply
    spare: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)


class MaskRegistry:
    """Which masks each model has applied now, and the lock whoever changes them holds.

    Keyed weakly by the model object: a model that is dropped is garbage-collected and leaves
    the registry (nothing in an entry refers back to its model, and no id can be reused).
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[nn.Module, _ModelEntry] = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()

    def entry(self, model: nn.Module) -> _ModelEntry:
        """The model's entry, made on first use."""
        with self._guard:
            found = self._entries.get(model)
            if found is None:
                found = self._entries[model] = _ModelEntry()
            return found

    def applied(self, model: nn.Module) -> AppliedMasks | None:
        """The masks applied to this model now, or None when it is dense."""
        with self._guard:
            found = self._entries.get(model)
            return found.applied if found else None

    def __len__(self) -> int:
        """How many live models the registry holds."""
        with self._guard:
            return len(self._entries)


REGISTRY = MaskRegistry()


def model_lock(model: nn.Module) -> threading.RLock:
    """One lock per model object: whoever applies masks holds it until they are restored."""
    return REGISTRY.entry(model).lock


def applied_masks(model: nn.Module) -> MaskSet | None:
    """The masks applied to this model now (None when it is dense)."""
    applied = REGISTRY.applied(model)
    return applied.masks if applied is not None else None


class AppliedMasks:
    """Masks applied in place; keeps only the pruned values, so restore is exact and cheap.

    Applying to a model that already has masks replaces them (one set at a time, never
    stacked), touching only what differs: a module whose new columns are the old ones plus
    more (or fewer) of the same ranked rows, as a slider move gives, zeroes (or puts back)
    only those. :meth:`extend` grows the applied set by more modules instead.

    An offloaded module keeps nothing: its hook reads the weights through :class:`PrunedWeights`
    (and a copy held now by :func:`~mlprune.models.onloaded` is zeroed too), so restoring it is
    putting the hook's own weights map back.
    """

    def __init__(self, model: nn.Module, masks: MaskSet):
        self._model = weakref.ref(model)  # the registry holds this object; it must not pin the model
        self.masks = masks
        # module -> (the set's pruned columns [out, k], bands of them with the values they held)
        self._saved: dict[str, tuple[torch.Tensor, list[_Band]]] = {}
        self._buffers: list[torch.Tensor] = []  # whole value buffers, handed on when restored
        # offloaded module -> (its hook, the weights map the hook had before, the columns)
        self._offloaded: dict[str, tuple[object, Mapping, torch.Tensor]] = {}
        # set once restore() begins: a set still registered with it set is a restore that was
        # interrupted, which dense work may finish (pruned(model, None))
        self.restoring = False
        entry = REGISTRY.entry(model)
        previous, entry.applied = entry.applied, self
        try:
            if previous is not None:  # what it holds becomes ours: one set, never stacked
                self._saved, previous._saved = previous._saved, {}
                self._buffers, previous._buffers = previous._buffers, []
                self._offloaded, previous._offloaded = previous._offloaded, {}
            _check_fits(model, masks)
            self._change(model, masks.pruned_cols, entry.spare)
        except BaseException:
            self.restore()
            raise

    @property
    def model(self) -> nn.Module | None:
        """The model these masks are applied to (None once it was garbage-collected)."""
        return self._model()

    def extend(self, more: MaskSet) -> None:
        """Also prune the modules of ``more`` (none of them pruned here yet): the applied set
        becomes ``self.masks.merge(more)``. Only the new modules are touched."""
        model = self._model()
        if model is None or REGISTRY.applied(model) is not self:
            raise MlpruneError("These masks are no longer applied; apply a new set instead.")
        merged = self.masks.merge(more)  # an overlap fails here, before any weight changes
        _check_fits(model, more)
        try:
            self._change(model, merged.pruned_cols, spare=None)
        except BaseException:
            self._put_back(model, [n for n in more.pruned_cols
                                   if n in self._saved or n in self._offloaded])
            raise
        self.masks = merged

    def _change(self, model: nn.Module, wanted: dict[str, torch.Tensor],
                spare: dict[tuple, list[torch.Tensor]] | None) -> None:
        """Make the zeroed positions those of ``wanted``: put back what it no longer prunes,
        then zero (saving first) what it newly prunes; ``spare`` may lend value buffers."""
        infos = linear_modules(model)
        for name, cols in wanted.items():
            _check_columns(name, cols, infos[name].weight)
        hooks = {n: offload_hook(infos[n].module, paused=True) for n in wanted}
        offloaded = {n: c for n, c in wanted.items() if hooks[n] is not None}
        wanted = {n: c for n, c in wanted.items() if hooks[n] is None}
        self._put_back(model, [n for n, (_, _, had) in self._offloaded.items()
                               if offloaded.get(n) is not had])
        with torch.no_grad():
            for name, cols in offloaded.items():
                if name not in self._offloaded:
                    self._offload(infos[name], hooks[name], cols)
        put_back, new = [], []  # (weight, band, first column to put back) / (name, cols, j0)
        gone = [n for n in self._saved if n not in wanted]
        for name in gone:
            put_back += [(infos[name].weight, band, 0) for band in self._saved[name][1]]
        # modules whose new columns are the old ones' rows, more or fewer (a slider move)
        resized = {n for n, c in wanted.items() if n in self._saved and _same_rows(self._saved[n][0], c)}
        for name, cols in wanted.items():
            had, bands = self._saved.get(name, (None, []))
            if name in resized:
                kept = cols.shape[1]
                for band in bands:
                    if band.j1 > kept:
                        put_back.append((infos[name].weight, band, max(kept - band.j0, 0)))
                if kept > had.shape[1]:
                    new.append((name, cols[:, had.shape[1]:], had.shape[1]))
            else:
                put_back += [(infos[name].weight, band, 0) for band in bands]
                new.append((name, cols, 0))
        on_cpu = all(infos[n].weight.device.type == "cpu" for n in [*wanted, *gone])
        _run_parallel(_put_back_tasks(put_back), on_cpu)
        for name in gone:  # forgotten only once put back: an interrupted put-back is redone
            del self._saved[name]
        for name, cols in wanted.items():  # bands now hold only what the wanted set keeps
            bands = self._saved[name][1] if name in resized else []
            self._saved[name] = (cols, [b.narrowed(cols.shape[1]) for b in bands
                                        if b.j0 < cols.shape[1]])
        self._drop_unused_buffers(spare)
        weights = [infos[name].weight for name, _, _ in new]
        slots, buffers = _value_slots(weights, [c.numel() for _, c, _ in new], spare)
        self._buffers += buffers
        zero = []
        for (name, cols, j0), weight, slot in zip(new, weights, slots):
            band = _Band(cols, slot.view(cols.shape), j0)
            self._saved[name][1].append(band)  # recorded before zeroing: restore is exact
            zero.append((lambda w=weight, b=band: _zero_band(w, b), cols.numel()))
        _run_parallel(zero, on_cpu)

    def _offload(self, info: LinearInfo, hook, cols: torch.Tensor) -> None:
        """Masks on an offloaded module: its hook reads the weights through PrunedWeights."""
        self._offloaded[info.name] = (hook, hook.weights_map, cols)
        hook.weights_map = PrunedWeights(hook.weights_map, cols, info.transposed)
        w = info.weight
        if w.device.type != "meta":  # held by onloaded() now: zero that copy too
            w.scatter_(1, cols.to(w.device, torch.long), 0.0)

    def _drop_unused_buffers(self, spare: dict[tuple, list[torch.Tensor]] | None) -> None:
        """Buffers no band uses any more go to ``spare`` for the next apply, or are freed."""
        used = {b.values.untyped_storage().data_ptr()
                for _, bands in self._saved.values() for b in bands}
        for buffer in self._buffers:
            if spare is not None and buffer.untyped_storage().data_ptr() not in used:
                spare.setdefault((buffer.device, buffer.dtype), []).append(buffer)
        self._buffers = [b for b in self._buffers if b.untyped_storage().data_ptr() in used]

    def _put_back(self, model: nn.Module, names: list[str]) -> None:
        infos = linear_modules(model)
        with torch.no_grad():
            for name in [n for n in names if n in self._offloaded]:
                hook, weights_map, _ = self._offloaded.pop(name)
                hook.weights_map = weights_map
                held = infos[name].module.weight
                if held.device.type != "meta":  # held by onloaded() now: refill that copy
                    held.data.copy_(weights_map["weight"])
        names = [n for n in names if n in self._saved]
        _run_parallel(_put_back_tasks([(infos[n].weight, band, 0)
                                       for n in names for band in self._saved[n][1]]),
                      all(infos[n].weight.device.type == "cpu" for n in names))
        for name in names:  # forgotten only once put back: an interrupted put-back is redone
            del self._saved[name]

    def restore(self) -> None:
        """Put every pruned value back: the dense weights, bit for bit. An interrupted restore
        stays registered and is finished by calling this again (each band is put back whole
        before it is forgotten, and putting a value back twice writes the same bits)."""
        self.restoring = True
        model = self._model()
        if model is not None:
            self._put_back(model, list(self._saved) + list(self._offloaded))
            entry = REGISTRY.entry(model)
            if entry.applied is self:
                entry.applied = None
            self._drop_unused_buffers(entry.spare)  # the next apply reuses the buffers
        self._saved.clear()
        self._offloaded.clear()
        self._buffers = []

    def nbytes(self) -> int:
        """Memory held to restore: the pruned values only."""
        return sum(b.values.numel() * b.values.element_size()
                   for _, bands in self._saved.values() for b in bands)


def _check_fits(model: nn.Module, masks: MaskSet) -> None:
    """One sentence, before any weight changes, for masks of a module this model lacks or of
    another width than this model's (masks made for another model)."""
    infos = linear_modules(model)
    for name in masks.pruned_cols:
        info = infos.get(name)
        if info is None:
            raise MlpruneError(f"The masks name {name}, but this model has no module of that name: "
                               "they were made for another model.")
        width = masks.in_features.get(name)
        if width != info.weight.shape[1]:
            raise MlpruneError(f"The masks of {name} were made for {width} inputs, but it has "
                               f"{info.weight.shape[1]}: they were made for another model.")


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are leading columns of the same rows in memory (two sparsities
    of one ranking's row order), so one is the other plus or minus some columns."""
    return (a.shape[0] == b.shape[0] and a.dtype == b.dtype and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride())


class PrunedWeights(Mapping):
    """An offloaded module's weights map as its accelerate hook reads it, with the pruned
    columns of ``weight`` read as zeros: masks on a module whose dense copy lives on the CPU or
    disk and is never written. Reads of a save (``save_pretrained``) go through it too."""

    def __init__(self, weights: Mapping, pruned_cols: torch.Tensor, transposed: bool):
        self.weights, self.pruned_cols, self.transposed = weights, pruned_cols, transposed

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.weights[key]
        if key != "weight":
            return value
        value = value.clone()  # the offloaded copy (maybe a read-only memory map) stays dense
        rows = value.t() if self.transposed else value
        rows.scatter_(1, self.pruned_cols.to(value.device, torch.long), 0.0)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self.weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def apply_masks(model: nn.Module, masks: MaskSet) -> AppliedMasks:
    """Zero the pruned weights in place; call ``.restore()`` on the result to undo."""
    return AppliedMasks(model, masks)


def restore(model: nn.Module) -> None:
    """Undo whatever masks are applied to this model (no-op when dense)."""
    applied = REGISTRY.applied(model)
    if applied is not None:
        applied.restore()


@contextmanager
def pruned(model: nn.Module, masks: MaskSet | None):
    """Run code on the pruned model under the model's lock, restoring it afterwards.

    With ``masks=None`` the block gets the dense model, checked in the registry (the one
    record of what is applied): a restore that was interrupted is finished first; masks
    applied and not being restored (outside a block, or by an outer block of this thread)
    raise, since undoing them would silently turn their owner's work dense."""
    with model_lock(model):
        if masks is None:
            _ensure_dense(model)
            yield model
            return
        try:
            apply_masks(model, masks)
            yield model
        finally:
            restore(model)  # by the registry: also what an interrupt between apply and here left


def _ensure_dense(model: nn.Module) -> None:
    """Make sure no masks are applied to ``model`` (the caller holds its lock)."""
    applied = REGISTRY.applied(model)
    if applied is None:
        return
    if not applied.restoring:
        raise MlpruneError(f"The model has masks applied to {len(applied.masks.pruned_cols)} modules "
                           "outside this dense block; restore them (mlprune.prune.restore(model)) "
                           "before dense work.")
    logging.getLogger("mlprune").warning(
        "mlprune: finishing a restore of masks that was interrupted, before dense work.")
    applied.restore()
    if REGISTRY.applied(model) is not None:  # cannot happen: restore() unregisters last
        raise MlpruneError("The model's masks could not be restored; reload the model.")
