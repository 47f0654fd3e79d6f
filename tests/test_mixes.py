"""Calibration mixes: the statistics of a mix are the weighted combination of its sets'
statistics, in one-shot and sequential mode; pooled; bad mix strings; activation counts."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import EN, FR

from mlprune import MlpruneError
from mlprune.capture import ActivationStats, capture
from mlprune.corpus import ParallelCorpus
from mlprune.models import linear_modules
from mlprune.pipeline import PruneSpec, calibrate
from mlprune.prompts import calibration_mix, mix_components, pooled_prompts
from mlprune.prune import sequential_stats

MIX = "mix:fr-en=2,en-fr=1,fr=1"


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mixed_stats_are_the_weighted_combination_of_the_single_sets(loaded, corpus):
    spec = PruneSpec(calibration=MIX, samples=3, mode="one-shot")
    mixed = calibrate(loaded, corpus, spec).stats
    singles = {name: calibrate(loaded, corpus, PruneSpec(calibration=c, pair=p, samples=3)).stats
               for name, c, p in (("mt:fr-en", "mt", "fr-en"), ("mt:en-fr", "mt", "en-fr"),
                                  ("mono:fr", "mono", "fr-en"))}
    weights = {"mt:fr-en": 0.5, "mt:en-fr": 0.25, "mono:fr": 0.25}
    assert [(n, w) for n, w, _ in mixed.parts] == list(weights.items())
    for name in mixed.input_sqnorms:  # per token: sum_k w_k * sqnorm_k / n_k
        per_token = sum(w * singles[n].input_sqnorms[name] / singles[n].n_tokens
                        for n, w in weights.items())
        assert close(mixed.input_norms(name), per_token.sqrt())
    for name in mixed.active_counts:
        share = sum(w * singles[n].active_counts[name] / singles[n].n_tokens
                    for n, w in weights.items())
        assert close(mixed.active_share(name), share)
    hidden = sum(w * singles[n].hidden_norms for n, w in weights.items())
    assert close(mixed.hidden_norms, hidden)
    assert mixed.n_tokens == sum(s.n_tokens for s in singles.values())
    for name, _, part in mixed.parts:  # each set is the single set itself (its cache entry)
        assert torch.equal(part.hidden_norms, singles[name].hidden_norms)


def test_a_one_set_mix_is_the_set_and_weights_are_normalised(loaded, corpus):
    single = calibrate(loaded, corpus, PruneSpec(samples=2)).stats
    one = calibrate(loaded, corpus, PruneSpec(calibration="mix:fr-en=3", samples=2)).stats
    for name in single.input_sqnorms:
        assert close(one.input_norms(name), single.input_norms(name))
    assert close(one.hidden_norms, single.hidden_norms)
    a = calibrate(loaded, corpus, PruneSpec(calibration="mix:fr-en=1,fr=1", samples=2)).stats
    b = calibrate(loaded, corpus, PruneSpec(calibration="mix:fr-en=5,fr=5", samples=2)).stats
    for name in a.input_sqnorms:
        assert torch.equal(a.input_sqnorms[name], b.input_sqnorms[name])
    assert mix_components("mix:fr-en=3,de-en") == [("mt:fr-en", 0.75), ("mt:de-en", 0.25)]


def test_pooled_is_every_x_to_english_direction():
    assert mix_components("pooled", ["en", "fr", "de", "zh"]) == \
        [("mt:fr-en", 1 / 3), ("mt:de-en", 1 / 3), ("mt:zh-en", 1 / 3)]
    with pytest.raises(MlpruneError, match="English"):
        mix_components("pooled", ["fr", "de"])


@pytest.mark.parametrize("bad", ["mix:", "mix:fr-en=abc", "mix:fr-en=-1", "mix:fr-en=0",
                                 "mix:fr-en,fr-en=2", "mix:fr-fr", "mix:=1", "mix:fr-en=inf",
                                 "mixture"])
def test_bad_mix_strings_are_one_clear_sentence(bad):
    with pytest.raises(MlpruneError) as err:
        PruneSpec(calibration=bad).validate()
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_a_language_the_corpus_lacks_is_named(loaded, corpus):
    with pytest.raises(MlpruneError, match="de"):
        calibrate(loaded, corpus, PruneSpec(calibration="mix:fr-en=1,de-en=1", samples=2))


def test_one_pass_over_a_pooled_set_equals_the_combination(llama, tok, corpus):
    parts = calibration_mix(corpus, MIX, shots=2, samples=3)
    pooled = capture(llama, tok, pooled_prompts(MIX, parts), batch_size=4)
    alone = ActivationStats.combine([capture(llama, tok, ps, batch_size=4) for ps, _ in parts],
                                    [w for _, w in parts])
    for name in alone.input_sqnorms:
        assert close(pooled.input_norms(name), alone.input_norms(name))
    for name in alone.active_counts:
        assert close(pooled.active_share(name), alone.active_share(name))
    assert close(pooled.hidden_norms, alone.hidden_norms)
    assert close(pooled.embed_norms, alone.embed_norms)


def test_sequential_mode_weights_a_mix_as_one_shot_does(loaded, corpus):
    """At sparsity 0 nothing is pruned, so the sequential pass must find the dense statistics
    of the mix: each part collected alone and weighted as the mix says."""
    spec = PruneSpec(calibration=MIX, samples=3)
    calib = calibrate(loaded, corpus, spec)
    seq = sequential_stats(loaded.model, loaded.tokenizer, calib.prompts, calib.stats,
                           method="wanda", sparsity=0.0)
    for name in calib.stats.input_sqnorms:
        assert close(seq.input_norms(name), calib.stats.input_norms(name))
    for name in calib.stats.active_counts:
        assert close(seq.active_share(name), calib.stats.active_share(name))
    assert [w for _, w, _ in seq.parts] == [0.5, 0.25, 0.25]
    pruned = sequential_stats(loaded.model, loaded.tokenizer, calib.prompts, calib.stats,
                              method="wanda", sparsity=0.5)
    assert not close(pruned.input_sqnorms["layers.1.attn.q"], seq.input_sqnorms["layers.1.attn.q"])


def test_activation_counts_are_the_gates_positive_outputs(llama, tok):
    texts = ["Hello there.", "Bonjour tout le monde, ca va?"]
    stats = capture(llama, tok, texts, batch_size=2)
    infos = linear_modules(llama)
    gate = infos["layers.1.mlp.gate"].module
    seen = []
    handle = gate.register_forward_hook(lambda m, a, out: seen.append((out[0] > 0).sum(0)))
    try:
        for t in texts:  # one prompt at a time: no padding to exclude
            llama(**tok([t], return_tensors="pt"))
    finally:
        handle.remove()
    assert torch.equal(stats.active_counts["layers.1.mlp.down"], sum(seen).float())
    assert set(stats.active_counts) == {n for n, i in infos.items() if i.role == "down"}


def test_saved_stats_keep_activation_counts_and_old_files_load(tmp_path, llama, tok):
    stats = capture(llama, tok, ["Hello there."])
    back = ActivationStats.load(stats.save(tmp_path / "s.safetensors"))
    assert back.active_counts.keys() == stats.active_counts.keys()
    old = ActivationStats(stats.hidden_norms, stats.input_sqnorms, stats.n_tokens, 1)
    back = ActivationStats.load(old.save(tmp_path / "old.safetensors"))
    assert back.active_counts == {} and back.input_sqnorms.keys() == stats.input_sqnorms.keys()
    with pytest.raises(MlpruneError, match="capture again"):
        back.active_share("layers.0.mlp.down")


def test_the_pooled_calibration_on_a_three_language_corpus(loaded):
    corpus = ParallelCorpus(pd.DataFrame({"en": EN, "fr": FR, "de": FR[::-1]}), "three")
    calib = calibrate(loaded, corpus, PruneSpec(calibration="pooled", samples=2))
    assert [n for n, _, _ in calib.stats.parts] == ["mt:fr-en", "mt:de-en"]
    assert calib.prompts.parts == [("mt:fr-en", 2, 0.5), ("mt:de-en", 2, 0.5)]
    assert calib.stats.meta["prompts"] == "pooled"
