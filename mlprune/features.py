"""Large-magnitude features: detect them per layer, and compare them across prompt sets.

A dimension is large when its magnitude (ActivationStats.hidden_norms) stands far above the
layer's typical dimension. Rules: ``top-k`` per layer, ``ratio`` to the layer median, or an
``absolute`` magnitude. Overlaps follow the paper: the share of one set's top-x% dimensions
that fall in another's bottom-x%, and the Jaccard overlap of the top sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from mlprune import MlpruneError
from mlprune.capture import ActivationStats

RULES = ("top-k", "ratio", "absolute")


@dataclass(frozen=True)
class Rule:
    """A detection rule: ``top-k:8``, ``ratio:100`` or ``absolute:500``."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Rule:
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


def detect(stats: ActivationStats, rule: Rule | str = "ratio:100") -> pd.DataFrame:
    """Detected dimensions, one row each: layer, dim, magnitude, median, ratio_to_median."""
    rule = Rule.parse(rule) if isinstance(rule, str) else rule
    norms = stats.hidden_norms.float()
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
            rows.append((layer, d, float(mags[d]), float(med), float(mags[d] / med)))
    return pd.DataFrame(rows, columns=["layer", "dim", "magnitude", "median", "ratio_to_median"])


def detected_dims(stats: ActivationStats, rule: Rule | str) -> dict[int, list[int]]:
    """{layer: [dims]} for every layer (empty lists where nothing is detected)."""
    table = detect(stats, rule)
    out = {layer: [] for layer in range(stats.n_layers)}
    for layer, group in table.groupby("layer"):
        out[int(layer)] = group["dim"].astype(int).tolist()
    return out


def top_dims(stats: ActivationStats, n: int = 5) -> dict:
    """The analysis JSON: per layer the median and the top n dims with their ratio to it."""
    table = detect(stats, Rule("top-k", n))
    layers = []
    for layer in range(stats.n_layers):
        part = table[table.layer == layer]
        layers.append({
            "layer": layer,
            "median": float(stats.hidden_norms[layer].median()),
            "top": [{"dim": int(r.dim), "magnitude": r.magnitude, "ratio_to_median": r.ratio_to_median}
                    for r in part.itertuples()],
        })
    return {"layers": layers}


def _top_bottom(norms: torch.Tensor, fraction: float) -> tuple[set[int], set[int]]:
    k = max(1, round(norms.numel() * fraction))
    order = norms.argsort(descending=True).tolist()
    return set(order[:k]), set(order[-k:])


def overlap(a: ActivationStats, b: ActivationStats, fraction: float = 0.05) -> pd.DataFrame:
    """Per layer: share of a's top-x% dims in b's top-x% (Jaccard too) and in b's bottom-x%."""
    if not 0 < fraction <= 0.5:
        raise MlpruneError("The overlap fraction must be in (0, 0.5].")
    if a.hidden_norms.shape != b.hidden_norms.shape:
        raise MlpruneError("These statistics come from different models and cannot be compared.")
    rows = []
    for layer in range(a.n_layers):
        top_a, _ = _top_bottom(a.hidden_norms[layer], fraction)
        top_b, bottom_b = _top_bottom(b.hidden_norms[layer], fraction)
        rows.append({
            "layer": layer,
            "top_in_top": len(top_a & top_b) / len(top_a),
            "top_in_bottom": len(top_a & bottom_b) / len(top_a),
            "jaccard": len(top_a & top_b) / len(top_a | top_b),
        })
    return pd.DataFrame(rows)


def overlap_matrix(sets: dict[str, ActivationStats], fraction: float = 0.05,
                   measure: str = "top_in_top", layer: int | None = None) -> pd.DataFrame:
    """Names x names table of an overlap measure, at one layer or averaged over layers."""
    names = list(sets)
    table = pd.DataFrame(index=names, columns=names, dtype=float)
    for x in names:
        for y in names:
            per_layer = overlap(sets[x], sets[y], fraction)
            col = per_layer[measure]
            table.loc[x, y] = float(col.iloc[layer] if layer is not None else col.mean())
    return table
