"""An intervention experiment's report (:func:`mlprune.experiments.run_intervention_experiment`)
as Markdown tables, and its files: strict JSON, and Markdown beside it in a folder."""

from __future__ import annotations

from pathlib import Path

from mlprune.reports.render import lang_row, md_table, write_json_and_markdown
from mlprune.storage import atomic_write_json


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _p(x: float | None) -> str:
    return "-" if x is None else "<0.001" if x < 0.001 else f"{x:.3f}"


def markdown(report: dict) -> str:
    """The report as Markdown tables: translation per run and the paired tests, then each
    zero-shot task's accuracy per run and its tests."""
    iv = report["intervention"]
    head = [f"## Intervention: {iv['label']} on {report['model']}"]
    if report["dequantized_from"]:
        head.append(f"Weights de-quantized from {report['dequantized_from']}.")
    n_dims = sum(len(d) if d is not None else 0 for d in iv["dims"].values())
    head.append(f"{len(iv['dims'])} sites, {n_dims or 'every'} (site, dim) entries changed.")
    t = report["translation"]
    lines = head + ["", f"### Translation {t['pair']} (held-out slice)", ""]
    lines += md_table(["run", "chrF", "BLEU", "in target language", "n"], (
        [run, f"{r['chrf']:.1f}", f"{r['bleu']:.1f}", _f(r["target_language_rate"], ".0%"),
         r["n"]] for run, r in t["runs"].items()))
    lines += [""] + md_table(["b vs a", "Δ chrF", "p", "Δ BLEU", "p", "n"], (
        [f"{test['b']} vs {test['a']}", f"{test['chrf']['difference']:+.1f}",
         _p(test["chrf"]["p_value"]), f"{test['bleu']['difference']:+.1f}",
         _p(test["bleu"]["p_value"]), test["chrf"]["n"]] for test in t["tests"]))
    for task, block in report["zeroshot"].items():
        lines += ["", f"### Zero-shot {task} ({block['n_items']} items per language)", ""]
        lines += _zeroshot_tables(block)
    return "\n".join(lines + [""] + [f"- {n}" for n in report["notes"]])


def _zeroshot_tables(block: dict) -> list[str]:
    """One task's accuracy per run, then its paired tests."""
    runs = []
    for run, rows in block["runs"].items():
        en, non = lang_row(rows, "en"), lang_row(rows, "non-en")
        runs.append([run, _f(en and en["accuracy"], ".3f"), _f(non and non["accuracy"], ".3f"),
                     _f(non and non["detectable_diff"], ".3f")])
    tests = []
    for test in block["tests"]:
        en, non = lang_row(test["rows"], "en"), lang_row(test["rows"], "non-en")
        tests.append([f"{test['b']} vs {test['a']}", _f(en and en["diff"], "+.3f"),
                      _p(en and en["p_value"]), _f(non and non["diff"], "+.3f"),
                      _p(non and non["p_value"]), _f(non and non["n"], "d")])
    return (md_table(["run", "en", "non-en", "detectable (non-en)"], runs) + [""]
            + md_table(["b vs a", "Δ en", "p", "Δ non-en", "p", "n non-en"], tests))


def write_report(report: dict, out: str | Path) -> list[Path]:
    """Strict JSON at ``out`` (a .json path), or report.json and report.md in folder ``out``."""
    out = Path(out)
    if out.suffix == ".json":
        return [atomic_write_json(out, report)]
    out.mkdir(parents=True, exist_ok=True)
    return write_json_and_markdown(report, out, markdown)
