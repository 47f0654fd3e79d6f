"""Scores, masks, N:M, protection, reversibility, the registry of applied masks, sequential vs
one-shot, saved masks and rankings."""

from __future__ import annotations

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.capture import capture
from mlprune.models import linear_modules
from mlprune.prune import (
    REGISTRY,
    MaskSet,
    Pattern,
    Ranking,
    applied_masks,
    apply_masks,
    model_lock,
    pruned,
    rank_modules,
    restore,
    select_modules,
    sequential_stats,
    sequential_stats_and_masks,
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
    # 3 protected columns in the first group of 4: 2:4 must prune one of them in every row
    protect = {"embed": [0, 1, 2], "layers.0.resid_post": [0, 1, 2]}
    masks = rank_modules(model, stats, protect=protect).masks(0.5, "2:4")
    assert masks.protected_pruned() > 0
    masks.save(tmp_path / "m.safetensors")
    back = MaskSet.load(tmp_path / "m.safetensors")
    assert back.pattern == "2:4" and back.target == 0.5
    assert back.modules == masks.modules  # forward order, not the file's key order
    assert all(torch.equal(back.keep(n), masks.keep(n)) for n in masks.modules)
    assert back.protected.keys() == masks.protected.keys()
    assert all(torch.equal(back.protected[n], masks.protected[n]) for n in masks.modules)
    assert back.protected_pruned() == masks.protected_pruned()
    assert back.meta["protected_dims"] == protect


def test_ranking_save_and_load_give_the_same_masks(tmp_path, setup):
    model, _, stats = setup
    ranking = rank_modules(model, stats, protect={"embed": [3, 7], "layers.0.resid_post": [5]})
    path = ranking.save(tmp_path / "r" / "ranking.safetensors")
    back = Ranking.load(path)
    assert back.modules == ranking.modules and back.meta == ranking.meta
    for sparsity, pattern in [(0.0, "unstructured"), (0.3, "unstructured"), (0.5, "unstructured"),
                              (0.9, "unstructured"), (0, "2:4"), (0, "4:8")]:
        a, b = ranking.masks(sparsity, pattern), back.masks(sparsity, pattern)
        assert all(torch.equal(a.pruned_cols[n], b.pruned_cols[n]) for n in a.modules)
        assert a.protected_pruned() == b.protected_pruned() and a.meta == b.meta
    assert [p.name for p in path.parent.iterdir()] == ["ranking.safetensors"]


def test_ranking_files_missing_damaged_or_torn(tmp_path, setup, monkeypatch):
    import mlprune.prune as prune_module

    model, _, stats = setup
    with pytest.raises(MlpruneError, match="No ranking file at"):
        Ranking.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(MlpruneError, match="is not a readable ranking file"):
        Ranking.load(tmp_path / "bad.safetensors")
    rank_modules(model, stats).masks(0.5).save(tmp_path / "masks.safetensors")
    with pytest.raises(MlpruneError, match="is not an mlprune ranking file"):
        Ranking.load(tmp_path / "masks.safetensors")
    # a save killed mid-write leaves the previous file whole
    ranking = rank_modules(model, stats)
    path = ranking.save(tmp_path / "r.safetensors")

    def torn(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_module, "save_file", torn)
    with pytest.raises(KeyboardInterrupt):
        rank_modules(model, stats, method="magnitude").save(path)
    back = Ranking.load(path)
    assert all(torch.equal(back.order[n], ranking.order[n]) for n in ranking.modules)


def _layer(model, i: int) -> list[str]:
    return [n for n, info in linear_modules(model).items() if info.layer == i]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_registry_says_what_is_applied_and_replaces(setup):
    model, _, stats = setup
    ranking = rank_modules(model, stats)
    dense = _state(model)
    assert applied_masks(model) is None
    half, most = ranking.masks(0.5), ranking.masks(0.8)
    apply_masks(model, half)
    assert applied_masks(model) is half
    apply_masks(model, most)  # replaces: the weights hold 80%, not 50% and then 80%
    assert applied_masks(model) is most
    for name, info in linear_modules(model).items():
        assert torch.equal(info.weight == 0, ~most.keep(name))
    restore(model)
    assert applied_masks(model) is None and _same(dense, _state(model))
    assert model_lock(model) is model_lock(model)
    assert model_lock(model) is not model_lock(tiny_model("llama"))


def test_the_registry_never_keeps_a_model_alive(setup):
    import gc
    import weakref

    _, _, stats = setup
    model = tiny_model("llama")
    applied = apply_masks(model, rank_modules(model, stats).masks(0.5))
    assert REGISTRY.applied(model) is applied
    gc.collect()  # earlier tests' dead models leave now, not in the count below
    ref, before = weakref.ref(model), len(REGISTRY)
    del model
    gc.collect()
    assert ref() is None and len(REGISTRY) == before - 1  # while `applied` is still held
    assert applied.model is None
    applied.restore()  # nothing left to restore: a no-op


def test_merge_and_extend(setup):
    model, _, stats = setup
    dense = _state(model)
    first = rank_modules(model, stats, modules=_layer(model, 0)).masks(0.5)
    second = rank_modules(model, stats, modules=_layer(model, 1)).masks(0.5)
    merged = first.merge(second)
    assert merged.modules == first.modules + second.modules
    assert all(torch.equal(merged.keep(n), m.keep(n)) for m in (first, second) for n in m.modules)
    with pytest.raises(MlpruneError, match="both prune layers.0.attn.q and 6 more"):
        first.merge(first)
    with pytest.raises(MlpruneError, match="Cannot merge masks of unstructured at 0.5 with"):
        first.merge(rank_modules(model, stats, modules=_layer(model, 1)).masks(0.3))
    # growing one applied set by a layer equals applying the merged set at once
    applied = apply_masks(model, first)
    applied.extend(second)
    grown = _state(model)
    assert applied_masks(model).modules == merged.modules and REGISTRY.applied(model) is applied
    with pytest.raises(MlpruneError, match="both prune"):
        applied.extend(second)
    assert _same(grown, _state(model))
    apply_masks(model, merged)
    assert _same(grown, _state(model))
    restore(model)
    assert _same(dense, _state(model))
    with pytest.raises(MlpruneError, match="no longer applied"):
        applied.extend(second)
    assert _same(dense, _state(model))


def test_an_extension_that_fails_mid_way_is_undone(setup):
    model, _, stats = setup
    first = rank_modules(model, stats, modules=_layer(model, 0)).masks(0.5)
    second = rank_modules(model, stats, modules=_layer(model, 1)).masks(0.5)
    last = second.modules[-1]
    second.pruned_cols[last] = second.pruned_cols[last] + 10_000  # out of range: fails there
    applied = apply_masks(model, first)
    before = _state(model)
    with pytest.raises(MlpruneError, match="name column 100"):
        applied.extend(second)
    assert _same(before, _state(model)) and applied_masks(model) is first
    applied.restore()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sequential_grows_one_mask_set_and_leaves_the_model_dense(pattern):
    model, tok = tiny_model("llama", layers=3), byte_tokenizer()
    stats = capture(model, tok, TEXTS)
    dense, infos = _state(model), linear_modules(model)
    seen = []

    def watch(stage, fraction):  # after each layer: what is applied, and the weights agree
        masks = applied_masks(model)
        seen.append((masks.modules, REGISTRY.applied(model), stage, fraction))
        for name in masks.modules:
            assert torch.equal(infos[name].weight == 0, ~masks.keep(name))

    protect = {0: [1, 2], 1: [4]}
    seq, grown = sequential_stats_and_masks(model, tok, TEXTS, stats, method="wanda", sparsity=0.5,
                                            pattern=pattern, protect=protect, progress=watch)
    assert [s[0] for s in seen] == [_layer(model, 0), _layer(model, 0) + _layer(model, 1),
                                    list(infos)]
    assert seen[0][1] is seen[1][1] is seen[2][1]  # one applied set, grown, never stacked
    assert [s[2:] for s in seen] == [("layer 1/3", 1 / 3), ("layer 2/3", 2 / 3), ("layer 3/3", 1.0)]
    # each layer's masks are those ranked from the statistics it saw (layers before it pruned)
    per_layer = rank_modules(model, seq, protect=protect).masks(0.5, pattern)
    assert grown.modules == per_layer.modules == list(infos)
    assert all(torch.equal(grown.keep(n), per_layer.keep(n)) for n in grown.modules)
    assert grown.protected_pruned() == per_layer.protected_pruned()
    assert applied_masks(model) is None and _same(dense, _state(model))
    plain = sequential_stats(model, tok, TEXTS, stats, method="wanda", sparsity=0.5, pattern=pattern,
                             protect=protect)
    assert all(torch.equal(plain.input_sqnorms[n], seq.input_sqnorms[n]) for n in infos)


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


def test_nm_selection_in_blocks_and_wide_rows_matches_the_argsort():
    """Many row blocks (int16 keys) and rows too wide for int16 keys (int32) give the same
    columns as the plain argsort."""
    from mlprune.prune import _lowest_in_groups

    g = torch.Generator().manual_seed(1)
    for out, n_in, n, m in [(300, 4096, 2, 4), (300, 4096, 4, 8), (40, 16384, 2, 4)]:
        order = torch.stack([torch.randperm(n_in, generator=g) for _ in range(out)])
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n_in).expand_as(order))
        lowest = ranks.view(out, -1, m).argsort(dim=-1)[..., :n] + torch.arange(0, n_in, m).view(1, -1, 1)
        assert torch.equal(_lowest_in_groups(order.to(torch.int16), n, m).long(),
                           lowest.reshape(out, -1))


@pytest.fixture(params=["one thread, whole modules", "threads, blocks of 7"])
def small_blocks(request, monkeypatch):
    """Both ways masks are applied: inline, and spread over threads in many small blocks."""
    import mlprune.prune as prune_module

    if request.param.startswith("threads"):
        monkeypatch.setattr(prune_module, "_BLOCK", 7)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    return request.param


def test_moving_sparsity_up_and_down_equals_fresh_applies_and_ends_dense(setup, small_blocks):
    """A slider's path: each new set replaces the last by touching only what differs, yet
    every state equals that set applied to the dense model, and restore is bit-exact."""
    import copy

    model, _, stats = setup
    ranking = rank_modules(model, stats)
    dense = _state(model)
    path = [(0.5, "unstructured"), (0.6, "unstructured"), (0.3, "unstructured"),
            (0.3, "unstructured"), (0.9, "unstructured"), (0.0, "unstructured"),
            (0.7, "unstructured"), (0.0, "2:4"), (0.0, "4:8"), (0.4, "unstructured")]
    fresh, applied = copy.deepcopy(model), None  # a dense twin, pruned from dense each step
    for sparsity, pattern in path:
        masks = ranking.masks(sparsity, pattern)
        applied = apply_masks(model, masks)
        with pruned(fresh, masks):
            assert _same(_state(fresh), _state(model)), (sparsity, pattern)
        assert _same(dense, _state(fresh))
        assert applied.nbytes() == sum(c.numel() for c in masks.pruned_cols.values()) * 4
    applied.restore()
    assert applied_masks(model) is None and _same(dense, _state(model))


def test_masks_from_elsewhere_replace_and_a_bad_set_leaves_the_model_dense(setup, small_blocks):
    model, _, stats = setup
    ranking = rank_modules(model, stats)
    dense = _state(model)
    loaded = ranking.masks(0.5)
    loaded = MaskSet({n: c.clone() for n, c in loaded.pruned_cols.items()}, loaded.in_features,
                     loaded.target, loaded.pattern)  # same columns, own memory (as read from a file)
    apply_masks(model, ranking.masks(0.7))
    apply_masks(model, loaded)
    assert all(torch.equal(info.weight == 0, ~loaded.keep(name))
               for name, info in linear_modules(model).items())
    bad = ranking.masks(0.6)
    last = bad.modules[-1]
    bad.pruned_cols[last] = bad.pruned_cols[last].clone()
    bad.pruned_cols[last][-1, -1] = -1  # one column out of range, in the last row
    with pytest.raises(MlpruneError, match="name column -1"):
        apply_masks(model, bad)
    assert applied_masks(model) is None and _same(dense, _state(model))


def test_a_restored_set_lends_its_buffer_to_the_next(setup):
    from mlprune.prune import REGISTRY

    model, _, stats = setup
    ranking = rank_modules(model, stats)
    apply_masks(model, ranking.masks(0.6)).restore()
    (spare,) = next(iter(REGISTRY.entry(model).spare.values()))
    applied = apply_masks(model, ranking.masks(0.5))  # fits in it
    storages = {b.values.untyped_storage().data_ptr()
                for _, bands in applied._saved.values() for b in bands}
    assert storages == {spare.untyped_storage().data_ptr()}
    assert not REGISTRY.entry(model).spare  # in use, not spare, while applied
    applied.restore()
    bigger = apply_masks(model, ranking.masks(0.8))  # the spare, and one new buffer for the rest
    storages = {b.values.untyped_storage().data_ptr()
                for _, bands in bigger._saved.values() for b in bands}
    assert len(storages) == 2 and spare.untyped_storage().data_ptr() in storages
    bigger.restore()
    assert len(next(iter(REGISTRY.entry(model).spare.values()))) == 2


def _native(monkeypatch, on: bool) -> None:
    """Turn the compiled mask moves on or off for what follows (off: torch's index ops)."""
    from mlprune import kernels

    monkeypatch.setenv(kernels.NATIVE_ENV, "1" if on else "0")


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                        ("gpt2", torch.float32), ("qwen2", torch.float64)])
def test_compiled_mask_moves_equal_torchs_bit_for_bit(monkeypatch, arch, dtype):
    from mlprune import kernels

    if not kernels.available():
        pytest.skip("no C compiler here: only torch's path runs")
    model, tok = tiny_model(arch).to(dtype), byte_tokenizer()  # gpt2: transposed Conv1D weights
    ranking = rank_modules(model, capture(model, tok, TEXTS))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    steps = [ranking.masks(0.5), ranking.masks(0.7), ranking.masks(0.3), ranking.masks(0, "2:4")]
    seen = {}
    for on in (True, False):
        _native(monkeypatch, on)
        for i, masks in enumerate(steps):  # a slider up and down, then a new pattern
            applied = apply_masks(model, masks)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            saved = {n: [b.values.clone() for b in bands] for n, (_, bands) in applied._saved.items()}
            if on:
                seen[i] = state, saved
            else:
                assert _same(seen[i][0], state), i
                assert all(torch.equal(a, b) for n in saved for a, b in zip(seen[i][1][n], saved[n]))
            for name, info in linear_modules(model).items():
                assert torch.equal(info.weight == 0, ~masks.keep(name))
        restore(model)
        assert _same(dense, _state(model))


def test_without_a_compiler_masks_still_apply(monkeypatch, setup, tmp_path):
    from mlprune import kernels

    model, _, stats = setup
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MLPRUNE_CACHE", str(tmp_path))
    assert not kernels.available()
    dense = _state(model)
    masks = rank_modules(model, stats).masks(0.6)
    apply_masks(model, masks)
    for name, info in linear_modules(model).items():
        assert torch.equal(info.weight == 0, ~masks.keep(name))
    restore(model)
    assert _same(dense, _state(model))


@pytest.mark.parametrize("cols_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compiled_take_and_put_by_column_type(cols_dtype, dtype):
    from mlprune import kernels

    if not kernels.available():
        pytest.skip("no C compiler here: only torch's path runs")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 24, generator=gen).to(dtype)
    weight = base.t().contiguous().t()  # column-major, as a transposed Conv1D
    cols = torch.rand(40, 24, generator=gen).argsort(1).to(cols_dtype)[:, 3:13]  # a strided view
    values = torch.full((40, 10), 7.0, dtype=dtype)
    assert kernels.take(weight, cols, values, 5, 30)
    assert torch.equal(values[5:30], base.gather(1, cols.long())[5:30])
    assert (values[:5] == 7).all() and (values[30:] == 7).all()  # rows outside untouched
    expected = base.clone()
    expected[5:30].scatter_(1, cols[5:30].long(), 0)
    assert torch.equal(weight, expected)
    assert kernels.put(weight, cols, values, 0, 40) is True
    expected[:5].scatter_(1, cols[:5].long(), 7.0)
    expected[30:].scatter_(1, cols[30:].long(), 7.0)
    expected[5:30] = base[5:30]
    assert torch.equal(weight, expected)
    assert not kernels.take(weight, cols, values.double(), 0, 40)  # dtype mismatch: not its job
    assert not kernels.take(weight, cols.float(), values, 0, 40)  # columns must be integers
    assert torch.equal(weight, expected)
