"""The verdict's report as text: the Markdown report, the README's section and the claims
table the Paper page shows, all from the report dict of :mod:`mlprune.reports.verdict`."""

from __future__ import annotations

from pathlib import Path

from mlprune.reports.render import fmt, md_table, write_json_and_markdown


def _n(c: dict) -> str:
    """Items (and the languages they are in) behind a claim."""
    if not c.get("n"):
        return "—"  # a bare "-" renders as a list bullet in Streamlit's table
    return f"{c['n']} ({', '.join(c['langs'])})" if c.get("langs") else str(c["n"])


def claims_rows(report: dict) -> list[dict]:
    """The claims table as display rows (the Paper page and the README show the same)."""
    rows = []
    for c in report["claims"]:
        ci, eff, det = c.get("ci"), c.get("effect"), c.get("detectable")
        scale = 1 if c.get("p_value") is None else 100
        rows.append({
            "claim": c["claim"], "paper": c["paper"], "found": c["found"],
            "effect": "—" if eff is None else f"{eff * scale:+.1f}" if scale == 100
            else f"{eff:.2f}",
            "95% CI": "—" if not ci else (f"[{ci[0] * scale:+.1f}, {ci[1] * scale:+.1f}]"
                                          if scale == 100 else f"{ci[0]:.2f}–{ci[1]:.2f}"),
            "p": "—" if c.get("p_value") is None else
            ("< 0.001" if c["p_value"] < 0.001 else f"{c['p_value']:.3f}"),
            "detectable": "—" if det is None else f"{det * 100:.1f}",
            "seeds a/b": "/".join(map(str, c.get("seeds") or [])) or "—", "n": _n(c),
            "holds here": _holds_here(c)})
    return rows


def _holds_here(c: dict) -> str:
    """yes; no (opposite); not found, with the gain the grid rules out; or cannot tell."""
    if c["holds"] is True:
        return "yes"
    if c["holds"] is False:
        return "no (opposite)" if c.get("p_value") is not None else "no"
    above = c.get("gain_ruled_out_above")
    if above is not None:
        return f"not found: a gain over {above * 100:+.1f} is ruled out"
    return "cannot tell"


CLAIM_COLUMNS = ("claim", "paper", "found", "effect", "95% CI", "p", "detectable", "seeds a/b",
                 "n", "holds here")  # the keys of a claims_rows row, in table order


def markdown(report: dict) -> str:
    """The verdict as Markdown: the claims table, then each comparison."""
    g = report["grid"]
    lines = [f"# The verdict: {report.get('model')}", ""]
    if report.get("dequantized_from"):
        lines += [f"Weights de-quantized from {report['dequantized_from']} (4-bit): every "
                  "figure is that of the de-quantized model.", ""]
    lines += [
             f"Seeds {g['seeds']}, sparsities {g['sparsities']}, calibration languages "
             f"{g['langs']} (wanda-mt on {g['mt_direction']}; wanda-mono on X), "
             f"{g['samples']} calibration prompts of {g['shots']} shots, one-shot rankings "
             f"sliced per sparsity; tasks {report['tasks']}, items per language "
             f"{report['items_per_language']}. Cells: {report['cells']['zeroshot']} zero-shot "
             f"and {report['cells']['translation']} translation of {report['cells']['expected']}.",
             ""]
    lines += md_table(["claim", "paper", "found", "effect (points)", "95% CI", "p",
                       "detectable (points)", "seeds a/b", "n", "holds"],
                      ([r[k] for k in CLAIM_COLUMNS] for r in claims_rows(report)))
    lines += ["", "p of the first two claims is Holm-adjusted over the sparsities tried. "
              "'detectable': the smallest difference this grid detects at p < 0.05 with 80% "
              "power (seeds and items resampled together)."]
    for name, rows in report["comparisons"].items():
        if rows:
            lines += ["", f"## {name}", ""] + _comparisons(rows)
    tr = report["translation"]
    if tr["table"]:
        lines += ["", "## Translation (en->X, task source sentences)", ""]
        lines += md_table(["method", "lang", "pattern", "protocol", "seed", "chrF", "BLEU",
                           "target lang", "n"],
                          ([r["method"], r["lang"], r["pattern"], r["protocol"], r["seed"],
                            f"{r['chrf']:.1f}", f"{r['bleu']:.1f}",
                            f"{r['target_language_rate']:.0%}", r["n"]] for r in tr["table"]))
    return "\n".join(lines) + "\n"


def _comparisons(rows: list[dict]) -> list[str]:
    """One kind of comparison (b against a), one row each."""
    out = []
    for r in rows:
        where = r.get("pattern", "") + (f" {r['only_task']}" if r.get("only_task") else "")
        out.append([r["b"]["method"], r["a"]["method"], where, f"{r['mean_b']:.3f}",
                    f"{r['mean_a']:.3f}", f"{r['diff'] * 100:+.1f}",
                    f"[{r['ci_low'] * 100:+.1f}, {r['ci_high'] * 100:+.1f}]",
                    f"{r['p_value']:.3f}",
                    f"[{r['seed_diff_min'] * 100:+.1f}, {r['seed_diff_max'] * 100:+.1f}]",
                    f"{r['detectable_diff'] * 100:.1f}", r["n_items"],
                    fmt(r.get("seeds_needed_for_target"), "d")])
    return md_table(["b", "a", "where", "mean b", "mean a", "diff", "95% CI", "p", "seed spread",
                     "detectable", "n", "seeds for 2 pts"], out)


def readme_section(report: dict, figures: list[str] = ()) -> str:
    """The README's answer: what was measured, the claims table, the figures, and what is
    still running (a grid stopped early says so)."""
    g, cells = report["grid"], report["cells"]
    measured = cells["zeroshot"] + cells["translation"] + cells.get("analysis", 0)
    tasks = ", ".join(Path(t).stem for t in report["tasks"])
    lines = [f"From `mlprune verdict` on {report.get('model')} (weights de-quantized from "
             f"{report.get('dequantized_from') or '-'}), tasks {tasks}, every item "
             f"({_items(report)}), calibration languages "
             f"{', '.join(g['langs'])} (wanda-mt on en→X, wanda-mono on X, each scored in X), "
             f"seeds {g['seeds']} (independent draws of {g['samples']} calibration prompts), "
             f"sparsities {', '.join(f'{s:.0%}' for s in g['sparsities'])} unstructured, "
             f"one-shot. **{measured} of {cells['expected']} cells measured**"
             + (": the grid is still running, and each row names the seeds and languages it "
                "rests on." if measured < cells["expected"] else "."), ""]
    lines += md_table(["claim", "paper", "found here", "effect (points)", "95% CI", "p",
                       "detectable", "seeds a/b", "n (langs)", "holds"],
                      ([r[k] for k in CLAIM_COLUMNS] for r in claims_rows(report)))
    lines += ["", "Effects are b − a in accuracy points (RankC ×100); the CI and p come from a "
              "bootstrap over seeds and items together; p of the first two rows is "
              "Holm-adjusted over the sparsities; 'detectable' is the smallest difference the "
              "grid detects at p < 0.05 with 80% power; 'not found' is p ≥ 0.05 from a grid "
              "that detects 2 points or less, so a gain above the CI's upper end is ruled out. "
              "Sharing rows give a fraction (0: chance, "
              "1: as shared as two draws of one prompt set) and use mlprune's stated rule, "
              "not the paper's (see the report). Full report: "
              "[bench/results/verdict/report.md](bench/results/verdict/report.md).", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _items(report: dict) -> str:
    per = report.get("items_per_language", {})
    counts = sorted({n for langs in per.values() for n in langs.values()})
    return "/".join(map(str, counts)) + " per language and task" if counts else "-"


def write_report(report: dict, out: str | Path) -> None:
    """report.json (strict) and report.md in ``out``."""
    write_json_and_markdown(report, Path(out), markdown)
