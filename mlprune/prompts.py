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

# the calibration vocabulary and the syntax of pairs and mixes are the spec's (re-exported)
from mlprune.spec import (  # noqa: F401
    CALIBRATIONS,
    MIX_PREFIX,
    POOLED,
    PROTOCOLS,
    is_mix,
    mix_components,
    parse_pair,
)

SPLIT_SEED = 20240917  # fixed: the test slice must not move when the calibration seed does
TEST_FRACTION = 0.25


SEPARATORS = ("newline", "eos")
EOS_MARK = "<eos>"  # how an inserted EOS is shown in texts meant for reading, never encoded


@dataclass
class PromptSet:
    """Texts to run through the model, with what they are for display and reports.

    ``segments`` (EOS-separated prompts only) holds each prompt's lines; the prompt is those
    lines, each followed by the EOS token id. ``texts`` is then for reading and reports.
    ``parts`` (a pooled calibration mix only) names the consecutive runs of prompts that came
    from each set of the mix, as (set name, number of prompts, weight).
    """

    name: str  # "mt:fr-en", "mono:en", "code", "mix:fr-en=1,de-en=1", "pooled"
    kind: str  # "mt" | "mono" | "code" | "text" | "mix"
    texts: list[str]
    meta: dict = field(default_factory=dict)
    segments: list[list[str]] | None = None
    parts: list[tuple[str, int, float]] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def key(self) -> str:
        """What the prompts are, exactly, as one string (for cache keys)."""
        if self.segments is None:
            key = "\x00".join(self.texts)
        else:
            key = "\x00".join("\x01".join(lines) for lines in self.segments) + "\x02eos"
        if self.parts:
            key += "\x03" + repr(self.parts)
        return key


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


def mono_sentences(shots: int, separator: str = "newline") -> int:
    """Sentences in a monolingual prompt of ``shots`` shots under the protocol whose separator
    this is (:attr:`~mlprune.protocol.Protocol.mono_per_shot`): ``2 * shots`` for ``clean``
    (as long as a translation prompt), ``shots`` for ``paper`` (the authors' get_mono)."""
    per_shot = next((p.mono_per_shot for p in PROTOCOLS.values() if p.separator == separator), 2)
    return per_shot * shots


def monolingual_prompts(corpus: ParallelCorpus, lang: str, *, shots: int = 4, samples: int = 16,
                        seed: int = 0, separator: str = "newline") -> PromptSet:
    """Prompts of sentences in one language: ``2 * shots`` of them (as long as translation
    prompts) with newline separators, ``shots`` with EOS separators, as the authors' get_mono
    (:func:`mono_sentences`)."""
    corpus.require(lang)
    pool, _ = split_rows(corpus)
    _check_counts(shots, samples, len(pool), f"the corpus '{corpus.name}'")
    rng = random.Random(seed)
    name = language_name(lang)
    col = corpus.table[lang]
    count = min(len(pool), mono_sentences(shots, separator))
    prompts = [[f"{name}: {col.iat[r]}" for r in rng.sample(pool, count)]
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
    (code snippets are whole files: they take no separator); a mix (``pooled``,
    ``mix:...``, see :func:`mix_components`) as one pooled prompt set of all its parts."""
    if is_mix(calibration):
        return pooled_prompts(calibration, calibration_mix(
            corpus, calibration, shots=shots, samples=samples, seed=seed, separator=separator))
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
    raise MlpruneError(f"Unknown calibration set '{calibration}': use mt, mono, code, pooled "
                       "or a mix such as mix:fr-en=1,de-en=1.")


# --------------------------------------------------------------------------- calibration mixes


def calibration_mix(corpus: ParallelCorpus, calibration: str, *, shots: int = 4,
                    samples: int = 16, seed: int = 0,
                    separator: str = "newline") -> list[tuple[PromptSet, float]]:
    """Each set of a mix with its weight: ``samples`` prompts per set, drawn exactly as the
    set alone would be (so a mix reuses the single sets' cached statistics)."""
    parts = mix_components(calibration, corpus.languages)
    kw = dict(shots=shots, samples=samples, seed=seed, separator=separator)
    out = []
    for name, weight in parts:
        kind, _, what = name.partition(":")
        ps = (translation_prompts(corpus, *parse_pair(what), **kw) if kind == "mt"
              else monolingual_prompts(corpus, what, **kw))
        out.append((ps, weight))
    return out


def pooled_prompts(name: str, parts: list[tuple[PromptSet, float]]) -> PromptSet:
    """All prompts of a mix's sets, one after the other, with ``parts`` saying which run of
    prompts came from which set and its weight (a sequential pass collects them per part)."""
    eos = [ps.segments is not None for ps, _ in parts]
    if any(eos) and not all(eos):
        raise MlpruneError("A calibration mix cannot join EOS-separated and newline-separated "
                           "prompt sets.")
    texts = [t for ps, _ in parts for t in ps.texts]
    segments = [seg for ps, _ in parts for seg in ps.segments] if all(eos) else None
    first = parts[0][0].meta
    meta = {k: first[k] for k in ("shots", "seed", "corpus", "separator") if k in first}
    meta["components"] = [{"prompts": ps.name, "weight": w} for ps, w in parts]
    return PromptSet(name, "mix", texts, meta, segments,
                     [(ps.name, len(ps), w) for ps, w in parts])


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
