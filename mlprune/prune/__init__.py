"""Pruning: scores -> ranks (computed once) -> masks at any sparsity and pattern -> apply/restore.

A :class:`Ranking` scores every weight of the selected modules (``wanda``, ``ratio``,
``m-wanda``, ``magnitude``, ``random``; see :mod:`~mlprune.prune.ranking`) and keeps each row's
column order, so a :class:`MaskSet` at a new sparsity or N:M pattern is a slice of it, with no
pass over data. Applying masks zeroes the pruned weights in place and keeps only their values
(to put them back): no second copy of the model. What each model has applied now is kept in
one registry (``REGISTRY``, read with ``applied_masks(model)``), beside the lock that guards it.

Offloaded models (loaded with a device map; weights on the CPU or disk, filled by accelerate's
hooks for each forward) work the same: scores read each module's weights inside
:func:`~mlprune.models.onloaded`, and masks on an offloaded module zero its pruned columns as
the hook reads them (the offloaded copy stays dense, so restoring is dropping the mask).
Sequential calibration holds one decoder layer on the device at a time, and can save each
finished layer to a folder and resume from it (:class:`LayerCheckpoint`); so can a ranking.

One module a job, each importing only those above it in this list:

    masks       MaskSet, N:M patterns, mask files (atomic, checked on load), column checks
    bands       moving pruned values: zero a band of columns, saving it; put it back; buffers
    checkpoint  LayerCheckpoint: a run or a ranking saved layer by layer; run keys
    ranking     modules to prune, protected columns, scores, Ranking, OWL/CWL allocations
    apply       apply_masks / restore / pruned, the registry and lock, offloaded modules
    sequential  sequential calibration: each layer's statistics with the layers before pruned

Import from ``mlprune.prune`` itself: it holds every name, and setting one here (as a test's
monkeypatch does) reaches the module that uses it.
"""

from __future__ import annotations

from safetensors.torch import save_file

from mlprune import patchable_package
from mlprune.prune import apply, bands, checkpoint, masks, ranking, sequential
from mlprune.prune.apply import (
    REGISTRY,
    AppliedMasks,
    MaskRegistry,
    PrunedWeights,
    applied_masks,
    apply_masks,
    model_lock,
    pruned,
    restore,
)
from mlprune.prune.bands import _BLOCK, _put_back_band
from mlprune.prune.checkpoint import LayerCheckpoint, run_key
from mlprune.prune.masks import MaskSet, Pattern, check_mask_set, check_sparsity
from mlprune.prune.ranking import (
    METHODS,
    Ranking,
    _lowest_in_groups,
    allocate,
    outlier_shares,
    protected_columns,
    rank_modules,
    residual_input_site,
    row_order,
    scores,
    select_modules,
)
from mlprune.prune.sequential import (
    SequentialRun,
    sequential_run,
    sequential_stats,
    sequential_stats_and_masks,
)
from mlprune.spec import MODES  # the spec's vocabulary, re-exported where it always was

__all__ = [
    "METHODS", "MODES", "REGISTRY", "AppliedMasks", "LayerCheckpoint", "MaskRegistry",
    "MaskSet", "Pattern", "PrunedWeights", "Ranking", "SequentialRun", "allocate",
    "applied_masks", "apply_masks", "check_mask_set", "check_sparsity", "model_lock",
    "outlier_shares", "protected_columns", "pruned", "rank_modules", "residual_input_site",
    "restore", "row_order", "run_key", "scores", "select_modules", "sequential_run",
    "sequential_stats", "sequential_stats_and_masks",
    # private, but imported or patched by name in tests
    "_BLOCK", "_lowest_in_groups", "_put_back_band", "save_file",
]

patchable_package(__name__, (masks, bands, checkpoint, ranking, apply, sequential))
