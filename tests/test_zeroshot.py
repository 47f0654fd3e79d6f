"""Zero-shot multiple choice: scoring against direct log-probabilities, task files, RankC,
the paired bootstrap, sweep columns, the lm-eval bridge and the eval/sweep commands."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import ARCHITECTURES, byte_tokenizer, save_tiny, tiny_model

from mlprune import MlpruneError
from mlprune import zeroshot as zs
from mlprune.cli import main
from mlprune.pipeline import sweep
from mlprune.prune import pruned, rank_modules
from mlprune.zeroshot import (
    ItemScores,
    Task,
    TaskItem,
    TaskResult,
    compare_results,
    evaluate_task,
    load_task,
    paired_bootstrap,
    rankc,
    rankc_item,
    score_items,
    split_tokens,
    top_j,
)

ITEMS = [
    TaskItem("1", "en", "The film was great. It is", (" positive", " negative"), 0),
    TaskItem("2", "en", "Paris is in ", ("France", "Spain", "the moon"), 0),  # trailing space
    TaskItem("3", "en", "A much longer prompt, so that rows are padded to different widths:",
             (" yes", " no"), 1),
    TaskItem("4", "en", "Le chat dort , right? {choice} , The cat sleeps", ("Yes", "Also", "No"), 0),
    TaskItem("5", "en", "x", ("a", "ab", "abc"), 2),  # choices that are prefixes of each other
]


def direct_logprob(model, tok, context: str, text: str) -> tuple[float, int]:
    """log P(text | context) from one unpadded forward pass and a full log-softmax."""
    stripped = context.rstrip()
    text = context[len(stripped):] + text
    ctx = [tok.bos_token_id] + tok(stripped, add_special_tokens=False)["input_ids"]
    cont = tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    return total, len(cont)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_equal_direct_log_probabilities(arch):
    model, tok = tiny_model(arch), byte_tokenizer()
    scored = score_items(model, tok, ITEMS, batch_size=3)
    for s in scored:
        for c, (context, text) in enumerate(s.item.pairs()):
            expected, n = direct_logprob(model, tok, context, text)
            assert s.logprob[c] == pytest.approx(expected, abs=2e-4)
            assert s.n_tokens[c] == n
            assert s.scores("token")[c] == pytest.approx(expected / n, abs=2e-4)
            assert s.scores("none")[c] == s.logprob[c]
    # one row per batch or everything at once: the same numbers
    alone = score_items(model, tok, ITEMS, batch_size=1)
    for x, y in zip(scored, alone):
        assert x.logprob == pytest.approx(y.logprob, abs=2e-4)


def test_whole_sequence_scores_every_token_after_bos(llama, tok):
    item = ITEMS[3]
    s = score_items(llama, tok, [item])[0]
    for c, choice in enumerate(item.choices):
        text = item.prompt.replace("{choice}", choice)
        expected, n = direct_logprob(llama, tok, "", text)
        assert n == len(text.encode()) and s.n_tokens[c] == n
        assert s.logprob[c] == pytest.approx(expected, abs=2e-4)
        assert s.scores("token")[c] == pytest.approx(expected / n, abs=2e-5)


def test_head_runs_only_on_scored_positions_and_identical_inputs_once(llama, tok):
    shapes = []
    hook = llama.lm_head.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape[:2])))
    try:
        # three single-token choices after one prompt: one input row, one position
        score_items(llama, tok, [TaskItem("1", "en", "Answer:", ("A", "B", "C"), 0)])
        assert shapes == [(1, 1)]
        shapes.clear()
        # choices sharing ' ab': only their differing last byte is computed for the others
        score_items(llama, tok, [TaskItem("1", "en", "Q:", (" abx", " aby"), 0)])
        assert shapes == [(1, 4)]
        shapes.clear()
        # a logits budget of ~1 position per batch splits rows into batches of one
        score_items(llama, tok, ITEMS[:3], max_logits_mb=0)
        assert all(b == 1 for b, _ in shapes)
    finally:
        hook.remove()


def _merging_tokenizer():
    """A byte tokenizer with one merge, 'c' + 'd' -> 'cd', to make a boundary merge."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    vocab["cd"] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("c", "d")]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    t.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def test_context_and_choice_are_tokenized_apart_like_lm_eval():
    tok = _merging_tokenizer()
    whole = tok("abcd")["input_ids"]
    ctx, cont = split_tokens(tok, "abc", "d")
    assert len(whole) == 4  # <bos> a b cd: tokenizing the whole would swallow the choice
    assert ctx == tok("abc")["input_ids"] and cont == tok("d", add_special_tokens=False)["input_ids"]
    # trailing whitespace of the prompt moves to the front of the choice
    ctx, cont = split_tokens(tok, "It is ", "cd")
    assert ctx == tok("It is")["input_ids"]
    assert cont == tok(" cd", add_special_tokens=False)["input_ids"]
    # an empty context starts from BOS
    assert split_tokens(tok, "", "ab")[0] == [tok.bos_token_id]


# --------------------------------------------------------------------------- task files


def _line(**kw) -> str:
    obj = {"id": "1", "lang": "en", "prompt": "p", "choices": ["a", "b"], "label": 0}
    obj.update(kw)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


def test_task_file_loads_and_subsets(tmp_path):
    lines = [_line(id=str(i), lang=lang, label=i % 2) for lang in ("fr", "en", "sw") for i in range(5)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    task = load_task(path)
    assert task.name == "t" and len(task) == 15
    assert task.languages == ["en", "fr", "sw"]  # English first
    small = task.subset(limit=2, langs=["en", "sw"])
    assert sorted((it.id, it.lang) for it in small.items) == [
        ("0", "en"), ("0", "sw"), ("1", "en"), ("1", "sw")]
    with pytest.raises(MlpruneError, match="no items in de"):
        task.subset(langs=["de"])


@pytest.mark.parametrize("text, message", [
    ('{"id": "1", "lang": "en"', r"t\.jsonl line 1 is not valid JSON"),
    (_line() + "\n" + _line(label=None), r"line 2 has no 'label' field"),
    (_line(choices=None), r"line 1 has no 'choices' field"),
    (_line(label=2), r"line 1 has label 2, out of range for its 2 choices \(0 to 1\)"),
    (_line(label=-1), r"label -1, out of range"),
    (_line(choices=["only"]), r"line 1 has 1 choice; an item needs at least 2"),
    (_line(choices="ab"), r"'choices' that are not a list of strings"),
    (_line(label="0"), r"label that is not an integer"),
    ("[1, 2]", r"line 1 is not a JSON object"),
    (_line() + "\n" + _line(), r"line 2 repeats item '1' in en \(first on line 1\)"),
    (_line() + "\n" + _line(lang="fr", choices=["a", "b", "c"]),
     r"line 2 gives item '1' 3 choices in fr but line 1 gives it 2 in en"),
    ("\n\n", r"holds no items"),
])
def test_task_file_problems_are_one_sentence_each(tmp_path, text, message):
    path = tmp_path / "t.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MlpruneError, match=message) as err:
        load_task(path)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_missing_task_file_names_the_builtins(tmp_path):
    with pytest.raises(MlpruneError, match="nli, sentiment"):
        load_task(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", zs.BUILTIN_TASKS)
def test_builtin_tasks_are_valid_and_parallel(name):
    if not zs.builtin_task_path(name).is_file():
        pytest.skip(f"built-in task {name} not written yet")
    task = load_task(name)
    assert "en" in task.languages and len(task.languages) >= 6
    for lang in task.languages:
        ids = {it.id for it in task.items if it.lang == lang}
        assert len(ids) >= 40 and ids == {it.id for it in task.items if it.lang == "en"}


# --------------------------------------------------------------------------- RankC


def test_rankc_hand_worked():
    # weights for 2 choices: e^-1 / (e^-1 + e^-2) = 0.731059, e^-2 / (...) = 0.268941
    assert rankc_item([0.9, 0.1], [0.8, 0.3]) == pytest.approx(1.0)
    assert rankc_item([0.9, 0.1], [0.2, 0.7]) == pytest.approx(0.268941, abs=1e-6)
    # 3 choices: weights 0.665241, 0.244728, 0.090031. English ranks 0 > 1 > 2, French 0 > 2 > 1:
    # P@1 = 1, P@2 = |{0,1} & {0,2}| / 2 = 0.5, P@3 = 1 -> 0.665241 + 0.122364 + 0.090031
    assert rankc_item([-1.0, -2.0, -3.0], [-1.0, -3.0, -2.0]) == pytest.approx(0.877636, abs=1e-6)
    # ranking by the lowest score would give P@1 = 0 ({2} vs {1}), P@2 = 1, P@3 = 1: 0.334759
    assert rankc_item([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.334759, abs=1e-6)
    assert top_j([0.1, 0.5, 0.5], 1) == {1}  # ties: the lower index first
    assert rankc([[0.9, 0.1], [0.9, 0.1]], [[0.8, 0.3], [0.2, 0.7]]) == pytest.approx(
        (1 + 0.268941) / 2, abs=1e-6)


def _scored(item_id, lang, logprob, label=0):
    item = TaskItem(item_id, lang, "p", tuple(str(i) for i in range(len(logprob))), label)
    return ItemScores(item, tuple(logprob), (1,) * len(logprob), (1,) * len(logprob))


def test_task_result_accuracy_and_consistency_hand_worked():
    scored = [
        _scored("a", "en", [-1, -2, -3], 0), _scored("b", "en", [-3, -1, -2], 1),
        _scored("a", "fr", [-1, -3, -2], 0), _scored("b", "fr", [-1, -2, -3], 1),
        _scored("a", "sw", [-3, -2, -1], 0), _scored("b", "sw", [-3, -1, -2], 1),
    ]
    res = TaskResult("nli", scored, "none")
    assert res.accuracy() == {"en": 1.0, "fr": 0.5, "sw": 0.5}
    assert res.non_english_accuracy() == 0.5
    cons = res.consistency()
    # fr: item a 0.877636 (above); item b: en 1>2>0, fr 0>1>2: P@1 0, P@2 1/2, P@3 1
    assert cons["fr"] == pytest.approx((0.877636 + 0.244728 / 2 + 0.090031) / 2, abs=1e-6)
    # sw: item a reversed: P@1 0, P@2 |{0,1}&{2,1}|/2, P@3 1; item b identical: 1
    assert cons["sw"] == pytest.approx((0.244728 / 2 + 0.090031 + 1) / 2, abs=1e-6)
    table = {r["lang"]: r for r in res.table()}
    assert table["non-en"]["accuracy"] == 0.5 and table["en"]["rankc"] != table["en"]["rankc"]
    cols = res.columns()
    assert cols["nli_acc_fr"] == 0.5 and cols["nli_rankc_mean"] == pytest.approx(
        (cons["fr"] + cons["sw"]) / 2)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_hand_worked_cases():
    same = paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], seed=1)
    assert (same.diff, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    worse = paired_bootstrap([1, 1, 1], [0, 0, 0], n_resamples=999)
    assert (worse.diff, worse.low, worse.high) == (-1.0, -1.0, -1.0)
    assert worse.p_value == pytest.approx(1 / 1000)  # no resample reaches 0
    # d = [1, 0, 0]: resampled means k/3, k ~ Binomial(3, 1/3): P(k) = 8, 12, 6, 1 (/27).
    # |k/3 - 1/3| >= 1/3 for k = 0, 2, 3: p = 15/27. 2.5% quantile 0 (P(k=0) = 0.30);
    # 97.5% quantile 1, since P(k <= 2) = 26/27 = 0.963 < 0.975.
    sig = paired_bootstrap([0, 0, 0], [1, 0, 0], n_resamples=20_000, seed=3)
    assert sig.diff == pytest.approx(1 / 3)
    assert sig.p_value == pytest.approx(15 / 27, abs=0.015)
    assert (sig.low, sig.high) == (0.0, 1.0)
    assert paired_bootstrap([0, 0, 0], [1, 0, 0], n_resamples=500, seed=3) == \
        paired_bootstrap([0, 0, 0], [1, 0, 0], n_resamples=500, seed=3)


def test_bootstrap_resamples_groups_together():
    a, b = [0, 0, 0, 0], [1, 1, 0, 0]
    # units independent: k/4 with k ~ Binomial(4, 1/2); |k/4 - 1/2| >= 1/2 iff k in {0, 4}: 2/16
    free = paired_bootstrap(a, b, n_resamples=20_000, seed=0)
    assert free.p_value == pytest.approx(2 / 16, abs=0.01)
    # as two items of two translations: means 1, 1/2, 0 with P 1/4, 1/2, 1/4 -> p = 1/2
    grouped = paired_bootstrap(a, b, groups=["x", "x", "y", "y"], n_resamples=20_000, seed=0)
    assert grouped.diff == 0.5 and grouped.p_value == pytest.approx(0.5, abs=0.015)
    with pytest.raises(MlpruneError, match="one score per item"):
        paired_bootstrap([1, 0], [1])


def test_compare_results_per_language_and_non_english():
    dense = TaskResult("t", [_scored(str(i), lang, [-1, -2]) for lang in ("en", "fr") for i in range(6)],
                       "none")
    sparse = TaskResult("t", [_scored(str(i), lang, [-2, -1] if (lang == "fr" and i < 3) else [-1, -2])
                              for lang in ("en", "fr") for i in range(6)], "none")
    rows = {r["lang"]: r for r in compare_results(dense, sparse, n_resamples=2000)}
    assert rows["en"]["diff"] == 0 and rows["en"]["p_value"] == 1.0
    assert rows["fr"]["acc_a"] == 1.0 and rows["fr"]["acc_b"] == 0.5 and rows["fr"]["diff"] == -0.5
    assert rows["non-en"]["n"] == 6 and rows["non-en"]["ci_high"] < 0
    assert rows["fr"]["rankc_a"] == 1.0 and rows["fr"]["rankc_b"] == pytest.approx(
        (3 + 3 * 0.268941) / 6, abs=1e-6)
    text = zs.format_comparison("t", list(rows.values()))
    assert "non-en" in text and "-0.500" in text


# --------------------------------------------------------------------------- sweep


def _task(n=4):
    items = []
    for i in range(n):
        items.append(TaskItem(str(i), "en", f"Item {i} is", (" good", " bad"), i % 2))
        items.append(TaskItem(str(i), "fr", f"L'objet {i} est", (" bon", " mauvais"), i % 2))
    return Task("toy", items)


def test_sweep_gets_zero_shot_columns(loaded, corpus, tmp_path):
    extra = zs.sweep_eval([_task()], seed=0, n_resamples=200)
    out = tmp_path / "sweep.csv"
    rows = sweep(loaded, corpus, methods=["magnitude", "random"], sparsities=[0.0, 0.5],
                 pairs=["fr-en"], limit=2, out_csv=out, extra_eval=extra)
    assert len(rows) == 4 and all(list(r)[-len(extra.columns):] == extra.columns for r in rows)
    dense = [r for r in rows if r["sparsity"] == 0]
    assert dense[0]["toy_acc_fr"] == dense[1]["toy_acc_fr"]
    assert dense[0]["toy_diff_non_en"] == 0 and dense[0]["toy_p_non_en"] == 1.0
    # a pruned row equals scoring under the same masks by hand
    masks = rank_modules(loaded.model, method="magnitude").masks(0.5)
    with pruned(loaded.model, masks):
        by_hand = evaluate_task(loaded.model, loaded.tokenizer, _task())
    row = next(r for r in rows if r["method"] == "magnitude" and r["sparsity"] == 0.5)
    assert row["toy_acc_en"] == by_hand.accuracy()["en"]
    assert row["toy_rankc_fr"] == pytest.approx(by_hand.consistency()["fr"])
    header = out.read_text().splitlines()[0].split(",")
    assert header[-len(extra.columns):] == extra.columns
    # resuming into a CSV written without these columns is refused
    plain = tmp_path / "plain.csv"
    sweep(loaded, corpus, methods=["magnitude"], sparsities=[0.0], pairs=["fr-en"], limit=1,
          out_csv=plain)
    with pytest.raises(MlpruneError, match="without the zero-shot columns"):
        extra.check_resume(plain)


# --------------------------------------------------------------------------- lm-eval bridge


def test_lm_eval_task_names_and_command(tmp_path):
    assert zs.lm_eval_tasks(["xnli"], ["fr", "sw"]) == ["xnli_fr", "xnli_sw"]
    assert zs.lm_eval_tasks(["pawsx", "xcopa"], ["zh"]) == ["paws_zh", "xcopa_zh"]
    assert len(zs.lm_eval_tasks(["xstorycloze"])) == 11
    with pytest.raises(MlpruneError, match="Unknown benchmark 'mmlu'"):
        zs.lm_eval_tasks(["mmlu"])
    with pytest.raises(MlpruneError, match="xcopa has none of the languages en"):
        zs.lm_eval_tasks(["xcopa"], ["en"])
    cmd = zs.lm_eval_command("/m/pruned", ["xnli_fr"], output_path=tmp_path, batch_size=4,
                             device="cpu", dtype="float32", limit=50)
    assert cmd[1:3] == ["-m", "lm_eval"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args == {"--model": "hf", "--model_args": "pretrained=/m/pruned,dtype=float32",
                    "--tasks": "xnli_fr", "--num_fewshot": "0", "--batch_size": "4",
                    "--output_path": str(tmp_path), "--device": "cpu", "--limit": "50"}


def test_lm_eval_says_when_it_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setattr("mlprune.zeroshot.lmeval.lm_eval_installed", lambda: False)
    with pytest.raises(MlpruneError, match="not installed; install it with 'pip install lm-eval'"):
        zs.run_lm_eval(tmp_path, ["xnli"], output_path=tmp_path)
    monkeypatch.setattr("mlprune.zeroshot.lmeval.lm_eval_installed", lambda: True)
    monkeypatch.setattr("mlprune.models.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(MlpruneError, match="hub cannot be reached"):
        zs.run_lm_eval(tmp_path, ["xnli"], output_path=tmp_path)


def test_lm_eval_runs_the_command_and_reads_its_results(monkeypatch, tmp_path):
    monkeypatch.setattr("mlprune.zeroshot.lmeval.lm_eval_installed", lambda: True)
    monkeypatch.setattr("mlprune.models.hub_reachable", lambda timeout=3.0: True)
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        folder = tmp_path / "out" / "model"
        folder.mkdir(parents=True)
        (folder / "results_2025.json").write_text(json.dumps({"results": {
            "xnli_fr": {"alias": "xnli_fr", "acc,none": 0.41, "acc_stderr,none": 0.01}}}))
        return type("Done", (), {"returncode": 0})()

    out = zs.run_lm_eval(tmp_path, ["xnli"], langs=["fr"], output_path=tmp_path / "out",
                         runner=fake_run)
    assert out == {"xnli_fr": {"acc": 0.41}}
    assert "xnli_fr" in calls[0]


# --------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "toy.jsonl"
    return zs.write_task(_task(5).items, path)


def test_eval_task_command_reports_languages_and_consistency(tiny_folder, task_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_folder), "--task", str(task_file), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "toy" in text and "\nen " in text and "\nfr " in text and "non-en" in text
    report = json.loads(out.read_text())
    langs = {r["lang"]: r for r in report["tasks"]["toy"]["languages"]}
    assert langs["fr"]["n"] == 5 and 0 <= langs["fr"]["rankc"] <= 1
    assert len(report["tasks"]["toy"]["items"]) == 10


def test_eval_task_command_compares_dense_and_pruned(tiny_folder, task_file, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", "llama", seed=1)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_folder), "--task", str(task_file), "--pruned",
                 str(other), "--limit", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "paired bootstrap" in text and "95% CI" in text
    report = json.loads(out.read_text())
    rows = {r["lang"]: r for r in report["comparison"]["toy"]}
    assert rows["en"]["n"] == 3 and 0 < rows["non-en"]["p_value"] <= 1


def test_eval_task_command_says_what_is_wrong(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line(label=5), encoding="utf-8")
    assert main(["eval", "--model", str(tiny_folder), "--task", str(bad)]) == 2
    assert "bad.jsonl line 1 has label 5" in capsys.readouterr().err


def test_eval_lm_eval_dry_run_prints_the_command(tiny_folder, capsys):
    assert main(["eval", "--lm-eval", "xnli,pawsx", "--langs", "fr,de", "--pruned",
                 str(tiny_folder), "--limit", "20", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert "-m lm_eval --model hf" in line and f"pretrained={tiny_folder}" in line
    assert "--tasks xnli_de,xnli_fr,paws_de,paws_fr" in line and "--limit 20" in line


def test_eval_lm_eval_without_lm_eval_installed(monkeypatch, tiny_folder, capsys):
    monkeypatch.setattr("mlprune.zeroshot.lmeval.lm_eval_installed", lambda: False)
    assert main(["eval", "--lm-eval", "xcopa", "--pruned", str(tiny_folder)]) == 2
    assert "lm-evaluation-harness is not installed" in capsys.readouterr().err


def test_sweep_command_adds_task_columns(tiny_folder, corpus_file, task_file, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["sweep", "--model", str(tiny_folder), "--corpus", str(corpus_file), "--methods",
                 "magnitude", "--sparsities", "0,0.5", "--limit", "1", "--task", str(task_file),
                 "--task-limit", "2", "--csv", str(out), "--samples", "2", "--shots", "1"]) == 0
    header = out.read_text().splitlines()[0]
    assert "toy_acc_fr" in header and "toy_rankc_fr" in header and "toy_p_non_en" in header
    assert "toy_acc_non_en" in capsys.readouterr().out


def test_scoring_is_finite_under_heavy_pruning(loaded):
    masks = rank_modules(loaded.model, method="magnitude").masks(0.9)
    with pruned(loaded.model, masks):
        s = score_items(loaded.model, loaded.tokenizer, ITEMS)
    assert all(math.isfinite(x) for r in s for x in r.logprob)


@pytest.mark.real
def test_scores_on_the_embedded_gemma_equal_direct_log_probabilities():
    from mlprune.models import load_model

    gemma = load_model()
    items = [TaskItem("1", "en", "The food was cold and the waiter was rude. It is ",
                      ("negative", "positive"), 0),
             TaskItem("2", "en", "A man plays a guitar , right? {choice} , A man makes music",
                      ("Yes", "Also", "No"), 0)]
    scored = score_items(gemma.model, gemma.tokenizer, items)
    assert scored[0].n_tokens == (1, 1)  # ' negative' is one Gemma token after 'It is'
    for s in scored:
        for c, (context, text) in enumerate(s.item.pairs()):
            ctx, cont = split_tokens(gemma.tokenizer, context, text)
            assert ctx[0] == gemma.tokenizer.bos_token_id
            with torch.no_grad():
                logits = gemma.model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            # fp32 sums over up to ~20 tokens of a model with activations in the thousands
            assert s.logprob[c] == pytest.approx(expected, abs=5e-3)
    assert scored[0].predicted() == 0
