"""Beyond the paper's Wanda: per-layer sparsity, calibration mixes and M-Wanda, each against
wanda-mt (single-pair translation calibration, uniform sparsity) with paired tests.

Compared, all unstructured, calibrated on --pair (default fr-en) where a method takes a pair:
- per-layer sparsity: uniform (wanda-mt) vs OWL (wanda-owl) at 50% and 60%;
- calibration at 50%: the pair (wanda-mt) vs every X->English direction pooled
  (wanda-pooled) vs monolingual text of the pair's source (wanda-mono);
- M-Wanda at 50% (pooled calibration): all parts, and each part left out.
Measured per variant: held-out few-shot translation (chrF, BLEU) for each --eval-pair, with
sacrebleu's paired bootstrap against wanda-mt at the same sparsity, and zero-shot accuracy on
the built-in headroom tasks (wordorder, completion) with a paired bootstrap over items (an
item's translations resampled together) and the smallest difference the test could detect.

    python bench/beyond_wanda.py [--model PATH] [--limit 40] [--task-limit 40]
                                 [--out bench/results/beyond_wanda.json]

Every measurement is saved to --out as soon as it is made (strict JSON: null, never NaN), and
each variant's masks under the mlprune cache, so an interrupted run resumes where it stopped.
Prints the Markdown tables (the README's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

from mlprune import MlpruneError  # noqa: E402
from mlprune import zeroshot as zs  # noqa: E402
from mlprune.corpus import read_corpus  # noqa: E402
from mlprune.evaluate import evaluate_translation  # noqa: E402
from mlprune.export import atomic_write_text  # noqa: E402
from mlprune.models import cache_dir, load_model  # noqa: E402
from mlprune.pipeline import SWEEP_METHODS, PruneSpec, paired_vs_dense, prune  # noqa: E402
from mlprune.prompts import parse_pair  # noqa: E402
from mlprune.prune import MaskSet, pruned  # noqa: E402
from mlprune.zeroshot.statistics import detectable_difference, paired_bootstrap  # noqa: E402

REFERENCE = "wanda-mt"
# (group, method as the sweep names it, sparsity): each is compared with wanda-mt at its sparsity
VARIANTS = [
    ("reference", "wanda-mt", 0.5), ("reference", "wanda-mt", 0.6),
    ("per-layer sparsity", "wanda-owl", 0.5), ("per-layer sparsity", "wanda-owl", 0.6),
    ("calibration", "wanda-pooled", 0.5), ("calibration", "wanda-mono", 0.5),
    ("M-Wanda", "m-wanda", 0.5), ("M-Wanda", "m-wanda-no-variance", 0.5),
    ("M-Wanda", "m-wanda-no-cwl", 0.5), ("M-Wanda", "m-wanda-no-prob", 0.5),
]
TASKS = ("wordorder", "completion")


def variant_name(method: str, sparsity: float) -> str:
    return f"{method} {sparsity:.0%}"


def spec_of(base: PruneSpec, method: str, sparsity: float) -> PruneSpec:
    return replace(base, sparsity=sparsity, **SWEEP_METHODS[method]).validate()


def cached_masks(loaded, corpus, spec: PruneSpec, model_id: str) -> tuple[MaskSet, float]:
    """The spec's masks, read back when an earlier run made them; (masks, seconds to make)."""
    key = hashlib.sha256(json.dumps([model_id, asdict(spec)], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "beyond_wanda" / f"{key[:20]}.safetensors"
    if path.is_file():
        try:
            return MaskSet.load(path), 0.0
        except MlpruneError:
            path.unlink(missing_ok=True)
    start = time.perf_counter()
    masks = prune(loaded, corpus, spec).masks
    path.parent.mkdir(parents=True, exist_ok=True)
    masks.save(path.with_name(path.name + ".partial"))
    path.with_name(path.name + ".partial").replace(path)
    return masks, time.perf_counter() - start


def compare_translation(ref: dict, row: dict, tgt: str) -> dict:
    """sacrebleu's paired bootstrap of a variant's outputs (b) against wanda-mt's (a)."""
    test = paired_vs_dense(ref["outputs"], row["outputs"], tgt)
    return {f"{m}_diff": test[m]["difference"] for m in ("chrf", "bleu")} | \
        {f"{m}_p": test[m]["p_value"] for m in ("chrf", "bleu")}


def compare_zeroshot(ref: dict, row: dict, resamples: int, seed: int) -> dict:
    """Paired bootstrap over every item (an item's languages together) of accuracy, variant
    (b) minus wanda-mt (a), with the smallest difference detectable at this size."""
    keys = sorted(set(ref["correct"]) & set(row["correct"]))
    a = [ref["correct"][k] for k in keys]
    b = [row["correct"][k] for k in keys]
    sig = paired_bootstrap(a, b, groups=[k.split("|")[0] for k in keys], n_resamples=resamples,
                           seed=seed)
    discordance = sum(x != y for x, y in zip(a, b)) / len(keys)
    return {"acc_diff": sig.diff, "acc_p": sig.p_value, "n": sig.n,
            "detectable": detectable_difference(len(keys), discordance)}


def measure(args, loaded, corpus, results: dict, out: Path) -> None:
    """Every variant's translation and zero-shot rows not measured yet, saved as measured."""
    base = PruneSpec(pair=args.pair, samples=args.samples, mode=args.mode, seed=args.seed)
    tasks = [zs.load_task(t).subset(args.task_limit or None, None)
             for t in args.tasks.split(",") if t]
    rows = results["rows"]
    for group, method, sparsity in VARIANTS:
        name = variant_name(method, sparsity)
        todo = [p for p in args.eval_pair if f"{name}|translation|{p}" not in rows]
        todo_tasks = [t for t in tasks if f"{name}|zeroshot|{t.name}" not in rows]
        if not todo and not todo_tasks:
            continue
        spec = spec_of(base, method, sparsity)
        masks, seconds = cached_masks(loaded, corpus, spec, results["settings"]["model"])
        print(f"{name}: masks ({masks.overall_sparsity():.1%} reached) in {seconds:.0f} s",
              file=sys.stderr, flush=True)
        with pruned(loaded.model, masks):
            for pair in todo:
                ev = evaluate_translation(loaded.model, loaded.tokenizer, corpus,
                                          *parse_pair(pair), limit=args.limit,
                                          batch_size=args.batch_size)
                rows[f"{name}|translation|{pair}"] = {
                    "variant": name, "group": group, "pair": pair, "chrf": ev["chrf"],
                    "bleu": ev["bleu"], "n": ev["n"], "sparsity": masks.overall_sparsity(),
                    "allocation": masks.meta.get("allocation"), "label": spec.label,
                    "outputs": [{"reference": o["reference"], "output": o["output"]}
                                for o in ev["outputs"]]}
                save(out, results)
                print(f"  {pair}: chrF {ev['chrf']:.1f}", file=sys.stderr, flush=True)
            for task in todo_tasks:
                res = zs.evaluate_task(loaded.model, loaded.tokenizer, task,
                                       batch_size=args.batch_size)
                correct = {f"{i}|{lang}": int(ok) for (i, lang), ok in res.correctness().items()}
                rows[f"{name}|zeroshot|{task.name}"] = {
                    "variant": name, "group": group, "task": task.name,
                    "accuracy": sum(correct.values()) / len(correct), "n": len(correct),
                    "correct": correct}
                save(out, results)
                print(f"  {task.name}: accuracy {rows[f'{name}|zeroshot|{task.name}']['accuracy']:.1%}",
                      file=sys.stderr, flush=True)


def comparisons(results: dict, args) -> list[dict]:
    """One line per variant: its figures and, beside wanda-mt at its sparsity, the tests."""
    rows, lines = results["rows"], []
    for group, method, sparsity in VARIANTS:
        name, ref = variant_name(method, sparsity), variant_name(REFERENCE, sparsity)
        line = {"variant": name, "group": group, "against": None if name == ref else ref}
        for pair in args.eval_pair:
            row, base = rows.get(f"{name}|translation|{pair}"), rows.get(f"{ref}|translation|{pair}")
            if row is None:
                continue
            line[f"{pair} chrf"], line[f"{pair} bleu"] = row["chrf"], row["bleu"]
            if base is not None and name != ref:
                test = compare_translation(base, row, parse_pair(pair)[1])
                line.update({f"{pair} {k}": v for k, v in test.items()})
        for task in TASKS:
            row, base = rows.get(f"{name}|zeroshot|{task}"), rows.get(f"{ref}|zeroshot|{task}")
            if row is None:
                continue
            line[f"{task} acc"] = row["accuracy"]
            if base is not None and name != ref:
                test = compare_zeroshot(base, row, args.resamples, args.seed)
                line.update({f"{task} {k}": v for k, v in test.items()})
        lines.append(line)
    return lines


def _f(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(lines: list[dict], args, model: str) -> str:
    """The tables: per group, each variant's figures with p against wanda-mt."""
    head = ["variant", *[f"chrF {p} (Δ, p)" for p in args.eval_pair],
            *[f"BLEU {p} (p)" for p in args.eval_pair], *[f"{t} acc (Δ, p)" for t in TASKS]]
    out = [f"Model: {model}; {args.limit} held-out sentences per direction, {args.task_limit} "
           f"items per language per task; every Δ and p against {REFERENCE} at the same "
           "sparsity (sacrebleu paired bootstrap for chrF/BLEU; paired bootstrap over items "
           "for accuracy).", ""]
    for group in dict.fromkeys(g for g, _, _ in VARIANTS):
        out += [f"**{group}**", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for line in (x for x in lines if x["group"] == group):
            cells = [line["variant"]]
            for p in args.eval_pair:
                chrf = line.get(f"{p} chrf")
                cells.append(_f(chrf, ".1f") + (f" ({line[f'{p} chrf_diff']:+.1f}, "
                                                f"{line[f'{p} chrf_p']:.3f})"
                                                if f"{p} chrf_p" in line else ""))
            for p in args.eval_pair:
                cells.append(_f(line.get(f"{p} bleu"), ".1f")
                             + (f" ({line[f'{p} bleu_p']:.3f})" if f"{p} bleu_p" in line else ""))
            for t in TASKS:
                acc = line.get(f"{t} acc")
                cells.append(_f(acc, ".1%") + (
                    f" ({line[f'{t} acc_diff'] * 100:+.1f}, {line[f'{t} acc_p']:.3f}; "
                    f"detectable {_f(_pct(line.get(f'{t} detectable')), 's')})"
                    if f"{t} acc_p" in line else ""))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{x * 100:.1f}"


def save(out: Path, results: dict) -> None:
    atomic_write_text(out, zs.strict_json(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or id (default: the embedded "
                                                  "Gemma 3 270M)")
    ap.add_argument("--corpus", default="builtin")
    ap.add_argument("--pair", default="fr-en", help="calibration pair of wanda-mt and wanda-owl")
    ap.add_argument("--eval-pair", action="append", default=None,
                    help="held-out translation direction (repeatable; default fr-en and de-en)")
    ap.add_argument("--limit", type=int, default=40, help="held-out sentences per direction")
    ap.add_argument("--task-limit", type=int, default=40,
                    help="zero-shot items per language per task (0: all)")
    ap.add_argument("--samples", type=int, default=16, help="calibration prompts per set")
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help="zero-shot tasks, comma-separated ('' for none); rows already measured "
                         "for other tasks are kept, so a later run can add a task")
    ap.add_argument("--mode", default="sequential", choices=("sequential", "one-shot"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=2000, help="zero-shot bootstrap resamples")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="bench/results/beyond_wanda.json")
    args = ap.parse_args(argv)
    args.eval_pair = args.eval_pair or ["fr-en", "de-en"]
    try:
        loaded = load_model(args.model)
        corpus = read_corpus(args.corpus)
        corpus.require(*{x for p in args.eval_pair for x in parse_pair(p)})
        settings = {"model": loaded.name, "corpus": corpus.name, "pair": args.pair,
                    "limit": args.limit, "task_limit": args.task_limit,
                    "samples": args.samples, "mode": args.mode, "seed": args.seed}
        out = Path(args.out)
        results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
        if results and results.get("settings") != settings:
            raise MlpruneError(f"{out} holds a run with other settings ({results.get('settings')})"
                               "; give another --out, or delete it to start again.")
        results = {"settings": settings, "dequantized_from": loaded.dequantized_from,
                   "rows": results.get("rows", {})}
        measure(args, loaded, corpus, results, out)
        lines = comparisons(results, args)
        results["comparisons"] = lines
        save(out, results)
    except MlpruneError as e:
        print(f"beyond_wanda: {e}", file=sys.stderr)
        return 2
    print(markdown(lines, args, loaded.name))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
