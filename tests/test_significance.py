"""Power of zero-shot comparisons (the detectable difference) and the paired test of
translation metrics through sacrebleu."""

from __future__ import annotations

import json
import math
import os

import pytest
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest
from tiny import save_tiny

from mlprune import MlpruneError
from mlprune import zeroshot as zs
from mlprune.cli import main
from mlprune.evaluate import paired_translation_test
from mlprune.zeroshot import ItemScores, TaskItem, TaskResult, detectable_difference

# --------------------------------------------------------------------------- power


def test_detectable_difference_hand_computed():
    # n = 100 pairs, 20% discordant, alpha 0.05 two-sided, power 0.8:
    # z_a = 1.959964, z_b = 0.841621, a = z_a sqrt(0.2) = 0.876522, z_b^2 = 0.708326
    # d = (a sqrt(100) + z_b sqrt(100.708326 * 0.2 - a^2)) / 100.708326
    #   = (8.765225 + 0.841621 * sqrt(19.373374)) / 100.708326 = 12.469632 / 100.708326
    assert detectable_difference(100, 0.2) == pytest.approx(0.123819, abs=1e-6)
    # and it solves Connor's sample size equation: sqrt(n) d = a + z_b sqrt(psi - d^2)
    d = detectable_difference(400, 0.1)
    assert math.sqrt(400) * d == pytest.approx(
        1.959964 * math.sqrt(0.1) + 0.841621 * math.sqrt(0.1 - d**2), abs=1e-5)
    assert detectable_difference(100, 0.0) is None  # the systems never differ
    assert detectable_difference(6, 0.5) is None  # 0.656 would exceed the discordance
    with pytest.raises(MlpruneError, match="discordance in"):
        detectable_difference(10, 1.5)


def _scored(item_id, lang, correct):
    item = TaskItem(item_id, lang, "p", ("a", "b"), 0)
    return ItemScores(item, (-1.0, -2.0) if correct else (-2.0, -1.0), (1, 1), (1, 1))


def test_power_in_one_result_and_in_a_comparison():
    # one model: 100 items at accuracy 0.5 -> assumed discordance 2 * 0.5 * 0.5 = 0.5
    one = TaskResult("t", [_scored(str(i), "en", i % 2 == 0) for i in range(100)], "none")
    row = one.table()[0]
    assert row["detectable_diff"] == pytest.approx(detectable_difference(100, 0.5))
    assert zs.assumed_discordance(0.5) == 0.5 and zs.assumed_discordance(0.9) == pytest.approx(0.18)
    text = zs.format_result(one)
    assert "detect" in text and f"{row['detectable_diff']:.3f}" in text
    assert "p < 0.05 with 80% power" in text
    # two models: 10 items lost and 10 gained of 100 -> discordance 0.2, as hand-computed above
    dense = TaskResult("t", [_scored(str(i), "en", i < 50) for i in range(100)], "none")
    sparse = TaskResult("t", [_scored(str(i), "en", 10 <= i < 60) for i in range(100)], "none")
    row = zs.compare_results(dense, sparse, n_resamples=200)[0]
    assert row["diff"] == 0 and row["discordance"] == pytest.approx(0.2)
    assert row["detectable_diff"] == pytest.approx(0.123819, abs=1e-6)
    text = zs.format_comparison("t", [row])
    assert "0.200" in text and "0.124" in text and "observed discordance" in text


def test_eval_command_prints_and_writes_power(tiny_folder, tmp_path, capsys):
    items = [TaskItem(str(i), lang, f"{lang} item {i} is", (" good", " bad"), i % 2)
             for lang in ("en", "fr") for i in range(4)]
    path = zs.write_task(items, tmp_path / "toy.jsonl")
    other = save_tiny(tmp_path / "other", "llama", seed=1)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_folder), "--task", str(path), "--pruned", str(other),
                 "--resamples", "200", "--json", str(out)]) == 0
    assert "detect" in capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {r["lang"]: r for r in report["comparison"]["toy"]}
    assert 0 <= rows["en"]["discordance"] <= 1 and "detectable_diff" in rows["en"]
    assert report["tasks"]["toy"]["power"]["alpha"] == 0.05
    assert "detectable_diff" in report["tasks"]["toy"]["languages"][0]


# --------------------------------------------------------------------------- translation

REFS = ["The cat sleeps on the sofa.", "It is sunny today.", "I would like a coffee.",
        "Where is the station?", "We go to the market tomorrow.", "My brother works in Paris."]
HYP_A = ["The cat sleeps on sofa.", "It is sunny.", "I want coffee.", "Where station?",
         "We go to market tomorrow.", "My brother works in Paris."]
HYP_B = ["A cat is sleeping on the couch.", "Today it is sunny.", "I would like a coffee.",
         "Where is the train station?", "Tomorrow we go to the market.", "My brother works in Paris."]


@pytest.mark.parametrize("method", ["bs", "ar"])
def test_paired_translation_test_agrees_with_sacrebleu(monkeypatch, method):
    monkeypatch.setenv("SACREBLEU_SEED", "7")
    direct = PairedTest([("a", HYP_A), ("b", HYP_B)], {"chrf": CHRF(), "bleu": BLEU()},
                        references=[REFS], test_type=method, n_samples=0,
                        n_ar_confidence=0 if method == "ar" else -1)
    _, scores = direct()
    monkeypatch.setenv("SACREBLEU_SEED", "999")  # ours sets its own seed and puts this back
    ours = paired_translation_test(REFS, HYP_A, HYP_B, method=method, seed=7)
    assert os.environ["SACREBLEU_SEED"] == "999"
    for key, name in (("chrf", "chrF2"), ("bleu", "BLEU")):
        a, b = scores[name]
        got = ours[key]
        assert got["metric"] == name and got["method"] == method and got["n"] == len(REFS)
        assert (got["a"], got["b"]) == pytest.approx((a.score, b.score))
        assert got["difference"] == pytest.approx(b.score - a.score)
        assert got["p_value"] == pytest.approx(b.p_value)
        assert (got["b_mean"], got["b_ci"]) == pytest.approx((b.mean, b.ci))
        assert got["n_samples"] == {"bs": 1000, "ar": 10000}[method]
    json.dumps(ours, allow_nan=False)  # plain floats, nothing numpy


def test_paired_translation_test_refuses_what_sacrebleu_would_get_wrong():
    with pytest.raises(MlpruneError, match="at least 1"):
        paired_translation_test(REFS, HYP_A, HYP_B, seed=0)
    with pytest.raises(MlpruneError, match="one output of each system per reference"):
        paired_translation_test(REFS, HYP_A[:2], HYP_B)
    with pytest.raises(MlpruneError, match="Unknown paired test 'tt'"):
        paired_translation_test(REFS, HYP_A, HYP_B, method="tt")
    with pytest.raises(MlpruneError, match="Unknown metric ter"):
        paired_translation_test(REFS, HYP_A, HYP_B, metrics=("ter",))


def test_eval_translation_with_pruned_tests_both_models(tiny_folder, corpus_file, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", "llama", seed=1)
    out = tmp_path / "t.json"
    assert main(["eval", "--model", str(tiny_folder), "--corpus", str(corpus_file), "--pair",
                 "fr-en", "--limit", "3", "--pruned", str(other), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dense  fr-en: chrF" in text and "pruned fr-en: chrF" in text
    assert "chrF2: pruned - dense" in text and "BLEU: pruned - dense" in text
    assert "sacrebleu paired bootstrap, 1000 samples, seed 12345" in text
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert report["n"] == report["pruned"]["n"] == 3
    assert [o["source"] for o in report["outputs"]] == [o["source"] for o in report["pruned"]["outputs"]]
    sig = report["significance"]
    assert set(sig) == {"chrf", "bleu"} and 0 < sig["chrf"]["p_value"] <= 1
    assert sig["chrf"]["a"] == pytest.approx(report["chrf"])
    assert sig["chrf"]["b"] == pytest.approx(report["pruned"]["chrf"])
