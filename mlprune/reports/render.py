"""The pieces every report shares: Markdown tables, number formats, one HTML page, and the
report files written atomically (strict JSON: a NaN is written as null)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mlprune.storage import atomic_write_json, atomic_write_text


def fmt(x: Any, spec: str, missing: str = "-") -> str:
    """``x`` formatted by ``spec``; ``missing`` for None and NaN (strict JSON reads a NaN back
    as None, so a report shows both the same way before and after it is saved)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return format(x, spec)


def md_row(cells: Iterable[Any]) -> str:
    """One Markdown table row: ``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: Sequence[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, then one line per row."""
    return [md_row(header), "|" + "---|" * len(header), *(md_row(r) for r in rows)]


def lang_row(rows: list[dict], lang: str) -> dict | None:
    """The row of ``lang`` (or "non-en") in a per-language table, or None."""
    return next((r for r in rows if r["lang"] == lang), None)


def html_page(title: str, markdown: str, parts: Iterable[str] = ()) -> str:
    """A standalone page: the Markdown report in a <pre> block (readable without a Markdown
    renderer), then ``parts`` (HTML fragments such as figures)."""
    body = f"<pre style='white-space:pre-wrap'>{html.escape(markdown)}</pre>"
    return (f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
            "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
            + body + "".join(parts) + "</body>")


def write_json_and_markdown(report: dict, folder: Path,
                            markdown: Callable[[dict], str]) -> list[Path]:
    """``report.json`` (strict), then ``report.md`` (``markdown(report)``) in ``folder``, each
    written atomically: the JSON is kept even if rendering fails."""
    written = [atomic_write_json(folder / "report.json", report)]
    written.append(atomic_write_text(folder / "report.md", markdown(report)))
    return written


def read_json(path: Path) -> dict | None:
    """The JSON at ``path``, or None when there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
