"""What to prune first: modules to prune, weight scores, and their ranking.

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
columns (large-magnitude features) are ranked above everything and never pruned.

A :class:`Ranking` keeps each row's column order as small integers, so a new sparsity is a
slice of it and a new N:M pattern one small sort, with no pass over data. It may carry an
:class:`~mlprune.allocation.Allocation` (OWL's or CWL's layer-adaptive sparsity, from
:func:`allocate`): its masks then prune each layer at that layer's share of the target, which
stays the overall mean.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.allocation import Allocation
from mlprune.capture import ActivationStats
from mlprune.models import LinearInfo, decoder_layers, linear_modules, onloaded
from mlprune.mwanda import MWanda, cwl_importance
from mlprune.mwanda import scores as mwanda_scores
from mlprune.prune.checkpoint import LayerCheckpoint, mwanda_key
from mlprune.prune.masks import _PROTECTED, MaskSet, Pattern, _read_safetensors, check_sparsity
from mlprune.sites import residual_input_site
from mlprune.spec import METHODS  # the spec's vocabulary
from mlprune.storage import atomic_save

# Keys in a ranking file: a module's row order, and the file's JSON header.
_ORDER, _RANKING = "order/", "mlprune_ranking"


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
        """The ranked modules' names."""
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
        tensors = {}
        for name, order in self.order.items():
            tensors[f"{_ORDER}{name}"] = order.contiguous()
            if name in self.protected:
                tensors[f"{_PROTECTED}{name}"] = self.protected[name].contiguous()
        header = {"modules": list(self.order), "meta": self.meta}
        metadata = {_RANKING: json.dumps(header, allow_nan=False)}
        return atomic_save(path, lambda partial: save_file(tensors, str(partial),
                                                           metadata=metadata))

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
                    "mwanda": mwanda_key(mwanda) if method == "m-wanda" else None}
        checkpoint = LayerCheckpoint.for_run(Path(checkpoint_dir) / "ranking", settings, stats,
                                             other, [], len(decoder_layers(model)), what="ranking")
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
