"""Scores, masks, N:M, protection, reversibility, sequential vs one-shot."""

from __future__ import annotations

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.capture import capture
from mlprune.models import linear_modules
from mlprune.prune import (
    MaskSet,
    Pattern,
    apply_masks,
    pruned,
    rank_modules,
    restore,
    select_modules,
    sequential_stats,
)

TEXTS = ["French: Le chat dort.\nEnglish: The cat sleeps.\n", "Hello there, general.",
         "German: Guten Morgen!\nEnglish: Good morning!\n", "1 2 3 4 5 6 7 8 9"]


@pytest.fixture
def setup():
    model, tok = tiny_model("llama"), byte_tokenizer()
    return model, tok, capture(model, tok, TEXTS)


def pruned_sets(masks: MaskSet, name: str) -> list[set[int]]:
    return [set(row) for row in masks.pruned_cols[name].tolist()]


def test_unstructured_matches_wanda_formula_row_by_row(setup):
    model, _, stats = setup
    masks = rank_modules(model, stats, method="wanda").masks(0.5)
    for name, info in linear_modules(model).items():
        w = info.weight.float()
        score = w.abs() * (stats.input_sqnorms[name] / stats.n_tokens).sqrt()  # |W| * ||X_j||
        k = int(w.shape[1] * 0.5)
        expected = [set(row) for row in score.argsort(dim=1)[:, :k].tolist()]
        assert pruned_sets(masks, name) == expected, name
        keep = masks.keep(name)
        assert (keep.sum(dim=1) == w.shape[1] - k).all()  # per-row sparsity exact
    assert masks.overall_sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.7, 0.95])
def test_per_row_sparsity_exact(setup, sparsity):
    model, _, stats = setup
    masks = rank_modules(model, stats, method="magnitude").masks(sparsity)
    for name, info in linear_modules(model).items():
        keep = masks.keep(name)
        assert (keep.sum(dim=1) == info.in_features - int(info.in_features * sparsity)).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_every_group_exact(setup, pattern):
    model, _, stats = setup
    p = Pattern.parse(pattern)
    masks = rank_modules(model, stats).masks(0, pattern)
    for name, info in linear_modules(model).items():
        keep = masks.keep(name).view(info.weight.shape[0], -1, p.m)
        assert ((~keep).sum(dim=-1) == p.n).all(), name
        # the n pruned in each group are the n lowest Wanda scores of that group
        score = info.weight.abs() * (stats.input_sqnorms[name] / stats.n_tokens).sqrt()
        groups = score.view(score.shape[0], -1, p.m)
        lowest = groups.argsort(dim=-1)[..., : p.n]
        expected = torch.ones_like(keep).scatter_(-1, lowest, False)
        assert torch.equal(keep, expected)
    assert masks.overall_sparsity() == pytest.approx(p.n / p.m)


def test_bad_parameters(setup):
    model, _, stats = setup
    ranking = rank_modules(model, stats)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(MlpruneError, match="Sparsity must be in"):
            ranking.masks(bad)
    for bad, message in [("4:4", "smaller than M"), ("3:2", "smaller than M"), ("x", "not a pattern"),
                         ("2:", "not a pattern")]:
        with pytest.raises(MlpruneError, match=message):
            ranking.masks(0, bad)
    with pytest.raises(MlpruneError, match="Unknown method"):
        rank_modules(model, stats, method="sparsegpt")
    with pytest.raises(MlpruneError, match="needs calibration statistics"):
        rank_modules(model, None, method="wanda")


def test_nm_needs_divisible_widths():
    model, tok = tiny_model("llama", hidden=36, heads=2), byte_tokenizer()
    stats = capture(model, tok, TEXTS[:2])
    with pytest.raises(MlpruneError, match="divisible by 8, but layers.0.attn.q has 36 inputs"):
        rank_modules(model, stats).masks(0, "4:8")


def test_restore_is_bit_identical_and_apply_twice_is_once(setup):
    model, _, stats = setup
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks = rank_modules(model, stats).masks(0.6)
    apply_masks(model, masks)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    apply_masks(model, masks)
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    # pruned weights are zero, and only them
    for name, info in linear_modules(model).items():
        assert torch.equal(info.weight == 0, ~masks.keep(name))
    restore(model)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    restore(model)  # a no-op when dense


def test_context_manager_restores_even_on_error(setup):
    model, _, stats = setup
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks = rank_modules(model, stats).masks(0.5, "2:4")
    with pytest.raises(RuntimeError), pruned(model, masks):
        assert linear_modules(model)["layers.0.mlp.up"].weight.eq(0).any()
        raise RuntimeError("boom")
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())


def test_conv1d_masks_land_on_transposed_storage():
    model, tok = tiny_model("gpt2"), byte_tokenizer()
    stats = capture(model, tok, TEXTS)
    masks = rank_modules(model, stats).masks(0.5)
    info = linear_modules(model)["layers.0.attn.qkv"]
    with pruned(model, masks):
        stored = info.module.weight  # (in, out) for Conv1D
        assert torch.equal(stored.t() == 0, ~masks.keep(info.name))


def test_protected_columns_are_never_pruned_and_rows_reach_target(setup):
    model, _, stats = setup
    protect = {"embed": [3, 7], "layers.0.resid_post": [5]}
    masks = rank_modules(model, stats, protect=protect).masks(0.7)
    infos = linear_modules(model)
    for name, info in infos.items():
        keep = masks.keep(name)
        k = int(info.in_features * 0.7)
        assert ((~keep).sum(dim=1) == k).all()
        if info.reads_residual:
            # layer 0 reads the embedding output; layer l the stream that layer l-1 wrote
            dims = [3, 7] if info.layer == 0 else [5]
            assert keep[:, dims].all(), name
            others = [d for d in (3, 5, 7) if d not in dims]
            assert not keep[:, others].all(), name  # the other site's dims are not protected here
    assert masks.meta["protected_dims"] == protect


def test_protection_caps_sparsity_when_it_must(setup):
    model, _, stats = setup
    protect = {"embed": list(range(20)), "layers.0.resid_post": list(range(20))}  # 20 of 32
    masks = rank_modules(model, stats, protect=protect).masks(0.9)
    assert masks.sparsity()["layers.1.attn.q"] == pytest.approx(12 / 32)
    assert masks.sparsity()["layers.1.attn.o"] == pytest.approx(int(32 * 0.9) / 32)


def test_invert_prunes_the_highest_scores(setup):
    model, _, stats = setup
    low = rank_modules(model, stats).masks(0.5)
    high = rank_modules(model, stats, invert=True).masks(0.5)
    for name in low.modules:
        assert all(not (a & b) for a, b in zip(pruned_sets(low, name), pruned_sets(high, name)))


def test_random_is_seeded_and_ratio_follows_its_formula(setup):
    model, tok, stats = setup
    r1 = rank_modules(model, stats, method="random", seed=1).masks(0.5)
    r2 = rank_modules(model, stats, method="random", seed=1).masks(0.5)
    r3 = rank_modules(model, stats, method="random", seed=2).masks(0.5)
    name = "layers.1.mlp.down"
    assert pruned_sets(r1, name) == pruned_sets(r2, name) != pruned_sets(r3, name)
    other = capture(model, tok, ["def f(x):\n    return x * 2\n", "SELECT * FROM t;"])
    masks = rank_modules(model, stats, method="ratio", other=other).masks(0.5)
    base = (stats.input_sqnorms[name] / stats.n_tokens).sqrt()
    oth = (other.input_sqnorms[name] / other.n_tokens).sqrt()
    score = linear_modules(model)[name].weight.abs() * base * (base / oth)
    expected = [set(row) for row in score.argsort(dim=1)[:, : int(64 * 0.5)].tolist()]
    assert pruned_sets(masks, name) == expected
    with pytest.raises(MlpruneError, match="second calibration set"):
        rank_modules(model, stats, method="ratio")


def test_module_selection(setup):
    model, _, stats = setup
    names = select_modules(model, "1-1", "mlp")
    assert names == ["layers.1.mlp.gate", "layers.1.mlp.up", "layers.1.mlp.down"]
    masks = rank_modules(model, stats, modules=names).masks(0.5)
    assert masks.modules == names
    with pytest.raises(MlpruneError, match="outside this model's layers 0-1"):
        select_modules(model, "0-5")
    with pytest.raises(MlpruneError, match="Unknown module kind"):
        select_modules(model, None, "embed")


def test_sequential_differs_from_one_shot_as_it_should(setup):
    model, tok, stats = setup
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    seq = sequential_stats(model, tok, TEXTS, stats, method="wanda", sparsity=0.5)
    # the model is left dense
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    # layer 0 sees the dense model either way
    for name in [n for n in stats.input_sqnorms if n.startswith("layers.0.")]:
        assert torch.allclose(seq.input_sqnorms[name], stats.input_sqnorms[name], rtol=1e-4)
    # layer 1 sees layer 0 pruned: equal to a one-shot capture of the model with layer 0 pruned
    layer0 = rank_modules(model, stats, modules=[n for n in stats.input_sqnorms if n.startswith("layers.0.")])
    with pruned(model, layer0.masks(0.5)):
        reference = capture(model, tok, TEXTS)
    for name in [n for n in stats.input_sqnorms if n.startswith("layers.1.")]:
        assert torch.allclose(seq.input_sqnorms[name], reference.input_sqnorms[name], rtol=1e-4)
        assert not torch.allclose(seq.input_sqnorms[name], stats.input_sqnorms[name], rtol=1e-4)


def test_masks_save_and_load(tmp_path, setup):
    model, _, stats = setup
    masks = rank_modules(model, stats).masks(0.5, "2:4")
    masks.save(tmp_path / "m.safetensors")
    back = MaskSet.load(tmp_path / "m.safetensors")
    assert back.pattern == "2:4" and back.target == 0.5
    assert all(torch.equal(back.keep(n), masks.keep(n)) for n in masks.modules)


def test_fast_row_order_and_nm_match_the_plain_sorts():
    """row_order's packed-key sort and N:M's selection passes equal the argsorts they replace."""
    from mlprune.prune import _lowest_in_groups, row_order

    g = torch.Generator().manual_seed(0)
    odd = torch.tensor([0.0, -0.0, 1.0, float("inf"), -1.0, -float("inf"), float("nan"), 3e-42])
    cases = [torch.randn(7, 48, generator=g), torch.randint(-2, 3, (7, 48), generator=g).float(),
             odd[torch.randint(0, len(odd), (7, 48), generator=g)], torch.randn(48, 7, generator=g).t()]
    for score in cases:
        protected = torch.rand(48, generator=g) < 0.2
        expected = score.masked_fill(protected, float("inf")).argsort(dim=1, stable=True)
        order = row_order(score, protected)
        assert order.dtype == torch.int16 and torch.equal(order.long(), expected)
        ranks = torch.empty_like(expected).scatter_(1, expected, torch.arange(48).expand_as(expected))
        for n, m in [(2, 4), (4, 8), (1, 4), (3, 6)]:
            lowest = ranks.view(7, -1, m).argsort(dim=-1)[..., :n] + torch.arange(0, 48, m).view(1, -1, 1)
            assert torch.equal(_lowest_in_groups(order, n, m).long(), lowest.reshape(7, -1))
