"""Do the large-magnitude dimensions matter for translation? Interventions on the embedded model.

For each direction (fr->en and de->en by default), on the held-out slice:
- the top-4 dimensions of every layer's output (top-k:4 on the translation calibration
  statistics: the 4 largest by their ratio to the layer's median) zeroed, set to their mean,
  scaled x0.5 and x2, each beside the same intervention on as many random ordinary dims;
- LRP2 (the direction's language vector, projected to English after a quarter of the layers
  and back after three quarters) beside a random vector of the same norm, and wanda-mt at 50%;
chrF and BLEU with sacrebleu's paired bootstrap, and zero-shot accuracy on the headroom tasks
(wordorder, completion) with a paired bootstrap, for the same runs.

    python bench/interventions.py [--limit 40] [--task-limit 40] [--pairs fr-en,de-en]
                                  [--model PATH] [--corpus FILE] [--tasks wordorder,completion]

Every measured cell (one run on one direction or one task) is saved as soon as it is
measured (--cells), so an interrupted run resumes where it stopped and the dense runs are
measured once. Writes bench/results/interventions.json (strict JSON: every experiment's
report and the summary rows) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

from mlprune import zeroshot as zs  # noqa: E402
from mlprune.corpus import builtin_corpus, read_corpus  # noqa: E402
from mlprune.experiments import Cells, InterventionSpec, run_intervention_experiment  # noqa: E402
from mlprune.export import atomic_write_text  # noqa: E402
from mlprune.models import cache_dir, load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (name, spec fields): every direction runs each of these
EXPERIMENTS = [
    ("zero", {"kind": "zero"}),
    ("mean", {"kind": "mean"}),
    ("scale x0.5", {"kind": "scale", "factor": 0.5}),
    ("scale x2", {"kind": "scale", "factor": 2.0}),
    ("lrp2", {"kind": "lrp2", "compare_prune": 0.5}),
]


def _test(tests: list[dict], a: str, b: str) -> dict | None:
    return next((t for t in tests if t["a"] == a and t["b"] == b), None)


def _row(rows: list[dict], lang: str) -> dict | None:
    return next((r for r in rows if r["lang"] == lang), None)


def summary_rows(pair: str, name: str, report: dict) -> list[dict]:
    """One row per intervention (and one for wanda-mt when the report has it): chrF and BLEU
    of each run, the change from dense and from the control with p-values, and per task the
    non-English accuracy with the same comparisons."""
    t = report["translation"]
    out = []
    for run, label in (("intervened", name), ("pruned", "wanda-mt 50%")):
        if run not in t["runs"]:
            continue
        control = "control" if run == "intervened" and "control" in t["runs"] else None
        row = {"pair": pair, "intervention": label, "n": t["runs"][run]["n"],
               "chrf_dense": t["runs"]["dense"]["chrf"], "chrf": t["runs"][run]["chrf"],
               "bleu_dense": t["runs"]["dense"]["bleu"], "bleu": t["runs"][run]["bleu"],
               "target_language_rate": t["runs"][run]["target_language_rate"]}
        vs_dense = _test(t["tests"], "dense", run)
        row.update(chrf_diff=vs_dense["chrf"]["difference"], chrf_p=vs_dense["chrf"]["p_value"],
                   bleu_diff=vs_dense["bleu"]["difference"], bleu_p=vs_dense["bleu"]["p_value"])
        if control:
            row["chrf_control"] = t["runs"]["control"]["chrf"]
            vs_control = _test(t["tests"], "control", run)
            row.update(chrf_vs_control=vs_control["chrf"]["difference"],
                       chrf_vs_control_p=vs_control["chrf"]["p_value"])
        for task, block in report["zeroshot"].items():
            dense_rows, rows = block["runs"]["dense"], block["runs"][run]
            for lang, col in (("en", "en"), ("non-en", "non_en")):
                if _row(rows, lang) is None:
                    continue
                row[f"{task}_{col}_dense"] = _row(dense_rows, lang)["accuracy"]
                row[f"{task}_{col}"] = _row(rows, lang)["accuracy"]
                test = _row(_test(block["tests"], "dense", run)["rows"], lang)
                row[f"{task}_{col}_p"] = test["p_value"]
                row[f"{task}_{col}_detectable"] = test["detectable_diff"]
                if control:
                    row[f"{task}_{col}_control"] = _row(block["runs"]["control"], lang)["accuracy"]
                    test = _row(_test(block["tests"], "control", run)["rows"], lang)
                    row[f"{task}_{col}_vs_control_p"] = test["p_value"]
        out.append(row)
    return out


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _p(x) -> str:
    return "-" if x is None else "<0.001" if x < 0.001 else f"{x:.3f}"


def markdown(rows: list[dict], tasks: list[str]) -> str:
    head = ["pair", "intervention", "chrF dense", "chrF (Δ, p)", "chrF control",
            "vs control (Δ, p)"]
    head += [f"{t} non-en: dense → run (p); control" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pair"], r["intervention"], _f(r["chrf_dense"]),
                 f"{r['chrf']:.1f} ({r['chrf_diff']:+.1f}, {_p(r['chrf_p'])})",
                 _f(r.get("chrf_control")),
                 f"{r['chrf_vs_control']:+.1f}, {_p(r['chrf_vs_control_p'])}"
                 if "chrf_vs_control" in r else "-"]
        for t in tasks:
            if f"{t}_non_en" not in r:
                cells.append("-")
                continue
            cells.append(f"{r[f'{t}_non_en_dense']:.3f} → {r[f'{t}_non_en']:.3f} "
                         f"({_p(r[f'{t}_non_en_p'])}); {_f(r.get(f'{t}_non_en_control'), '.3f')}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded Gemma 3 270M)")
    ap.add_argument("--corpus", default=None, help="corpus file (default: the built-in corpus)")
    ap.add_argument("--pairs", default="fr-en,de-en")
    ap.add_argument("--limit", type=int, default=40, help="held-out sentences (40: all)")
    ap.add_argument("--task-limit", type=int, default=40, help="items per language per task")
    ap.add_argument("--tasks", default="wordorder,completion", help="comma-separated; '' for none")
    ap.add_argument("--only", default=None, metavar="NAMES",
                    help=f"run only these experiments (comma-separated: "
                         f"{', '.join(n for n, _ in EXPERIMENTS)})")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16, help="calibration prompts")
    ap.add_argument("--out", default=str(RESULTS / "interventions.json"))
    ap.add_argument("--cells", default=None,
                    help="measured cells, to resume from (default: in the mlprune cache)")
    args = ap.parse_args(argv)
    wanted = [n.strip() for n in args.only.split(",")] if args.only else [n for n, _ in EXPERIMENTS]
    unknown = sorted(set(wanted) - {n for n, _ in EXPERIMENTS})
    if unknown:
        ap.error(f"unknown experiment {', '.join(unknown)}")
    chosen = [(n, f) for n, f in EXPERIMENTS if n in wanted]
    loaded = load_model(args.model)
    corpus = read_corpus(args.corpus) if args.corpus else builtin_corpus()
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    cells = Cells(args.cells or cache_dir() / "bench-interventions" /
                  f"{loaded.name.replace('/', '_')}.json")
    out = Path(args.out)
    reports, rows = {}, []
    for pair in [p.strip() for p in args.pairs.split(",") if p.strip()]:
        for name, fields in chosen:
            spec = InterventionSpec(pair=pair, detect="top-k:4", limit=args.limit,
                                    task_limit=args.task_limit, tasks=tasks,
                                    samples=args.samples, max_new_tokens=args.max_new_tokens,
                                    **fields).validate()
            t = time.perf_counter()
            report = run_intervention_experiment(
                loaded, corpus, spec, cells=cells,
                progress=lambda s, f, w=f"{pair} {name}": print(f"\r{w}: {s} {f:.0%}   ",
                                                                 end="", file=sys.stderr))
            reports[f"{pair} {name}"] = report
            rows += summary_rows(pair, name, report)
            save(out, loaded, rows, reports, args)
            print(f"\r{pair} {name}: {time.perf_counter() - t:.0f} s" + " " * 40, file=sys.stderr)
    print(f"\n{loaded.name}" + (f" (weights de-quantized from {loaded.dequantized_from})"
                                if loaded.dequantized_from else ""))
    print(f"top-k:4 dims at every layer's output; {args.limit} held-out sentences, "
          f"{args.task_limit} task items per language; p: paired bootstrap against dense\n")
    names = list(dict.fromkeys(t for r in reports.values() for t in r["zeroshot"]))
    print(markdown(rows, names))
    print(f"\nwrote {out}", file=sys.stderr)


def save(out: Path, loaded, rows: list[dict], reports: dict, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = {}  # the reports without the generated outputs (they stay in the cells file)
    for key, report in reports.items():
        runs = {name: {k: v for k, v in run.items() if k != "outputs"}
                for name, run in report["translation"]["runs"].items()}
        slim[key] = {**report, "translation": {**report["translation"], "runs": runs}}
    atomic_write_text(out, zs.strict_json({
        "model": loaded.name, "dequantized_from": loaded.dequantized_from,
        "settings": {"pairs": args.pairs, "limit": args.limit, "task_limit": args.task_limit,
                     "tasks": args.tasks, "samples": args.samples, "detect": "top-k:4",
                     "max_new_tokens": args.max_new_tokens},
        "rows": rows, "reports": slim}))


if __name__ == "__main__":
    main()
