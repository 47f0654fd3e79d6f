"""Multiple-choice items, tasks, task files and the templates that make items from records.

A task file is JSONL, one item per line::

    {"id": "7", "lang": "fr", "prompt": "...", "choices": ["...", "..."], "label": 1}

Items sharing an ``id`` across languages are the same item (translations of each other). The
choices may be in a different order in each language (the label then differs too): accuracy
is still defined per language, and RankC, which pairs choice i in English with choice i in
another language, leaves such items out (:func:`rankc_unaligned`).

A template turns raw records (premise and hypothesis, a review and its stars) into items, as
the paper's zero-shot protocol does for XNLI and MARC (:data:`TEMPLATES`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np

from mlprune import MlpruneError
from mlprune.corpus import json_object

CHOICE_SLOT = "{choice}"
REFERENCE_LANG = "en"


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
        """Only ``langs``, and at most ``limit`` items in each language.

        Each language keeps its first ``limit`` items in one common order, the order in which
        ids first appear in the task, so items shared across languages (the same id:
        translations of each other) stay aligned: a parallel task keeps the same ``limit``
        ids everywhere, and a task whose ids differ per language still gets ``limit`` items
        in every language (not ``limit`` ids shared out among them)."""
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
            rank = {item_id: k for k, item_id in enumerate(dict.fromkeys(it.id for it in items))}
            keep: set[tuple[str, str]] = set()
            for lang in dict.fromkeys(it.lang for it in items):
                ids = sorted((it.id for it in items if it.lang == lang), key=rank.__getitem__)
                keep.update((item_id, lang) for item_id in ids[:limit])
            items = [it for it in items if (it.id, it.lang) in keep]
        return Task(self.name, list(items))

    def sample(self, n: int, seed: int = 0) -> Task:
        """``n`` items per language drawn as the paper drew its 1000: the ``datasets`` library's
        ``shuffle(seed).select(range(n))``, i.e. rows ``default_rng(seed).permutation(N)[:n]``
        of each language in file order. Parallel files (XNLI) keep the same items everywhere."""
        if n < 1:
            raise MlpruneError("The sample size must be at least 1.")
        out: list[TaskItem] = []
        for lang in dict.fromkeys(it.lang for it in self.items):
            rows = [it for it in self.items if it.lang == lang]
            order = np.random.default_rng(seed).permutation(len(rows))[:n]
            out += [rows[i] for i in order]
        return Task(self.name, out)


def rankc_unaligned(items: Iterable[TaskItem]) -> set[tuple[str, str]]:
    """(id, lang) of the non-English items whose choices RankC cannot pair with English's.

    RankC compares the rank of choice i in English with that of choice i in another language,
    so it needs the choices in one order. A label other than the English item's shows they
    are not. Once a task shows such shuffled items, an item with three or more choices whose
    texts differ from English's may have been shuffled with its label kept in place by chance,
    so it is left out too; identical choice texts (the paper's English XNLI verbalizers) prove
    the order. Two-choice items with the same label are aligned.
    """
    items = list(items)
    ref = {it.id: it for it in items if it.lang == REFERENCE_LANG}
    others = [it for it in items if it.lang != REFERENCE_LANG and it.id in ref]
    shuffled = any(it.label != ref[it.id].label for it in others)
    out = set()
    for it in others:
        en = ref[it.id]
        if it.label != en.label or (shuffled and len(it.choices) > 2 and it.choices != en.choices):
            out.add((it.id, it.lang))
    return out


# --------------------------------------------------------------------------- task files


# wordorder and completion: 170 aligned items in 8 languages, where the embedded model has
# headroom (mlprune/data/tasks/README.md); nli and sentiment: small, near chance for it.
BUILTIN_TASKS = ("wordorder", "completion", "nli", "sentiment")
MAX_TASK_BYTES = 100 * 1024 * 1024


def builtin_task_path(name: str) -> Path:
    """Where a built-in task file lives inside the package."""
    return Path(str(files("mlprune").joinpath(f"data/tasks/{name}.jsonl")))


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

    ``text`` has ``{field}`` slots and one ``{choice}`` slot. With ``whole_sequence`` (the
    paper's protocol) each filled-in text is scored whole, over all its tokens; otherwise a
    ``{choice}`` at the very end makes prompt + continuation items (log P(choice | prompt)).
    ``max_words`` truncates fields to their first words, joined by single spaces (MARC: 128).
    """

    text: str
    choices: tuple[str, ...]
    max_words: dict = field(default_factory=dict)
    whole_sequence: bool = False

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
        if not 0 <= label < len(self.choices):
            raise MlpruneError(f"Record {id} has label {label}, out of range for the template's "
                               f"{len(self.choices)} choices ({', '.join(self.choices)}).")
        if not self.whole_sequence and text.endswith(CHOICE_SLOT) and text.count(CHOICE_SLOT) == 1:
            return TaskItem(id, lang, text[: -len(CHOICE_SLOT)], self.choices, label)
        return TaskItem(id, lang, text, self.choices, label)


# The paper's protocols (Kim et al., 2024, src/data/preprocess.py and src/evaluate.py of their
# code): the English template in every language, each choice filled in and the whole sequence
# scored by its mean token log-probability. XNLI: their prompt joins "{premise} , right?" and
# " {word} , {hypothesis}" with a space, hence the two spaces; labels in the order of the
# `datasets` xnli features (entailment, neutral, contradiction). MARC: the first 128 words of
# the review, then " It is " and the label name; stars 1-2 negative, 4-5 positive, 3 dropped.
# Per-language templates would go in TEMPLATES[task][lang]; "*" is the fallback.
TEMPLATES: dict[str, dict[str, Template]] = {
    "xnli": {"*": Template("{premise} , right?  {choice} , {hypothesis}", ("Yes", "Also", "No"),
                           whole_sequence=True)},
    "marc": {"*": Template("{review} It is {choice}", ("negative", "positive"), {"review": 128},
                           whole_sequence=True)},
}


def template_for(task: str, lang: str) -> Template:
    """The template of a task in a language (its language-specific one, else the default)."""
    if task not in TEMPLATES:
        raise MlpruneError(f"No template for task '{task}'; known: {', '.join(TEMPLATES)}.")
    table = TEMPLATES[task]
    return table.get(lang) or table["*"]


def render_items(task: str, records: Iterable[dict], lang: str) -> list[TaskItem]:
    """Items from raw records ``{"id", "label", <fields>}`` of one language with the task's
    template (the label an index into the template's choices)."""
    template = template_for(task, lang)
    out = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if "label" not in rec:
            raise MlpruneError(f"Record {i} has no 'label' field.")
        item_id, label = str(rec.pop("id", i)), rec.pop("label")
        out.append(template.render(rec, id=item_id, lang=lang, label=int(label)))
    return out
