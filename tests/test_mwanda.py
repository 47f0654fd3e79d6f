"""M-Wanda: with every part off it is Wanda on the pooled mix; each part moves the ranking the
way its docstring says, on hand-made statistics; CWL keeps the target; the spec's checks."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.allocation import weighted_mean
from mlprune.capture import ActivationStats
from mlprune.export import build_report
from mlprune.models import LinearInfo, LoadedModel, linear_modules
from mlprune.mwanda import MWanda, cross_lingual_correlation
from mlprune.pipeline import PruneSpec, calibrate, prune
from mlprune.prune import allocate, rank_modules, scores

MIX = "mix:fr-en=1,en-fr=1,fr=1"


def set_stats(sqnorms: dict[str, list[float]], active: dict[str, list[float]] | None = None,
              n_tokens: int = 1) -> ActivationStats:
    """Hand-made statistics of one calibration set."""
    return ActivationStats(torch.zeros(1, 2), {k: torch.tensor(v) for k, v in sqnorms.items()},
                           n_tokens, 1, {},
                           active_counts={k: torch.tensor(v) for k, v in (active or {}).items()})


def module(name: str, role: str, n_in: int = 2) -> LinearInfo:
    linear = torch.nn.Linear(n_in, 1, bias=False)
    torch.nn.init.ones_(linear.weight)
    return LinearInfo(name, name, 0, "mlp", role, linear, False)


def lowest(score: torch.Tensor) -> int:
    """The column pruned first."""
    return int(score[0].argmin())


def test_variance_keeps_a_column_one_language_relies_on():
    info = module("layers.0.mlp.up", "up")
    # column 0: both languages alike; column 1: only the second language uses it, and its
    # pooled RMS is a little lower (sqrt(4) vs sqrt(4.2)), so plain Wanda prunes it first
    stats = ActivationStats.combine([set_stats({info.name: [4.2, 0.0]}),
                                     set_stats({info.name: [4.2, 8.0]})], [1, 1])
    assert lowest(scores(info, "wanda", stats)) == 1
    none = MWanda.parse("none")
    assert torch.equal(scores(info, "m-wanda", stats, mwanda=none), scores(info, "wanda", stats))
    assert lowest(scores(info, "m-wanda", stats, mwanda=MWanda.parse("variance"))) == 0
    assert lowest(scores(info, "m-wanda", stats,
                         mwanda=MWanda.parse("variance", variance_weight=0.0))) == 1


def test_prob_keeps_neurons_that_fire_often():
    info = module("layers.0.mlp.down", "down")
    sets = [set_stats({info.name: [4.2, 4.0]}, {info.name: [1.0, 9.0]}, n_tokens=10),
            set_stats({info.name: [4.2, 4.0]}, {info.name: [3.0, 9.0]}, n_tokens=10)]
    stats = ActivationStats.combine(sets, [1, 1])
    assert lowest(scores(info, "wanda", stats)) == 1
    assert lowest(scores(info, "m-wanda", stats, mwanda=MWanda.parse("prob"))) == 0
    expected = stats.input_norms(info.name) * (1 + torch.tensor([0.2, 0.9]))
    assert torch.allclose(scores(info, "m-wanda", stats, mwanda=MWanda.parse("prob"))[0],
                          expected)
    up = module("layers.0.mlp.up", "up")  # no activation counts: the term is 1
    stats_up = ActivationStats.combine([set_stats({up.name: [1.0, 2.0]}),
                                        set_stats({up.name: [1.0, 2.0]})], [1, 1])
    assert torch.equal(scores(up, "m-wanda", stats_up, mwanda=MWanda.parse("prob")),
                       scores(up, "wanda", stats_up))


def test_cwl_prunes_layers_where_languages_diverge_less_and_keeps_the_target():
    model = tiny_model("llama", layers=4)
    infos = linear_modules(model)
    g = torch.Generator().manual_seed(0)
    first, second = {}, {}
    for name, info in infos.items():
        v = torch.rand(info.in_features, generator=g) + 0.1
        first[name] = v.square().tolist()
        other = {0: v * 3, 1: v * 3, 2: v * (1 + 0.5 * torch.rand(v.shape, generator=g)),
                 3: torch.rand(v.shape, generator=g) + 0.1}[info.layer]
        second[name] = other.square().tolist()
    stats = ActivationStats.combine([set_stats(first), set_stats(second)], [1, 1])
    layers = {k: [n for n, i in infos.items() if i.layer == k] for k in range(4)}
    rho = cross_lingual_correlation(stats, layers)
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(1.0)
    assert rho[3] < rho[2] < rho[0]
    allocation = allocate(model, stats, kind="cwl", strength=0.1)
    per_layer = allocation.sparsities(0.5)
    assert per_layer[3] < per_layer[2] < per_layer[0] == pytest.approx(per_layer[1])
    assert per_layer[0] - per_layer[3] == pytest.approx(0.2)
    assert weighted_mean(per_layer, allocation.sizes) == pytest.approx(0.5, abs=1e-12)
    masks = rank_modules(model, stats, method="m-wanda", allocation=allocation).masks(0.5)
    for name, s in masks.sparsity().items():
        n_in = infos[name].in_features
        assert s == int(n_in * per_layer[infos[name].layer]) / n_in


def test_with_every_part_off_m_wanda_is_wanda_on_the_pooled_mix(loaded, corpus):
    base = PruneSpec(calibration=MIX, samples=2, mode="one-shot", sparsity=0.5)
    wanda = prune(loaded, corpus, base).masks
    off = prune(loaded, corpus, PruneSpec(**{**asdict(base), "method": "m-wanda",
                                             "mwanda_parts": "none"})).masks
    assert wanda.pruned_cols.keys() == off.pruned_cols.keys()
    assert all(torch.equal(wanda.pruned_cols[n], off.pruned_cols[n]) for n in wanda.pruned_cols)
    # each part on its own changes the masks, where it should
    stats = calibrate(loaded, corpus, base).stats
    model = loaded.model
    plain = rank_modules(model, stats).masks(0.5)
    for part, changed in (("variance", None), ("prob", "down")):
        masks = rank_modules(model, stats, method="m-wanda", mwanda=MWanda.parse(part)).masks(0.5)
        differs = {n for n in plain.pruned_cols
                   if not torch.equal(plain.pruned_cols[n], masks.pruned_cols[n])}
        assert differs, part
        if changed:
            assert all(n.endswith(changed) for n in differs)


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_m_wanda_runs_whole_and_the_report_shows_cwl(mode, corpus):
    loaded = LoadedModel(tiny_model("llama", layers=4), byte_tokenizer(), "tiny-llama", "local")
    spec = PruneSpec(method="m-wanda", calibration=MIX, samples=2, mode=mode, sparsity=0.5)
    result = prune(loaded, corpus, spec)
    report = build_report(loaded, result.masks, spec=asdict(spec))
    assert report["allocation"]["kind"] == "cwl"
    per_layer = {int(k): v for k, v in report["allocation"]["per_layer"].items()}
    sizes = {int(k): v for k, v in report["allocation"]["sizes"].items()}
    assert weighted_mean(per_layer, sizes) == pytest.approx(0.5, abs=1e-12)
    assert result.ranking.meta["mwanda"]["parts"] == ["cwl", "prob", "variance"]
    assert spec.label == "m-wanda"
    ablated = PruneSpec(method="m-wanda", calibration=MIX, mwanda_parts="variance,prob")
    assert ablated.layer_allocation == "uniform" and ablated.label == "m-wanda[prob,variance]"


@pytest.mark.parametrize("changes, words", [
    (dict(method="m-wanda"), "calibrate on a mix"),
    (dict(allocation="cwl"), "calibrate on a mix"),
    (dict(method="m-wanda", calibration="pooled", mwanda_parts="variance,size"), "size"),
    (dict(method="m-wanda", calibration="pooled", allocation="owl"), "drop cwl"),
    (dict(method="m-wanda", calibration="pooled", pattern="2:4"), "drop cwl"),
    (dict(method="m-wanda", calibration="pooled", variance_weight=-1.0), "at least 0"),
])
def test_bad_m_wanda_settings_are_one_clear_sentence(changes, words):
    with pytest.raises(MlpruneError, match=words):
        PruneSpec(**changes).validate()
    PruneSpec(method="m-wanda", calibration="pooled", pattern="2:4",
              mwanda_parts="variance,prob").validate()  # no cwl: N:M is fine


def test_a_one_set_mix_cannot_feed_m_wanda(loaded, corpus):
    with pytest.raises(MlpruneError, match="at least two"):
        prune(loaded, corpus, PruneSpec(method="m-wanda", calibration="mix:fr-en", samples=2,
                                        mode="one-shot"))
