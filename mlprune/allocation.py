"""Per-layer sparsity: one overall target, shared out unevenly across layers.

``uniform`` prunes every layer at the target. The layer-adaptive kinds read one number per
layer, its *importance*, and prune important layers less:

- ``owl``: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024, arXiv 2310.05175; code
  github.com/luuyin/OWL). A layer's importance is its outlier share D_l: the fraction of its
  weights (all selected modules together) whose score exceeds M times the layer's mean score
  (M = 5 in OWL's scripts). OWL maps D linearly onto keep ratios spanning 2 * lambda and
  centres them on 1 - S (``(D - min D) / (max D - min D) * 2 * lambda``, minus its mean, plus
  1 - S), so a layer with more outliers keeps more.
- ``cwl``: M-Wanda's correlation-weighted layerwise sparsity (Choenni and Titov, EMNLP 2025;
  see :mod:`mlprune.mwanda`): the importance is how little the languages' activations agree in
  that layer (1 - their mean correlation), mapped the same way.

What lambda bounds is the *spread*: the layers' sparsities span 2 * lambda, from the least to
the most important layer, and their mean is S. It is not each layer's distance from S (OWL's
paper says S +- lambda; its code, and this mapping, centre on the mean, not the midpoint): with
importance {0, 0, 0, 1}, lambda = 0.08 and S = 0.5 the sparsities are 0.54, 0.54, 0.54 and
0.38, the last 0.12 = 1.5 * lambda below S. A layer can sit up to (nearly) 2 * lambda from S.

Two changes from OWL's code, both so the target stays exact on any model: the offsets are
centred with each layer's weight count as its weight (OWL averages layers equally, the same
thing when layers are equally large), and after clipping to [0, cap] every layer is moved by
one common shift, solved so that the size-weighted mean is the target again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlprune import MlpruneError
from mlprune.spec import ALLOCATIONS  # noqa: F401  (the spec's vocabulary, re-exported)

MAX_LAYER_SPARSITY = 0.99  # a layer is never pruned whole, whatever its offset


def spread(importance: dict[int, float], sizes: dict[int, int], strength: float) -> dict[int, float]:
    """Sparsity offsets from per-layer importance: importance min-max scaled onto
    [0, 2 * strength], centred on its size-weighted mean, negated (more important, pruned
    less). The offsets span exactly 2 * strength (each one lies within +- 2 * strength, not
    +- strength: see the module notes). All offsets are 0 when every layer is equally
    important."""
    if strength < 0:
        raise MlpruneError(f"The allocation range must be at least 0; got {strength}.")
    layers = list(importance)
    lo, hi = min(importance.values()), max(importance.values())
    if not layers or hi - lo <= 0:
        return dict.fromkeys(layers, 0.0)
    scaled = {k: (importance[k] - lo) / (hi - lo) * 2 * strength for k in layers}
    total = sum(sizes[k] for k in layers)
    mean = sum(scaled[k] * sizes[k] for k in layers) / total
    return {k: mean - scaled[k] for k in layers}


def layer_sparsities(offsets: dict[int, float], sizes: dict[int, int], target: float,
                     cap: float = MAX_LAYER_SPARSITY) -> dict[int, float]:
    """Each layer's sparsity: ``target + offset + c``, clipped to [0, cap], with the one shift
    c that makes the size-weighted mean exactly ``target`` (to float precision).

    The mean is non-decreasing in c, so c is found by bisection; the last step solves for c
    in closed form over the layers left unclipped.
    """
    if not offsets:
        return {}
    cap = max(cap, target)
    total = float(sum(sizes[k] for k in offsets))
    if total <= 0:
        raise MlpruneError("Per-layer sparsity needs layers with at least one weight.")

    def at(c: float) -> dict[int, float]:
        return {k: min(max(target + o + c, 0.0), cap) for k, o in offsets.items()}

    def mean(c: float) -> float:
        return sum(s * sizes[k] for k, s in at(c).items()) / total

    lo, hi = -1.0 - max(offsets.values()), 1.0 - min(offsets.values())  # mean(lo)=0, mean(hi)=cap
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    c = (lo + hi) / 2
    values = at(c)
    free = [k for k, s in values.items() if 0.0 < s < cap]
    if free:  # exact on the unclipped layers: their total is what the clipped ones leave
        clipped = sum(values[k] * sizes[k] for k in values if k not in free)
        free_size = sum(sizes[k] for k in free)
        c = (target * total - clipped) / free_size - target \
            - sum(offsets[k] * sizes[k] for k in free) / free_size
        values.update({k: min(max(target + offsets[k] + c, 0.0), cap) for k in free})
    return values


def weighted_mean(values: dict[int, float], sizes: dict[int, int]) -> float:
    """The size-weighted mean of per-layer values (what the target is a mean of)."""
    total = sum(sizes[k] for k in values)
    return sum(v * sizes[k] for k, v in values.items()) / max(total, 1)


@dataclass
class Allocation:
    """How a ranking shares its target out across layers: which layer each module belongs to,
    how many weights each layer has, and each layer's offset from the target (importance is
    kept for the report and the figure). Plain values: it travels in a ranking's JSON meta."""

    kind: str
    module_layers: dict[str, int]
    sizes: dict[int, int]
    offsets: dict[int, float]
    importance: dict[int, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def sparsities(self, target: float) -> dict[int, float]:
        """Per-layer sparsity at this overall target (size-weighted mean = target)."""
        return layer_sparsities(self.offsets, self.sizes, target)

    def module_sparsities(self, target: float) -> dict[str, float]:
        """Each module's sparsity at this target: its layer's."""
        per_layer = self.sparsities(target)
        return {name: per_layer[layer] for name, layer in self.module_layers.items()}

    def report(self, target: float) -> dict:
        """What a mask set records: the kind, its settings, and per layer the importance,
        the allocated sparsity and the weight count (JSON keys are strings)."""
        per_layer = self.sparsities(target)
        return {"kind": self.kind, **self.settings, "target": target,
                "per_layer": {str(k): per_layer[k] for k in sorted(per_layer)},
                "importance": {str(k): v for k, v in sorted(self.importance.items())},
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "module_layers": self.module_layers,
                "sizes": {str(k): v for k, v in self.sizes.items()},
                "offsets": {str(k): v for k, v in self.offsets.items()},
                "importance": {str(k): v for k, v in self.importance.items()},
                "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict) -> Allocation:
        return cls(data["kind"], dict(data["module_layers"]),
                   {int(k): int(v) for k, v in data["sizes"].items()},
                   {int(k): float(v) for k, v in data["offsets"].items()},
                   {int(k): float(v) for k, v in data.get("importance", {}).items()},
                   dict(data.get("settings", {})))

    @classmethod
    def from_importance(cls, kind: str, importance: dict[int, float],
                        module_layers: dict[str, int], module_sizes: dict[str, int],
                        strength: float, **settings) -> Allocation:
        """An allocation of ``kind`` from per-layer importance (OWL's mapping, see the module
        notes), over the modules given."""
        sizes: dict[int, int] = {}
        for name, layer in module_layers.items():
            sizes[layer] = sizes.get(layer, 0) + module_sizes[name]
        offsets = spread({k: importance[k] for k in sizes}, sizes, strength)
        return cls(kind, dict(module_layers), sizes, offsets, dict(importance),
                   {"range": strength, **settings})
