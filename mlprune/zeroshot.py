"""Zero-shot multilingual multiple choice: scoring, task files, consistency, significance.

A task is a JSONL file, one item per line::

    {"id": "7", "lang": "fr", "prompt": "...", "choices": ["...", "..."], "label": 1}

Items sharing an ``id`` across languages are the same item (translations of each other).
Each choice is scored by its log-likelihood under the model, as XGLM and lm-evaluation-harness
do, in one of two forms:

- prompt + continuation (default): the score is log P(choice | prompt). As in lm-eval, the
  prompt's trailing whitespace moves to the front of the choice, and prompt and choice are
  tokenized separately and concatenated, so a token merge across the boundary cannot make
  the choice's tokens ambiguous.
- whole sequence: a prompt holding the slot ``{choice}`` is scored as one sequence per choice,
  the slot filled in, over all its tokens (the paper's XNLI protocol,
  ``{premise} , right? {Yes|Also|No} , {hypothesis}``, scored by mean token log-probability).

Scores are available raw (``norm="none"``: summed log-probability), per token (``"token"``,
the paper's mean token log-probability) and per byte (``"byte"``, lm-eval's acc_norm idea).

Only the logits that are needed are computed: the model's head runs on the scored positions
alone (``logits_to_keep`` with left padding), choices that share a token prefix share its
log-probabilities, identical inputs run once, and batches are sized so that the logits held
at once stay under a memory budget (Gemma's vocabulary has 262k entries).

Cross-lingual consistency is RankC (Qi et al., 2023, as used by Kim et al., 2024): per item,
sum over j of w_j * |top_j(English) & top_j(lang)| / j with w_j = exp(-j) / sum_k exp(-k),
averaged over items. Dense vs pruned differences come with a seeded paired bootstrap.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlprune import MlpruneError
from mlprune.capture import context_length, encode
from mlprune.corpus import json_object

CHOICE_SLOT = "{choice}"
BUILTIN_TASKS = ("nli", "sentiment")
NORMS = ("token", "byte", "none")
REFERENCE_LANG = "en"
MAX_TASK_BYTES = 100 * 1024 * 1024
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- items and tasks


@dataclass(frozen=True)
class TaskItem:
    """One multiple-choice item in one language."""

    id: str
    lang: str
    prompt: str
    choices: tuple[str, ...]
    label: int

    @property
    def whole_sequence(self) -> bool:
        """True when the prompt holds ``{choice}``: each filled-in sequence is scored whole."""
        return CHOICE_SLOT in self.prompt

    def pairs(self) -> list[tuple[str, str]]:
        """(context, scored text) per choice; the context is empty for whole sequences."""
        if self.whole_sequence:
            return [("", self.prompt.replace(CHOICE_SLOT, c)) for c in self.choices]
        return [(self.prompt, c) for c in self.choices]


@dataclass
class Task:
    """Items of one task in one or more languages."""

    name: str
    items: list[TaskItem]

    @property
    def languages(self) -> list[str]:
        """Languages in file order, English first when present."""
        seen = list(dict.fromkeys(it.lang for it in self.items))
        return sorted(seen, key=lambda lang: lang != REFERENCE_LANG)

    @property
    def ids(self) -> list[str]:
        return list(dict.fromkeys(it.id for it in self.items))

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, limit: int | None = None, langs: Iterable[str] | None = None) -> Task:
        """The first ``limit`` item ids (kept in every language) and only ``langs``."""
        items = self.items
        if langs is not None:
            wanted = [lang.strip() for lang in langs if lang.strip()]
            missing = [lang for lang in wanted if lang not in self.languages]
            if missing:
                raise MlpruneError(f"The task {self.name} has no items in {', '.join(missing)}; "
                                   f"it has {', '.join(self.languages)}.")
            items = [it for it in items if it.lang in wanted]
        if limit is not None:
            if limit < 1:
                raise MlpruneError("The item limit must be at least 1.")
            keep = set(list(dict.fromkeys(it.id for it in items))[:limit])
            items = [it for it in items if it.id in keep]
        return Task(self.name, list(items))


def builtin_task_path(name: str) -> Path:
    """Where a built-in task file lives inside the package."""
    return Path(str(files("mlprune").joinpath(f"data/tasks/{name}.jsonl")))


def load_task(source: str | Path) -> Task:
    """A task from a built-in name (``nli``, ``sentiment``) or a JSONL file, validated."""
    text_source = str(source)
    if text_source in BUILTIN_TASKS:
        path = builtin_task_path(text_source)
        if not path.is_file():
            raise MlpruneError(f"The built-in task {text_source} is missing from this install "
                               f"({path} does not exist).")
        name = text_source
    else:
        path = Path(text_source).expanduser()
        if not path.is_file():
            raise MlpruneError(f"No task file at {path}; give a .jsonl file or a built-in task "
                               f"({', '.join(BUILTIN_TASKS)}).")
        if path.stat().st_size > MAX_TASK_BYTES:
            raise MlpruneError(f"{path} is larger than {MAX_TASK_BYTES >> 20} MB; split it.")
        name = path.stem
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MlpruneError(f"{path.name} is not UTF-8 text (byte {e.start}).") from e
    return parse_task(text, name, label=path.name)


def parse_task(text: str, name: str, *, label: str | None = None) -> Task:
    """Parse and validate JSONL task text; the first problem is raised as one sentence."""
    where = label or name
    items: list[TaskItem] = []
    seen: dict[tuple[str, str], int] = {}
    first_of: dict[str, tuple[int, TaskItem]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item = _parse_line(line, n, where)
        key = (item.id, item.lang)
        if key in seen:
            raise MlpruneError(f"{where} line {n} repeats item '{item.id}' in {item.lang} "
                               f"(first on line {seen[key]}).")
        seen[key] = n
        if item.id in first_of:
            m, other = first_of[item.id]
            if len(other.choices) != len(item.choices):
                raise MlpruneError(
                    f"{where} line {n} gives item '{item.id}' {len(item.choices)} choices in "
                    f"{item.lang} but line {m} gives it {len(other.choices)} in {other.lang}.")
            if other.label != item.label:
                raise MlpruneError(
                    f"{where} line {n} gives item '{item.id}' label {item.label} in {item.lang} "
                    f"but line {m} gives it label {other.label} in {other.lang}.")
        else:
            first_of[item.id] = (n, item)
        items.append(item)
    if not items:
        raise MlpruneError(f"{where} holds no items.")
    return Task(name, items)


def _parse_line(line: str, n: int, where: str) -> TaskItem:
    obj = json_object(line, f"{where} line {n}")
    for key in ("id", "lang", "prompt", "choices", "label"):
        if key not in obj:
            raise MlpruneError(f"{where} line {n} has no '{key}' field.")
    item_id, lang, prompt, choices, label = (obj[k] for k in ("id", "lang", "prompt", "choices", "label"))
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise MlpruneError(f"{where} line {n} has an id that is not a non-empty string.")
    if not isinstance(lang, str) or not lang.strip():
        raise MlpruneError(f"{where} line {n} has a 'lang' that is not a language code.")
    if not isinstance(prompt, str):
        raise MlpruneError(f"{where} line {n} has a 'prompt' that is not a string.")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise MlpruneError(f"{where} line {n} has 'choices' that are not a list of strings.")
    if len(choices) < 2:
        raise MlpruneError(f"{where} line {n} has {len(choices)} choice"
                           f"{'' if len(choices) == 1 else 's'}; an item needs at least 2.")
    empty = [i for i, c in enumerate(choices) if not c.strip()]
    if empty and CHOICE_SLOT not in prompt:
        raise MlpruneError(f"{where} line {n} has an empty choice (number {empty[0]}).")
    if isinstance(label, bool) or not isinstance(label, int):
        raise MlpruneError(f"{where} line {n} has a label that is not an integer.")
    if not 0 <= label < len(choices):
        raise MlpruneError(f"{where} line {n} has label {label}, out of range for its "
                           f"{len(choices)} choices (0 to {len(choices) - 1}).")
    return TaskItem(str(item_id), lang.strip(), prompt, tuple(choices), label)


def write_task(items: Iterable[TaskItem], path: str | Path) -> Path:
    """Write items as a task JSONL file (UTF-8, one item per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": it.id, "lang": it.lang, "prompt": it.prompt,
                         "choices": list(it.choices), "label": it.label}, ensure_ascii=False)
             for it in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """Turns a raw record (premise, hypothesis, review...) into a multiple-choice item.

    ``text`` has ``{field}`` slots and one ``{choice}`` slot. With ``{choice}`` at the very end,
    items are prompt + continuation; anywhere else, each filled-in sequence is scored whole.
    ``max_words`` truncates fields to their first words (MARC: 128).
    """

    text: str
    choices: tuple[str, ...]
    max_words: dict = field(default_factory=dict)

    def render(self, record: dict, *, id: str, lang: str, label: int) -> TaskItem:
        """One item from one record."""
        values = {}
        for key, value in record.items():
            value = str(value)
            limit = self.max_words.get(key)
            values[key] = " ".join(value.split()[:limit]) if limit else value
        values["choice"] = CHOICE_SLOT  # filled per choice at scoring time
        try:
            text = self.text.format_map(values)
        except KeyError as e:
            raise MlpruneError(f"The template needs a field {e} that record {id} lacks.") from e
        if text.endswith(CHOICE_SLOT) and text.count(CHOICE_SLOT) == 1:
            return TaskItem(id, lang, text[: -len(CHOICE_SLOT)], self.choices, label)
        return TaskItem(id, lang, text, self.choices, label)


# The paper's protocols (English templates, as XGLM's zero-shot evaluation uses by default).
# Per-language templates go in TEMPLATES[task][lang]; "*" is the fallback.
TEMPLATES: dict[str, dict[str, Template]] = {
    "xnli": {"*": Template("{premise} , right? {choice} , {hypothesis}", ("Yes", "Also", "No"))},
    "marc": {"*": Template("{review} It is {choice}", ("negative", "positive"),
                           {"review": 128})},
}


def template_for(task: str, lang: str) -> Template:
    """The template of a task in a language (its language-specific one, else the default)."""
    if task not in TEMPLATES:
        raise MlpruneError(f"No template for task '{task}'; known: {', '.join(TEMPLATES)}.")
    table = TEMPLATES[task]
    return table.get(lang) or table["*"]


def render_items(task: str, records: Iterable[dict], lang: str) -> list[TaskItem]:
    """Items from raw records ``{"id", "label", <fields>}`` with the task's template."""
    template = template_for(task, lang)
    out = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if "label" not in rec:
            raise MlpruneError(f"Record {i} has no 'label' field.")
        item_id, label = str(rec.pop("id", i)), rec.pop("label")
        out.append(template.render(rec, id=item_id, lang=lang, label=int(label)))
    return out


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ItemScores:
    """Log-likelihood of each choice of one item."""

    item: TaskItem
    logprob: tuple[float, ...]  # summed log-probability of the scored tokens
    n_tokens: tuple[int, ...]
    n_bytes: tuple[int, ...]

    def scores(self, norm: str = "token") -> list[float]:
        """Each choice's score: summed (``none``), per token (``token``) or per byte (``byte``)."""
        if norm == "none":
            return list(self.logprob)
        if norm == "token":
            return [lp / max(n, 1) for lp, n in zip(self.logprob, self.n_tokens)]
        if norm == "byte":
            return [lp / max(n, 1) for lp, n in zip(self.logprob, self.n_bytes)]
        raise MlpruneError(f"Unknown normalisation '{norm}': use {', '.join(NORMS)}.")

    def predicted(self, norm: str = "token") -> int:
        """The highest-scoring choice (the first of equals)."""
        s = self.scores(norm)
        return max(range(len(s)), key=lambda i: (s[i], -i))

    def correct(self, norm: str = "token") -> bool:
        return self.predicted(norm) == self.item.label


@dataclass
class _Request:
    """One choice: its tokens, and which of its targets this run computes.

    Targets ``tokens[start:]`` are scored; those before ``compute_from`` lie in a token prefix
    shared with the item's first choice (``owner``), so their log-probabilities are read from it.
    """

    tokens: list[int]
    start: int
    compute_from: int
    owner: int | None
    n_bytes: int
    logps: list[float] = field(default_factory=list)


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text without special tokens (typed special tokens stay text)."""
    try:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids the lm-eval way.

    The context's trailing whitespace moves to the continuation, both are tokenized separately
    (the context with the tokenizer's special prefix, e.g. BOS) and concatenated. An empty
    context becomes the BOS token, or EOS for tokenizers without one, so the first token of a
    whole sequence is scored too.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = encode(tokenizer, [context])[0] if context else encode(tokenizer, [""])[0]
    if not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise MlpruneError("This tokenizer has neither a BOS nor an EOS token to start "
                               "a sequence with, so an empty prompt cannot be scored.")
        ctx = [prefix]
    return ctx, _plain_ids(tokenizer, continuation)


def _requests(tokenizer, items: Sequence[TaskItem], max_len: int | None) -> list[list[_Request]]:
    out = []
    for item in items:
        reqs = []
        for context, text in item.pairs():
            ctx, cont = split_tokens(tokenizer, context, text)
            if not cont:
                raise MlpruneError(f"Choice '{text}' of item {item.id} ({item.lang}) has no tokens.")
            tokens = ctx + cont
            start = len(ctx)
            if max_len and len(tokens) > max_len + 1:  # keep the end, as lm-eval does
                cut = len(tokens) - (max_len + 1)
                tokens, start = tokens[cut:], max(start - cut, 1)
            n_bytes = len((context[len(context.rstrip()):] + text).encode("utf-8"))
            reqs.append(_Request(tokens, start, start, None, n_bytes))
        # Targets inside the longest token prefix common to all choices are predicted from
        # identical inputs: compute them once (for choice 0) and share them.
        if len(reqs) > 1 and len({r.start for r in reqs}) == 1:
            common = _common_prefix([r.tokens for r in reqs])
            for r in reqs[1:]:
                r.compute_from, r.owner = max(r.start, min(common, len(r.tokens))), 0
        out.append(reqs)
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _forward_options(model: nn.Module) -> tuple[bool, bool]:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params, "logits_to_keep" in params


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def score_items(model: nn.Module, tokenizer, items: Sequence[TaskItem], *, batch_size: int = 8,
                max_logits_mb: int = 256, progress: Progress | None = None) -> list[ItemScores]:
    """Log-likelihood of every choice of every item, in item order.

    Sequences are left-padded so that the positions to score end each row, and the model's
    head runs on those last positions only (``logits_to_keep``); padding is masked and
    position ids skip it. A batch holds at most ``batch_size`` distinct inputs, and no more
    than ``max_logits_mb`` of fp32 logits unless one input alone needs more.
    """
    if batch_size < 1:
        raise MlpruneError("The batch size must be at least 1.")
    per_item = _requests(tokenizer, items, context_length(model))
    flat = [r for reqs in per_item for r in reqs]
    # Inputs are tokens[:-1]; identical inputs (e.g. single-token choices after one prompt)
    # run once, each request reading its own targets.
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(flat):
        if r.compute_from < len(r.tokens):
            rows.setdefault(tuple(r.tokens[:-1]), []).append(i)
    need = {key: max(len(flat[i].tokens) - flat[i].compute_from for i in members)
            for key, members in rows.items()}
    order = sorted(rows, key=lambda key: (need[key], len(key)), reverse=True)
    per_position = _vocab_size(model) * 4
    budget = max_logits_mb * 2**20
    groups: list[list[tuple[int, ...]]] = []
    for key in order:  # need[] is non-increasing along `order`: the first row sets the width
        if groups and len(groups[-1]) < batch_size and \
                (len(groups[-1]) + 1) * need[groups[-1][0]] * per_position <= budget:
            groups[-1].append(key)
        else:
            groups.append([key])
    with_pos, with_keep = _forward_options(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    with torch.inference_mode():
        for b, group in enumerate(groups):
            keep = need[group[0]]
            width = max(len(key) for key in group)
            input_ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, key in enumerate(group):
                input_ids[row, width - len(key):] = torch.tensor(key)
                mask[row, width - len(key):] = 1
            kwargs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                      "use_cache": False}
            if with_pos:  # left padding: real tokens still start at position 0
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(device)
            if with_keep:
                kwargs["logits_to_keep"] = keep
            logits = model(**kwargs).logits[:, -keep:].float()
            lse = logits.logsumexp(-1)
            for row, key in enumerate(group):
                for i in rows[key]:
                    r = flat[i]
                    k = len(r.tokens) - r.compute_from
                    target = torch.tensor(r.tokens[r.compute_from:], device=logits.device)
                    picked = logits[row, keep - k:].gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    r.logps = (picked - lse[row, keep - k:]).tolist()
            del logits, lse
            if progress:
                progress(b + 1, len(groups))
    results = []
    for item, reqs in zip(items, per_item):
        logprob = []
        for r in reqs:
            shared = 0.0
            if r.owner is not None:
                owner = reqs[r.owner]
                shared = sum(owner.logps[t - owner.compute_from] for t in range(r.start, r.compute_from))
            logprob.append(shared + sum(r.logps))
        results.append(ItemScores(item, tuple(logprob), tuple(len(r.tokens) - r.start for r in reqs),
                                  tuple(r.n_bytes for r in reqs)))
    return results


# --------------------------------------------------------------------------- consistency


def top_j(scores: Sequence[float], j: int) -> set[int]:
    """Indices of the j highest scores (ties: the lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:j])


def rankc_weights(n: int) -> list[float]:
    """w_j = exp(-j) / sum_k exp(-k), j = 1..n: most weight on agreeing about the top choice."""
    raw = [math.exp(-j) for j in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def rankc_item(reference: Sequence[float], other: Sequence[float]) -> float:
    """RankC of one item: sum_j w_j * |top_j(reference) & top_j(other)| / j."""
    if len(reference) != len(other):
        raise MlpruneError("RankC compares rankings of the same choices; the counts differ.")
    n = len(reference)
    return sum(w * len(top_j(reference, j) & top_j(other, j)) / j
               for j, w in zip(range(1, n + 1), rankc_weights(n)))


def rankc(reference: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> float:
    """RankC averaged over items (paired lists of per-choice scores)."""
    if len(reference) != len(other):
        raise MlpruneError("RankC needs the same items in both languages.")
    if not reference:
        return float("nan")
    return sum(rankc_item(a, b) for a, b in zip(reference, other)) / len(reference)


# --------------------------------------------------------------------------- significance


@dataclass(frozen=True)
class Significance:
    """Paired bootstrap of a difference of accuracies (b - a)."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    n_resamples: int
    confidence: float


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, groups: Sequence | None = None,
                     n_resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> Significance:
    """Bootstrap over items of mean(b) - mean(a), paired item by item.

    ``groups`` resamples clusters instead of single units (the translations of one item are
    drawn together). The interval is the percentile interval; the p-value is two-sided: the
    share of resampled differences at least as far from the observed one as the observed one
    is from zero, (1 + count) / (1 + n_resamples), so it is never exactly zero.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise MlpruneError("The paired bootstrap needs one score per item for both models.")
    if a_arr.size == 0:
        raise MlpruneError("The paired bootstrap needs at least one item.")
    if not 0 < confidence < 1:
        raise MlpruneError("The confidence level must be between 0 and 1.")
    d = b_arr - a_arr
    if groups is None:
        sums, counts = d, np.ones_like(d)
    else:
        if len(groups) != d.size:
            raise MlpruneError("Give one group per item to the paired bootstrap.")
        _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        sums = np.bincount(inverse, weights=d)
        counts = np.bincount(inverse).astype(float)
    observed = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // len(sums))  # bounded memory for the index matrix
    for lo in range(0, n_resamples, chunk):
        hi = min(lo + chunk, n_resamples)
        idx = rng.integers(0, len(sums), size=(hi - lo, len(sums)))
        stats[lo:hi] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.sum(np.abs(stats - observed) >= abs(observed) - 1e-12))
    p = (1 + extreme) / (1 + n_resamples)
    return Significance(observed, float(low), float(high), min(1.0, p), int(d.size), n_resamples,
                        confidence)


# --------------------------------------------------------------------------- results


@dataclass
class TaskResult:
    """Scored items of one task for one model, with accuracy and consistency views."""

    task: str
    scored: list[ItemScores]
    norm: str = "token"

    @property
    def languages(self) -> list[str]:
        seen = list(dict.fromkeys(s.item.lang for s in self.scored))
        return sorted(seen, key=lambda lang: lang != REFERENCE_LANG)

    def by_lang(self, lang: str) -> list[ItemScores]:
        return [s for s in self.scored if s.item.lang == lang]

    def accuracy(self, norm: str | None = None) -> dict[str, float]:
        """Accuracy per language."""
        norm = norm or self.norm
        out = {}
        for lang in self.languages:
            part = self.by_lang(lang)
            out[lang] = sum(s.correct(norm) for s in part) / len(part)
        return out

    def non_english_accuracy(self, norm: str | None = None) -> float:
        """Mean of the per-language accuracies of the languages other than English."""
        acc = [v for k, v in self.accuracy(norm).items() if k != REFERENCE_LANG]
        return sum(acc) / len(acc) if acc else float("nan")

    def consistency(self, norm: str | None = None) -> dict[str, float]:
        """RankC of each non-English language with English, over the items both have."""
        norm = norm or self.norm
        if REFERENCE_LANG not in self.languages:
            return {}
        ref = {s.item.id: s.scores(norm) for s in self.by_lang(REFERENCE_LANG)}
        out = {}
        for lang in self.languages:
            if lang == REFERENCE_LANG:
                continue
            pairs = [(ref[s.item.id], s.scores(norm)) for s in self.by_lang(lang) if s.item.id in ref]
            out[lang] = rankc([p[0] for p in pairs], [p[1] for p in pairs])
        return out

    def mean_consistency(self, norm: str | None = None) -> float:
        values = list(self.consistency(norm).values())
        return sum(values) / len(values) if values else float("nan")

    def correctness(self, norm: str | None = None) -> dict[tuple[str, str], bool]:
        """(id, lang) -> whether the model picked the label."""
        norm = norm or self.norm
        return {(s.item.id, s.item.lang): s.correct(norm) for s in self.scored}

    def table(self) -> list[dict]:
        """One row per language: n, accuracy (chosen norm), raw accuracy, RankC with English."""
        acc, raw, cons = self.accuracy(), self.accuracy("none"), self.consistency()
        rows = [{"lang": lang, "n": len(self.by_lang(lang)), "accuracy": acc[lang],
                 "accuracy_raw": raw[lang], "rankc": cons.get(lang, float("nan"))}
                for lang in self.languages]
        if len(self.languages) > 1:
            others = [r for r in rows if r["lang"] != REFERENCE_LANG]
            rows.append({"lang": "non-en", "n": sum(r["n"] for r in others),
                         "accuracy": self.non_english_accuracy(),
                         "accuracy_raw": self.non_english_accuracy("none"),
                         "rankc": self.mean_consistency()})
        return rows

    def columns(self) -> dict[str, float]:
        """Flat columns for a sweep row: ``{task}_acc_{lang}``, ``_acc_non_en``, ``_rankc_...``."""
        t = self.task
        out = {f"{t}_acc_{lang}": v for lang, v in self.accuracy().items()}
        out[f"{t}_acc_non_en"] = self.non_english_accuracy()
        out.update({f"{t}_rankc_{lang}": v for lang, v in self.consistency().items()})
        out[f"{t}_rankc_mean"] = self.mean_consistency()
        return out

    def to_dict(self) -> dict:
        """JSON-ready summary, with every item's per-choice log-likelihoods."""
        return {"task": self.task, "norm": self.norm, "languages": self.table(),
                "items": [{"id": s.item.id, "lang": s.item.lang, "label": s.item.label,
                           "logprob": list(s.logprob), "n_tokens": list(s.n_tokens),
                           "predicted": s.predicted(self.norm)} for s in self.scored]}


def evaluate_task(model: nn.Module, tokenizer, task: Task, *, norm: str = "token",
                  batch_size: int = 8, max_logits_mb: int = 256,
                  progress: Progress | None = None) -> TaskResult:
    """Score a task on the model's current weights (wrap in ``prune.pruned`` for a pruned one)."""
    if norm not in NORMS:
        raise MlpruneError(f"Unknown normalisation '{norm}': use {', '.join(NORMS)}.")
    scored = score_items(model, tokenizer, task.items, batch_size=batch_size,
                         max_logits_mb=max_logits_mb, progress=progress)
    return TaskResult(task.name, scored, norm)


def compare_results(a: TaskResult, b: TaskResult, *, n_resamples: int = 10_000, seed: int = 0,
                    confidence: float = 0.95) -> list[dict]:
    """Model a vs model b on the same items: per language and over non-English items
    (translations of an item resampled together), with a paired bootstrap each."""
    ca, cb = a.correctness(), b.correctness()
    if set(ca) != set(cb):
        raise MlpruneError("The two results are not on the same items; score both on one task.")
    cons_a, cons_b = a.consistency(), b.consistency()
    rows = []
    langs = a.languages
    blocks = [(lang, [k for k in ca if k[1] == lang]) for lang in langs]
    if len(langs) > 1:
        blocks.append(("non-en", [k for k in ca if k[1] != REFERENCE_LANG]))
    for name, keys in blocks:
        if not keys:
            continue
        sig = paired_bootstrap([ca[k] for k in keys], [cb[k] for k in keys],
                               groups=[k[0] for k in keys], n_resamples=n_resamples, seed=seed,
                               confidence=confidence)
        if name == "non-en":
            acc_a, acc_b = a.non_english_accuracy(), b.non_english_accuracy()
            ra, rb = a.mean_consistency(), b.mean_consistency()
        else:
            acc_a, acc_b = a.accuracy()[name], b.accuracy()[name]
            ra, rb = cons_a.get(name, float("nan")), cons_b.get(name, float("nan"))
        rows.append({"lang": name, "n": sig.n, "acc_a": acc_a, "acc_b": acc_b, "diff": sig.diff,
                     "ci_low": sig.low, "ci_high": sig.high, "p_value": sig.p_value,
                     "rankc_a": ra, "rankc_b": rb})
    return rows


# --------------------------------------------------------------------------- sweep columns


class SweepEval:
    """The ``extra_eval`` callback of ``pipeline.sweep``: zero-shot columns for every row.

    Called inside the sweep's pruned context with (loaded, method, sparsity). Dense (sparsity
    0) results are computed once per model and reused for every method; later rows add the
    difference from dense with its bootstrap p-value (NaN when the sweep did not measure the
    dense model in this session, e.g. when resuming past its rows).
    """

    def __init__(self, tasks: Sequence[Task], *, norm: str = "token", batch_size: int = 8,
                 n_resamples: int = 2_000, seed: int = 0, max_logits_mb: int = 256):
        if norm not in NORMS:
            raise MlpruneError(f"Unknown normalisation '{norm}': use {', '.join(NORMS)}.")
        if not tasks:
            raise MlpruneError("Name at least one zero-shot task.")
        self.tasks, self.norm, self.batch_size = list(tasks), norm, batch_size
        self.n_resamples, self.seed, self.max_logits_mb = n_resamples, seed, max_logits_mb
        # keyed by the model object itself (weakly): an id() could be reused by another model
        self._dense: weakref.WeakKeyDictionary[nn.Module, dict[str, TaskResult]] = (
            weakref.WeakKeyDictionary())

    @property
    def columns(self) -> list[str]:
        """The column names every row gets, in order (the same for every row, as CSV needs)."""
        cols = []
        for task in self.tasks:
            t, langs = task.name, task.languages
            cols += [f"{t}_acc_{lang}" for lang in langs] + [f"{t}_acc_non_en"]
            if REFERENCE_LANG in langs:
                cols += [f"{t}_rankc_{lang}" for lang in langs if lang != REFERENCE_LANG]
            cols += [f"{t}_rankc_mean", f"{t}_diff_en", f"{t}_p_en", f"{t}_diff_non_en",
                     f"{t}_p_non_en"]
        return cols

    def __call__(self, loaded, method: str, sparsity: float) -> dict:
        key = loaded.model
        dense = self._dense.get(key)
        if sparsity == 0 and dense is not None:
            results = dense
        else:
            results = {t.name: evaluate_task(loaded.model, loaded.tokenizer, t, norm=self.norm,
                                             batch_size=self.batch_size,
                                             max_logits_mb=self.max_logits_mb) for t in self.tasks}
            if sparsity == 0:
                self._dense[key] = dense = results
        row: dict[str, float] = {}
        for task in self.tasks:
            res = results[task.name]
            row.update(res.columns())
            cmp = {r["lang"]: r for r in compare_results(dense[task.name], res,
                                                         n_resamples=self.n_resamples,
                                                         seed=self.seed)} if dense else {}
            for lang, label in ((REFERENCE_LANG, "en"), ("non-en", "non_en")):
                r = cmp.get(lang)
                row[f"{task.name}_diff_{label}"] = r["diff"] if r else float("nan")
                row[f"{task.name}_p_{label}"] = r["p_value"] if r else float("nan")
        return {c: row.get(c, float("nan")) for c in self.columns}

    def check_resume(self, csv_path: str | Path) -> None:
        """Refuse to append to a sweep CSV whose header lacks these columns (rows would shift)."""
        path = Path(csv_path)
        if not path.is_file() or path.stat().st_size == 0:
            return
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise MlpruneError(f"{path} was written without the zero-shot columns of this sweep "
                               f"(e.g. {missing[0]}); give another CSV file to resume into.")


def sweep_eval(tasks: Sequence[str | Path | Task], *, limit: int | None = None,
               langs: Iterable[str] | None = None, norm: str = "token", batch_size: int = 8,
               n_resamples: int = 2_000, seed: int = 0) -> SweepEval:
    """Build the zero-shot ``extra_eval`` callback for ``pipeline.sweep`` (CLI and dashboard).

    ``tasks`` are built-in names, JSONL paths or loaded tasks; ``limit`` keeps that many items
    per language.
    """
    loaded_tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    langs = list(langs) if langs is not None else None
    return SweepEval([t.subset(limit, langs) for t in loaded_tasks], norm=norm,
                     batch_size=batch_size, n_resamples=n_resamples, seed=seed)


# --------------------------------------------------------------------------- lm-eval bridge

# lm-evaluation-harness task names: benchmark -> (task name pattern, languages).
LM_EVAL_BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "xnli": ("xnli_{}", ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr",
                         "ur", "vi", "zh")),
    "xstorycloze": ("xstorycloze_{}", ("ar", "en", "es", "eu", "hi", "id", "my", "ru", "sw",
                                       "te", "zh")),
    "xcopa": ("xcopa_{}", ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")),
    "pawsx": ("paws_{}", ("de", "en", "es", "fr", "ja", "ko", "zh")),
}


def lm_eval_tasks(benchmarks: Iterable[str], langs: Iterable[str] | None = None) -> list[str]:
    """lm-eval task names for benchmarks, restricted to ``langs`` where given."""
    wanted = [lang.strip() for lang in langs] if langs is not None else None
    out = []
    for bench in benchmarks:
        bench = bench.strip().lower()
        if bench not in LM_EVAL_BENCHMARKS:
            raise MlpruneError(f"Unknown benchmark '{bench}': use {', '.join(LM_EVAL_BENCHMARKS)}.")
        pattern, available = LM_EVAL_BENCHMARKS[bench]
        chosen = [lang for lang in available if wanted is None or lang in wanted]
        if not chosen:
            raise MlpruneError(f"{bench} has none of the languages {', '.join(wanted or [])}; it "
                               f"has {', '.join(available)}.")
        out += [pattern.format(lang) for lang in chosen]
    return out


def lm_eval_command(model: str | Path, tasks: Sequence[str], *, output_path: str | Path,
                    batch_size: int = 8, device: str | None = None, dtype: str | None = None,
                    limit: int | None = None, trust_remote_code: bool = False) -> list[str]:
    """The argv that runs lm-evaluation-harness zero-shot on a model folder or hub id."""
    model_args = f"pretrained={model}"
    if dtype:
        model_args += f",dtype={dtype}"
    if trust_remote_code:
        model_args += ",trust_remote_code=True"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
           "--tasks", ",".join(tasks), "--num_fewshot", "0", "--batch_size", str(batch_size),
           "--output_path", str(output_path)]
    if device:
        cmd += ["--device", device]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def check_lm_eval_ready() -> None:
    """Raise one sentence unless lm-eval is installed and the hub (its data) can be reached."""
    from mlprune.models import hub_reachable

    if not lm_eval_installed():
        raise MlpruneError("lm-evaluation-harness is not installed; install it with "
                           "'pip install lm-eval' to evaluate on xnli, xstorycloze, xcopa or pawsx.")
    if not hub_reachable():
        raise MlpruneError("The Hugging Face hub cannot be reached from this machine, and "
                           "lm-evaluation-harness downloads the xnli, xstorycloze, xcopa and "
                           "pawsx data from it; run this where the hub is reachable.")


def read_lm_eval_results(output_path: str | Path) -> dict[str, dict[str, float]]:
    """Metrics per task from the newest results JSON lm-eval wrote under ``output_path``."""
    found = sorted(glob.glob(os.path.join(str(output_path), "**", "results*.json"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise MlpruneError(f"lm-eval wrote no results file under {output_path}.")
    data = json.loads(Path(found[-1]).read_text(encoding="utf-8"))
    out = {}
    for task, metrics in data.get("results", {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and "stderr" not in k}
    return out


def run_lm_eval(model: str | Path, benchmarks: Iterable[str], *, output_path: str | Path,
                langs: Iterable[str] | None = None, batch_size: int = 8,
                device: str | None = None, dtype: str | None = None, limit: int | None = None,
                runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict:
    """Evaluate a model folder (e.g. an mlprune export) with lm-evaluation-harness.

    Needs ``pip install lm-eval`` and a reachable Hugging Face hub (the benchmarks' data come
    from it). Runs zero-shot; returns {task: {metric: value}} (e.g. ``acc``).
    """
    check_lm_eval_ready()
    tasks = lm_eval_tasks(benchmarks, langs)
    cmd = lm_eval_command(model, tasks, output_path=output_path, batch_size=batch_size,
                          device=device, dtype=dtype, limit=limit)
    done = runner(cmd, check=False)
    if done.returncode != 0:
        raise MlpruneError(f"lm-eval stopped with exit status {done.returncode}; its messages "
                           "above say why.")
    return read_lm_eval_results(output_path)


def resolve_model_dir(spec: str | Path | None) -> str:
    """A folder or hub id lm-eval can load: the embedded model's converted folder for the
    default spec, the path itself for a folder, the id itself for a hub id."""
    from mlprune.models import DEFAULT_MODEL, _embedded_folder

    text = str(spec or DEFAULT_MODEL).strip()
    if text in (DEFAULT_MODEL, "embedded", "default"):
        return str(_embedded_folder(lambda f, m: None))
    if text.lower().endswith(".gguf"):
        raise MlpruneError("lm-eval cannot read a .gguf file here; export the model first "
                           "(mlprune prune --out DIR) and give that folder.")
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MlpruneError(f"{path} has no config.json, so lm-eval cannot load it as a model.")
        return str(path.resolve())
    return text


# --------------------------------------------------------------------------- text reports


def _f(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_result(result: TaskResult) -> str:
    """A plain-text table of one model's accuracy and consistency per language."""
    lines = [f"{result.task} (scores: {result.norm}-normalised log-likelihood; raw = summed)",
             f"{'lang':<7} {'n':>4} {'accuracy':>9} {'raw':>7} {'RankC':>7}"]
    for r in result.table():
        lines.append(f"{r['lang']:<7} {r['n']:>4} {_f(r['accuracy']):>9} "
                     f"{_f(r['accuracy_raw']):>7} {_f(r['rankc']):>7}")
    return "\n".join(lines)


def format_comparison(task: str, rows: list[dict], names: tuple[str, str] = ("dense", "pruned"),
                      confidence: float = 0.95) -> str:
    """A plain-text table of two models' accuracy, difference, interval and p-value."""
    a, b = names
    ci = f"{confidence:.0%} CI"
    lines = [f"{task}: {b} - {a}, paired bootstrap over items",
             f"{'lang':<7} {'n':>4} {a:>8} {b:>8} {'diff':>7} {ci:>17} {'p':>6} "
             f"{'RankC ' + a:>12} {'RankC ' + b:>12}"]
    for r in rows:
        interval = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(f"{r['lang']:<7} {r['n']:>4} {_f(r['acc_a']):>8} {_f(r['acc_b']):>8} "
                     f"{r['diff']:>+7.3f} {interval:>17} {r['p_value']:>6.3f} "
                     f"{_f(r['rankc_a']):>12} {_f(r['rankc_b']):>12}")
    return "\n".join(lines)
