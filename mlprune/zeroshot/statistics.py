"""Statistics of zero-shot results: RankC consistency, the paired bootstrap, and power.

Cross-lingual consistency is RankC (Qi et al., 2023, as used by Kim et al., 2024): per item,
sum over j of w_j * |top_j(English) & top_j(lang)| / j with w_j = exp(-j) / sum_k exp(-k),
averaged over items. top_j holds the j most likely choices, as RankC is defined; the authors'
evaluate_consistency.py takes the first j of an ascending np.argsort, the j least likely ones
(with 3 choices that still agrees on P@2 and P@3, not on P@1). Dense vs pruned differences come with a seeded paired bootstrap, and
each task's size with the smallest accuracy difference a paired test detects at it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from mlprune import MlpruneError


def top_j(scores: Sequence[float], j: int) -> set[int]:
    """Indices of the j highest scores (ties: the lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:j])


def rankc_weights(n: int) -> list[float]:
    """w_j = exp(-j) / sum_k exp(-k), j = 1..n: most weight on agreeing about the top choice."""
    raw = [math.exp(-j) for j in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def rankc_item(reference: Sequence[float], other: Sequence[float]) -> float:
    """RankC of one item: sum_j w_j * |top_j(reference) & top_j(other)| / j."""
    if len(reference) != len(other):
        raise MlpruneError("RankC compares rankings of the same choices; the counts differ.")
    n = len(reference)
    return sum(w * len(top_j(reference, j) & top_j(other, j)) / j
               for j, w in zip(range(1, n + 1), rankc_weights(n)))


def rankc(reference: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> float:
    """RankC averaged over items (paired lists of per-choice scores)."""
    if len(reference) != len(other):
        raise MlpruneError("RankC needs the same items in both languages.")
    if not reference:
        return float("nan")
    return sum(rankc_item(a, b) for a, b in zip(reference, other)) / len(reference)


# --------------------------------------------------------------------------- significance


@dataclass(frozen=True)
class Significance:
    """Paired bootstrap of a difference of accuracies (b - a)."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    n_resamples: int
    confidence: float


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, groups: Sequence | None = None,
                     n_resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> Significance:
    """Bootstrap over items of mean(b) - mean(a), paired item by item.

    ``groups`` resamples clusters instead of single units (the translations of one item are
    drawn together). The interval is the percentile interval; the p-value is two-sided: the
    share of resampled differences at least as far from the observed one as the observed one
    is from zero, (1 + count) / (1 + n_resamples), so it is never exactly zero.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise MlpruneError("The paired bootstrap needs one score per item for both models.")
    if a_arr.size == 0:
        raise MlpruneError("The paired bootstrap needs at least one item.")
    if not 0 < confidence < 1:
        raise MlpruneError("The confidence level must be between 0 and 1.")
    d = b_arr - a_arr
    if groups is None:
        sums, counts = d, np.ones_like(d)
    else:
        if len(groups) != d.size:
            raise MlpruneError("Give one group per item to the paired bootstrap.")
        _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        sums = np.bincount(inverse, weights=d)
        counts = np.bincount(inverse).astype(float)
    observed = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // len(sums))  # bounded memory for the index matrix
    for lo in range(0, n_resamples, chunk):
        hi = min(lo + chunk, n_resamples)
        idx = rng.integers(0, len(sums), size=(hi - lo, len(sums)))
        stats[lo:hi] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.sum(np.abs(stats - observed) >= abs(observed) - 1e-12))
    p = (1 + extreme) / (1 + n_resamples)
    return Significance(observed, float(low), float(high), min(1.0, p), int(d.size), n_resamples,
                        confidence)



# --------------------------------------------------------------------------- power


def detectable_difference(n: int, discordance: float, *, alpha: float = 0.05,
                          power: float = 0.8) -> float | None:
    """The smallest accuracy difference a two-sided paired test of binary outcomes (McNemar's)
    detects at level ``alpha`` with probability ``power``, on ``n`` items of which the share
    ``discordance`` gets a different outcome from the two systems.

    Connor's (1987) sample size, n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2 with
    z_a = z(1 - alpha/2), z_b = z(power), solved for d:
    d = (z_a sqrt(psi n) + z_b sqrt((n + z_b^2) psi - z_a^2 psi)) / (n + z_b^2).
    None when nothing is detectable: no discordant items, too few items, or a d above psi
    (a difference can never exceed the share of items on which the systems differ).
    """
    if n < 1 or not 0 <= discordance <= 1 or not 0 < alpha < 1 or not 0 < power < 1:
        raise MlpruneError("The power calculation needs n >= 1, a discordance in [0, 1], and "
                           "alpha and power between 0 and 1.")
    if discordance == 0:
        return None
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    a = z_a * math.sqrt(discordance)
    under = (n + z_b**2) * discordance - a**2
    if under < 0:
        return None
    d = (a * math.sqrt(n) + z_b * math.sqrt(under)) / (n + z_b**2)
    return d if d <= discordance else None


def assumed_discordance(accuracy: float) -> float:
    """The discordance of two systems of this accuracy whose errors are independent,
    2 acc (1 - acc): an upper bound when their errors go together, as a dense and a pruned
    model's do, so the detectable difference computed from it is conservative."""
    return 2 * accuracy * (1 - accuracy)
