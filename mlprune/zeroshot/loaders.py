"""Where tasks come from: built-in and JSONL task files, record files rendered with a template,
XNLI and MARC in their published formats, and the Hugging Face hub.

A task source is one string (the ``--task`` argument of ``mlprune eval``):

- ``nli``, ``sentiment``: the built-in tasks; ``FILE.jsonl``: a task file of items.
- ``xnli:PATH``, ``marc:PATH``: records in a published format, rendered with the paper's
  template. PATH is a file or a folder of files:
  XNLI-1.0's ``xnli.test.tsv`` / ``xnli.dev.tsv`` (columns language, gold_label, sentence1,
  sentence2, pairID ...); rows of the ``datasets`` xnli (premise, hypothesis, label 0-2) as
  JSON lines, a JSON array, CSV or parquet; amazon_reviews_multi JSON lines (review_id, stars,
  review_body, language) or records {"id", "lang", "review", "label" 0/1 or "stars"}.
  Rows without a language field take it from the file name (``fr.jsonl``, ``fr.test.jsonl``).
- ``xnli``, ``marc``: the same data from the hub through ``datasets`` (facebook/xnli;
  SetFit/amazon_reviews_multi_{lang}, the copy the paper used), test split.
- ``FILE`` with ``template="xnli"`` or ``"marc"``: the same as ``xnli:FILE``.

XNLI and MARC (any of the three forms) can be cut to the authors' draw: ``sample=1000`` keeps,
per language, the 1000 items their evaluate.py scored (``datasets``' ``shuffle(seed=0)``, then
the first 1000: :meth:`Task.sample`); ``--protocol paper`` asks for it
(:attr:`mlprune.protocol.Protocol.task_sample`). Task files of items are never sampled.
"""

from __future__ import annotations

import csv
import json
import numbers
import sys
from collections.abc import Iterable
from pathlib import Path

from mlprune import MlpruneError
from mlprune.zeroshot.tasks import (
    BUILTIN_TASKS,
    MAX_TASK_BYTES,
    TEMPLATES,
    Task,
    TaskItem,
    builtin_task_path,
    parse_task,
    template_for,
)

XNLI_LABELS = ("entailment", "neutral", "contradiction")  # the order of the datasets features
MARC_LABELS = ("negative", "positive")
XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi",
              "zh")
MARC_LANGS = ("de", "en", "es", "fr", "ja", "zh")
RECORD_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")

# Field names each published format uses, first match wins.
FIELDS = {
    "id": ("id", "pairID", "review_id"),
    "lang": ("lang", "language"),
    "premise": ("premise", "sentence1"),
    "hypothesis": ("hypothesis", "sentence2"),
    "review": ("review", "review_body", "text", "sentence"),
    "label": ("label", "gold_label"),
}


PAPER_SEED = 0  # the seed of the authors' draw (evaluate.py: dataset.shuffle(seed=0))


def load_task(source: str | Path, *, template: str | None = None,
              langs: Iterable[str] | None = None, split: str = "test",
              sample: int | None = None) -> Task:
    """A task from a source string (see the module docstring), validated.

    ``template`` (``xnli`` or ``marc``) reads a file of raw records instead of items.
    ``langs`` and ``split`` only choose what is downloaded from the hub.
    ``sample``: XNLI and MARC records keep that many items per language, drawn as the
    authors drew theirs (:meth:`Task.sample` with seed 0; after MARC's 3-star reviews are
    dropped, as their MARC-2 files were made); other sources are returned whole.
    """
    task = _load_task(source, template=template, langs=langs, split=split)
    if sample is not None and _is_records(source, template):
        task = task.sample(sample, seed=PAPER_SEED)
    return task


def _is_records(source: str | Path, template: str | None) -> bool:
    """Whether a source is read as XNLI or MARC records (rendered with a template)."""
    text = str(source)
    name, sep, rest = text.partition(":")
    return bool(template) or (bool(sep) and name in TEMPLATES and bool(rest)) or \
        (text in TEMPLATES and not Path(text).exists())


def _load_task(source: str | Path, *, template: str | None, langs: Iterable[str] | None,
               split: str) -> Task:
    text = str(source)
    if template is not None and template not in TEMPLATES:
        raise MlpruneError(f"No template '{template}'; use {' or '.join(TEMPLATES)}.")
    if text in BUILTIN_TASKS:
        if template:
            raise MlpruneError(f"The built-in task {text} already holds items; a template "
                               "applies to a file of records.")
        return _builtin(text)
    name, sep, rest = text.partition(":")
    if sep and name in TEMPLATES and rest:
        if template and template != name:
            raise MlpruneError(f"{text} is read with the {name} template; drop the {template} one.")
        return load_records(rest, name)
    if text in TEMPLATES and not Path(text).exists():
        return load_from_hub(text, langs, split=split)
    if template:
        return load_records(text, template, name=Path(text).stem)
    path = Path(text).expanduser()
    if not path.is_file():
        raise MlpruneError(f"No task file at {path}; give a .jsonl file, a built-in task "
                           f"({', '.join(BUILTIN_TASKS)}), or xnli:PATH / marc:PATH.")
    return parse_task(_read_text(path), path.stem, label=path.name)


def _builtin(name: str) -> Task:
    path = builtin_task_path(name)
    if not path.is_file():
        raise MlpruneError(f"The built-in task {name} is missing from this install "
                           f"({path} does not exist).")
    return parse_task(_read_text(path), name, label=path.name)


def _read_text(path: Path) -> str:
    if path.stat().st_size > MAX_TASK_BYTES:
        raise MlpruneError(f"{path} is larger than {MAX_TASK_BYTES >> 20} MB; split it.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MlpruneError(f"{path.name} is not UTF-8 text (byte {e.start}).") from e


# --------------------------------------------------------------------------- record files


def load_records(source: str | Path, task: str, *, name: str | None = None) -> Task:
    """XNLI or MARC records from a file or a folder of files, rendered with the paper's template."""
    path = Path(source).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix in RECORD_SUFFIXES)
        if not paths:
            raise MlpruneError(f"{path} holds no {', '.join(RECORD_SUFFIXES)} files.")
    elif path.is_file():
        paths = [path]
    else:
        raise MlpruneError(f"No {task} data at {path}; give a file or a folder of files.")
    items: list[TaskItem] = []
    for p in paths:
        items += records_to_items(read_records(p), task, where=p.name, lang=_lang_of_name(p))
    return _checked(name or task, items, path.name)


def read_records(path: Path) -> list[dict]:
    """Rows of a .tsv, .csv, .jsonl, .json (lines or one array) or .parquet file as dicts."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        except Exception as e:
            raise MlpruneError(f"{path.name} could not be read as parquet "
                               f"({type(e).__name__}).") from e
    text = _read_text(path)
    if suffix in (".tsv", ".csv"):
        # XNLI-1.0's TSV holds bare quotes inside sentences: no quoting there (as `datasets` reads it)
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",",
                                quoting=quoting)
        return list(reader)
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise MlpruneError(f"{path.name} is not valid JSON ({e.msg} at line {e.lineno}).") from e
        if not all(isinstance(r, dict) for r in rows):
            raise MlpruneError(f"{path.name} is a JSON array of something other than objects.")
        return rows
    if suffix in (".json", ".jsonl"):
        from mlprune.corpus import json_object

        return [json_object(line, f"{path.name} line {n}")
                for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    raise MlpruneError(f"{path.name}: read records from {', '.join(RECORD_SUFFIXES)} files.")


def _lang_of_name(path: Path) -> str | None:
    """The language a file name starts with (``fr.jsonl``, ``fr.test.jsonl``), if it looks like one."""
    head = path.name.split(".")[0]
    return head if 2 <= len(head) <= 3 and head.isalpha() and head.islower() else None


def _field(rec: dict, key: str):
    for name in FIELDS[key]:
        if name in rec and rec[name] is not None and str(rec[name]) != "":
            return rec[name]
    return None


def records_to_items(records: Iterable[dict], task: str, *, where: str,
                     lang: str | None = None) -> list[TaskItem]:
    """Items from XNLI or MARC records (field names of any published format), one per record;
    MARC records of 3 stars are dropped, as the paper did. ``lang`` is the language of rows
    that do not name one."""
    position: dict[str, int] = {}
    items = []
    for n, rec in enumerate(records, start=1):
        row_lang = _field(rec, "lang") or lang
        if not row_lang:
            raise MlpruneError(f"{where} row {n} names no language (a 'lang' or 'language' "
                               "field); or name the file after its language, e.g. fr.jsonl.")
        row_lang = str(row_lang).strip()
        index = position[row_lang] = position.get(row_lang, -1) + 1
        item_id = _field(rec, "id")
        item_id = str(index) if item_id is None else str(item_id)
        if task == "xnli":
            label = _xnli_label(rec, n, where)
            values = {key: _text(rec, key, n, where) for key in ("premise", "hypothesis")}
        elif task == "marc":
            label = _marc_label(rec, n, where)
            if label is None:
                continue
            values = {"review": _text(rec, "review", n, where)}
        else:
            raise MlpruneError(f"No template for task '{task}'; known: {', '.join(TEMPLATES)}.")
        items.append(template_for(task, row_lang).render(values, id=item_id, lang=row_lang,
                                                         label=label))
    return items


def _text(rec: dict, key: str, n: int, where: str) -> str:
    value = _field(rec, key)
    if not isinstance(value, str):
        names = " or ".join(f"'{f}'" for f in FIELDS[key])
        raise MlpruneError(f"{where} row {n} has no {key} text (a {names} field).")
    return value


def _xnli_label(rec: dict, n: int, where: str) -> int:
    value = _field(rec, "label")
    if isinstance(value, str) and value.strip() in XNLI_LABELS:
        return XNLI_LABELS.index(value.strip())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value <= 2:
        return int(value)
    raise MlpruneError(f"{where} row {n} has label {value!r}; XNLI labels are 0-2 or "
                       f"{', '.join(XNLI_LABELS)}.")


def _marc_label(rec: dict, n: int, where: str) -> int | None:
    """0 negative, 1 positive, None for a 3-star review (dropped, as the paper did)."""
    stars = rec.get("stars")
    if stars is not None and str(stars) != "":
        try:
            stars = int(stars)
        except (TypeError, ValueError):
            stars = None
        if stars not in (1, 2, 3, 4, 5):
            raise MlpruneError(f"{where} row {n} has stars {rec.get('stars')!r}; give 1 to 5.")
        return None if stars == 3 else int(stars > 3)
    value = _field(rec, "label")
    if isinstance(value, str) and value.strip() in MARC_LABELS:
        return MARC_LABELS.index(value.strip())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in (0, 1):
        return int(value)
    raise MlpruneError(f"{where} row {n} has label {value!r}; MARC labels are 0 (negative) or "
                       "1 (positive); give star ratings as 'stars' (1-5; SetFit's label is stars - 1).")


def _checked(name: str, items: list[TaskItem], where: str) -> Task:
    if not items:
        raise MlpruneError(f"{where} holds no items.")
    seen: set[tuple[str, str]] = set()
    for it in items:
        if (it.id, it.lang) in seen:
            raise MlpruneError(f"{where} holds item '{it.id}' twice in {it.lang}.")
        seen.add((it.id, it.lang))
    return Task(name, items)


# --------------------------------------------------------------------------- hub


def load_from_hub(task: str, langs: Iterable[str] | None = None, *, split: str = "test") -> Task:
    """XNLI (facebook/xnli) or MARC (SetFit/amazon_reviews_multi_{lang}, stars 0-indexed in
    its label) through ``datasets``; needs the package and a reachable hub."""
    from mlprune.models import hub_reachable

    available = {"xnli": XNLI_LANGS, "marc": MARC_LANGS}[task]
    wanted = [lang.strip() for lang in langs if lang.strip()] if langs is not None else list(available)
    missing = [lang for lang in wanted if lang not in available]
    if missing:
        raise MlpruneError(f"{task} has no {', '.join(missing)} on the hub; it has "
                           f"{', '.join(available)}.")
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise MlpruneError(f"Loading {task} from the hub needs the 'datasets' package (pip install "
                           f"datasets); or give a local copy as {task}:PATH.") from e
    if not hub_reachable():
        raise MlpruneError(f"The Hugging Face hub cannot be reached from this machine, so {task} "
                           f"cannot be downloaded; give a local copy as {task}:PATH.")
    items: list[TaskItem] = []
    for lang in wanted:
        try:
            if task == "xnli":
                rows = load_dataset("facebook/xnli", lang, split=split)
            else:
                rows = [{"id": r["id"], "review": r["text"], "stars": int(r["label"]) + 1}
                        for r in load_dataset(f"SetFit/amazon_reviews_multi_{lang}", split=split)]
        except Exception as e:
            raise MlpruneError(f"{task} ({lang}, {split}) could not be loaded from the hub "
                               f"({type(e).__name__}); give a local copy as {task}:PATH.") from e
        items += records_to_items(rows, task, where=f"{task} {lang}", lang=lang)
    return _checked(task, items, task)
