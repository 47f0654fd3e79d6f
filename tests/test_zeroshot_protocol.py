"""The paper's zero-shot protocol: XNLI and MARC templates (exact strings), loaders for their
published formats and the hub, choices shuffled per language, strict JSON, and the eval
command's task options."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest

from mlprune import MlpruneError
from mlprune import zeroshot as zs
from mlprune.cli import main
from mlprune.zeroshot import ItemScores, Task, TaskItem, TaskResult, Template, load_task


def strict_load(text: str):
    """json.loads that refuses NaN and Infinity, as jq and browsers do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- templates


def test_xnli_template_is_the_papers_string():
    # preprocess.create_xnil_prompt: " ".join([premise + " , right?", " " + word + " , " + hyp])
    for lang in ("en", "fr", "sw"):  # the English template in every language
        item = zs.template_for("xnli", lang).render(
            {"premise": "Il pleut", "hypothesis": "Le sol est mouillé"}, id="7", lang=lang, label=2)
        assert item.whole_sequence and item.label == 2
        assert item.pairs() == [("", "Il pleut , right?  Yes , Le sol est mouillé"),
                                ("", "Il pleut , right?  Also , Le sol est mouillé"),
                                ("", "Il pleut , right?  No , Le sol est mouillé")]


def test_marc_template_is_the_papers_string():
    marc = zs.template_for("marc", "de")
    item = marc.render({"review": "Tolles  Produkt,\nfunktioniert gut."}, id="1", lang="de", label=1)
    assert item.whole_sequence  # scored whole, like XNLI, not as a continuation
    assert item.pairs() == [("", "Tolles Produkt, funktioniert gut. It is negative"),
                            ("", "Tolles Produkt, funktioniert gut. It is positive")]
    review = " ".join(f"w{i}" for i in range(200))
    long = marc.render({"review": review}, id="2", lang="de", label=0)
    assert long.pairs()[0][1] == " ".join(f"w{i}" for i in range(128)) + " It is negative"
    with pytest.raises(MlpruneError, match="needs a field"):
        Template("{premise} {choice}", ("a", "b")).render({}, id="1", lang="en", label=0)
    with pytest.raises(MlpruneError, match="label 3, out of range"):
        marc.render({"review": "x"}, id="1", lang="en", label=3)
    # a template without whole_sequence and {choice} at the end still makes continuations
    cont = Template("{review} It is {choice}", (" bad", " good")).render(
        {"review": "ok"}, id="1", lang="en", label=1)
    assert cont.pairs()[1] == ("ok It is ", " good")


# --------------------------------------------------------------------------- loaders

XNLI_COLUMNS = ["language", "gold_label", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "promptID",
                "pairID", "genre", "label1", "label2", "label3", "label4", "label5",
                "sentence1_tokenized", "sentence2_tokenized", "match"]


def _xnli_tsv(path, rows):
    lines = ["\t".join(XNLI_COLUMNS)]
    for lang, gold, s1, s2, pair in rows:
        values = dict.fromkeys(XNLI_COLUMNS, "x")
        values.update(language=lang, gold_label=gold, sentence1=s1, sentence2=s2, pairID=pair)
        lines.append("\t".join(values[c] for c in XNLI_COLUMNS))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_xnli_tsv_of_xnli_1_0(tmp_path):
    path = _xnli_tsv(tmp_path / "xnli.test.tsv", [
        ("fr", "contradiction", 'Il a dit "non', "Il a dit oui", "11"),
        ("en", "entailment", "He slept", "He rested", "10"),
        ("en", "contradiction", 'He said "no', "He said yes", "11"),
        ("fr", "entailment", "Il dormait", "Il se reposait", "10"),
    ])
    task = load_task(f"xnli:{path}")
    assert task.name == "xnli" and task.languages == ["en", "fr"] and len(task) == 4
    by_key = {(it.id, it.lang): it for it in task.items}
    assert by_key[("10", "en")].label == 0 and by_key[("11", "fr")].label == 2
    # a bare quote stays text (XNLI-1.0 is not CSV-quoted)
    assert by_key[("11", "en")].pairs()[2] == ("", 'He said "no , right?  No , He said yes')
    assert by_key[("10", "fr")].pairs()[0] == ("", "Il dormait , right?  Yes , Il se reposait")
    assert zs.rankc_unaligned(task.items) == set()


def test_xnli_rows_of_the_datasets_library_per_language_files(tmp_path):
    folder = tmp_path / "xnli"
    folder.mkdir()
    for lang, rows in {"en": [("A man sleeps", "A man rests", 0), ("It rains", "It is dry", 2)],
                       "fr": [("Un homme dort", "Un homme se repose", 0),
                              ("Il pleut", "Il fait sec", 2)]}.items():
        (folder / f"{lang}.test.jsonl").write_text("\n".join(
            json.dumps({"premise": p, "hypothesis": h, "label": lab}) for p, h, lab in rows) + "\n",
            encoding="utf-8")
    task = load_task(f"xnli:{folder}")
    assert sorted((it.id, it.lang, it.label) for it in task.items) == [
        ("0", "en", 0), ("0", "fr", 0), ("1", "en", 2), ("1", "fr", 2)]
    fr = next(it for it in task.items if it.lang == "fr" and it.id == "1")
    assert fr.pairs()[1] == ("", "Il pleut , right?  Also , Il fait sec")
    # the same rows as parquet, naming their language in a column
    frame = pd.DataFrame({"premise": ["Es regnet"], "hypothesis": ["Es ist nass"],
                          "label": np.array([1]), "language": ["de"]})
    frame.to_parquet(tmp_path / "rows.parquet")
    de = load_task(f"xnli:{tmp_path / 'rows.parquet'}")
    assert de.items == [TaskItem("0", "de", "Es regnet , right?  {choice} , Es ist nass",
                                 ("Yes", "Also", "No"), 1)]


def test_marc_json_lines_of_amazon_reviews_multi(tmp_path):
    rows = [{"review_id": f"de_{i}", "product_id": "p", "reviewer_id": "r", "stars": stars,
             "review_body": body, "review_title": "t", "language": "de",
             "product_category": "home"}
            for i, (stars, body) in enumerate([(1, "Schlecht."), (2, "Nicht gut."), (3, "Geht so."),
                                               (4, "Gut."), (5, "Sehr  gut!")])]
    path = tmp_path / "dataset_de_test.json"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    task = load_task(f"marc:{path}")
    assert [(it.id, it.label) for it in task.items] == [("de_0", 0), ("de_1", 0), ("de_3", 1),
                                                        ("de_4", 1)]  # 3 stars dropped
    assert task.items[3].pairs()[1] == ("", "Sehr gut! It is positive")


def test_template_option_renders_a_record_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "lang": "en", "review": "Broke after a day.", "label": 0},
        {"id": "b", "lang": "en", "review": "Love it.", "label": "positive"},
        {"id": "c", "lang": "en", "review": "Fine.", "stars": 4}]) + "\n", encoding="utf-8")
    task = load_task(path, template="marc")
    assert task.name == "reviews"
    assert [(it.id, it.label, it.pairs()[0][1]) for it in task.items] == [
        ("a", 0, "Broke after a day. It is negative"), ("b", 1, "Love it. It is negative"),
        ("c", 1, "Fine. It is negative")]
    with pytest.raises(MlpruneError, match="already holds items"):
        load_task("nli", template="xnli")
    with pytest.raises(MlpruneError, match="No template 'copa'"):
        load_task(path, template="copa")
    with pytest.raises(MlpruneError, match="is read with the xnli template; drop the marc one"):
        load_task(f"xnli:{path}", template="marc")


def test_template_without_a_task_is_refused(capsys):
    assert main(["eval", "--template", "xnli"]) == 2
    assert "--template renders the records of a --task file" in capsys.readouterr().err


@pytest.mark.parametrize("task, record, message", [
    ("xnli", {"premise": "a", "hypothesis": "b", "label": 0},
     r"x\.jsonl row 1 names no language .* e\.g\. fr\.jsonl"),
    ("xnli", {"lang": "en", "premise": "a", "hypothesis": "b", "label": 3},
     r"row 1 has label 3; XNLI labels are 0-2 or entailment, neutral, contradiction"),
    ("xnli", {"lang": "en", "premise": "a", "label": 0}, r"row 1 has no hypothesis text"),
    ("marc", {"lang": "en", "text": "a", "label": 4, "label_text": "4"},
     r"row 1 has label 4; MARC labels are 0 \(negative\) or 1 \(positive\); give star ratings"),
    ("marc", {"lang": "en", "review": "a", "stars": 6}, r"row 1 has stars 6; give 1 to 5"),
    ("marc", {"lang": "en", "review": "a", "stars": 3}, r"x\.jsonl holds no items"),
])
def test_record_problems_are_one_sentence_each(tmp_path, task, record, message):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(MlpruneError, match=message) as err:
        load_task(f"{task}:{path}")
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_hub_loading_without_datasets_or_hub_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MlpruneError, match=r"needs the 'datasets' package .* xnli:PATH"):
        load_task("xnli", langs=["fr"])
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: pytest.fail("must not download without a hub")
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr("mlprune.models.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(MlpruneError, match="hub cannot be reached .* marc:PATH"):
        load_task("marc")
    with pytest.raises(MlpruneError, match="marc has no sw on the hub"):
        load_task("marc", langs=["sw"])


def test_hub_loading_maps_the_published_rows(monkeypatch):
    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        if repo == "facebook/xnli":
            return [{"premise": f"P {config}", "hypothesis": "H", "label": 1}]
        # SetFit's copy: label = stars - 1
        return [{"id": "r1", "text": "Awful", "label": 0, "label_text": "0"},
                {"id": "r2", "text": "Meh", "label": 2, "label_text": "2"},
                {"id": "r3", "text": "Great", "label": 4, "label_text": "4"}]

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr("mlprune.models.hub_reachable", lambda timeout=3.0: True)
    xnli = load_task("xnli", langs=["en", "sw"])
    assert calls == [("facebook/xnli", "en", "test"), ("facebook/xnli", "sw", "test")]
    assert [(it.lang, it.label, it.pairs()[1][1]) for it in xnli.items] == [
        ("en", 1, "P en , right?  Also , H"), ("sw", 1, "P sw , right?  Also , H")]
    marc = load_task("marc", langs=["ja"])
    assert calls[-1] == ("SetFit/amazon_reviews_multi_ja", None, "test")
    assert [(it.id, it.label) for it in marc.items] == [("r1", 0), ("r3", 1)]


def test_sample_draws_as_the_datasets_library_shuffles():
    items = [TaskItem(str(i), lang, f"{lang} {i}", ("a", "b"), 0) for lang in ("en", "fr")
             for i in range(10)]
    sample = Task("t", items).sample(4, seed=0)
    # datasets' Dataset.shuffle(seed) selects default_rng(seed).permutation(len)
    order = np.random.default_rng(0).permutation(10)[:4]
    assert [it.id for it in sample.items if it.lang == "en"] == [str(i) for i in order]
    assert [it.id for it in sample.items if it.lang == "fr"] == [str(i) for i in order]


# --------------------------------------------------------------------------- shuffled choices


def _scored(item_id, lang, choices, label, logprob):
    item = TaskItem(item_id, lang, "p", tuple(choices), label)
    return ItemScores(item, tuple(logprob), (1,) * len(choices), (1,) * len(choices))


def test_shuffled_choices_are_scored_and_left_out_of_rankc_only():
    scored = [
        # b: French shuffled, so its label moved
        _scored("b", "en", ["yes", "also", "no"], 1, [-3, -1, -2]),
        _scored("b", "fr", ["non", "oui", "aussi"], 2, [-1, -2, -3]),
        # a, c: the same label, but the task shuffles and three translated choices may have
        # been swapped around the label: not provably aligned
        _scored("a", "en", ["yes", "also", "no"], 0, [-1, -2, -3]),
        _scored("a", "fr", ["oui", "aussi", "non"], 0, [-1, -3, -2]),
        _scored("c", "en", ["yes", "also", "no"], 2, [-3, -2, -1]),
        _scored("c", "fr", ["aussi", "oui", "non"], 2, [-2, -3, -1]),
        # d: identical choice texts prove the order
        _scored("d", "en", ["Yes", "Also", "No"], 0, [-1, -2, -3]),
        _scored("d", "fr", ["Yes", "Also", "No"], 0, [-3, -2, -1]),
    ]
    res = TaskResult("t", scored, "none")
    assert res.accuracy() == {"en": 1.0, "fr": 0.5}  # every item counts for accuracy
    assert res.rankc_skipped() == {"fr": 3}
    # RankC over d alone: reversed, P@1 = 0, P@2 = |{0,1} & {2,1}| / 2, P@3 = 1
    assert res.consistency()["fr"] == pytest.approx(0.244728 / 2 + 0.090031, abs=1e-6)
    note = zs.rankc_note(res)
    assert note == ("RankC leaves out 3 of 4 non-English items: their choices are in another "
                    "order than in English (accuracy counts them all).")
    table = {r["lang"]: r for r in res.table()}
    assert table["fr"]["rankc_skipped"] == 3 and table["non-en"]["rankc_skipped"] == 3
    assert note in zs.format_result(res) and zs.result_dict(res)["notes"] == [note]
    # the same items without b: nothing shows shuffling, so a, c and d are all used
    aligned = TaskResult("t", [s for s in scored if s.item.id != "b"], "none")
    assert aligned.rankc_skipped() == {"fr": 0} and zs.rankc_note(aligned) is None


def test_two_choice_items_with_the_same_label_stay_aligned():
    scored = [_scored("a", "en", ["good", "bad"], 0, [-1, -2]),
              _scored("a", "fr", ["mauvais", "bon"], 1, [-2, -1]),
              _scored("b", "en", ["good", "bad"], 0, [-1, -2]),
              _scored("b", "fr", ["bon", "mauvais"], 0, [-2, -1])]
    res = TaskResult("t", scored, "none")
    assert res.rankc_skipped() == {"fr": 1}
    assert res.consistency()["fr"] == pytest.approx(0.268941, abs=1e-6)  # b alone, reversed


def test_eval_command_scores_a_shuffled_task_file(tiny_folder, tmp_path, capsys):
    lines = []
    for i in range(3):
        lines.append({"id": str(i), "lang": "en", "prompt": f"Item {i} is",
                      "choices": [" good", " bad", " odd"], "label": 0})
        lines.append({"id": str(i), "lang": "fr", "prompt": f"L'objet {i} est",
                      "choices": [" mauvais", " bon", " bizarre"], "label": 1})
    path = tmp_path / "shuffled.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_folder), "--task", str(path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RankC leaves out 3 of 3 non-English items" in text
    report = strict_load(out.read_text())["tasks"]["shuffled"]
    fr = next(r for r in report["languages"] if r["lang"] == "fr")
    assert fr["n"] == 3 and fr["rankc"] is None and fr["rankc_skipped"] == 3
    assert report["notes"] == ["RankC leaves out 3 of 3 non-English items: their choices are in "
                               "another order than in English (accuracy counts them all)."]


# --------------------------------------------------------------------------- strict JSON


def test_strict_json_writes_null_for_non_finite_numbers():
    text = zs.strict_json({"a": float("nan"), "b": [float("inf"), np.float32(0.5), np.int64(3)],
                           "c": (1.0, -float("inf"))})
    assert strict_load(text) == {"a": None, "b": [None, 0.5, 3], "c": [1.0, None]}


def test_eval_json_is_strict_when_rankc_is_undefined(tiny_folder, tmp_path, capsys):
    # MARC-like: English and French hold different reviews, so RankC has nothing to pair
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "en1", "lang": "en", "review": "Great.", "stars": 5},
        {"id": "en2", "lang": "en", "review": "Bad.", "stars": 1},
        {"id": "fr1", "lang": "fr", "review": "Nul.", "stars": 2}]) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_folder), "--task", str(path), "--template", "marc",
                 "--json", str(out)]) == 0
    assert "RankC is undefined: no non-English item shares its id" in capsys.readouterr().out
    text = out.read_text()
    assert "NaN" not in text
    report = strict_load(text)["tasks"]["reviews"]
    rows = {r["lang"]: r for r in report["languages"]}
    assert rows["fr"]["rankc"] is None and rows["non-en"]["rankc"] is None
    assert rows["en"]["rankc"] is None and rows["en"]["n"] == 2
    assert math.isfinite(rows["en"]["accuracy"])


def test_eval_refuses_a_limit_below_one(tiny_folder, task_file_factory, capsys):
    path = task_file_factory()
    for limit in ("0", "-3"):
        assert main(["eval", "--model", str(tiny_folder), "--task", str(path), "--limit", limit]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == "mlprune eval: starting (importing torch and transformers)"
        assert err[-1] == f"mlprune: --limit must be at least 1 item per language (got {limit})."


@pytest.fixture
def task_file_factory(tmp_path):
    def make():
        items = [TaskItem(str(i), lang, f"{lang} item {i} is", (" good", " bad"), i % 2)
                 for lang in ("en", "fr") for i in range(3)]
        return zs.write_task(items, tmp_path / "toy.jsonl")
    return make
