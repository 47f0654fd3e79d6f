"""Parallel corpora: tables of aligned sentences whose columns are language codes.

Read from TSV, CSV or JSONL (one object per line, keys are language codes), the built-in
corpus written by the team, or FLORES+ through ``datasets`` when a hub is reachable.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pandas as pd

from mlprune import MlpruneError

LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "es": "Spanish", "de": "German", "ru": "Russian",
    "zh": "Chinese", "ja": "Japanese", "ar": "Arabic", "hi": "Hindi", "sw": "Swahili",
    "pt": "Portuguese", "it": "Italian", "ko": "Korean", "tr": "Turkish", "vi": "Vietnamese",
    "th": "Thai", "id": "Indonesian", "nl": "Dutch", "pl": "Polish", "uk": "Ukrainian",
    "fa": "Persian", "bn": "Bengali", "ur": "Urdu", "el": "Greek", "he": "Hebrew",
    "bg": "Bulgarian", "ta": "Tamil", "te": "Telugu", "fi": "Finnish", "sv": "Swedish",
}
# FLORES+ uses ISO 639-3 + script codes.
FLORES_CODES = {
    "en": "eng_Latn", "fr": "fra_Latn", "es": "spa_Latn", "de": "deu_Latn", "ru": "rus_Cyrl",
    "zh": "cmn_Hans", "ja": "jpn_Jpan", "ar": "arb_Arab", "hi": "hin_Deva", "sw": "swh_Latn",
    "pt": "por_Latn", "it": "ita_Latn", "ko": "kor_Hang", "tr": "tur_Latn", "vi": "vie_Latn",
}
MAX_CORPUS_BYTES = 200 * 1024 * 1024  # a corpus is read whole; refuse larger files plainly


def language_name(code: str) -> str:
    """'fr' -> 'French'; unknown codes are shown as given."""
    return LANGUAGE_NAMES.get(code, code)


@dataclass
class ParallelCorpus:
    """Aligned sentences: ``table[lang][i]`` is sentence i in language ``lang``."""

    table: pd.DataFrame
    name: str = "corpus"

    @property
    def languages(self) -> list[str]:
        return list(self.table.columns)

    def __len__(self) -> int:
        return len(self.table)

    def sentences(self, lang: str) -> list[str]:
        self.require(lang)
        return self.table[lang].tolist()

    def require(self, *langs: str) -> None:
        """Raise one clear sentence if a language is not a column of this corpus."""
        missing = [lang for lang in langs if lang not in self.table.columns]
        if missing:
            raise MlpruneError(
                f"The corpus '{self.name}' has no column for {', '.join(missing)}; "
                f"it has {', '.join(self.languages)}."
            )


def builtin_corpus() -> ParallelCorpus:
    """The team's built-in corpus: everyday sentences aligned across 12 languages."""
    text = files("mlprune").joinpath("data/parallel.tsv").read_text(encoding="utf-8")
    return _from_text(text, "tsv", "built-in")


def json_object(line: str, place: str, of: str = "") -> dict:
    """One JSONL line as a dict; ``place`` ("Line 3 of 'x'") starts the error sentence."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MlpruneError(f"{place} is not valid JSON ({e.msg} at column {e.colno}).") from e
    if not isinstance(obj, dict):
        raise MlpruneError(f"{place} is not a JSON object{' of ' + of if of else ''}.")
    return obj


def read_corpus(source: str | Path | bytes, *, name: str | None = None,
                fmt: str | None = None) -> ParallelCorpus:
    """Read a corpus from a .tsv/.csv/.jsonl path, or from raw bytes with ``fmt`` given.

    ``"builtin"`` names the built-in corpus and ``"flores:dev"`` FLORES+ from the hub.
    """
    if isinstance(source, str) and source in ("builtin", "built-in"):
        return builtin_corpus()
    if isinstance(source, str) and source.startswith("flores"):
        return flores_corpus(source.partition(":")[2] or "dev")
    if isinstance(source, bytes):
        raw, label = source, name or "uploaded"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise MlpruneError(f"No corpus file at {path}.")
        if path.stat().st_size > MAX_CORPUS_BYTES:
            raise MlpruneError(
                f"{path.name} is {path.stat().st_size / 2**20:.0f} MiB; mlprune reads corpora "
                f"whole and takes at most {MAX_CORPUS_BYTES // 2**20} MiB: use a sample of it."
            )
        raw, label = path.read_bytes(), name or path.name
        fmt = fmt or path.suffix.lstrip(".").lower()
    if len(raw) > MAX_CORPUS_BYTES:
        raise MlpruneError(f"The corpus '{label}' is larger than {MAX_CORPUS_BYTES // 2**20} MiB.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MlpruneError(
            f"The corpus '{label}' is not UTF-8 text (bad byte at position {e.start})."
        ) from e
    fmt = {"txt": "tsv", "tab": "tsv", "json": "jsonl", "ndjson": "jsonl"}.get(fmt or "", fmt)
    if fmt not in ("tsv", "csv", "jsonl"):
        raise MlpruneError(f"Unknown corpus format '{fmt}' for '{label}': use .tsv, .csv or .jsonl.")
    return _from_text(text, fmt, label)


def _from_text(text: str, fmt: str, label: str) -> ParallelCorpus:
    if not text.strip():
        raise MlpruneError(f"The corpus '{label}' is empty.")
    if fmt == "jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            rows.append(json_object(line, f"Line {n} of '{label}'", "language: text"))
        header = list(dict.fromkeys(k for r in rows for k in r))
        records = [[r.get(k) for k in header] for r in rows]
        lines = list(range(1, len(rows) + 1))
    else:
        reader = csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",",
                            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
        try:
            all_rows = [r for r in reader]
        except csv.Error as e:
            raise MlpruneError(f"'{label}' is not readable as {fmt.upper()}: {e}.") from e
        numbered = [(i + 1, r) for i, r in enumerate(all_rows) if any(c.strip() for c in r)]
        if not numbered:
            raise MlpruneError(f"The corpus '{label}' is empty.")
        header = [h.strip() for h in numbered[0][1]]
        for n, r in numbered[1:]:
            if len(r) != len(header):
                raise MlpruneError(
                    f"Row {n} of '{label}' has {len(r)} fields but the header has {len(header)}."
                )
        records = [r for _, r in numbered[1:]]
        lines = [n for n, _ in numbered[1:]]
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise MlpruneError(f"The header of '{label}' names {', '.join(dup)} more than once.")
    if any(not h for h in header):
        raise MlpruneError(f"The header of '{label}' has an empty column name.")
    if not records:
        raise MlpruneError(f"The corpus '{label}' has a header but no sentences.")
    for n, rec in zip(lines, records):
        for lang, cell in zip(header, rec):
            if cell is None or not str(cell).strip():
                raise MlpruneError(f"Row {n} of '{label}' has no '{lang}' sentence.")
            if not isinstance(cell, str):
                raise MlpruneError(f"Row {n} of '{label}' has a non-text '{lang}' value.")
    table = pd.DataFrame([[c.strip() for c in rec] for rec in records], columns=header)
    return ParallelCorpus(table, label)


def flores_corpus(split: str = "dev", langs: list[str] | None = None) -> ParallelCorpus:
    """FLORES+ (openlanguagedata/flores_plus) through ``datasets``; needs a reachable hub."""
    langs = langs or list(FLORES_CODES)[:10]
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError as e:
        raise MlpruneError("FLORES+ needs the 'datasets' package (pip install datasets).") from e
    columns = {}
    try:
        for lang in langs:
            ds = load_dataset("openlanguagedata/flores_plus", FLORES_CODES[lang], split=split)
            columns[lang] = [r["text"] for r in ds]
    except Exception as e:
        raise MlpruneError(
            "FLORES+ could not be loaded: the Hugging Face hub is not reachable from here "
            f"(or the dataset is gated and needs a token). Use the built-in corpus. ({type(e).__name__})"
        ) from e
    return ParallelCorpus(pd.DataFrame(columns), f"FLORES+ {split}")


def code_snippets() -> list[str]:
    """The built-in code calibration set (python, javascript, java, c, sql, bash)."""
    text = files("mlprune").joinpath("data/code.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["code"] for line in text.splitlines() if line.strip()]
