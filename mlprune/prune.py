"""Pruning: scores -> ranks (computed once) -> masks at any sparsity and pattern -> apply/restore.

Scores of W[i, j] (compared within each output row i):
- ``wanda``     |W[i, j]| * ||X_j||, X from the calibration set's ActivationStats;
- ``ratio``     |W[i, j]| * b_j * (b_j / o_j), b from translation and o from a second set
                (e.g. code), so columns specific to the second set lose weight (the paper's
                variant for BLOOM-like models);
- ``m-wanda``   M-Wanda (Choenni and Titov, 2025): Wanda on a calibration mix with the
                languages' spread and the MLP neurons' activation probability in the score
                (:mod:`mlprune.mwanda`, whose CWL part is a layer allocation);
- ``magnitude`` |W[i, j]|;
- ``random``    seeded uniform noise.
``invert`` prunes the highest-scoring weights instead (the paper's ablation). Protected input
columns (large-magnitude features) are ranked above everything and never pruned. A ranking may
carry an :class:`~mlprune.allocation.Allocation` (OWL's layer-adaptive sparsity): its masks then
prune each layer at that layer's share of the target, which stays the overall mean.

Each row's column order is kept as small integers, so a new sparsity is a slice of it and a
new N:M pattern one small sort, with no pass over data. Applying masks keeps only the pruned values
(to put them back): no second copy of the model. What each model has applied now is kept in one
registry (``REGISTRY``, read with ``applied_masks(model)``), beside the lock that guards it.

Offloaded models (loaded with a device map; weights on the CPU or disk, filled by accelerate's
hooks for each forward) work the same: scores read each module's weights inside
:func:`~mlprune.models.onloaded`, and masks on an offloaded module zero its pruned columns as
the hook reads them (the offloaded copy stays dense, so restoring is dropping the mask).
Sequential calibration holds one decoder layer on the device at a time, and can save each
finished layer to a folder and resume from it (:class:`LayerCheckpoint`); so can a ranking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from mlprune import MlpruneError, Progress, kernels, no_progress
from mlprune.allocation import Allocation
from mlprune.capture import ActivationStats, LayerRunner, padding_side
from mlprune.models import LinearInfo, decoder_layers, linear_modules, offload_hook, onloaded
from mlprune.mwanda import MWanda, cwl_importance
from mlprune.mwanda import scores as mwanda_scores
from mlprune.prompts import PromptSet

METHODS = ("wanda", "ratio", "m-wanda", "magnitude", "random")
MODES = ("one-shot", "sequential")


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` or N:M (prune the N lowest of every M consecutive inputs of a row)."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        if isinstance(text, Pattern):
            return text
        text = str(text).strip().lower()
        if text in ("", "unstructured", "none"):
            return cls()
        n, sep, m = text.partition(":")
        if not sep or not n.isdigit() or not m.isdigit():
            raise MlpruneError(f"'{text}' is not a pattern: use unstructured, 2:4 or 4:8.")
        n_, m_ = int(n), int(m)
        if not 0 < n_ < m_:
            raise MlpruneError(f"In the pattern {text}, N must be at least 1 and smaller than M.")
        return cls(n_, m_)

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def check_sparsity(sparsity: float) -> float:
    if not 0 <= float(sparsity) < 1:
        raise MlpruneError(f"Sparsity must be in [0, 1); got {sparsity}.")
    return float(sparsity)


def select_modules(model: nn.Module, layers: tuple[int, int] | str | None = None,
                   blocks: tuple[str, ...] | str | None = None) -> list[str]:
    """Names of the linear modules to prune: a layer range (inclusive) and block kinds."""
    infos = linear_modules(model)
    n_layers = max(i.layer for i in infos.values()) + 1
    if isinstance(layers, str):
        lo, _, hi = layers.partition("-")
        try:
            layers = (int(lo), int(hi or lo))
        except ValueError as e:
            raise MlpruneError(f"'{layers}' is not a layer range; write it as 0-11.") from e
    lo, hi = layers or (0, n_layers - 1)
    if not 0 <= lo <= hi < n_layers:
        raise MlpruneError(f"Layer range {lo}-{hi} is outside this model's layers 0-{n_layers - 1}.")
    if isinstance(blocks, str):
        blocks = tuple(b.strip() for b in blocks.split(",") if b.strip())
    blocks = tuple(blocks or ("attn", "mlp", "other"))
    unknown = set(blocks) - {"attn", "mlp", "other"}
    if unknown:
        raise MlpruneError(f"Unknown module kind {', '.join(sorted(unknown))}: use attn and/or mlp.")
    names = [n for n, i in infos.items() if lo <= i.layer <= hi and i.block in blocks]
    if not names:
        raise MlpruneError("No linear modules match that layer range and module kind.")
    return names


def residual_input_site(layer: int) -> str:
    """The residual-stream site a module of this layer reads: the embedding output for layer 0,
    else the previous layer's output."""
    return "embed" if layer == 0 else f"layers.{layer - 1}.resid_post"


def protected_columns(model: nn.Module, dims_by_site: dict[str, list[int]] | None,
                      names: list[str]) -> dict[str, torch.Tensor]:
    """Input columns never to prune: a module reading the residual stream entering layer l
    protects the dimensions detected at that site (:func:`residual_input_site`)."""
    infos = linear_modules(model)
    out = {}
    for name in names:
        info = infos[name]
        cols = torch.zeros(info.in_features, dtype=torch.bool)
        if dims_by_site and info.reads_residual:
            dims = dims_by_site.get(residual_input_site(info.layer), [])
            cols[[d for d in dims if d < info.in_features]] = True
        out[name] = cols
    return out


# --------------------------------------------------------------------------- scores and ranks


def scores(info: LinearInfo, method: str, stats: ActivationStats | None = None,
           other: ActivationStats | None = None, seed: int = 0,
           mwanda: MWanda | None = None) -> torch.Tensor:
    """Score of every weight of one module, fp32 [out, in]; low scores are pruned first
    (``mwanda``: the parts of M-Wanda to use, all by default). An offloaded module's weights
    are read inside :func:`~mlprune.models.onloaded`, one module at a time."""
    with onloaded(info.module):
        return _scores(info, method, stats, other, seed, mwanda)


def _scores(info: LinearInfo, method: str, stats: ActivationStats | None,
            other: ActivationStats | None, seed: int, mwanda: MWanda | None) -> torch.Tensor:
    if method == "m-wanda":
        return mwanda_scores(info, stats, mwanda or MWanda())
    w = info.weight.detach().float().abs()
    if method == "magnitude":
        return w
    if method == "random":
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(info.name.encode()))
        return torch.rand(w.shape, generator=g)
    if stats is None or info.name not in stats.input_sqnorms:
        raise MlpruneError(f"The {method} method needs calibration statistics for {info.name}.")
    base = stats.input_norms(info.name).to(w.device)
    if method == "wanda":
        return w * base
    if method == "ratio":
        if other is None or info.name not in other.input_sqnorms:
            raise MlpruneError("The ratio method needs a second calibration set (e.g. code).")
        other_norms = other.input_norms(info.name).to(w.device).clamp_min(1e-8)
        return w * (base * (base / other_norms))
    raise MlpruneError(f"Unknown method '{method}': use {', '.join(METHODS)}.")


def row_order(score: torch.Tensor, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Input columns of each row in ascending score order (protected columns last), int16/32,
    on the CPU whatever the score's device (a model's rankings are as large as its weights:
    streamed through a GPU layer by layer, they must not pile up there).

    Ties keep column order: the result is ``score.argsort(dim=1, stable=True)``.
    """
    if protected is not None and protected.any():
        score = score.masked_fill(protected.to(score.device).unsqueeze(0), float("inf"))
    n_in = score.shape[1]
    dtype = torch.int16 if n_in <= torch.iinfo(torch.int16).max else torch.int32
    if score.device.type != "cpu" or score.dtype != torch.float32:
        return score.argsort(dim=1, stable=True).to(dtype).cpu()
    order = _stable_argsort_rows(score)
    return torch.from_numpy(order.astype(np.int16 if dtype == torch.int16 else np.int32))


def _stable_argsort_rows(score: torch.Tensor) -> np.ndarray:
    """``score.argsort(dim=1, stable=True)`` for fp32 on CPU, ~2x faster (ranking's main cost).

    Each score becomes one int64 key: its float bits, mapped to an int32 that sorts like the
    float, above its column index. Keys are then unique, so numpy's unstable (SIMD) integer
    sort gives exactly the stable order, with no comparison sort of floats.
    """
    score = (score.detach() + 0.0).contiguous()  # our own copy; -0.0 ties with 0.0 as in a float sort
    if score.isnan().any():  # a float sort puts every NaN last: give them one bit pattern
        score = torch.where(score.isnan(), float("nan"), score)
    bits = score.view(torch.int32)
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats: flip the magnitude bits
    keys = bits.numpy().astype(np.int64)
    keys <<= 32
    keys |= np.arange(score.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    return keys & 0xFFFFFFFF


@dataclass
class Ranking:
    """Ranked scores of the selected modules: masks at any sparsity/pattern, no data pass.

    ``order[name][i]`` lists row i's input columns from lowest to highest score, so the
    columns pruned at sparsity s are simply its first ``int(s * in)`` entries.
    """

    order: dict[str, torch.Tensor]
    protected: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    _nm_cache: dict = field(default_factory=dict, repr=False)

    @property
    def modules(self) -> list[str]:
        return list(self.order)

    def masks(self, sparsity: float, pattern: str | Pattern = "unstructured") -> MaskSet:
        """The pruned columns of every row of every module at this sparsity or N:M pattern
        (with an allocation, each module at its layer's sparsity; unstructured only)."""
        pattern = Pattern.parse(pattern)
        pruned_cols = {}
        if pattern.structured and self.meta.get("allocation"):
            raise MlpruneError(f"Layer-adaptive sparsity ({self.meta['allocation']['kind']}) "
                               f"prunes layers unevenly, which the fixed {pattern} pattern "
                               "cannot: use unstructured sparsity or the uniform allocation.")
        if pattern.structured:
            for name, order in self.order.items():
                if order.shape[1] % pattern.m:
                    raise MlpruneError(
                        f"{pattern} needs input widths divisible by {pattern.m}, but {name} has "
                        f"{order.shape[1]} inputs."
                    )
            for name in self.order:
                pruned_cols[name] = self._nm_columns(name, pattern)
            target = pattern.n / pattern.m
        else:
            target = check_sparsity(sparsity)
            per_module = self.module_sparsities(target)
            for name, order in self.order.items():
                n_in = order.shape[1]
                k = min(int(n_in * per_module[name]), n_in - int(self.protected[name].sum()))
                pruned_cols[name] = order[:, :k]
        meta = dict(self.meta)
        if self.allocation is not None:
            meta["allocation"] = self.allocation.report(target)
        return MaskSet(pruned_cols, {n: o.shape[1] for n, o in self.order.items()}, target,
                       str(pattern), meta, self.protected)

    @property
    def allocation(self) -> Allocation | None:
        """How the target is shared out across layers (None: every layer at the target)."""
        data = self.meta.get("allocation")
        return Allocation.from_dict(data) if data else None

    def module_sparsities(self, target: float) -> dict[str, float]:
        """Each ranked module's sparsity at this overall target: its layer's allocated share,
        or the target itself when the ranking has no allocation."""
        allocation = self.allocation
        if allocation is None:
            return dict.fromkeys(self.order, target)
        return allocation.module_sparsities(target)

    def _nm_columns(self, name: str, pattern: Pattern) -> torch.Tensor:
        """The N lowest-ranked columns of every group of M (cached per module and pattern).

        N:M stays exact: a protected column is ranked last in its group, and is pruned only
        if its group holds more than M - N protected columns (the report counts those)."""
        key = (name, pattern)
        if key not in self._nm_cache:
            self._nm_cache[key] = _lowest_in_groups(self.order[name], pattern.n, pattern.m)
        return self._nm_cache[key]

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (each module's row order and protected columns, JSON
        meta), atomically: a run or a restarted dashboard can reuse the ranking."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, order in self.order.items():
            tensors[f"{_ORDER}{name}"] = order.contiguous()
            if name in self.protected:
                tensors[f"{_PROTECTED}{name}"] = self.protected[name].contiguous()
        header = {"modules": list(self.order), "meta": self.meta}
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={_RANKING: json.dumps(header, allow_nan=False)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Ranking:
        """Read a ranking written by :meth:`save`."""
        tensors, meta = _read_safetensors(path, "ranking")
        try:
            header = json.loads(meta[_RANKING])
            modules = header["modules"]
            order = {n: tensors[f"{_ORDER}{n}"] for n in modules}
            protected = {n: tensors[f"{_PROTECTED}{n}"] for n in modules
                         if f"{_PROTECTED}{n}" in tensors}
        except (KeyError, ValueError, TypeError) as e:
            raise MlpruneError(f"{path} is not an mlprune ranking file: its header is missing "
                               f"or damaged ({e}).") from e
        return cls(order, protected, header.get("meta", {}))


def _lowest_in_groups(order: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row, the n lowest-ranked columns of each group of m, lowest first: [out, groups * n].

    Equal to ``ranks.view(out, groups, m).argsort(-1)[..., :n]`` (plus group offsets), ~2.5x
    faster: an argsort over millions of 4- or 8-element groups is slow, while a partial
    selection sort across m contiguous planes (plane j = the j-th column of every group) is a
    few vectorised min/max passes. Rows go in blocks of ~0.5 M weights, so every pass stays
    in cache and the int64 index the scatter needs is one block's, not the module's.
    """
    out, n_in = order.shape
    groups = n_in // m
    # key = rank, then the column's place j in its group in the low bits: keys compare like
    # ranks (they are unique in a row) and carry j along through the min/max passes; int16
    # when they fit (half the bytes per pass)
    shift = (m - 1).bit_length()
    key_type = torch.int16 if n_in << shift <= 1 << 15 else torch.int32
    rows = max(1, min(out, (1 << 19) // max(n_in, 1)))
    index = torch.empty(rows, n_in, dtype=torch.int64)
    ranks = torch.empty(rows, n_in, dtype=order.dtype)
    count = torch.arange(n_in, dtype=order.dtype).expand(rows, n_in)
    keys = torch.empty(m, rows, groups, dtype=key_type)
    spare = torch.empty(rows, groups, dtype=key_type)
    place = torch.arange(m, dtype=key_type).view(m, 1, 1)
    offsets = torch.arange(0, n_in, m, dtype=key_type)
    cols = torch.empty(out, groups, n, dtype=order.dtype)
    for r0 in range(0, out, rows):
        b = min(out, r0 + rows) - r0
        index[:b].copy_(order[r0:r0 + b])
        ranks[:b].scatter_(1, index[:b], count[:b])  # rank of each column in its row
        block = keys[:, :b]
        block.copy_(ranks[:b].view(b, groups, m).permute(2, 0, 1))
        block.bitwise_left_shift_(shift).bitwise_or_(place)
        planes, free = list(block.unbind(0)), spare[:b]
        for r in range(n):  # after pass r, plane r holds the r-th lowest key of each group
            for j in range(r + 1, m):
                torch.minimum(planes[r], planes[j], out=free)
                torch.maximum(planes[r], planes[j], out=planes[j])
                planes[r], free = free, planes[r]
        for r in range(n):
            cols[r0:r0 + b, :, r] = planes[r].bitwise_and_((1 << shift) - 1).add_(offsets)
    return cols.view(out, -1)


def rank_modules(model: nn.Module, stats: ActivationStats | None = None, *, method: str = "wanda",
                 other: ActivationStats | None = None, invert: bool = False,
                 protect: dict[str, list[int]] | None = None, modules: list[str] | None = None,
                 seed: int = 0, allocation: Allocation | None = None,
                 mwanda: MWanda | None = None, checkpoint_dir: str | Path | None = None,
                 progress: Progress = no_progress) -> Ranking:
    """Score and rank every selected module once (``progress`` is told "module i/n").

    ``allocation`` (from :func:`allocate`) makes the ranking's masks layer-adaptive.
    ``checkpoint_dir``: each decoder layer's row orders are saved there as soon as the layer
    is ranked (:class:`LayerCheckpoint`), and a ranking given the same folder reads the layers
    it finds instead of scoring and sorting them again (a 70B model's ranking is as large as
    its weights and takes minutes)."""
    if method not in METHODS:
        raise MlpruneError(f"Unknown method '{method}': use {', '.join(METHODS)}.")
    infos = linear_modules(model)
    names = modules or list(infos)
    prot = protected_columns(model, protect, names)
    checkpoint = None
    if checkpoint_dir is not None:
        settings = {"ranking": method, "invert": invert, "protect": protect, "modules": names,
                    "seed": seed, "model": getattr(model, "name_or_path", ""),
                    "config": model.config.to_json_string() if hasattr(model, "config") else "",
                    "mwanda": (sorted(mwanda.parts), mwanda.variance_weight, mwanda.prob_weight)
                    if mwanda is not None and method == "m-wanda" else None}
        checkpoint = LayerCheckpoint(Path(checkpoint_dir) / "ranking",
                                     run_key(stats, other, [], settings),
                                     len(decoder_layers(model)), what="ranking")
    order = {}
    done = 0
    for layer, here in _by_layer(model, names).items():
        saved = checkpoint.read_orders(layer, here) if checkpoint is not None else None
        for name in here:
            if saved is not None:
                order[name] = saved[name]
            else:
                s = scores(infos[name], method, stats, other, seed, mwanda)
                order[name] = row_order(-s if invert else s, prot[name])
            done += 1
            progress(f"module {done}/{len(names)}", done / len(names))
        if checkpoint is not None and saved is None:
            checkpoint.write_orders(layer, {n: order[n] for n in here})
    order = {n: order[n] for n in names}  # the selection's order, whatever the layers'
    meta = {"method": method, "invert": invert, "seed": seed,
            "protected_dims": {str(k): v for k, v in (protect or {}).items() if v},
            "calibration": (stats.meta.get("prompts") if stats else None),
            "other": (other.meta.get("prompts") if other else None)}
    if method == "m-wanda":
        mw = mwanda or MWanda()
        meta["mwanda"] = {"parts": sorted(mw.parts), "variance_weight": mw.variance_weight,
                          "prob_weight": mw.prob_weight}
    if allocation is not None:
        meta["allocation"] = allocation.to_dict()
    return Ranking(order, prot, meta)


def _by_layer(model: nn.Module, names: list[str]) -> dict[int, list[str]]:
    infos = linear_modules(model)
    layers: dict[int, list[str]] = {}
    for name in names:
        layers.setdefault(infos[name].layer, []).append(name)
    return layers


def outlier_shares(model: nn.Module, stats: ActivationStats | None = None, *,
                   method: str = "wanda", other: ActivationStats | None = None,
                   modules: list[str] | None = None, threshold: float = 5.0,
                   seed: int = 0, mwanda: MWanda | None = None) -> dict[int, float]:
    """OWL's layerwise outlier distribution D_l: per layer, the share of the selected modules'
    weights whose score exceeds ``threshold`` times the mean score of that layer (OWL's
    ``check_outlier_mean`` on the concatenated scores of a layer's modules)."""
    if threshold <= 0:
        raise MlpruneError(f"The outlier threshold must be above 0; got {threshold}.")
    infos = linear_modules(model)
    shares = {}
    for layer, names in _by_layer(model, modules or list(infos)).items():
        layer_scores = [scores(infos[n], method, stats, other, seed, mwanda) for n in names]
        count = sum(s.numel() for s in layer_scores)
        mean = sum(float(s.double().sum()) for s in layer_scores) / count
        above = sum(int((s > threshold * mean).sum()) for s in layer_scores)
        shares[layer] = above / count
    return shares


def allocate(model: nn.Module, stats: ActivationStats | None = None, *, kind: str = "uniform",
             method: str = "wanda", other: ActivationStats | None = None,
             modules: list[str] | None = None, strength: float = 0.08, threshold: float = 5.0,
             seed: int = 0, mwanda: MWanda | None = None) -> Allocation | None:
    """How to share a target out across the selected modules' layers, from ``stats`` (the
    dense statistics, also in sequential mode): None for ``uniform``; for ``owl``, offsets
    from :func:`outlier_shares` of the method's scores; for ``cwl`` (M-Wanda's), from the
    cross-lingual correlation of the calibration mix's languages
    (:func:`mlprune.mwanda.cwl_importance`)."""
    if kind == "uniform":
        return None
    infos = linear_modules(model)
    names = modules or list(infos)
    if kind == "owl":
        importance = outlier_shares(model, stats, method=method, other=other, modules=names,
                                    threshold=threshold, seed=seed, mwanda=mwanda)
        settings = {"threshold": threshold}
    elif kind == "cwl":
        if stats is None:
            raise MlpruneError("The cwl allocation needs calibration statistics of a mix.")
        importance = cwl_importance(stats, _by_layer(model, names))
        settings = {"correlation": "pearson of log input norms"}
    else:
        raise MlpruneError(f"Unknown allocation '{kind}': use uniform, owl or cwl.")
    return Allocation.from_importance(
        kind, importance, {n: infos[n].layer for n in names},
        {n: infos[n].weight.numel() for n in names}, strength, **settings)


# --------------------------------------------------------------------------- masks


@dataclass
class MaskSet:
    """Which weights are pruned: per module, the pruned input columns of each output row.

    Every row of a module prunes the same number of weights (exact per-row sparsity, exact
    N:M), so ``pruned_cols[name]`` is an [out, k] index tensor; boolean masks derive from it.
    """

    pruned_cols: dict[str, torch.Tensor]
    in_features: dict[str, int]
    target: float
    pattern: str
    meta: dict = field(default_factory=dict)
    protected: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def modules(self) -> list[str]:
        return list(self.pruned_cols)

    def keep(self, name: str) -> torch.Tensor:
        """Boolean keep-mask of one module, (out, in) like ``LinearInfo.weight``; True = kept."""
        cols = self.pruned_cols[name]
        mask = torch.ones(cols.shape[0], self.in_features[name], dtype=torch.bool)
        return mask.scatter_(1, cols.long(), False)

    def sparsity(self) -> dict[str, float]:
        """Sparsity reached per module."""
        return {n: c.shape[1] / self.in_features[n] for n, c in self.pruned_cols.items()}

    def overall_sparsity(self) -> float:
        total = sum(c.shape[0] * self.in_features[n] for n, c in self.pruned_cols.items())
        pruned = sum(c.numel() for c in self.pruned_cols.values())
        return pruned / max(total, 1)

    def protected_pruned(self) -> int:
        """Weights in protected columns that had to be pruned to keep an N:M pattern exact."""
        count = 0
        for name, cols in self.pruned_cols.items():
            prot = self.protected.get(name)
            if prot is not None and prot.any():
                count += int(prot[cols.long()].sum())
        return count

    def merge(self, other: MaskSet) -> MaskSet:
        """One mask set holding the modules of both; they must not share a module."""
        shared = [n for n in self.pruned_cols if n in other.pruned_cols]
        if shared:
            more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
            raise MlpruneError(f"Cannot merge two mask sets that both prune {shared[0]}{more}: "
                               "a module can have one mask only.")
        first = self if self.pruned_cols else other  # an empty set takes the other's target
        if other.pruned_cols and (other.pattern, other.target) != (first.pattern, first.target):
            raise MlpruneError(f"Cannot merge masks of {first.pattern} at {first.target:g} with "
                               f"masks of {other.pattern} at {other.target:g}.")
        return MaskSet({**self.pruned_cols, **other.pruned_cols},
                       {**self.in_features, **other.in_features}, first.target, first.pattern,
                       {**other.meta, **self.meta}, {**self.protected, **other.protected})

    def save(self, path: str | Path) -> None:
        """Masks as safetensors: each module's pruned-column indices and protected columns,
        plus JSON metadata."""
        meta = {"target": str(self.target), "pattern": self.pattern, "meta": json.dumps(self.meta),
                "in_features": json.dumps(self.in_features)}
        tensors = {n: c.contiguous() for n, c in self.pruned_cols.items()}
        tensors.update({f"{_PROTECTED}{n}": p.contiguous() for n, p in self.protected.items()
                        if n in self.pruned_cols})
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        """Read masks written by :meth:`save` (files without protected columns read as none).

        Checked before anything uses them (:func:`check_mask_set`): a file whose columns are
        out of range, repeated in a row or not integers is refused in one sentence."""
        tensors, meta = _read_safetensors(path, "masks")
        try:
            in_features = json.loads(meta["in_features"])
            if not isinstance(in_features, dict):
                raise TypeError("in_features is not a table of modules")
            pruned_cols = {n: tensors[n] for n in in_features}  # in saved (forward) order
            protected = {n: tensors[f"{_PROTECTED}{n}"] for n in in_features
                         if f"{_PROTECTED}{n}" in tensors}
            masks = cls(pruned_cols, in_features, float(meta["target"]), meta["pattern"],
                        json.loads(meta.get("meta", "{}")), protected)
        except (KeyError, ValueError, TypeError) as e:
            raise MlpruneError(f"{path} is not an mlprune masks file: its header is missing "
                               f"or damaged ({e}).") from e
        check_mask_set(masks, f" in {path}")
        return masks


def check_mask_set(masks: MaskSet, source: str = "") -> None:
    """Raise one sentence where ``masks`` cannot be masks of any model: a width that is not a
    positive whole number, a target outside [0, 1], an unknown pattern, protected columns of
    another shape, or pruned columns that are not [rows, k] integers, each in range and named
    once per row (:func:`_check_column_values`). ``source`` (" in file") joins the sentence.
    Whether they fit a model is checked when they are applied."""
    if not isinstance(masks.target, float) or not 0 <= masks.target <= 1:  # NaN fails too
        raise MlpruneError(f"The masks{source} have target {masks.target!r}, outside 0 to 1.")
    Pattern.parse(masks.pattern)
    if not isinstance(masks.meta, dict):
        raise MlpruneError(f"The masks{source} carry a header meta that is not a table.")
    for name, width in masks.in_features.items():
        if type(width) is not int or width <= 0:
            raise MlpruneError(f"The masks of {name}{source} give it {width!r} inputs, not a "
                               "positive whole number.")
        _check_column_values(name, masks.pruned_cols[name], width, source)
        prot = masks.protected.get(name)
        if prot is not None and (prot.dtype != torch.bool or tuple(prot.shape) != (width,)):
            raise MlpruneError(f"The protected columns of {name}{source} are {prot.dtype} of shape "
                               f"{tuple(prot.shape)}, not {width} booleans.")


# Keys in saved files: protected columns of a module (masks and rankings), a module's row
# order (rankings), and the JSON header of a ranking.
_PROTECTED, _ORDER, _RANKING = "protected/", "order/", "mlprune_ranking"


def _read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file; one sentence if missing or damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MlpruneError(f"No {what} file at {path}.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for damaged headers and data
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MlpruneError(f"{path} is not a readable {what} file ({first}).") from e
    return tensors, meta


# --------------------------------------------------------------------------- applied masks


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


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are leading columns of the same rows in memory (two sparsities
    of one ranking's row order), so one is the other plus or minus some columns."""
    return (a.shape[0] == b.shape[0] and a.dtype == b.dtype and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride())


def _check_columns(name: str, cols: torch.Tensor, weight: torch.Tensor) -> None:
    """One sentence, before any weight changes, for columns that do not fit ``weight``: a
    column out of range would name a weight of another row, and one named twice in a row
    would be saved as 0.0 the second time by a take that zeroes as it reads."""
    if cols.dim() != 2 or cols.shape[0] != weight.shape[0]:
        raise MlpruneError(f"The masks of {name} have shape {tuple(cols.shape)}, which does not "
                           f"fit its {weight.shape[0]} output rows.")
    _check_column_values(name, cols, weight.shape[1])


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


_COLUMN_TYPES = (torch.int16, torch.int32, torch.int64)  # what rankings write and kernels move


def _check_column_values(name: str, cols: torch.Tensor, width: int, source: str = "") -> None:
    """One sentence unless ``cols`` is [rows, k] integers, each in 0..width-1 and named once
    per row (any order: a ranking's columns come lowest score first). Read once per tensor
    content (cached), so a slider's next set costs nothing here."""
    if cols.dim() != 2:
        raise MlpruneError(f"The masks of {name}{source} have shape {tuple(cols.shape)}, not "
                           "[rows, pruned columns].")
    if cols.dtype not in _COLUMN_TYPES:
        raise MlpruneError(f"The masks of {name}{source} hold {cols.dtype} values, not column "
                           "numbers (int16, int32 or int64).")
    lo, hi, repeat = _column_facts(cols, width)
    if lo < 0 or hi >= width:
        bad = lo if lo < 0 else hi
        raise MlpruneError(f"The masks of {name}{source} name column {bad}, but it has "
                           f"{width} inputs.")
    if repeat is not None:
        raise MlpruneError(f"The masks of {name}{source} name column {repeat[1]} twice in row "
                           f"{repeat[0]}; each pruned column must be named once.")


# facts about a column tensor (or the tensor it is a view of, such as a ranking's row order),
# read once per content: (its version counter, lowest, highest, first repeat in a row or None)
_COLUMN_FACTS = WeakTensorKeyDictionary()


def _column_facts(cols: torch.Tensor, width: int) -> tuple[int, int, tuple[int, int] | None]:
    """Lowest and highest column of ``cols`` and its first (row, column) named twice in a row,
    or None. A view whose rows are runs of the rows of the tensor it views (a ranking's row
    order cut at a sparsity) takes that tensor's facts, read once for every sparsity."""
    root = cols._base
    if root is not None and _rows_within(cols, root):
        lo, hi, repeat = _tensor_facts(root)
        if lo >= 0 and hi < width and repeat is None:  # true of the rows, so of their runs
            return lo, hi, None
    return _tensor_facts(cols)


def _tensor_facts(t: torch.Tensor) -> tuple[int, int, tuple[int, int] | None]:
    seen = _COLUMN_FACTS.get(t)
    if seen is None or seen[0] != t._version:  # an in-place change bumps the version
        seen = _COLUMN_FACTS[t] = (t._version, *_scan_columns(t))
    return seen[1:]


def _rows_within(cols: torch.Tensor, root: torch.Tensor) -> bool:
    """Whether every row of the view ``cols`` is a run of one row of the contiguous 2-D
    ``root``: then a column is named twice in a row of ``cols`` only if in one of ``root``."""
    if (root.dim() != 2 or cols.dtype != root.dtype or not root.is_contiguous()
            or root.shape[1] == 0 or cols.numel() == 0):
        return False
    n = root.shape[1]
    if (cols.shape[1] > 1 and cols.stride(1) != 1) or (cols.shape[0] > 1 and cols.stride(0) % n):
        return False
    row, col = divmod(cols.storage_offset() - root.storage_offset(), n)
    last = row + (cols.shape[0] - 1) * (cols.stride(0) // n)
    return 0 <= row and last < root.shape[0] and col + cols.shape[1] <= n


def _scan_columns(cols: torch.Tensor) -> tuple[int, int, tuple[int, int] | None]:
    """:func:`_tensor_facts` read from the data: per block of rows, a bitmap of the columns
    seen (~3 ns a column; a row sort where columns are negative or huge)."""
    if cols.dim() != 2 or cols.numel() == 0:
        return (0, -1, None) if cols.numel() == 0 else (*(int(x) for x in torch.aminmax(cols)), None)
    lo, hi = (int(x) for x in torch.aminmax(cols))
    rows, k = cols.shape
    if k < 2:
        return lo, hi, None
    data = cols.cpu().numpy()
    bitmap = 0 <= lo and hi < 1 << 16
    width = hi + 1 if bitmap else 0
    step = max(1, (1 << 20) // max(k, width))
    if bitmap:  # one flat index per block: ~4x faster than np.put_along_axis
        seen = np.empty(step * width, dtype=np.bool_)
        where = np.empty((step, k), dtype=np.intp)
        starts = (np.arange(step, dtype=np.intp) * width)[:, None]
    for r0 in range(0, rows, step):
        block = data[r0:r0 + step]
        if bitmap:
            n = block.shape[0]
            seen[:n * width] = False
            np.add(block, starts[:n], out=where[:n])
            seen[where[:n].reshape(-1)] = True
            bad = np.flatnonzero(np.count_nonzero(seen[:n * width].reshape(n, width), axis=1) != k)
        else:
            ordered = np.sort(block, axis=1)
            bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1))
        if bad.size:
            row = np.sort(block[bad[0]])
            return lo, hi, (r0 + int(bad[0]), int(row[1:][row[1:] == row[:-1]][0]))
    return lo, hi, None


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


# --------------------------------------------------------------------------- sequential


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
                     dense: ActivationStats, *,
                     method: str, sparsity: float, pattern: str | Pattern = "unstructured",
                     other: ActivationStats | None = None, invert: bool = False,
                     protect: dict[str, list[int]] | None = None, modules: list[str] | None = None,
                     seed: int = 0, batch_size: int = 8, pad_to: int | None = None,
                     allocation: Allocation | None = None, mwanda: MWanda | None = None,
                     checkpoint_dir: str | Path | None = None,
                     progress: Progress = no_progress, pad_side: str | None = None,
                     other_prompts: PromptSet | list[str] | None = None) -> ActivationStats:
    """Statistics as Wanda takes them: layer l's inputs with layers < l already pruned.

    The model is left dense. The result ranks like any stats; its masks are exact at the
    sparsity and pattern it was taken with, and an approximation at others.
    (:func:`sequential_run` also returns the masks the run applied and the second set's
    statistics.)
    """
    return sequential_run(
        model, tokenizer, texts, dense, method=method, sparsity=sparsity, pattern=pattern,
        other=other, invert=invert, protect=protect, modules=modules, seed=seed,
        batch_size=batch_size, pad_to=pad_to, pad_side=pad_side, allocation=allocation,
        mwanda=mwanda, checkpoint_dir=checkpoint_dir, other_prompts=other_prompts,
        progress=progress).stats


def sequential_stats_and_masks(
        model: nn.Module, tokenizer, texts: PromptSet | list[str], dense: ActivationStats, *,
        method: str, sparsity: float, pattern: str | Pattern = "unstructured",
        other: ActivationStats | None = None, invert: bool = False,
        protect: dict[str, list[int]] | None = None, modules: list[str] | None = None,
        seed: int = 0, batch_size: int = 8, pad_to: int | None = None,
        allocation: Allocation | None = None, mwanda: MWanda | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: Progress = no_progress, pad_side: str | None = None,
        other_prompts: PromptSet | list[str] | None = None) -> tuple[ActivationStats, MaskSet]:
    """:func:`sequential_stats` and the masks the run applied (:func:`sequential_run`'s
    ``stats`` and ``masks``)."""
    run = sequential_run(
        model, tokenizer, texts, dense, method=method, sparsity=sparsity, pattern=pattern,
        other=other, invert=invert, protect=protect, modules=modules, seed=seed,
        batch_size=batch_size, pad_to=pad_to, pad_side=pad_side, allocation=allocation,
        mwanda=mwanda, checkpoint_dir=checkpoint_dir, other_prompts=other_prompts,
        progress=progress)
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
    n_layers = dense.n_layers
    layers = decoder_layers(model)
    replay = other_prompts is not None and other is not None
    # a mix is collected per part and combined with its weights after every layer
    sets = [_SequentialSet(dense)] + ([_SequentialSet(other)] if replay else [])
    checkpoint = None
    if checkpoint_dir is not None:
        settings = {"method": method, "sparsity": sparsity, "pattern": str(Pattern.parse(pattern)),
                    "invert": invert, "protect": protect, "modules": names, "seed": seed,
                    "batch_size": batch_size, "pad_to": pad_to,
                    "allocation": allocation.to_dict() if allocation is not None else None,
                    "mwanda": (sorted(mwanda.parts), mwanda.variance_weight, mwanda.prob_weight)
                    if mwanda is not None else None}
        if pad_to is not None and padding_side(tokenizer, pad_side) == "left":
            settings["pad_side"] = "left"  # (right-padded runs keep the key they had)
        if replay:
            settings["other_prompts"] = hashlib.sha256("\x00".join(
                other_prompts.texts if isinstance(other_prompts, PromptSet) else other_prompts
            ).encode()).hexdigest()
        checkpoint = LayerCheckpoint(checkpoint_dir, run_key(dense, other, texts, settings),
                                     n_layers)
    applied: AppliedMasks | None = None
    with model_lock(model):
        restore(model)
        for one, prompts in zip(sets, (texts, other_prompts)):
            one.runner = LayerRunner(model, tokenizer, prompts, batch_size, pad_to,
                                     pad_side=pad_side)
            if one.runner.groups.count != len(one.parts):
                raise MlpruneError("The prompts of the sequential pass are not the parts of "
                                   "the calibration mix its statistics were taken on.")
        try:
            for layer in range(n_layers):
                here = [n for n in names if infos[n].layer == layer]
                saved = checkpoint.read(layer) if checkpoint is not None else None
                saved_other = checkpoint.read_other(layer) \
                    if saved is not None and replay else None
                if replay and saved is not None and saved_other is None:
                    saved = None  # a layer saved without the second set: compute it again
                with onloaded(layers[layer]):
                    masks = None
                    found: list[tuple[dict, dict]] = []
                    for k, one in enumerate(sets):
                        if saved is not None:
                            sq, act = saved[:2] if k == 0 else saved_other
                        else:
                            sq, act = one.runner.collect(layer, here) if here else ({}, {})
                        one.update(sq, act)
                        found.append((sq, act))
                    if saved is not None:
                        masks = saved[2]
                    elif here:
                        partial = sets[0].partial()
                        ranking = rank_modules(model, partial, method=method,
                                               other=sets[1].partial() if replay else other,
                                               invert=invert, protect=protect, modules=here,
                                               seed=seed, allocation=allocation, mwanda=mwanda)
                        masks = ranking.masks(sparsity, pattern)
                    if checkpoint is not None and saved is None:
                        checkpoint.write(layer, *found[0], masks,
                                         other=found[1] if replay else None)
                    if masks is not None:
                        if applied is None:
                            applied = apply_masks(model, masks)
                        else:
                            applied.extend(masks)
                    if layer < n_layers - 1:  # the last layer's output feeds no statistic
                        for one in sets:
                            one.runner.advance(layer)
                progress(f"layer {layer + 1}/{n_layers}", (layer + 1) / n_layers)
        finally:
            if applied is not None:
                applied.restore()
    done = {"mode": "sequential", "sequential_sparsity": sparsity,
            "sequential_pattern": str(Pattern.parse(pattern))}
    stats = sets[0].partial(dict(dense.meta, **done))
    other_out = sets[1].partial(dict(other.meta, **done)) if replay else other
    if applied is None:  # no selected module in the stats' layers
        pat = Pattern.parse(pattern)
        return SequentialRun(stats, MaskSet({}, {}, pat.n / pat.m if pat.structured
                                            else sparsity, str(pat)), other_out)
    return SequentialRun(stats, applied.masks, other_out)


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


def run_key(dense: ActivationStats, other: ActivationStats | None,
            texts: PromptSet | list[str], settings: dict) -> str:
    """What decides a sequential run's layers, as a digest: its settings, its prompts and the
    dense statistics it starts from (which the model's weights and the prompts decide)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update("\x00".join(texts.texts if isinstance(texts, PromptSet) else texts).encode())
    for stats in (dense, other):
        if stats is None:
            continue
        h.update(f"{stats.n_tokens}/{stats.n_prompts}".encode())
        h.update(stats.hidden_norms.float().contiguous().numpy().tobytes())
        for name in sorted(stats.input_sqnorms):
            h.update(name.encode())
            h.update(stats.input_sqnorms[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class LayerCheckpoint:
    """A folder holding a sequential run or a ranking layer by layer, so that a run that stops
    resumes there.

    ``run.json`` says which run it is (:func:`run_key`); ``layer-007.safetensors`` holds layer
    7's module statistics (per part of a calibration mix) and masks, written atomically when
    the layer is done; a ranking's files hold each module's row order (``what="ranking"``,
    in the ``ranking`` folder of a run's checkpoint folder). A folder of another run is
    refused rather than mixed in; another checkpoint folder inside it is no obstacle.
    """

    MANIFEST = "run.json"

    def __init__(self, folder: str | Path, key: str, n_layers: int,
                 what: str = "sequential run"):
        self.folder = Path(folder).expanduser()
        manifest = self.folder / self.MANIFEST
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text(encoding="utf-8")).get("run")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != key:
                raise MlpruneError(
                    f"{self.folder} holds the layers of another {what} (another model, "
                    "calibration or setting); give an empty folder, or delete it to start over.")
        elif self.folder.is_dir() and any(not (p / self.MANIFEST).is_file()
                                          for p in self.folder.iterdir()):
            raise MlpruneError(f"{self.folder} is not empty and holds no {what}; give an "
                               "empty or new folder for the per-layer checkpoints.")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(manifest, json.dumps({"run": key, "layers": n_layers}).encode())

    def path(self, layer: int) -> Path:
        return self.folder / f"layer-{layer:03d}.safetensors"

    def _save(self, layer: int, tensors: dict[str, torch.Tensor], header: dict) -> Path:
        """One layer's file, written atomically: a stopped run never leaves half a layer."""
        path = self.path(layer)
        tmp = path.with_name(f".{path.name}.partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"mlprune_layer": json.dumps(header)})
        os.replace(tmp, path)
        return path

    def _load(self, layer: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """One layer's tensors and header, or None when it is not saved (or unreadable: it
        is then computed and written again)."""
        try:
            tensors, meta = _read_safetensors(self.path(layer), "layer")
            return tensors, json.loads(meta["mlprune_layer"])
        except (MlpruneError, KeyError, ValueError):
            return None

    def write_orders(self, layer: int, orders: dict[str, torch.Tensor]) -> Path:
        """Save one ranked layer: each module's row order."""
        return self._save(layer, orders, {"layer": layer})

    def read_orders(self, layer: int, names: list[str]) -> dict[str, torch.Tensor] | None:
        """A ranked layer's row orders, or None when they are not all saved."""
        found = self._load(layer)
        return found[0] if found is not None and all(n in found[0] for n in names) else None

    def write(self, layer: int, sqnorms: dict[str, torch.Tensor],
              active: dict[str, torch.Tensor], masks: MaskSet | None,
              other: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
              ) -> Path:
        """Save one finished layer: its modules' [groups, in] statistics and its masks (and
        ``other``: the second set's statistics, (sqnorms, active), when it is replayed)."""
        tensors = {f"sq/{n}": v for n, v in sqnorms.items()}
        tensors.update({f"act/{n}": v for n, v in active.items()})
        header: dict = {"layer": layer, "masks": None, "other": other is not None}
        if other is not None:
            tensors.update({f"osq/{n}": v for n, v in other[0].items()})
            tensors.update({f"oact/{n}": v for n, v in other[1].items()})
        if masks is not None:
            tensors.update({f"cols/{n}": c for n, c in masks.pruned_cols.items()})
            tensors.update({f"{_PROTECTED}{n}": p for n, p in masks.protected.items()
                            if n in masks.pruned_cols})
            header["masks"] = {"modules": masks.modules, "in_features": masks.in_features,
                               "target": masks.target, "pattern": masks.pattern,
                               "meta": masks.meta}
        return self._save(layer, tensors, header)

    def read(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                        MaskSet | None] | None:
        """A saved layer's statistics and masks, or None when it is not done (or its file is
        unreadable: it is then computed and written again)."""
        found = self._load(layer)
        if found is None:
            return None
        tensors, header = found
        sq = {k[3:]: v for k, v in tensors.items() if k.startswith("sq/")}
        act = {k[4:]: v for k, v in tensors.items() if k.startswith("act/")}
        saved = header["masks"]
        if saved is None:
            return sq, act, None
        names = saved["modules"]
        masks = MaskSet({n: tensors[f"cols/{n}"] for n in names},
                        {n: saved["in_features"][n] for n in names}, float(saved["target"]),
                        saved["pattern"], saved["meta"],
                        {n: tensors[f"{_PROTECTED}{n}"] for n in names
                         if f"{_PROTECTED}{n}" in tensors})
        return sq, act, masks

    def read_other(self, layer: int) -> tuple[dict[str, torch.Tensor],
                                              dict[str, torch.Tensor]] | None:
        """A saved layer's second-set statistics (sqnorms, active), or None when the layer
        is not saved or was saved without them."""
        found = self._load(layer)
        if found is None or not found[1].get("other"):
            return None
        tensors = found[0]
        return ({k[4:]: v for k, v in tensors.items() if k.startswith("osq/")},
                {k[5:]: v for k, v in tensors.items() if k.startswith("oact/")})


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
