"""Prompt sets: monolingual, translation (src->tgt) and code demonstrations, and eval items.

The paper's demonstration form is ``{Language name}: {sentence}<eos>``; mlprune's clean protocol
ends each line with a newline, the separator a base model continues naturally and the one
generation stops at. With ``separator="eos"`` (the paper protocol) each line is kept as a
segment, and the tokenizer's EOS id is inserted after it when the prompt is encoded: the EOS is
a token id, never text, so a sentence that contains the string ``<eos>`` stays text. Sentences are split once, with a fixed seed, into a demonstration pool and a held-out test
slice, so no test sentence is ever a demonstration or a calibration text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mlprune import MlpruneError
from mlprune.corpus import ParallelCorpus, code_snippets, language_name

SPLIT_SEED = 20240917  # fixed: the test slice must not move when the calibration seed does
TEST_FRACTION = 0.25


SEPARATORS = ("newline", "eos")
EOS_MARK = "<eos>"  # how an inserted EOS is shown in texts meant for reading, never encoded


@dataclass
class PromptSet:
    """Texts to run through the model, with what they are for display and reports.

    ``segments`` (EOS-separated prompts only) holds each prompt's lines; the prompt is those
    lines, each followed by the EOS token id. ``texts`` is then for reading and reports.
    """

    name: str  # "mt:fr-en", "mono:en", "code"
    kind: str  # "mt" | "mono" | "code" | "text"
    texts: list[str]
    meta: dict = field(default_factory=dict)
    segments: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def key(self) -> str:
        """What the prompts are, exactly, as one string (for cache keys)."""
        if self.segments is None:
            return "\x00".join(self.texts)
        return "\x00".join("\x01".join(lines) for lines in self.segments) + "\x02eos"


def _prompt_set(name: str, kind: str, prompts: list[list[str]], separator: str,
                meta: dict) -> PromptSet:
    """A prompt set from each prompt's lines, joined by newlines or followed by EOS ids."""
    if separator not in SEPARATORS:
        raise MlpruneError(f"Unknown separator '{separator}': use newline or eos.")
    meta = {**meta, "separator": separator}
    if separator == "newline":
        return PromptSet(name, kind, ["".join(f"{line}\n" for line in p) for p in prompts], meta)
    texts = ["".join(f"{line}{EOS_MARK}" for line in p) for p in prompts]
    return PromptSet(name, kind, texts, meta, segments=prompts)


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
                        samples: int = 16, seed: int = 0, separator: str = "newline") -> PromptSet:
    """``samples`` prompts of ``shots`` translation demonstrations ``Src: s`` / ``Tgt: t``."""
    if src == tgt:
        raise MlpruneError(f"The pair {src}-{tgt} names the same language twice.")
    corpus.require(src, tgt)
    pool, _ = split_rows(corpus)
    _check_counts(shots, samples, len(pool), f"the corpus '{corpus.name}'")
    rng = random.Random(seed)
    s_name, t_name = language_name(src), language_name(tgt)
    table = corpus.table
    prompts = []
    for _ in range(samples):
        rows = rng.sample(pool, shots)
        prompts.append([line for r in rows for line in
                        (f"{s_name}: {table[src].iat[r]}", f"{t_name}: {table[tgt].iat[r]}")])
    return _prompt_set(f"mt:{src}-{tgt}", "mt", prompts, separator,
                       {"src": src, "tgt": tgt, "shots": shots, "seed": seed, "corpus": corpus.name})


def monolingual_prompts(corpus: ParallelCorpus, lang: str, *, shots: int = 4, samples: int = 16,
                        seed: int = 0, separator: str = "newline") -> PromptSet:
    """Prompts of ``2 * shots`` sentences in one language, as long as translation prompts."""
    corpus.require(lang)
    pool, _ = split_rows(corpus)
    _check_counts(shots, samples, len(pool), f"the corpus '{corpus.name}'")
    rng = random.Random(seed)
    name = language_name(lang)
    col = corpus.table[lang]
    prompts = [[f"{name}: {col.iat[r]}" for r in rng.sample(pool, min(len(pool), 2 * shots))]
               for _ in range(samples)]
    return _prompt_set(f"mono:{lang}", "mono", prompts, separator,
                       {"lang": lang, "shots": shots, "seed": seed, "corpus": corpus.name})


def code_prompts(*, shots: int = 4, samples: int = 16, seed: int = 0) -> PromptSet:
    """Prompts of ``shots`` code snippets from the built-in code set (the ratio variant's 'other')."""
    snippets = code_snippets()
    _check_counts(shots, samples, len(snippets), "the built-in code set")
    rng = random.Random(seed)
    texts = ["\n\n".join(rng.sample(snippets, shots)) + "\n" for _ in range(samples)]
    return PromptSet("code", "code", texts, {"shots": shots, "seed": seed})


def calibration_prompts(corpus: ParallelCorpus, calibration: str, pair: str | None = None, *,
                        shots: int = 4, samples: int = 16, seed: int = 0,
                        separator: str = "newline") -> PromptSet:
    """The calibration set by name: ``mt`` (needs a pair), ``mono`` (the pair's source), ``code``
    (code snippets are whole files: they take no separator)."""
    if calibration == "mt":
        if not pair:
            raise MlpruneError("Translation calibration needs a language pair, e.g. fr-en.")
        return translation_prompts(corpus, *parse_pair(pair), shots=shots, samples=samples,
                                   seed=seed, separator=separator)
    if calibration == "mono":
        lang = parse_pair(pair)[0] if pair and "-" in pair else (pair or "en")
        return monolingual_prompts(corpus, lang, shots=shots, samples=samples, seed=seed,
                                   separator=separator)
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
        if limit < 1:  # a negative slice would quietly drop sentences from the end instead
            raise MlpruneError(f"The number of held-out sentences (limit) must be at least 1; "
                               f"got {limit}.")
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
                     samples: int, seed: int, separator: str = "newline") -> list[PromptSet]:
    """The prompt sets a feature analysis captures: one translation set per pair ('fr-en'),
    then one monolingual set per language, all with the same shots, samples, seed and
    separator."""
    if not pairs and not monos:
        raise MlpruneError("Name at least one translation direction (e.g. fr-en) or "
                           "monolingual language.")
    kw = dict(shots=shots, samples=samples, seed=seed, separator=separator)
    sets = [translation_prompts(corpus, *parse_pair(p), **kw) for p in pairs]
    return sets + [monolingual_prompts(corpus, lang, **kw) for lang in monos]
