"""``mlprune reproduce``'s report as Markdown and HTML, and its files.

The report is the plain dict :func:`mlprune.reproduce.run` builds from its cells; this module
only renders it, so the run can write it when it ends. The two reference variants live here
because they name the report's columns (``chrf_p_vs_wanda-mono``); the run measures with them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from mlprune import MlpruneError
from mlprune.reports.render import html_page, lang_row, md_table, write_json_and_markdown
from mlprune.storage import atomic_write_text

BASELINE = "wanda-mono"  # what Table 1 and the key zero-shot comparison test against
REFERENCE = "wanda-mt"  # what the variants beyond the paper are also tested against


def points(x: float | None) -> str:
    """A difference in accuracy (a fraction) as points, 'n/a' when there is none."""
    return "n/a" if x is None else f"{x * 100:.1f} points"


def _fmt(x, spec: str = ".1f") -> str:
    return "" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    lines = [f"# mlprune reproduce: {report['model']}", ""]
    if report.get("dequantized_from"):
        lines += [f"Weights de-quantized from {report['dequantized_from']} (4-bit): every figure "
                  "is that of the de-quantized model.", ""]
    grid = report["grid"]
    lines += [f"Protocol: paper (EOS-separated demonstrations, {grid['samples']} calibration "
              f"prompts of 4 shots, sequential Wanda); calibration pair {grid['pair']}; "
              f"translation on {grid['translation_limit']} held-out sentences.", ""]
    lines += _claims(report["claims"]) + _table1(report["table1"])
    for task, block in report["zeroshot"].items():
        lines += _zeroshot(task, block)
    lines += _overlaps(report["overlap"])
    return "\n".join(lines) + "\n"


def _claims(claims: list[dict]) -> list[str]:
    rows = []
    for c in claims:
        holds = {True: "yes", False: "no (opposite)", None: "cannot tell"}[c["holds"]] \
            if c["p_value"] is not None else ("yes" if c["holds"] else "no")
        rows.append([c["claim"], c["paper"], f"{c['found']} (n: {c['n']})",
                     _fmt(c["p_value"], ".3f") or "-", holds])
    return ["## Claims", ""] + md_table(["claim", "paper", "found", "p", "holds"], rows)


def _table1(table1: list[dict]) -> list[str]:
    """Table 1, then the variants beyond the paper against the reference."""
    lines = ["", "## Table 1: translation", ""] + md_table(
        ["variant", "chrF", "BLEU", "target language", "perplexity", f"p chrF vs {BASELINE}",
         f"p BLEU vs {BASELINE}"],
        ([r["variant"], f"{r['chrf']:.1f}", f"{r['bleu']:.1f}",
          f"{r['target_language_rate']:.0%}", _fmt(r["perplexity"]),
          _fmt(r.get(f"chrf_p_vs_{BASELINE}"), ".3f"), _fmt(r.get(f"bleu_p_vs_{BASELINE}"), ".3f")]
         for r in table1))
    beyond = [r for r in table1 if f"chrf_p_vs_{REFERENCE}" in r]
    if beyond:
        lines += ["", f"Beyond the paper, against {REFERENCE} (50% unstructured):", ""]
        lines += md_table(["variant", "chrF", "BLEU", f"p chrF vs {REFERENCE}",
                           f"p BLEU vs {REFERENCE}"],
                          ([r["variant"], f"{r['chrf']:.1f}", f"{r['bleu']:.1f}",
                            _fmt(r.get(f"chrf_p_vs_{REFERENCE}"), ".3f"),
                            _fmt(r.get(f"bleu_p_vs_{REFERENCE}"), ".3f")] for r in beyond))
    return lines


def _zeroshot(task: str, block: dict) -> list[str]:
    """One task: accuracy per language and variant, then each comparison's non-English row."""
    langs = [row["lang"] for row in next(iter(block["variants"].values()))]
    lines = ["", f"## Zero-shot: {task}", "", "Accuracy per language (RankC with English "
             "in the non-en column's brackets).", ""]
    rows = []
    for name, by_lang in block["variants"].items():
        cells = []
        for row in by_lang:
            cell = f"{row['accuracy']:.1%}"
            if row["lang"] == "non-en" and row.get("rankc") is not None:
                cell += f" ({row['rankc']:.2f})"
            cells.append(cell)
        rows.append([name, *cells])
    lines += md_table(["variant", *langs], rows) + [""]
    rows = []
    for comp in block["comparisons"]:
        row = lang_row(comp["rows"], "non-en")
        if row is None:
            continue
        key = " (key)" if comp.get("key") else ""
        rows.append([f"{comp['b']} vs {comp['a']}{key}", f"{row['acc_a']:.1%}",
                     f"{row['acc_b']:.1%}", f"{row['diff'] * 100:+.1f}",
                     f"[{row['ci_low'] * 100:+.1f}, {row['ci_high'] * 100:+.1f}]",
                     f"{row['p_value']:.3f}", points(row.get("detectable_diff"))])
    lines += md_table(["comparison", "non-en a", "non-en b", "diff", "95% CI", "p",
                       "detectable"], rows)
    return lines + [f"- {note}" for note in block.get("notes", [])]


def _overlaps(ov: dict) -> list[str]:
    lines = ["", "## Overlaps (Figures 1 and 3)", "",
             f"Top-{ov['fraction']:.0%} in bottom-{ov['fraction']:.0%} (the paper's measure) and "
             f"top-5% in top-5%, mean over layers numbered as output_hidden_states.", ""]
    for measure in ("top_in_bottom", "top_in_top"):
        table = ov[measure]
        names = list(table)
        # the corner cell is empty: "| |", not md_table's "|  |"
        lines += [f"**{measure}**", "", "| | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for a in names:
            lines.append(f"| {a} | " + " | ".join(f"{table[b][a]:.2f}" for b in names) + " |")
        lines.append("")
    return lines


def write_report(report: dict, out: Path, stats: dict | None = None) -> None:
    """report.json (strict), report.md and report.html (with the figures) in ``out``.
    ``stats`` is accepted for the callers that pass the run's activation statistics; the
    figures are drawn from the report alone."""
    write_json_and_markdown(report, out, markdown)
    from mlprune.plots import report_figures  # plotly only when a report is written

    figures = report_figures(report)
    parts = [f"<h2>{html.escape(title)}</h2>" + fig.to_html(
        full_html=False, include_plotlyjs="cdn" if i == 0 else False)
        for i, (title, fig) in enumerate(figures)]
    atomic_write_text(out / "report.html",
                      html_page("mlprune reproduce", markdown(report), parts))


def load_report(folder: str | Path) -> dict:
    """A finished report (report.json in ``folder``)."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise MlpruneError(f"No reproduce report at {path}; run `mlprune reproduce --out "
                           f"{folder}` first.")
    return json.loads(path.read_text(encoding="utf-8"))
