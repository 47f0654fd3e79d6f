"""Layer-adaptive sparsity (OWL): the target stays the size-weighted mean; layers with more
outliers are pruned less; sequential mode, saved rankings and the report carry it."""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.allocation import Allocation, layer_sparsities, spread, weighted_mean
from mlprune.capture import capture
from mlprune.export import build_report
from mlprune.models import LoadedModel, linear_modules
from mlprune.pipeline import PruneSpec, prune
from mlprune.prune import (
    Ranking,
    allocate,
    outlier_shares,
    rank_modules,
    scores,
    sequential_stats_and_masks,
)

TEXTS = ["French: Le chat dort.\nEnglish: The cat sleeps.\n", "Hello there, general.",
         "German: Guten Morgen!\nEnglish: Good morning!\n", "1 2 3 4 5 6 7 8 9"]


@pytest.fixture
def deep():
    """A tiny llama with 4 layers, its tokenizer and its statistics on a few texts."""
    model, tok = tiny_model("llama", layers=4), byte_tokenizer()
    return model, tok, capture(model, tok, TEXTS)


@pytest.mark.parametrize("target", [0.0, 0.03, 0.3, 0.5, 0.7, 0.97])
def test_layer_sparsities_average_to_the_target_weighted_by_size(target):
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randint(1, 12)
        sizes = {k: rng.choice([100, 400, 1000, 4096]) for k in range(n)}
        offsets = spread({k: rng.random() for k in range(n)}, sizes, rng.choice([0.05, 0.2, 0.5]))
        out = layer_sparsities(offsets, sizes, target)
        assert weighted_mean(out, sizes) == pytest.approx(target, abs=1e-12)
        assert all(0 <= s <= max(0.99, target) for s in out.values())
        # the shape is kept: the order of the layers' sparsities follows their offsets
        for a in out:
            for b in out:
                if offsets[a] < offsets[b]:
                    assert out[a] <= out[b] + 1e-12


def test_spread_is_owls_mapping():
    sizes = dict.fromkeys(range(4), 10)
    offsets = spread({0: 0.1, 1: 0.4, 2: 0.25, 3: 0.1}, sizes, 0.08)
    # min-max scaled onto [0, 2 * lambda], centred, negated: the most outliers, the least pruned
    assert offsets[1] == pytest.approx(min(offsets.values()))
    assert max(offsets.values()) - min(offsets.values()) == pytest.approx(0.16)
    assert sum(offsets.values()) == pytest.approx(0.0, abs=1e-15)
    assert spread({0: 0.2, 1: 0.2}, {0: 1, 1: 1}, 0.08) == {0: 0.0, 1: 0.0}  # nothing to go by
    sparsities = layer_sparsities(offsets, sizes, 0.5)
    # scaled 0, .16, .08, 0 (mean .06): sparsities .5 + .06 - scaled
    assert [sparsities[k] for k in range(4)] == pytest.approx([0.56, 0.40, 0.48, 0.56])


def test_outlier_shares_follow_owls_definition(deep):
    model, _, stats = deep
    infos = linear_modules(model)
    shares = outlier_shares(model, stats, threshold=2.0)
    for layer in range(4):
        names = [n for n, i in infos.items() if i.layer == layer]
        flat = [scores(infos[n], "wanda", stats) for n in names]
        mean = sum(s.sum() for s in flat) / sum(s.numel() for s in flat)
        above = sum(int((s > 2.0 * mean).sum()) for s in flat)
        assert shares[layer] == pytest.approx(above / sum(s.numel() for s in flat))
    assert len(set(shares.values())) > 1  # the layers differ, or the test shows nothing


def test_owl_masks_prune_each_layer_at_its_share_and_keep_the_target(deep):
    model, _, stats = deep
    infos = linear_modules(model)
    allocation = allocate(model, stats, kind="owl", strength=0.1, threshold=2.0)
    masks = rank_modules(model, stats, allocation=allocation).masks(0.5)
    per_layer = {int(k): v for k, v in masks.meta["allocation"]["per_layer"].items()}
    shares = outlier_shares(model, stats, threshold=2.0)
    most, least = max(shares, key=shares.get), min(shares, key=shares.get)
    assert per_layer[least] - per_layer[most] == pytest.approx(0.2)  # spans 2 * lambda
    assert per_layer[most] == min(per_layer.values()) and per_layer[least] == max(per_layer.values())
    for name, s in masks.sparsity().items():  # every row of a module at its layer's share
        n_in = infos[name].in_features
        assert s == int(n_in * per_layer[infos[name].layer]) / n_in
    # the reached overall sparsity is the target, short only of each row's rounding down
    assert 0.5 - 1 / 32 < masks.overall_sparsity() <= 0.5
    uniform = rank_modules(model, stats).masks(0.5)
    assert uniform.overall_sparsity() == pytest.approx(0.5)
    assert "allocation" not in uniform.meta


def test_nm_patterns_refuse_an_allocation(deep, loaded, corpus):
    model, _, stats = deep
    ranking = rank_modules(model, stats, allocation=allocate(model, stats, kind="owl"))
    with pytest.raises(MlpruneError, match="unevenly"):
        ranking.masks(0, "2:4")
    with pytest.raises(MlpruneError, match="unevenly"):
        PruneSpec(allocation="owl", pattern="2:4").validate()
    for bad in (dict(allocation="wide"), dict(allocation_range=0.7),
                dict(outlier_threshold=0)):
        with pytest.raises(MlpruneError):
            PruneSpec(**bad).validate()


def test_sequential_mode_uses_the_dense_allocation(deep):
    model, tok, stats = deep
    allocation = allocate(model, stats, kind="owl", strength=0.1, threshold=2.0)
    _, masks = sequential_stats_and_masks(model, tok, TEXTS, stats, method="wanda",
                                          sparsity=0.5, allocation=allocation)
    one_shot = rank_modules(model, stats, allocation=allocation).masks(0.5)
    assert masks.sparsity() == one_shot.sparsity()  # same per-module shares as one-shot
    assert len(set(masks.sparsity().values())) > 1


def test_saved_rankings_keep_their_allocation(deep, tmp_path):
    model, _, stats = deep
    ranking = rank_modules(model, stats, allocation=allocate(model, stats, kind="owl"))
    again = Ranking.load(ranking.save(tmp_path / "r.safetensors"))
    assert again.masks(0.6).sparsity() == ranking.masks(0.6).sparsity()
    assert again.allocation == ranking.allocation
    assert Allocation.from_dict(ranking.allocation.to_dict()) == ranking.allocation


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_the_prune_report_records_the_allocation(mode, corpus):
    loaded = LoadedModel(tiny_model("llama", layers=4), byte_tokenizer(), "tiny-llama", "local")
    spec = PruneSpec(allocation="owl", outlier_threshold=2.0, allocation_range=0.1, samples=2,
                     mode=mode, sparsity=0.4)
    result = prune(loaded, corpus, spec)
    report = build_report(loaded, result.masks, spec=asdict(spec))
    allocation = report["allocation"]
    assert allocation["kind"] == "owl" and allocation["target"] == 0.4
    assert allocation["range"] == 0.1 and allocation["threshold"] == 2.0
    per_layer = {int(k): v for k, v in allocation["per_layer"].items()}
    sizes = {int(k): v for k, v in allocation["sizes"].items()}
    assert weighted_mean(per_layer, sizes) == pytest.approx(0.4, abs=1e-12)
    assert len(set(per_layer.values())) > 1
    assert spec.label == "wanda-mt-owl"
