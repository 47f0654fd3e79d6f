"""Prompt sets: monolingual, translation (src->tgt) and code demonstrations, and eval items.

The paper's demonstration form is ``{Language name}: {sentence}<eos>``; mlprune ends each line
with a newline, the separator a base model continues naturally and the one generation stops
at. Sentences are split once, with a fixed seed, into a demonstration pool and a held-out test
slice, so no test sentence is ever a demonstration or a calibration text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mlprune import MlpruneError
from mlprune.corpus import ParallelCorpus, code_snippets, language_name

SPLIT_SEED = 20240917  # fixed: the test slice must not move when the calibration seed does
TEST_FRACTION = 0.25


@dataclass
class PromptSet:
    """Texts to run through the model, with what they are for display and reports."""

    name: str  # "mt:fr-en", "mono:en", "code"
    kind: str  # "mt" | "mono" | "code" | "text"
    texts: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class EvalItem:
    """One few-shot translation test: the prompt ends with the target-language label."""

    prompt: str
    source: str
    reference: str
    src: str
    tgt: str


def parse_pair(pair: str) -> tuple[str, str]:
    """'fr-en' -> ('fr', 'en'), with one clear sentence for anything else."""
    parts = pair.replace(">", "-").replace("->", "-").split("-")
    parts = [p.strip() for p in parts if p.strip()]
    if len(parts) != 2:
        raise MlpruneError(f"'{pair}' is not a language pair; write it as src-tgt, e.g. fr-en.")
    if parts[0] == parts[1]:
        raise MlpruneError(f"The pair '{pair}' names the same language twice.")
    return parts[0], parts[1]


def split_rows(corpus: ParallelCorpus, test_fraction: float = TEST_FRACTION) -> tuple[list[int], list[int]]:
    """Row indices of the demonstration pool and of the held-out test slice (fixed seed)."""
    rows = list(range(len(corpus)))
    random.Random(SPLIT_SEED).shuffle(rows)
    n_test = max(1, round(len(rows) * test_fraction)) if len(rows) > 1 else 0
    return sorted(rows[n_test:]), sorted(rows[:n_test])


def _check_counts(shots: int, samples: int, pool: int, what: str) -> None:
    if samples < 1:
        raise MlpruneError("The number of samples must be at least 1.")
    if shots < 1:
        raise MlpruneError("The number of shots must be at least 1.")
    if shots > pool:
        raise MlpruneError(
            f"{shots} shots need {shots} demonstration sentences, but {what} has only {pool} "
            "outside the held-out test slice."
        )


def translation_prompts(corpus: ParallelCorpus, src: str, tgt: str, *, shots: int = 4,
                        samples: int = 16, seed: int = 0) -> PromptSet:
    """``samples`` prompts of ``shots`` translation demonstrations ``Src: s`` / ``Tgt: t``."""
    if src == tgt:
        raise MlpruneError(f"The pair {src}-{tgt} names the same language twice.")
    corpus.require(src, tgt)
    pool, _ = split_rows(corpus)
    _check_counts(shots, samples, len(pool), f"the corpus '{corpus.name}'")
    rng = random.Random(seed)
    s_name, t_name = language_name(src), language_name(tgt)
    table = corpus.table
    texts = []
    for _ in range(samples):
        rows = rng.sample(pool, shots)
        texts.append("".join(
            f"{s_name}: {table[src].iat[r]}\n{t_name}: {table[tgt].iat[r]}\n" for r in rows
        ))
    return PromptSet(f"mt:{src}-{tgt}", "mt", texts,
                     {"src": src, "tgt": tgt, "shots": shots, "seed": seed, "corpus": corpus.name})


def monolingual_prompts(corpus: ParallelCorpus, lang: str, *, shots: int = 4, samples: int = 16,
                        seed: int = 0) -> PromptSet:
    """Prompts of ``2 * shots`` sentences in one language, as long as translation prompts."""
    corpus.require(lang)
    pool, _ = split_rows(corpus)
    _check_counts(shots, samples, len(pool), f"the corpus '{corpus.name}'")
    rng = random.Random(seed)
    name = language_name(lang)
    col = corpus.table[lang]
    texts = []
    for _ in range(samples):
        rows = rng.sample(pool, min(len(pool), 2 * shots))
        texts.append("".join(f"{name}: {col.iat[r]}\n" for r in rows))
    return PromptSet(f"mono:{lang}", "mono", texts,
                     {"lang": lang, "shots": shots, "seed": seed, "corpus": corpus.name})


def code_prompts(*, shots: int = 4, samples: int = 16, seed: int = 0) -> PromptSet:
    """Prompts of ``shots`` code snippets from the built-in code set (the ratio variant's 'other')."""
    snippets = code_snippets()
    _check_counts(shots, samples, len(snippets), "the built-in code set")
    rng = random.Random(seed)
    texts = ["\n\n".join(rng.sample(snippets, shots)) + "\n" for _ in range(samples)]
    return PromptSet("code", "code", texts, {"shots": shots, "seed": seed})


def calibration_prompts(corpus: ParallelCorpus, calibration: str, pair: str | None = None, *,
                        shots: int = 4, samples: int = 16, seed: int = 0) -> PromptSet:
    """The calibration set by name: ``mt`` (needs a pair), ``mono`` (the pair's source), ``code``."""
    if calibration == "mt":
        if not pair:
            raise MlpruneError("Translation calibration needs a language pair, e.g. fr-en.")
        return translation_prompts(corpus, *parse_pair(pair), shots=shots, samples=samples, seed=seed)
    if calibration == "mono":
        lang = parse_pair(pair)[0] if pair and "-" in pair else (pair or "en")
        return monolingual_prompts(corpus, lang, shots=shots, samples=samples, seed=seed)
    if calibration == "code":
        return code_prompts(shots=shots, samples=samples, seed=seed)
    raise MlpruneError(f"Unknown calibration set '{calibration}': use mt, mono or code.")


def eval_items(corpus: ParallelCorpus, src: str, tgt: str, *, shots: int = 4,
               limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Few-shot translation tests on the held-out slice; demonstrations from the pool only."""
    if src == tgt:
        raise MlpruneError(f"The pair {src}-{tgt} names the same language twice.")
    corpus.require(src, tgt)
    pool, test = split_rows(corpus)
    _check_counts(shots, 1, len(pool), f"the corpus '{corpus.name}'")
    if limit is not None:
        test = test[:limit]
    rng = random.Random(seed + 1)
    s_name, t_name = language_name(src), language_name(tgt)
    table = corpus.table
    items = []
    for r in test:
        demos = rng.sample(pool, shots)
        head = "".join(f"{s_name}: {table[src].iat[d]}\n{t_name}: {table[tgt].iat[d]}\n" for d in demos)
        items.append(EvalItem(f"{head}{s_name}: {table[src].iat[r]}\n{t_name}:",
                              table[src].iat[r], table[tgt].iat[r], src, tgt))
    return items


def analysis_prompts(corpus: ParallelCorpus, pairs: list[str], monos: list[str], *, shots: int,
                     samples: int, seed: int) -> list[PromptSet]:
    """The prompt sets a feature analysis captures: one translation set per pair ('fr-en'),
    then one monolingual set per language, all with the same shots, samples and seed."""
    if not pairs and not monos:
        raise MlpruneError("Name at least one translation direction (e.g. fr-en) or "
                           "monolingual language.")
    sets = [translation_prompts(corpus, *parse_pair(p), shots=shots, samples=samples, seed=seed)
            for p in pairs]
    return sets + [monolingual_prompts(corpus, lang, shots=shots, samples=samples, seed=seed)
                   for lang in monos]
