"""Statistics of zero-shot results: RankC consistency, the paired bootstrap, and power.

Cross-lingual consistency is RankC (Qi et al., 2023, as used by Kim et al., 2024): per item,
sum over j of w_j * |top_j(English) & top_j(lang)| / j with w_j = exp(-j) / sum_k exp(-k),
averaged over items. top_j holds the j most likely choices, as RankC is defined; the authors'
evaluate_consistency.py takes the first j of an ascending np.argsort, the j least likely ones.
That is not a harmless reordering: with 3 choices the 2 least likely are the complement of the
top choice, so only P@3 (always 1) agrees. Scores (.6, .3, .1) against (.6, .1, .3) give
RankC 0.88 here (P@1 = 1, P@2 = 1/2) but 0.33 in the authors' version (P@1 = 0, P@2 = 1).
Dense vs pruned differences come with a seeded paired bootstrap, and each task's size with the
smallest accuracy difference a paired test detects at it. Comparisons of pruned variants
calibrated with several seeds use a two-level (seeds x items) bootstrap, the detectable
difference from its standard error, a planner for seeds and items, and Holm's correction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


# --------------------------------------------------------------------------- seeds x items


def _t_quantile(alpha: float, df: float) -> float:
    """t with P(|T_df| > t) = alpha, numpy only: with t = sqrt(df) tan(theta) the density is
    proportional to cos(theta)^(df - 1) on [0, pi/2), integrated on a fine grid and inverted."""
    if df > 1e4:
        return NormalDist().inv_cdf(1 - alpha / 2)
    df = max(df, 1.0)  # Welch-Satterthwaite df never fall below the smallest part's (>= 1)
    theta = np.linspace(0.0, math.pi / 2, 20_001)
    dens = np.cos(theta) ** (df - 1)
    cum = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2)])
    at = float(np.interp(1 - alpha, cum / cum[-1], theta))
    return math.sqrt(df) * math.tan(at)


def _critical(alpha: float, df: float) -> float:
    """Two-sided critical value at level ``alpha``: t with ``df`` degrees of freedom (z at inf)."""
    if not 0 < alpha < 1 or not df > 0:
        raise MlpruneError("Alpha must be between 0 and 1 and the degrees of freedom above 0.")
    return _t_quantile(alpha, df) if math.isfinite(df) else NormalDist().inv_cdf(1 - alpha / 2)


def _welch_df(parts: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance estimates (variance, df)."""
    parts = [(v, df) for v, df in parts if v > 0]
    if not parts:
        return math.inf
    return sum(v for v, _ in parts) ** 2 / sum(v**2 / df for v, df in parts)


def detectable_from_se(se: float, *, alpha: float = 0.05, power: float = 0.8,
                       df: float = math.inf) -> float:
    """The smallest true difference that a two-sided level-``alpha`` test of an estimate with
    standard error ``se`` detects with probability ``power``: (z(1 - alpha/2) + z(power)) se,
    about 2.80 se at 0.05 and 0.8 (the opposite tail, under 1e-3 there, is left out). A finite
    ``df`` puts the test's t critical value in place of z(1 - alpha/2)."""
    if not se >= 0 or not 0 < power < 1:
        raise MlpruneError("The detectable difference needs se >= 0 and a power in (0, 1).")
    return (_critical(alpha, df) + NormalDist().inv_cdf(power)) * se


def power_from_se(effect: float, se: float, *, alpha: float = 0.05,
                  df: float = math.inf) -> float:
    """Probability that a two-sided level-``alpha`` test rejects when the true difference is
    ``effect`` and its estimate has standard error ``se`` (both tails; critical value z, or t
    with a finite ``df``, against a normal estimate)."""
    if not se >= 0:
        raise MlpruneError(f"A standard error cannot be negative; got {se}.")
    crit = _critical(alpha, df)
    if se == 0:
        return 1.0 if effect != 0 else alpha
    r = abs(effect) / se
    return NormalDist().cdf(r - crit) + NormalDist().cdf(-r - crit)


@dataclass(frozen=True)
class ComparisonPlan:
    """Predicted precision of a seeds x items comparison, and what would reach ``target``."""

    se: float
    df: float
    detectable_diff: float
    target: float
    power_at_target: float
    seeds_needed: int | None  # seeds per calibrated side at n_items; None: seeds alone never do
    items_needed: int | None  # items at these seeds; None: items alone never do
    n_items: int
    seeds_a: int
    seeds_b: int


def _smallest(reaches: Callable[[int], bool], cap: int) -> int | None:
    """Smallest k in [1, cap] with reaches(k), reaches growing with k; None if not even cap."""
    if not reaches(cap):
        return None
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid + 1, hi)
    return lo


def plan_comparison(discordance: float, n_items: int, *, seeds_a: int = 1, seeds_b: int = 1,
                    seed_sd_a: float = 0.0, seed_sd_b: float = 0.0, flip_a: float = 0.0,
                    flip_b: float = 0.0, target: float = 0.02, alpha: float = 0.05,
                    power: float = 0.8) -> ComparisonPlan:
    """Standard error, detectable difference and power at ``target`` of mean(b) - mean(a) over
    ``n_items`` items and ``seeds_a`` x ``seeds_b`` calibration seeds, as
    ``hierarchical_bootstrap`` tests it, and the smallest seeds per calibrated side (items
    fixed) or items (seeds fixed) whose detectable difference is at most ``target``.

    Inputs, each measurable from one grid (``HierarchicalSignificance.plan`` passes them):
    ``discordance``: share of items on which one seed of a and one of b disagree (for general
    scores the mean squared per-item difference); ``seed_sd_*``: SD across seeds of that side's
    accuracy on these items (0 for dense); ``flip_*``: share of items on which two seeds of one
    side disagree (0 for dense; 0 elsewhere errs conservative). A flip rate f is an item-level
    calibration variance f/2, and a seed SD measured on n items holds f/(2n) of it, so
    Var = (discordance - f_a/2 - f_b/2)/n + sum over sides of [f/(2 n S) + (sd^2 - f/(2 n))/S].
    The t critical value uses the Welch-Satterthwaite df of the item share (n - 1) and seed
    shares (S - 1), as the test does. The true difference's own share of the discordance (d^2)
    is kept in, erring conservative.
    """
    if not discordance >= 0 or n_items < 1 or seeds_a < 1 or seeds_b < 1:
        raise MlpruneError("The plan needs a discordance of at least 0, items and seeds >= 1.")
    if not min(seed_sd_a, seed_sd_b, flip_a, flip_b) >= 0 or not target > 0:
        raise MlpruneError("Seed SDs and flip rates must be at least 0, the target above 0.")
    _critical(alpha, math.inf)
    methods = max(0.0, discordance - flip_a / 2 - flip_b / 2)  # no seeds shrink this share
    calib_a, calib_b = (max(0.0, sd**2 - f / (2 * n_items))
                        for sd, f in ((seed_sd_a, flip_a), (seed_sd_b, flip_b)))
    noisy_a, noisy_b = calib_a + flip_a > 0, calib_b + flip_b > 0  # dense sides stay at 1

    def precision(n: int, sa: int, sb: int) -> tuple[float, float]:
        parts = [((methods + flip_a / (2 * sa) + flip_b / (2 * sb)) / n, max(1, n - 1)),
                 (calib_a / sa, max(1, sa - 1)), (calib_b / sb, max(1, sb - 1))]
        return math.sqrt(sum(v for v, _ in parts)), _welch_df(parts)

    def detectable(n: int, sa: int, sb: int) -> float:
        se, df = precision(n, sa, sb)
        return detectable_from_se(se, alpha=alpha, power=power, df=df)

    se, df = precision(n_items, seeds_a, seeds_b)
    seeds_needed = _smallest(lambda k: detectable(n_items, k if noisy_a else seeds_a,
                                                  k if noisy_b else seeds_b) <= target, 10**6)
    items_needed = _smallest(lambda n: detectable(n, seeds_a, seeds_b) <= target, 10**9)
    return ComparisonPlan(se, df, detectable_from_se(se, alpha=alpha, power=power, df=df),
                          target, power_from_se(target, se, alpha=alpha, df=df), seeds_needed,
                          items_needed, n_items, seeds_a, seeds_b)


@dataclass(frozen=True)
class HierarchicalSignificance:
    """Two-level (seeds x items) bootstrap of a difference of mean scores, b - a."""

    diff: float
    low: float
    high: float
    p_value: float
    se: float
    detectable_diff: float  # (t_df(1 - alpha/2) + z(power)) * se; z for z at many seeds
    seed_diff_min: float  # over all seed pairs (t of b, s of a) of mean(b_t) - mean(a_s)
    seed_diff_max: float
    seed_diff_sd: float
    seed_sd_a: float  # SD across seeds of each side's mean (0 for one seed)
    seed_sd_b: float
    discordance: float  # mean over seed pairs and items of (b - a)^2: the disagreement share
    flip_a: float  # mean over seed pairs of one side of (a_s - a_s')^2 (0 for one seed)
    flip_b: float
    n_items: int
    n_strata: int
    n_seeds_a: int
    n_seeds_b: int
    n_resamples: int
    confidence: float
    power: float
    df: float  # Welch-Satterthwaite degrees of freedom of the variance (inf: no seed share)
    widening: float  # t_df / z at the interval's level, applied to interval and p-value

    def plan(self, target: float = 0.02) -> ComparisonPlan:
        """``plan_comparison`` with this grid's discordance, seed SDs and flip rates."""
        return plan_comparison(self.discordance, self.n_items, seeds_a=self.n_seeds_a,
                               seeds_b=self.n_seeds_b, seed_sd_a=self.seed_sd_a,
                               seed_sd_b=self.seed_sd_b, flip_a=self.flip_a, flip_b=self.flip_b,
                               target=target, alpha=1 - self.confidence, power=self.power)


def _seed_matrix(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]  # one deterministic model (dense): a single "seed"
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MlpruneError(f"Give {name} as seeds x items scores with at least one of each.")
    if not np.isfinite(arr).all():
        raise MlpruneError(f"The scores of {name} must all be finite.")
    return arr


def _seed_effects(y: np.ndarray) -> tuple[np.ndarray, float]:
    """Seed deviations of the seed means, scaled so that resampling S of them with replacement
    has the variance sigma_seed^2 / S of the calibration draw alone.

    Plain resampling gives ((S - 1) / S) Var(seed means) / S: 2/3 of it with 3 seeds. And a seed
    mean holds the item x seed noise MSe / n that the item means carry already, so that share is
    taken out: sigma_seed^2 = max(0, Var(seed means) - MSe / n), MSe the two-way residual.
    Returns the effects and that sigma_seed^2."""
    seeds, n = y.shape
    rows = y.mean(axis=1)
    if seeds < 2:
        return np.zeros(1), 0.0
    v_row = float(rows.var(ddof=1))
    if v_row == 0:
        return np.zeros(seeds), 0.0
    resid = y - rows[:, None] - y.mean(axis=0)[None, :] + y.mean()
    mse = float((resid**2).sum()) / ((seeds - 1) * (n - 1)) if n > 1 else 0.0
    calib = max(0.0, v_row - mse / n)
    return (rows - rows.mean()) * math.sqrt(seeds / (seeds - 1) * calib / v_row), calib


def hierarchical_bootstrap(a: object, b: object, *, strata: Sequence | None = None,
                           n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95,
                           power: float = 0.8) -> HierarchicalSignificance:
    """Bootstrap of mean(b) - mean(a) over calibration seeds and items together.

    ``a`` is seeds_a x items, ``b`` seeds_b x items, scores of the same items in the same order
    (a 1-d array, e.g. dense, is one seed); ``strata`` (one label per item, e.g. language x
    task) makes items resample within their stratum, keeping each stratum's size. Seeds of a and
    b are independent draws: each side's seeds resample on their own, and seed t of b is not
    paired with seed t of a. Each resample draws items (shared by a and b: paired) and seeds of
    each side, and evaluates the two-way decomposition, grand + seed effect + item effect, there:
    diff* = diff + (mean of d over drawn items - diff) + mean(e_b[drawn]) - mean(e_a[drawn]),
    d the per-item difference of seed means, e the seed effects of ``_seed_effects``. Indexing
    the raw matrix at drawn (seed, item) pairs instead (Owen's pigeonhole bootstrap) would shrink
    the seed variance by (S - 1)/S and count the item x seed noise up to three times.

    With few seeds the seed share of the variance rests on few degrees of freedom (a t, not a z,
    situation), so the deviations diff* - diff are widened by w = t_df(1 - alpha/2) / z(1 -
    alpha/2), df the Welch-Satterthwaite degrees of freedom of the item and seed shares (w is
    about 1.05 with 3 seeds a side, 1.01 with 5, 1 with no seed share). The interval is the
    percentile interval of diff + w (diff* - diff). The p-value is two-sided from the centred
    (shifted-null) bootstrap: w (diff* - diff) stands for the estimate's distribution under no
    difference, p = (1 + #{w |diff* - diff| >= |diff|}) / (1 + n_resamples). The detectable
    difference is (t_df(1 - alpha/2) + z(power)) * SE, alpha = 1 - confidence, SE the bootstrap
    SD (the (z + z) SE of many seeds, 2.80 SE; about 2.90 SE with 3 seeds a side).
    """
    a_arr, b_arr = _seed_matrix(a, "a"), _seed_matrix(b, "b")
    n = a_arr.shape[1]
    if b_arr.shape[1] != n:
        raise MlpruneError("Both sides need scores for the same items.")
    if n_resamples < 2:
        raise MlpruneError("The bootstrap needs at least 2 resamples.")
    if not 0 < confidence < 1:
        raise MlpruneError("The confidence level must be between 0 and 1.")
    d = b_arr.mean(axis=0) - a_arr.mean(axis=0)
    diff = float(d.mean())
    groups = _strata_groups(d, strata)
    (eff_a, calib_a), (eff_b, calib_b) = _seed_effects(a_arr), _seed_effects(b_arr)
    stats = _resampled_diffs(groups, eff_a, eff_b, n_resamples, seed)
    alpha = 1 - confidence
    # Welch-Satterthwaite degrees of freedom of the variance: items (n - strata) and each side's
    # seed share (S - 1); with 3 seeds a side the plain bootstrap rejects a true null ~7% of the
    # time at 5%, so the deviations widen by t_df / z at this level.
    parts = [(sum(g.size * g.var(ddof=1) for g in groups if g.size > 1) / n**2,
              max(1, n - len(groups))),
             (calib_a / a_arr.shape[0], a_arr.shape[0] - 1),
             (calib_b / b_arr.shape[0], b_arr.shape[0] - 1)]
    df_eff = _welch_df(parts)
    widen = _critical(alpha, df_eff) / NormalDist().inv_cdf(1 - alpha / 2)
    dev = (stats - diff) * widen
    low, high = diff + np.quantile(dev, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.sum(np.abs(dev) >= abs(diff) - 1e-12))
    se = float(stats.std(ddof=1))
    row_a, row_b = a_arr.mean(axis=1), b_arr.mean(axis=1)
    pairs = (row_b[:, None] - row_a[None, :]).ravel()
    discordance = float(np.mean((b_arr**2).mean(axis=0) + (a_arr**2).mean(axis=0)
                                - 2 * b_arr.mean(axis=0) * a_arr.mean(axis=0)))
    (sd_a, flip_a), (sd_b, flip_b) = _seed_spread(a_arr), _seed_spread(b_arr)
    return HierarchicalSignificance(
        diff, float(low), float(high), min(1.0, (1 + extreme) / (1 + n_resamples)), se,
        detectable_from_se(se, alpha=alpha, power=power, df=df_eff), float(pairs.min()),
        float(pairs.max()), float(pairs.std(ddof=1)) if pairs.size > 1 else 0.0, sd_a, sd_b,
        discordance, flip_a, flip_b, n, len(groups), a_arr.shape[0], b_arr.shape[0],
        n_resamples, confidence, power, float(df_eff), widen)


def _strata_groups(d: np.ndarray, strata: Sequence | None) -> list[np.ndarray]:
    """The per-item differences ``d`` split by stratum (one group without strata), in the
    sorted order of the stratum labels, as the resampling draws them."""
    n = d.size
    if strata is None:
        inverse = np.zeros(n, dtype=int)
    else:
        if len(strata) != n:
            raise MlpruneError("Give one stratum per item to the bootstrap.")
        _, inverse = np.unique(np.asarray([str(s) for s in strata]), return_inverse=True)
    return [d[inverse == k] for k in range(int(inverse.max()) + 1)]


def _resampled_diffs(groups: list[np.ndarray], eff_a: np.ndarray, eff_b: np.ndarray,
                     n_resamples: int, seed: int) -> np.ndarray:
    """diff* of each resample: the mean of d over items drawn within their strata, plus the
    mean of b's drawn seed effects minus a's. Drawn in chunks (bounded memory: chunk x n item
    indices at a time), each chunk in the same order, so a seed gives the same figures."""
    n = sum(g.size for g in groups)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)
    for lo in range(0, n_resamples, chunk):
        m = min(lo + chunk, n_resamples) - lo
        total = np.zeros(m)
        for g in groups:
            total += g[rng.integers(0, g.size, size=(m, g.size))].sum(axis=1)
        seeds = (eff_b[rng.integers(0, eff_b.size, size=(m, eff_b.size))].mean(axis=1)
                 - eff_a[rng.integers(0, eff_a.size, size=(m, eff_a.size))].mean(axis=1))
        stats[lo:lo + m] = total / n + seeds
    return stats


def _seed_spread(y: np.ndarray) -> tuple[float, float]:
    """SD across seeds of a side's seed means, and its flip rate: the mean over items of
    2 x the variance across seeds (0, 0 for one seed)."""
    if y.shape[0] < 2:
        return 0.0, 0.0
    return float(y.mean(axis=1).std(ddof=1)), float(2 * y.var(axis=0, ddof=1).mean())


# --------------------------------------------------------------------------- multiplicity


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input order; None (no test) passes through and
    does not count among the m tests. With p sorted ascending, adjusted p_(k) =
    max over j <= k of min(1, (m - j + 1) p_(j)): reject where the adjusted p is below alpha."""
    tested = [i for i, p in enumerate(p_values) if p is not None]
    if any(not 0 <= p_values[i] <= 1 for i in tested):
        raise MlpruneError("Holm's correction needs p-values between 0 and 1.")
    out: list[float | None] = [None] * len(p_values)
    m, running = len(tested), 0.0
    for rank, i in enumerate(sorted(tested, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out
