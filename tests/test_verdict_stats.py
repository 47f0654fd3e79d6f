"""Statistics of the verdict grid: the seeds x items bootstrap against simulated grids of known
effect (power, coverage, null rejection), the planner, Holm's correction and RankC's top-j."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlprune import MlpruneError
from mlprune.zeroshot.statistics import (
    detectable_from_se,
    hierarchical_bootstrap,
    holm,
    plan_comparison,
    power_from_se,
    rankc_item,
    rankc_weights,
)

STRATA, PER_STRATUM = 8, 170  # 4 languages x 2 tasks, 170 items each: 1360 items pooled
SEED_SD = 0.01  # SD of a pruned variant's accuracy across calibration draws: 1 point


def _grid(rng: np.random.Generator, effect: float, seeds_a: int, seeds_b: int, *,
          dense_a: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """0/1 outcomes of a (seeds_a x items, or 1 x items when dense) and b whose expected pooled
    accuracies differ by exactly ``effect``.

    An item is right when a uniform latent falls below the accuracy q of its stratum (+ effect
    for b, + a N(0, SEED_SD) shift per seed). The latent is the item's own shared one with
    probability 0.93 per method, else the method's own; each seed keeps it with probability
    0.935, else draws afresh. Every latent is uniform, so P(right) = q exactly, while the two
    methods disagree on ~13% of items and two seeds of one method on ~7%, as pruned models do.
    """
    n = STRATA * PER_STRATUM
    q = np.repeat(rng.uniform(0.45, 0.75, STRATA), PER_STRATUM)
    shared = rng.random(n)

    def side(acc: np.ndarray, seeds: int, dense: bool) -> np.ndarray:
        own = np.where(rng.random(n) < 0.93, shared, rng.random(n))
        if dense:
            return (own < acc)[None, :].astype(float)
        shift = rng.normal(0.0, SEED_SD, seeds)
        latent = np.where(rng.random((seeds, n)) < 0.935, own, rng.random((seeds, n)))
        return (latent < acc[None, :] + shift[:, None]).astype(float)

    return (side(q, seeds_a, dense_a), side(q + effect, seeds_b, False),
            np.repeat(np.arange(STRATA), PER_STRATUM))


def _simulate(effect: float, seeds_a: int, seeds_b: int, grids: int, seed: int, *,
              dense_a: bool = False) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(grids):
        a, b, strata = _grid(rng, effect, seeds_a, seeds_b, dense_a=dense_a)
        out.append(hierarchical_bootstrap(a, b, strata=strata, n_resamples=200, seed=k))
    return out


# --------------------------------------------------------------------------- test the test


def test_finds_a_two_point_effect_at_the_planned_power_and_covers_it():
    effect, seeds, grids = 0.02, 4, 300
    res = _simulate(effect, seeds, seeds, grids, seed=1)
    n = STRATA * PER_STRATUM
    # the planner from the design: discordance and flip rates (precise averages over the
    # grids), the known calibration SD plus the item noise a measured seed SD carries
    psi = float(np.mean([r.discordance for r in res]))
    flip = float(np.mean([r.flip_a + r.flip_b for r in res]) / 2)
    sd = math.sqrt(SEED_SD**2 + flip / (2 * n))
    plan = plan_comparison(psi, n, seeds_a=seeds, seeds_b=seeds, seed_sd_a=sd, seed_sd_b=sd,
                           flip_a=flip, flip_b=flip, target=effect)
    assert 0.10 < psi < 0.16 and 0.05 < flip < 0.09  # most items agree, as in pruned models
    power = np.mean([r.p_value < 0.05 for r in res])
    coverage = np.mean([r.low <= effect <= r.high for r in res])
    diffs = np.array([r.diff for r in res])
    # 300 grids: binomial SD of the power ~0.029, of the coverage ~0.013
    assert abs(power - plan.power_at_target) < 0.08, (power, plan.power_at_target)
    assert 0.91 <= coverage <= 0.99, coverage
    assert abs(diffs.mean() - effect) < 3 * diffs.std() / math.sqrt(grids)  # unbiased
    # the bootstrap SE and the planner's SE both match the SD of the estimate across grids
    true_se = diffs.std(ddof=1)
    assert np.sqrt(np.mean([r.se**2 for r in res])) == pytest.approx(true_se, rel=0.1)
    assert plan.se == pytest.approx(true_se, rel=0.1)
    assert np.mean([r.detectable_diff for r in res]) == pytest.approx(plan.detectable_diff,
                                                                      rel=0.1)


def test_rejects_a_true_null_at_the_nominal_rate():
    # 3 seeds a side: the seed share of the variance rests on 2 + 2 degrees of freedom, which
    # the t widening allows for (unwidened, the rate was ~7%)
    res = _simulate(0.0, 3, 3, 400, seed=2)
    rate = np.mean([r.p_value < 0.05 for r in res])
    assert 0.02 <= rate <= 0.085, rate  # binomial SD ~0.011 at 400 grids
    # t_2 / z = 2.2 bounds it; here the median df is ~10, a 14% widening
    assert all(1.0 <= r.widening < 2.2 for r in res)
    assert np.median([r.widening for r in res]) > 1.05
    # dense (one deterministic model) against 3 seeds of a pruned one
    res = _simulate(0.0, 1, 3, 200, seed=3, dense_a=True)
    rate = np.mean([r.p_value < 0.05 for r in res])
    assert 0.01 <= rate <= 0.10, rate
    assert all(r.n_seeds_a == 1 and r.seed_sd_a == 0 and r.flip_a == 0 for r in res)


# --------------------------------------------------------------------------- small cases


def test_hierarchical_bootstrap_hand_worked():
    a = np.array([[1, 0, 1, 1], [1, 1, 1, 0]])
    b = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 1]])
    r = hierarchical_bootstrap(a, b, strata=["en", "en", "fr", "fr"], n_resamples=500, seed=3)
    # seed means a: .75, .75; b: 1, .75, .75 -> diff 2.5/3 - .75 = 1/12
    assert r.diff == pytest.approx(1 / 12)
    # seed pairs b_t - a_s: .25 twice, 0 four times
    assert (r.seed_diff_min, r.seed_diff_max) == (0.0, pytest.approx(0.25))
    assert r.seed_diff_sd == pytest.approx(np.std([.25, .25, 0, 0, 0, 0], ddof=1))
    assert r.seed_sd_a == 0 and r.seed_sd_b == pytest.approx(np.std([1, .75, .75], ddof=1))
    # disagreements over the 6 seed pairs x 4 items: item 0: 1 of 6, items 1, 2, 3: 3 of 6
    assert r.discordance == pytest.approx((1 + 3 + 3 + 3) / 24)
    # two seeds of a disagree on items 1 and 3; seeds of b on 3 of the 12 (pair, item)s
    assert r.flip_a == pytest.approx(0.5) and r.flip_b == pytest.approx(4 / 12)
    assert (r.n_items, r.n_strata, r.n_seeds_a, r.n_seeds_b) == (4, 2, 2, 3)
    assert r.low <= r.diff <= r.high and 0 < r.p_value <= 1
    assert r == hierarchical_bootstrap(a, b, strata=["en", "en", "fr", "fr"], n_resamples=500,
                                       seed=3)  # seeded: deterministic
    same = hierarchical_bootstrap(a, a, n_resamples=100)
    assert same.diff == 0 and same.p_value == 1.0 and same.se == 0


def test_hierarchical_bootstrap_dense_and_strata():
    dense = np.array([1, 0, 1, 0, 1, 1])  # 1-d: one deterministic model
    pruned = np.array([[1, 0, 0, 0, 1, 1], [1, 0, 1, 0, 0, 1]])
    r = hierarchical_bootstrap(dense, pruned, n_resamples=300)
    assert r.n_seeds_a == 1 and r.diff == pytest.approx(-1 / 6)
    # items resample within strata: a stratum whose difference is constant adds nothing, so
    # the interval is the single value when all strata are constant and seeds agree
    a = np.array([[0, 0, 1, 1]])
    b = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    fixed = hierarchical_bootstrap(a, b, strata=[0, 0, 1, 1], n_resamples=200)
    assert fixed.low == fixed.high == pytest.approx(0.5) and fixed.se == pytest.approx(0)
    free = hierarchical_bootstrap(a, b, n_resamples=200)  # unstratified: 0.5 is not fixed
    assert free.se > 0


@pytest.mark.parametrize(("a", "b", "kwargs", "match"), [
    (np.zeros((2, 3)), np.zeros((2, 4)), {}, "same items"),
    (np.zeros((2, 3)), np.zeros((2, 3)), {"strata": [0, 1]}, "one stratum per item"),
    (np.zeros((2, 0)), np.zeros((2, 0)), {}, "at least one"),
    (np.full((2, 3), np.nan), np.zeros((2, 3)), {}, "finite"),
    (np.zeros((2, 3)), np.zeros((2, 3)), {"n_resamples": 1}, "at least 2"),
])
def test_hierarchical_bootstrap_refuses(a, b, kwargs, match):
    with pytest.raises(MlpruneError, match=match):
        hierarchical_bootstrap(a, b, **kwargs)


def test_detectable_and_power_from_se():
    z_sum = 1.959964 + 0.841621
    assert detectable_from_se(0.01) == pytest.approx(z_sum * 0.01, abs=1e-7)
    # the detectable difference is detected with the stated power (+ the far tail, ~1e-8)
    assert power_from_se(detectable_from_se(0.01), 0.01) == pytest.approx(0.8, abs=1e-6)
    assert power_from_se(0.0, 0.01) == pytest.approx(0.05)
    # t with 10 df: 2.228139 in place of 1.959964
    assert detectable_from_se(0.01, df=10) == pytest.approx((2.228139 + 0.841621) * 0.01,
                                                             abs=1e-6)
    with pytest.raises(MlpruneError):
        detectable_from_se(-1.0)


def test_plan_hand_worked():
    # dense vs 4 seeds of a pruned model, 1000 items: discordance 0.1, seeds flip 6% of items,
    # calibration variance 1e-4 (measured SD^2 = 1e-4 + 0.06 / 2000)
    # Var = (0.1 - 0.03) / 1000 + 0.03 / 4000 + 1e-4 / 4 = 7e-5 + 7.5e-6 + 2.5e-5 = 1.025e-4
    # df = 1.025e-4^2 / (7.75e-5^2 / 999 + 2.5e-5^2 / 3) = 49.0
    plan = plan_comparison(0.1, 1000, seeds_b=4, seed_sd_b=math.sqrt(1e-4 + 0.06 / 2000),
                           flip_b=0.06, target=0.027)
    assert plan.se == pytest.approx(math.sqrt(1.025e-4))
    assert plan.df == pytest.approx(49.0, abs=0.1)
    assert plan.detectable_diff == pytest.approx(detectable_from_se(plan.se, df=plan.df))
    assert plan.detectable_diff > 0.027 and plan.power_at_target < 0.8
    # the seeds and items it asks for are the fewest that reach the target
    k, n = plan.seeds_needed, plan.items_needed

    def det(n_items: int = 1000, seeds_b: int = 4) -> float:
        # the SD measured on n items: the same calibration variance, its own item noise
        return plan_comparison(0.1, n_items, seeds_b=seeds_b, seed_sd_b=math.sqrt(
            1e-4 + 0.06 / (2 * n_items)), flip_b=0.06).detectable_diff

    assert k is not None and det(seeds_b=k) <= 0.027 < det(seeds_b=k - 1)
    assert n is not None and det(n_items=n) <= 0.027 < det(n_items=n - 1)
    # a floor seeds cannot lower: the methods' own item-level disagreement
    assert plan_comparison(0.5, 1000, seeds_b=4, seed_sd_b=0.01, target=0.02).seeds_needed is None
    # dense vs dense-like (no seed noise): Connor-like item share only, seeds irrelevant
    flat = plan_comparison(0.1, 1000, target=0.03)
    assert flat.se == pytest.approx(math.sqrt(0.1 / 1000)) and flat.seeds_needed == 1
    with pytest.raises(MlpruneError, match="target above 0"):
        plan_comparison(0.1, 1000, target=0.0)


# --------------------------------------------------------------------------- Holm


def test_holm_hand_worked():
    # m = 4 tests (None is not one). Sorted: .005 x4 = .02; .01 x3 = .03; .03 x2 = .06;
    # .04 x1 = .04 -> .06 (step-down adjusted p never decrease)
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, then carried
    assert holm([None, None]) == [None, None] and holm([]) == []
    assert holm([0.02]) == [0.02]
    with pytest.raises(MlpruneError, match="between 0 and 1"):
        holm([0.1, 1.5])


# --------------------------------------------------------------------------- RankC


def _rankc_least_likely(reference: list[float], other: list[float]) -> float:
    """The authors' evaluate_consistency.py: the first j of an ascending np.argsort, i.e. the j
    least likely choices, in place of the j most likely."""
    asc_ref, asc_other = np.argsort(reference), np.argsort(other)
    n = len(reference)
    return sum(w * len(set(asc_ref[:j]) & set(asc_other[:j])) / j
               for j, w in zip(range(1, n + 1), rankc_weights(n)))


def test_rankc_top_j_against_the_authors_least_likely():
    # weights 0.665241, 0.244728, 0.090031. Top-j: P@1 = 1, P@2 = |{0,1} & {0,2}|/2 = 1/2,
    # P@3 = 1 -> 0.877636. Least likely: P@1 = |{2} & {1}| = 0, P@2 = |{2,1} & {1,2}|/2 = 1,
    # P@3 = 1 -> 0.334759: they differ on P@1 and P@2, not only P@1
    en, fr = [0.6, 0.3, 0.1], [0.6, 0.1, 0.3]
    assert rankc_item(en, fr) == pytest.approx(0.877636, abs=1e-6)
    assert _rankc_least_likely(en, fr) == pytest.approx(0.334759, abs=1e-6)
    assert round(rankc_item(en, fr), 2) == 0.88 and round(_rankc_least_likely(en, fr), 2) == 0.33
