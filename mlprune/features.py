"""Large-magnitude features: detect them per layer, and compare them across prompt sets.

A dimension is large when its magnitude at a residual-stream site stands far above the
site's typical dimension. Rules: ``top-k`` per layer, ``ratio`` to the layer median, or an
``absolute`` magnitude. Layers are numbered as ``ActivationStats.layer_view`` lays them out:
``sites`` (row i is layer i's output) or ``hidden_states`` (the paper's: row 0 is the
embedding output, the last row is after the final norm). Overlaps: the share of one set's
top-x% dimensions in another's top-x% (and Jaccard), and in its bottom-x% (the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from mlprune import MlpruneError
from mlprune.stats import ActivationStats

RULES = ("top-k", "ratio", "absolute")


@dataclass(frozen=True)
class Rule:
    """A detection rule: ``top-k:8``, ``ratio:100`` or ``absolute:500``."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Rule:
        """The rule ``text`` names (``top-k:8``, ``ratio:100``, ``absolute:500``; ``topk``,
        ``top`` and ``abs`` too), or one clear sentence saying why it names none."""
        kind, _, value = text.partition(":")
        kind = {"topk": "top-k", "top": "top-k", "abs": "absolute"}.get(kind, kind)
        if kind not in RULES or not value:
            raise MlpruneError(f"'{text}' is not a detection rule: use top-k:8, ratio:100 or absolute:500.")
        try:
            v = float(value)
        except ValueError as e:
            raise MlpruneError(f"'{value}' in '{text}' is not a number.") from e
        if v <= 0 or (kind == "top-k" and v != int(v)):
            raise MlpruneError(f"The value in '{text}' must be a positive {'integer' if kind == 'top-k' else 'number'}.")
        return cls(kind, v)

    def __str__(self) -> str:
        return f"{self.kind}:{int(self.value) if self.kind == 'top-k' else self.value:g}"


def detect(stats: ActivationStats, rule: Rule | str = "ratio:100",
           numbering: str = "sites") -> pd.DataFrame:
    """Detected dimensions, one row each: layer, site, dim, magnitude, median, ratio_to_median."""
    rule = Rule.parse(rule) if isinstance(rule, str) else rule
    sites, norms = stats.layer_view(numbering)
    return _detect_rows(sites, norms.float(), rule)


def _detect_rows(sites: list[str], norms: torch.Tensor, rule: Rule) -> pd.DataFrame:
    medians = norms.median(dim=1).values.clamp_min(1e-12)
    rows = []
    for layer in range(norms.shape[0]):
        mags, med = norms[layer], medians[layer]
        if rule.kind == "top-k":
            dims = mags.topk(min(int(rule.value), mags.numel())).indices
        elif rule.kind == "ratio":
            dims = (mags / med >= rule.value).nonzero().flatten()
        else:
            dims = (mags >= rule.value).nonzero().flatten()
        dims = dims[mags[dims].argsort(descending=True)]
        for d in dims.tolist():
            rows.append((layer, sites[layer], d, float(mags[d]), float(med), float(mags[d] / med)))
    return pd.DataFrame(rows, columns=["layer", "site", "dim", "magnitude", "median",
                                       "ratio_to_median"])


def detected_dims(stats: ActivationStats, rule: Rule | str) -> dict[str, list[int]]:
    """{site: [dims]} for every residual-stream site the statistics hold (``embed``,
    ``layers.{i}.resid_post``, ``final_norm``), with empty lists where nothing is detected."""
    rule = Rule.parse(rule) if isinstance(rule, str) else rule
    sites = stats.sites()
    table = _detect_rows(list(sites), torch.stack(list(sites.values())).float(), rule)
    out = {site: [] for site in sites}
    for site, group in table.groupby("site", sort=False):
        out[str(site)] = group["dim"].astype(int).tolist()
    return out


def top_dims(stats: ActivationStats, n: int = 5, numbering: str = "sites") -> dict:
    """The analysis JSON: per layer the median and the top n dims with their ratio to it."""
    sites, norms = stats.layer_view(numbering)
    table = detect(stats, Rule("top-k", n), numbering)
    layers = []
    for layer in range(len(sites)):
        part = table[table.layer == layer]
        layers.append({
            "layer": layer,
            "site": sites[layer],
            "median": float(norms[layer].median()),
            "top": [{"dim": int(r.dim), "magnitude": r.magnitude, "ratio_to_median": r.ratio_to_median}
                    for r in part.itertuples()],
        })
    return {"layers": layers}


def _top_bottom(norms: torch.Tensor, fraction: float) -> tuple[set[int], set[int]]:
    k = max(1, round(norms.numel() * fraction))
    order = norms.argsort(descending=True).tolist()
    return set(order[:k]), set(order[-k:])


def overlap(a: ActivationStats, b: ActivationStats, fraction: float = 0.05,
            numbering: str = "sites") -> pd.DataFrame:
    """Per layer: share of a's top-x% dims in b's top-x% (Jaccard too) and in b's bottom-x%
    (the paper's measure: |top-x%(a) & bottom-x%(b)| / |top-x%(a)|)."""
    if not 0 < fraction <= 0.5:
        raise MlpruneError("The overlap fraction must be in (0, 0.5].")
    if a.hidden_norms.shape != b.hidden_norms.shape:
        raise MlpruneError("These statistics come from different models and cannot be compared.")
    _, norms_a = a.layer_view(numbering)
    _, norms_b = b.layer_view(numbering)
    rows = []
    for layer in range(norms_a.shape[0]):
        top_a, _ = _top_bottom(norms_a[layer], fraction)
        top_b, bottom_b = _top_bottom(norms_b[layer], fraction)
        rows.append({
            "layer": layer,
            "top_in_top": len(top_a & top_b) / len(top_a),
            "top_in_bottom": len(top_a & bottom_b) / len(top_a),
            "jaccard": len(top_a & top_b) / len(top_a | top_b),
        })
    return pd.DataFrame(rows)


def overlap_matrix(sets: dict[str, ActivationStats], fraction: float = 0.05,
                   measure: str = "top_in_top", layer: int | None = None,
                   numbering: str = "sites") -> pd.DataFrame:
    """Names x names table of an overlap measure, at one layer or averaged over layers."""
    names = list(sets)
    table = pd.DataFrame(index=names, columns=names, dtype=float)
    for x in names:
        for y in names:
            per_layer = overlap(sets[x], sets[y], fraction, numbering)
            col = per_layer[measure]
            table.loc[x, y] = float(col.iloc[layer] if layer is not None else col.mean())
    return table
