"""Corpus readers (with property-based round trips) and deterministic prompt sets."""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlprune import MlpruneError
from mlprune.corpus import read_corpus
from mlprune.prompts import (
    eval_items,
    monolingual_prompts,
    parse_pair,
    split_rows,
    translation_prompts,
)

# Sentences: any text but tabs/newlines (cell and row separators), not blank, no edge spaces.
sentence = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=30
).map(str.strip).filter(bool)
table = st.integers(1, 8).flatmap(
    lambda n: st.tuples(st.lists(sentence, min_size=n, max_size=n), st.lists(sentence, min_size=n, max_size=n))
)


@settings(max_examples=60, deadline=None)
@given(table)
def test_tsv_round_trip(cols):
    en, fr = cols
    text = "en\tfr\n" + "\n".join(f"{a}\t{b}" for a, b in zip(en, fr))
    corpus = read_corpus(text.encode(), fmt="tsv", name="t")
    assert corpus.sentences("en") == en and corpus.sentences("fr") == fr


@settings(max_examples=60, deadline=None)
@given(table)
def test_csv_and_jsonl_round_trip(cols):
    en, fr = cols
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["en", "fr"])
    writer.writerows(zip(en, fr))
    assert read_corpus(buf.getvalue().encode(), fmt="csv").sentences("fr") == fr
    jsonl = "\n".join(json.dumps({"en": a, "fr": b}, ensure_ascii=False) for a, b in zip(en, fr))
    assert read_corpus(jsonl.encode(), fmt="jsonl").sentences("en") == en


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(raw):
    try:
        corpus = read_corpus(raw, fmt="tsv", name="fuzz")
    except MlpruneError:
        return
    assert len(corpus) >= 1 and all(lang for lang in corpus.languages)


@pytest.mark.parametrize("text, fmt, message", [
    ("", "tsv", "is empty"),
    ("   \n\n", "csv", "is empty"),
    ("en\tfr\n", "tsv", "no sentences"),
    ("en\tfr\nhello\tbonjour\nonly one\n", "tsv", "Row 3 .* 1 fields but the header has 2"),
    ("en\ten\na\tb\n", "tsv", "names en more than once"),
    ("en\tfr\nhello\t \n", "tsv", "Row 2 .* no 'fr' sentence"),
    ('{"en": "a", "fr": "b"}\n{"en": "c"\n', "jsonl", "Line 2 .* not valid JSON"),
    ('{"en": "a", "fr": "b"}\n{"en": "c"}\n', "jsonl", "Row 2 .* no 'fr' sentence"),
    ("en\tfr\nhi\tsalut\n", "xlsx", "Unknown corpus format"),
])
def test_bad_corpora_get_one_sentence(text, fmt, message):
    with pytest.raises(MlpruneError, match=message):
        read_corpus(text.encode(), fmt=fmt, name="bad")


def test_wrong_encoding_and_missing_file(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("en\tfr\ncafé\tcafé\n".encode("latin-1"))
    with pytest.raises(MlpruneError, match="not UTF-8"):
        read_corpus(path)
    with pytest.raises(MlpruneError, match="No corpus file"):
        read_corpus(tmp_path / "missing.tsv")


def test_oversized_file_is_refused_without_reading(tmp_path, monkeypatch):
    import mlprune.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "MAX_CORPUS_BYTES", 10)
    path = tmp_path / "big.tsv"
    path.write_text("en\tfr\n" + "a\tb\n" * 10)
    with pytest.raises(MlpruneError, match="at most"):
        read_corpus(path)


def test_missing_language_column(corpus):
    with pytest.raises(MlpruneError, match="no column for ja"):
        translation_prompts(corpus, "fr", "ja")


def test_builtin_corpus():
    from mlprune.corpus import builtin_corpus

    corpus = builtin_corpus()
    assert len(corpus) >= 120
    for lang in ("en", "fr", "es", "de", "ru", "zh", "ja", "ar", "hi", "sw"):
        assert lang in corpus.languages
    assert corpus.table["en"].is_unique


def test_prompts_are_deterministic_and_formatted(corpus):
    a = translation_prompts(corpus, "fr", "en", shots=3, samples=5, seed=7)
    b = translation_prompts(corpus, "fr", "en", shots=3, samples=5, seed=7)
    c = translation_prompts(corpus, "fr", "en", shots=3, samples=5, seed=8)
    assert a.texts == b.texts and a.texts != c.texts
    lines = a.texts[0].splitlines()
    assert len(lines) == 6
    assert lines[0].startswith("French: ") and lines[1].startswith("English: ")


def test_demonstrations_never_include_test_sentences(corpus):
    pool, test = split_rows(corpus)
    assert not set(pool) & set(test) and len(pool) + len(test) == len(corpus)
    test_fr = {corpus.table["fr"].iat[r] for r in test}
    for seed in range(5):
        for text in translation_prompts(corpus, "fr", "en", shots=4, samples=8, seed=seed).texts:
            assert not any(s in text for s in test_fr)
        for text in monolingual_prompts(corpus, "fr", shots=2, samples=4, seed=seed).texts:
            assert not any(s in text for s in test_fr)
    for item in eval_items(corpus, "fr", "en", shots=4):
        demos = item.prompt.rsplit("French:", 1)[0]
        assert item.source in test_fr and item.source not in demos
        assert item.prompt.endswith("English:")


@pytest.mark.parametrize("kwargs, message", [
    (dict(shots=99), "99 shots need 99"),
    (dict(samples=0), "at least 1"),
    (dict(shots=0), "at least 1"),
])
def test_bad_prompt_parameters(corpus, kwargs, message):
    with pytest.raises(MlpruneError, match=message):
        translation_prompts(corpus, "fr", "en", **kwargs)


def test_pairs():
    assert parse_pair("fr-en") == ("fr", "en")
    for bad, message in [("fr-fr", "same language twice"), ("fren", "not a language pair")]:
        with pytest.raises(MlpruneError, match=message):
            parse_pair(bad)
