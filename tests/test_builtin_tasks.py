"""The team-written task files (word order, sentence completion): they load, are aligned
across languages, are large enough, rebuild byte for byte from source.tsv, and share no
sentence with the calibration corpus."""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path

import pytest

from mlprune.data import make_tasks
from mlprune.zeroshot import load_task

DATA = Path(make_tasks.__file__).resolve().parent
TASKS = ("wordorder", "completion")
MIN_ITEMS = 150


def _source() -> tuple[list[str], list[dict[str, str]]]:
    return make_tasks.read_source(DATA / "tasks" / "source.tsv")


@pytest.mark.parametrize("name", TASKS)
def test_task_loads_with_enough_aligned_items(name):
    langs, records = _source()
    task = load_task(DATA / "tasks" / f"{name}.jsonl")
    assert task.languages == langs  # English first, then the source's order
    by_lang = defaultdict(dict)
    for item in task.items:
        by_lang[item.lang][item.id] = item
    ids = list(by_lang["en"])
    assert len(ids) == len(records) >= MIN_ITEMS
    for lang in langs:
        assert list(by_lang[lang]) == ids, f"{lang} does not hold the same items as en"
        for item_id in ids:
            item, en = by_lang[lang][item_id], by_lang["en"][item_id]
            assert item.label == en.label and len(item.choices) == len(en.choices)
            assert len(set(item.choices)) == len(item.choices), f"{item_id} {lang}"
    labels = [by_lang["en"][i].label for i in ids]
    n_choices = len(by_lang["en"][ids[0]].choices)
    # The right answer sits in every position, none more than twice its fair share.
    counts = [labels.count(k) for k in range(n_choices)]
    assert min(counts) > 0 and max(counts) < 2 * len(ids) / n_choices


def test_wordorder_pairs_are_the_sentence_and_a_reordering_of_it():
    langs, records = _source()
    task = load_task(DATA / "tasks" / "wordorder.jsonl")
    source = {(f"wo-{r['id']}", lang): r[lang] for r in records for lang in langs}
    for item in task.items:
        assert item.prompt == ""
        good = item.choices[item.label]
        bad = item.choices[1 - item.label]
        assert good == source[item.id, item.lang]
        assert sorted(good) == sorted(bad) and good != bad  # same characters, other order
        if item.lang != "zh":
            words, swapped = good.split(" "), bad.split(" ")
            assert sorted(words) == sorted(swapped)
            diff = [i for i, (a, b) in enumerate(zip(words, swapped)) if a != b]
            assert len(diff) == 2 and diff[1] == diff[0] + 1  # one adjacent pair
            assert 0 < diff[0] and diff[1] < len(words) - 1  # never the first or last word


def test_completion_prompt_plus_true_ending_is_the_sentence():
    langs, records = _source()
    task = load_task(DATA / "tasks" / "completion.jsonl")
    source = {(f"cmp-{r['id']}", lang): r[lang] for r in records for lang in langs}
    endings = defaultdict(set)
    for r in records:
        for lang in langs:
            endings[lang].add(make_tasks.split_middle(r[lang], lang)[1])
    for item in task.items:
        assert item.prompt + item.choices[item.label] == source[item.id, item.lang]
        assert item.prompt.strip() and all(c.strip() for c in item.choices)
        # Wrong endings are true endings of other sentences in the same language.
        assert set(item.choices) <= endings[item.lang]


def test_builder_reproduces_the_shipped_files(tmp_path):
    written = make_tasks.build(out_dir=tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.jsonl" for n in TASKS)
    for path in written:
        assert path.read_bytes() == (DATA / "tasks" / path.name).read_bytes(), \
            f"{path.name} is stale: run python -m mlprune.data.make_tasks"


def test_source_sentences_are_not_in_the_calibration_corpus():
    langs, records = _source()
    with (DATA / "parallel.tsv").open(encoding="utf-8", newline="") as f:
        calibration = {cell.strip() for row in csv.reader(f, delimiter="\t") for cell in row}
    shared = [(r["id"], lang) for r in records for lang in langs if r[lang] in calibration]
    assert shared == []
    english = [r["en"] for r in records]
    assert len(set(english)) == len(english)


def test_swap_and_split_handle_spaced_and_unspaced_text():
    rng = random.Random(0)
    assert make_tasks.swap_adjacent("one two three four", "en", rng) == "one three two four"
    with pytest.raises(ValueError, match="No two adjacent words"):
        make_tasks.swap_adjacent("Hello, big world.", "en", rng)
    swapped = make_tasks.swap_adjacent("我们去公园。", "zh", random.Random(1))
    assert swapped[0] == "我" and swapped[-2:] == "园。" and sorted(swapped) == sorted("我们去公园。")
    assert make_tasks.split_middle("a b c d e.", "en") == ("a b", " c d e.")
    assert make_tasks.split_middle("我们去，公园。", "zh") == ("我们去，", "公园。")
