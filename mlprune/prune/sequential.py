"""Sequential calibration: layer by layer, each layer's statistics taken with the layers
before it already pruned, as Wanda takes them.

:func:`sequential_run` pushes the calibration prompts through the model one decoder layer at
a time (:class:`~mlprune.capture.LayerRunner`): it collects a layer's input statistics, ranks
and prunes that layer (growing one :class:`~mlprune.prune.apply.AppliedMasks`), then pushes the
cached inputs through it pruned, and leaves the model dense at the end. Offloaded models hold
one decoder layer on the device at a time; with a checkpoint folder each finished layer is
saved (:class:`~mlprune.prune.checkpoint.LayerCheckpoint`) and a stopped run resumes there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.allocation import Allocation
from mlprune.capture import ActivationStats, LayerRunner, padding_side
from mlprune.models import decoder_layers, linear_modules, onloaded
from mlprune.mwanda import MWanda
from mlprune.prompts import PromptSet
from mlprune.prune.apply import AppliedMasks, apply_masks, model_lock, restore
from mlprune.prune.checkpoint import LayerCheckpoint, mwanda_key
from mlprune.prune.masks import MaskSet, Pattern
from mlprune.prune.ranking import rank_modules


def _with_inputs(dense: ActivationStats, sqnorms: list[dict[str, torch.Tensor]],
                 active: list[dict[str, torch.Tensor]], tokens: list[int],
                 meta: dict | None = None) -> ActivationStats:
    """``dense`` with the module statistics of a sequential pass: one table per part of its
    mix (one for a single set), combined with the mix's weights."""
    parts = dense.parts or [(dense.meta.get("prompts", "calibration"), 1.0, dense)]
    stats = [ActivationStats(p.hidden_norms, sq, n, p.n_prompts, p.meta, p.embed_norms,
                             p.final_norms, act)
             for (_, _, p), sq, act, n in zip(parts, sqnorms, active, tokens)]
    if not dense.parts:
        stats[0].meta = meta if meta is not None else dense.meta
        return stats[0]
    return ActivationStats.combine(stats, [w for _, w, _ in parts], [n for n, _, _ in parts],
                                   meta=meta if meta is not None else dense.meta)


def sequential_stats(model: nn.Module, tokenizer, texts: PromptSet | list[str],
                     dense: ActivationStats, **options: Any) -> ActivationStats:
    """Statistics as Wanda takes them: layer l's inputs with layers < l already pruned.

    ``options`` are :func:`sequential_run`'s (``method`` and ``sparsity`` required). The
    model is left dense. The result ranks like any stats; its masks are exact at the
    sparsity and pattern it was taken with, and an approximation at others.
    """
    return sequential_run(model, tokenizer, texts, dense, **options).stats


def sequential_stats_and_masks(model: nn.Module, tokenizer, texts: PromptSet | list[str],
                               dense: ActivationStats, **options: Any
                               ) -> tuple[ActivationStats, MaskSet]:
    """:func:`sequential_stats` and the masks the run applied (:func:`sequential_run`'s
    ``stats`` and ``masks``); ``options`` are :func:`sequential_run`'s."""
    run = sequential_run(model, tokenizer, texts, dense, **options)
    return run.stats, run.masks


@dataclass
class SequentialRun:
    """What a sequential pass gives: the calibration set's statistics as each layer saw them,
    the one mask set it grew, and the second set's statistics (the ratio method's), replayed
    through the pruned layers too when its prompts were given, else as given (dense)."""

    stats: ActivationStats
    masks: MaskSet
    other: ActivationStats | None = None


def sequential_run(
        model: nn.Module, tokenizer, texts: PromptSet | list[str], dense: ActivationStats, *,
        method: str, sparsity: float, pattern: str | Pattern = "unstructured",
        other: ActivationStats | None = None, invert: bool = False,
        protect: dict[str, list[int]] | None = None, modules: list[str] | None = None,
        seed: int = 0, batch_size: int = 8, pad_to: int | None = None,
        pad_side: str | None = None, allocation: Allocation | None = None,
        mwanda: MWanda | None = None, checkpoint_dir: str | Path | None = None,
        other_prompts: PromptSet | list[str] | None = None,
        progress: Progress = no_progress) -> SequentialRun:
    """:func:`sequential_stats`, the one mask set it grew layer by layer (every selected
    module, each pruned at ``sparsity``/``pattern`` from the statistics it saw, or at its
    layer's share of ``sparsity`` under an ``allocation``, which :func:`allocate` computes
    from the dense statistics before the pass), and the second set's statistics. ``progress``
    is told "layer i/n" as each layer is done.

    With ``other_prompts`` (the prompts ``other`` was captured on), the second set is replayed
    beside the first, as the authors' ratio variant runs both sets through each pruned layer
    (prune_mt.py, layerwrapper.py): layer l's ``other`` statistics are then taken with layers
    < l pruned too, and layer l is ranked on both. Without, ``other`` stays as given.

    The run starts from the dense model (masks applied before are restored first) and applies
    one :class:`AppliedMasks` that each layer extends with its own masks, so only that layer's
    weights are touched; at the end, or on any error or Ctrl-C, the model is dense again.

    Each layer runs held by :func:`~mlprune.models.onloaded`: for an offloaded model, one
    decoder layer's weights are on the device at a time (filled once for its statistics, its
    ranking and pushing the cached inputs through it pruned), as llm-compressor's sequential
    pipeline runs. With ``checkpoint_dir``, each finished layer's statistics and masks are
    saved there (:class:`LayerCheckpoint`), and a run given the same folder skips the layers
    it finds: their saved masks are applied and the cached inputs pushed through them, so it
    goes on from the first layer missing with the statistics an uninterrupted run has.
    """
    infos = linear_modules(model)
    names = modules or list(infos)
    replay = other_prompts is not None and other is not None
    # a mix is collected per part and combined with its weights after every layer
    sets = [_SequentialSet(dense)] + ([_SequentialSet(other)] if replay else [])
    checkpoint = None if checkpoint_dir is None else _run_checkpoint(
        checkpoint_dir, tokenizer, texts, dense, other, other_prompts if replay else None, {
            "method": method, "sparsity": sparsity, "pattern": str(Pattern.parse(pattern)),
            "invert": invert, "protect": protect, "modules": names, "seed": seed,
            "batch_size": batch_size, "pad_to": pad_to, "mwanda": mwanda_key(mwanda),
            "allocation": allocation.to_dict() if allocation is not None else None}, pad_side)

    def rank(here: list[str]) -> MaskSet:
        """One layer's masks, ranked on the statistics its inputs gave (layers < l pruned)."""
        first = sets[0].partial()
        ranking = rank_modules(model, first, method=method,
                               other=sets[1].partial() if replay else other, invert=invert,
                               protect=protect, modules=here, seed=seed,
                               allocation=allocation, mwanda=mwanda)
        return ranking.masks(sparsity, pattern)

    run = _Pass(model, sets, checkpoint, rank)
    with model_lock(model):
        restore(model)
        for one, prompts in zip(sets, (texts, other_prompts)):
            one.runner = LayerRunner(model, tokenizer, prompts, batch_size, pad_to,
                                     pad_side=pad_side)
            if one.runner.groups.count != len(one.parts):
                raise MlpruneError("The prompts of the sequential pass are not the parts of "
                                   "the calibration mix its statistics were taken on.")
        try:
            run.layers([[n for n in names if infos[n].layer == layer]
                        for layer in range(dense.n_layers)], progress)
        finally:
            if run.applied is not None:
                run.applied.restore()
    return _outcome(run, dense, other, sparsity, pattern)


def _run_checkpoint(folder: str | Path, tokenizer, texts: PromptSet | list[str],
                    dense: ActivationStats, other: ActivationStats | None,
                    other_prompts: PromptSet | list[str] | None, settings: dict,
                    pad_side: str | None) -> LayerCheckpoint:
    """The checkpoint of a sequential run with these settings (``other_prompts``: the second
    set's prompts, when it is replayed)."""
    if settings["pad_to"] is not None and padding_side(tokenizer, pad_side) == "left":
        settings["pad_side"] = "left"  # (right-padded runs keep the key they had)
    if other_prompts is not None:
        settings["other_prompts"] = hashlib.sha256("\x00".join(
            other_prompts.texts if isinstance(other_prompts, PromptSet) else other_prompts
        ).encode()).hexdigest()
    return LayerCheckpoint.for_run(folder, settings, dense, other, texts, dense.n_layers)


class _Pass:
    """A sequential pass under way: its prompt sets, its checkpoint, how it ranks a layer, and
    the one mask set it grows (held here as soon as it is applied, so that whatever stops the
    pass finds it to restore)."""

    def __init__(self, model: nn.Module, sets: list[_SequentialSet],
                 checkpoint: LayerCheckpoint | None, rank: Callable[[list[str]], MaskSet]):
        self.model, self.sets, self.checkpoint, self.rank = model, sets, checkpoint, rank
        self.replay = len(sets) > 1
        self.applied: AppliedMasks | None = None

    def layers(self, modules: list[list[str]], progress: Progress) -> None:
        """Run every decoder layer in turn (``modules[l]``: layer l's selected modules), each
        held on the device by :func:`~mlprune.models.onloaded`."""
        blocks = decoder_layers(self.model)
        n_layers = len(modules)
        for layer, here in enumerate(modules):
            with onloaded(blocks[layer]):
                self.layer(layer, here, last=layer == n_layers - 1)
            progress(f"layer {layer + 1}/{n_layers}", (layer + 1) / n_layers)

    def layer(self, layer: int, here: list[str], last: bool) -> None:
        """One layer: its statistics (saved, or collected from its inputs), its masks (saved,
        or ranked), saved when new, applied; then its inputs pushed through it pruned."""
        saved, saved_other = self.saved(layer)
        found: list[tuple[dict, dict]] = []
        for k, one in enumerate(self.sets):
            if saved is not None:
                sq, act = saved[:2] if k == 0 else saved_other
            else:
                sq, act = one.runner.collect(layer, here) if here else ({}, {})
            one.update(sq, act)
            found.append((sq, act))
        masks = saved[2] if saved is not None else self.rank(here) if here else None
        if self.checkpoint is not None and saved is None:
            self.checkpoint.write(layer, *found[0], masks,
                                  other=found[1] if self.replay else None)
        if masks is not None:
            if self.applied is None:
                self.applied = apply_masks(self.model, masks)
            else:
                self.applied.extend(masks)
        if not last:  # the last layer's output feeds no statistic
            for one in self.sets:
                one.runner.advance(layer)

    def saved(self, layer: int) -> tuple[tuple | None, tuple | None]:
        """The layer's saved statistics and masks and its second set's statistics, each None
        when not saved (a layer saved without the second set it now needs: both None)."""
        saved = self.checkpoint.read(layer) if self.checkpoint is not None else None
        saved_other = self.checkpoint.read_other(layer) if saved is not None and self.replay \
            else None
        if self.replay and saved is not None and saved_other is None:
            saved = None  # a layer saved without the second set: compute it again
        return saved, saved_other


def _outcome(run: _Pass, dense: ActivationStats, other: ActivationStats | None,
             sparsity: float, pattern: str | Pattern) -> SequentialRun:
    """What a finished pass gives: its statistics, marked as sequential, and its masks."""
    done = {"mode": "sequential", "sequential_sparsity": sparsity,
            "sequential_pattern": str(Pattern.parse(pattern))}
    stats = run.sets[0].partial(dict(dense.meta, **done))
    other_out = run.sets[1].partial(dict(other.meta, **done)) if run.replay else other
    if run.applied is None:  # no selected module in the stats' layers
        pat = Pattern.parse(pattern)
        return SequentialRun(stats, MaskSet({}, {}, pat.n / pat.m if pat.structured
                                            else sparsity, str(pat)), other_out)
    return SequentialRun(stats, run.applied.masks, other_out)


class _SequentialSet:
    """One prompt set of a sequential pass: its dense statistics, its runner, and its module
    statistics per part of its mix (one part for a single set), updated layer by layer."""

    def __init__(self, dense: ActivationStats):
        self.dense = dense
        self.parts = dense.parts or [(dense.meta.get("prompts", "calibration"), 1.0, dense)]
        self.sqnorms = [dict(p.input_sqnorms) for _, _, p in self.parts]
        self.active = [dict(p.active_counts) for _, _, p in self.parts]
        self.runner: LayerRunner | None = None

    def update(self, sq: dict[str, torch.Tensor], act: dict[str, torch.Tensor]) -> None:
        """Take one layer's [groups, in] module statistics."""
        for g in range(len(self.parts)):
            self.sqnorms[g].update({n: v[g] for n, v in sq.items()})
            self.active[g].update({n: v[g] for n, v in act.items()})

    def partial(self, meta: dict | None = None) -> ActivationStats:
        """The dense statistics with every module statistic taken so far."""
        return _with_inputs(self.dense, self.sqnorms, self.active, self.runner.group_tokens,
                            meta)
