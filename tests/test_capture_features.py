"""Capture statistics against direct computations; padding excluded; feature detection."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.capture import (
    ActivationStats,
    Cancelled,
    _Collector,
    capture,
    check_finite,
    encode,
    token_magnitudes,
)
from mlprune.features import Rule, detect, detected_dims, overlap, overlap_matrix, top_dims
from mlprune.models import linear_modules

TEXTS = ["French: Le chat dort.\nEnglish: The cat sleeps.\n", "Hi", "German: Guten Morgen, wie geht es dir heute?\n"]


def direct_stats(model, tok, texts):
    """Reference: each text alone (no padding at all), hidden states from output_hidden_states,
    module inputs from plain hooks."""
    infos = linear_modules(model)
    sq = {n: torch.zeros(i.in_features, dtype=torch.float64) for n, i in infos.items()}
    hidden = None
    for text in texts:
        ids = torch.tensor([encode(tok, [text])[0]])
        seen = {}
        handles = [i.module.register_forward_pre_hook(
            lambda m, a, n=n, seen=seen: seen.__setitem__(n, a[0].detach()))
            for n, i in infos.items()]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        for h in handles:
            h.remove()
        for n, x in seen.items():
            sq[n] += x.reshape(-1, x.shape[-1]).double().square().sum(0)
        # hidden_states[0] is the embedding output; [l + 1] is layer l's output (the last one
        # is after the final norm in most models, so compare layers before the last)
        norms = torch.stack([h[0].double().norm(dim=0) for h in out.hidden_states[1:]])
        hidden = norms if hidden is None else hidden + norms
    return hidden / len(texts), sq


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stats_equal_direct_computation_and_padding_is_excluded(arch):
    model, tok = tiny_model(arch), byte_tokenizer()
    stats = capture(model, tok, TEXTS, batch_size=3)  # one batch: two of three rows padded
    hidden, sq = direct_stats(model, tok, TEXTS)
    assert stats.n_tokens == sum(len(s) for s in encode(tok, TEXTS))
    assert torch.allclose(stats.hidden_norms[:-1].double(), hidden[:-1], rtol=1e-4)
    for name, v in stats.input_sqnorms.items():
        assert torch.allclose(v.double(), sq[name], rtol=1e-4, atol=1e-5), name


def test_padding_really_excluded():
    """Counting pad positions changes the statistics: the test above would catch it."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    padded = capture(model, tok, TEXTS, batch_size=3)
    alone = capture(model, tok, TEXTS, batch_size=1)
    for name in padded.input_sqnorms:
        assert torch.allclose(padded.input_sqnorms[name], alone.input_sqnorms[name], rtol=1e-4)
    # The mask is what excludes padding: drop it, and the statistics must change.
    import mlprune.capture as cap

    original = cap._Collector._tokens
    cap._Collector._tokens = lambda self, x: x.reshape(-1, x.shape[-1]).float()
    try:
        counted = capture(model, tok, TEXTS, batch_size=3)
    finally:
        cap._Collector._tokens = original
    # (pad embeddings are zero, so layer 0's q input is zero there; later layers are not)
    name = "layers.1.mlp.down"
    assert not torch.allclose(counted.input_sqnorms[name], alone.input_sqnorms[name], rtol=1e-3)


def test_save_load_round_trip(tmp_path, llama, tok):
    stats = capture(llama, tok, TEXTS)
    path = stats.save(tmp_path / "s.safetensors")
    back = ActivationStats.load(path)
    assert torch.equal(back.hidden_norms, stats.hidden_norms)
    assert back.input_sqnorms.keys() == stats.input_sqnorms.keys()
    assert all(torch.equal(back.input_sqnorms[k], v) for k, v in stats.input_sqnorms.items())
    assert back.meta["texts"] == TEXTS and back.n_tokens == stats.n_tokens
    assert not list(tmp_path.glob("*.partial"))


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MlpruneError, match="not an mlprune statistics file"):
        ActivationStats.load(bad)


def test_half_precision_squares_accumulate_in_fp32():
    """fp16 activations of 1000 square to 1e6, past fp16's 65504: sums must stay finite."""
    layer = torch.nn.Linear(4, 2).half()
    from mlprune.models import LinearInfo

    info = LinearInfo("layers.0.mlp.up", "x", 0, "mlp", "up", layer, False)
    collector = _Collector([], [info], 4)
    x = torch.full((1, 3, 4), 1000.0, dtype=torch.float16)
    with collector:
        collector.mask = torch.ones(1, 3, dtype=torch.bool)
        collector._last = None
        collector._linear_hook(info.name)(layer, (x,))
    assert torch.isfinite(collector.sqnorms[info.name]).all()
    assert torch.allclose(collector.sqnorms[info.name], torch.full((4,), 3e6))


def test_non_finite_stats_are_caught(llama, tok):
    stats = capture(llama, tok, TEXTS)
    stats.hidden_norms[1, 3] = float("nan")
    with pytest.raises(MlpruneError, match="NaN or infinite in layers \\[1\\]"):
        check_finite(stats)


def test_cancel_raises_and_leaves_no_hooks(llama, tok):
    with pytest.raises(Cancelled):
        capture(llama, tok, TEXTS * 4, batch_size=2, should_stop=lambda: True)
    for module in llama.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_special_tokens_typed_as_text_stay_text(tok):
    ids = encode(tok, ["<eos> and <bos>"])[0]
    assert ids.count(tok.eos_token_id) == 0 and ids.count(tok.bos_token_id) == 1  # only the real BOS


def test_token_view(llama, tok):
    tokens, mags = token_magnitudes(llama, tok, "Hello world")
    assert mags.shape == (2, len(tokens), 32) and (mags >= 0).all()


def fake_stats(rows):
    norms = torch.tensor(rows, dtype=torch.float32)
    return ActivationStats(norms, {}, 10, 1, {"prompts": "x"})


def test_detection_rules():
    stats = fake_stats([[1, 1, 1, 500, 1, 50], [2, 2, 400, 2, 2, 2]])
    assert detected_dims(stats, "ratio:100") == {"layers.0.resid_post": [3], "layers.1.resid_post": [2]}
    top2 = detected_dims(stats, "top-k:2")
    assert top2["layers.0.resid_post"] == [3, 5] and top2["layers.1.resid_post"][0] == 2
    assert detected_dims(stats, "absolute:450") == {"layers.0.resid_post": [3],
                                                    "layers.1.resid_post": []}
    table = detect(stats, "ratio:20")
    assert list(table.columns) == ["layer", "site", "dim", "magnitude", "median", "ratio_to_median"]
    assert table.iloc[0].to_dict() == {"layer": 0, "site": "layers.0.resid_post", "dim": 3,
                                       "magnitude": 500.0, "median": 1.0, "ratio_to_median": 500.0}
    assert top_dims(stats, 1)["layers"][1]["top"][0]["dim"] == 2
    for bad in ("top-k:0", "ratio", "median:3", "top-k:1.5", "ratio:x"):
        with pytest.raises(MlpruneError):
            Rule.parse(bad)


def test_overlap_hand_worked():
    # 20 dims; top/bottom 10% = 2 dims each.
    a = fake_stats([list(range(20))])  # top {19, 18}, bottom {0, 1}
    b = fake_stats([list(range(20))[::-1]])  # top {0, 1}, bottom {19, 18}
    c = fake_stats([[*range(18), 100, 99]])  # top {18, 19}
    ab = overlap(a, b, 0.1).iloc[0]
    assert ab.top_in_top == 0 and ab.top_in_bottom == 1 and ab.jaccard == 0
    ac = overlap(a, c, 0.1).iloc[0]
    assert ac.top_in_top == 1 and ac.jaccard == 1
    matrix = overlap_matrix({"a": a, "b": b, "c": c}, 0.1)
    assert matrix.loc["a", "a"] == 1 and matrix.loc["a", "b"] == 0 and matrix.loc["b", "c"] == 0
