"""The ``mlprune`` command: analyze, prune, eval, compare, sweep."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlprune import MlpruneError

CORPUS_HELP = "corpus file (.tsv/.csv/.jsonl), 'builtin' (default) or 'flores:dev'"


def _bar():
    """A progress callback (stage, fraction) drawing one tqdm bar per stage, on stderr."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, fraction: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=100, desc=stage, leave=False, file=sys.stderr,
                                     bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        bar.n = round(fraction * 100)
        bar.refresh()

    return update


def _say(loaded) -> None:
    f = loaded.facts()
    note = f" (weights de-quantized from {f['dequantized_from']})" if f["dequantized_from"] else ""
    print(f"model: {f['model']}: {f['parameters'] / 1e6:.0f}M parameters, {f['layers']} layers, "
          f"hidden {f['hidden_size']}, {f['dtype']} on {f['device']}{note}", file=sys.stderr)


def _load(args):
    from mlprune.corpus import read_corpus
    from mlprune.models import load_model

    progress = _bar()
    loaded = load_model(args.model, dtype=getattr(args, "dtype", None),
                        device=getattr(args, "device", None),
                        trust_remote_code=getattr(args, "trust_remote_code", False),
                        progress=lambda f, m: progress("loading model", f))
    _say(loaded)
    corpus = read_corpus(args.corpus) if getattr(args, "corpus", None) is not None else None
    return loaded, corpus


def _write_json(path: str, data: dict) -> None:
    from mlprune.export import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))
    print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------- analyze


def cmd_analyze(args) -> None:
    from mlprune.capture import capture
    from mlprune.features import detect, overlap_matrix, top_dims
    from mlprune.prompts import analysis_prompts

    loaded, corpus = _load(args)
    sets = analysis_prompts(corpus, args.pair, args.mono, shots=args.shots, samples=args.samples,
                            seed=args.seed)
    progress = _bar()
    stats = {}
    for ps in sets:
        stats[ps.name] = capture(loaded.model, loaded.tokenizer, ps, batch_size=args.batch_size,
                                 progress=lambda d, t, n=ps.name: progress(f"capture {n}", d / t))
    first = next(iter(stats.values()))
    result = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
              "rule": args.rule, **top_dims(first, args.top),
              "sets": {name: top_dims(s, args.top) for name, s in stats.items()}}
    if len(stats) > 1:
        result["overlap_top5pct"] = overlap_matrix(stats, 0.05).round(3).to_dict()
    for name, s in stats.items():
        table = detect(s, args.rule)
        print(f"\n{name}: {s.n_prompts} prompts, {s.n_tokens} tokens; dims detected by {args.rule}")
        print(f"{'layer':>5} {'median':>10}  top dimensions (x median)")
        for layer in range(s.n_layers):
            part = table[table.layer == layer].head(args.top)
            tops = ", ".join(f"{int(r.dim)} ({r.ratio_to_median:.0f}x)" for r in part.itertuples())
            print(f"{layer:>5} {float(s.hidden_norms[layer].median()):>10.2f}  {tops or '-'}")
    if loaded.dequantized_from:
        print(f"\nnote: weights de-quantized from {loaded.dequantized_from}; magnitudes are those "
              "of the de-quantized model.")
    if args.json:
        _write_json(args.json, result)
    if args.figure:
        from mlprune.plots import top_dims_figure

        fig = top_dims_figure(first, args.top, dequantized_from=loaded.dequantized_from)
        _write_figure(fig, args.figure)


def _write_figure(fig, path: str) -> None:
    if path.endswith(".html"):
        fig.write_html(path, include_plotlyjs="cdn")
    else:
        try:
            fig.write_image(path)
        except Exception as e:
            raise MlpruneError(f"Could not write {path} as an image ({type(e).__name__}); "
                               "write .html instead, or install kaleido.") from e
    print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------- prune / eval


def _spec(args):
    from mlprune.pipeline import PruneSpec

    return PruneSpec(method=args.method, calibration=args.calibration, pair=args.pair,
                     other=args.other, sparsity=args.sparsity, pattern=args.pattern,
                     invert=args.invert, protect=args.protect, layers=args.layers,
                     blocks=args.blocks, mode=args.mode, shots=args.shots, samples=args.samples,
                     seed=args.seed).validate()


def cmd_prune(args) -> None:
    from dataclasses import asdict

    from mlprune.export import build_report, export_pruned
    from mlprune.pipeline import prune

    spec = _spec(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MlpruneError(f"{out} already exists; choose another --out or pass --overwrite.")
    loaded, corpus = _load(args)
    result = prune(loaded, corpus, spec, batch_size=args.batch_size, progress=_bar())
    metrics = {}
    if args.eval:
        from mlprune.evaluate import evaluate_translation
        from mlprune.prompts import parse_pair
        from mlprune.prune import pruned

        with pruned(loaded.model, result.masks):
            metrics = evaluate_translation(loaded.model, loaded.tokenizer, corpus,
                                           *parse_pair(spec.pair), shots=spec.shots, limit=args.eval)
    t = time.perf_counter()
    report = build_report(loaded, result.masks, spec=asdict(spec),
                          calibration_texts=result.calibration.prompts.texts if result.calibration else [],
                          timings=result.timings, metrics=metrics)
    export_pruned(loaded, result.masks, out, report, overwrite=args.overwrite)
    print(f"pruned {spec.label} to {result.masks.overall_sparsity():.1%} ({result.masks.pattern}) "
          f"in {sum(result.timings.values()) + time.perf_counter() - t:.1f} s; saved to {out}")


def cmd_eval(args) -> None:
    if args.lm_eval:
        import shlex

        from mlprune import zeroshot as zs

        model = zs.resolve_model_dir(args.pruned or args.model)
        langs = args.langs.split(",") if args.langs else None
        tasks = zs.lm_eval_tasks(args.lm_eval.split(","), langs)
        if args.dry_run:
            print(shlex.join(zs.lm_eval_command(model, tasks, output_path=args.lm_eval_out,
                                                batch_size=args.batch_size, device=args.device,
                                                dtype=args.dtype, limit=args.limit)))
            return
        results = zs.run_lm_eval(model, args.lm_eval.split(","), langs=langs,
                                 output_path=args.lm_eval_out, batch_size=args.batch_size,
                                 device=args.device, dtype=args.dtype, limit=args.limit)
        for task, metrics in results.items():
            print(f"{task}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if args.json:
            _write_json(args.json, {"model": model, "lm_eval": results})
        return
    if args.task:
        from mlprune import zeroshot as zs
        from mlprune.models import load_model

        langs = args.langs.split(",") if args.langs else None
        tasks = [zs.load_task(t).subset(args.limit, langs) for t in args.task]  # fail before loading
        args.corpus = None  # zero-shot tasks need no parallel corpus
        loaded, _ = _load(args)
        bar = _bar()

        def score(model, tokenizer, who):
            return [zs.evaluate_task(model, tokenizer, t, norm=args.norm, batch_size=args.batch_size,
                                     progress=lambda d, n, t=t: bar(f"{who}: {t.name}", d / n))
                    for t in tasks]

        dense = score(loaded.model, loaded.tokenizer, "scoring")
        report = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
                  "tasks": {r.task: r.to_dict() for r in dense}}
        if args.pruned:
            other = load_model(args.pruned, dtype=args.dtype, device=args.device)
            sparse = score(other.model, other.tokenizer, "scoring pruned")
            report.update(pruned=other.name, pruned_tasks={r.task: r.to_dict() for r in sparse},
                          comparison={})
            for a, b in zip(dense, sparse):
                rows = zs.compare_results(a, b, n_resamples=args.resamples, seed=args.seed)
                report["comparison"][a.task] = rows
                print(zs.format_comparison(f"{a.task} ({args.norm}-normalised)", rows))
                print()
        else:
            for r in dense:
                print(zs.format_result(r))
                print()
        if args.json:
            _write_json(args.json, report)
        return
    from mlprune.evaluate import evaluate_translation
    from mlprune.prompts import parse_pair

    loaded, corpus = _load(args)
    bar = _bar()
    result = evaluate_translation(loaded.model, loaded.tokenizer, corpus, *parse_pair(args.pair),
                                  shots=args.shots, limit=args.limit, batch_size=args.batch_size,
                                  progress=lambda d, t: bar("translating", d / t))
    result["model"] = loaded.name
    result["dequantized_from"] = loaded.dequantized_from
    print(f"{args.pair}: chrF {result['chrf']:.1f}  BLEU {result['bleu']:.1f}  "
          f"target-language {result['target_language_rate']:.0%}  perplexity "
          f"{result['perplexity']:.1f}  (n={result['n']})")
    if args.json:
        _write_json(args.json, result)


def cmd_compare(args) -> None:
    from mlprune.evaluate import generate
    from mlprune.models import load_model
    from mlprune.prompts import eval_items, parse_pair

    loaded, corpus = _load(args)
    sparse = load_model(args.pruned)
    if args.prompt:
        prompts, refs = [args.prompt.replace("\\n", "\n")], [None]
    else:
        items = eval_items(corpus, *parse_pair(args.pair), shots=args.shots, limit=args.limit)
        prompts, refs = [it.prompt for it in items], [it.reference for it in items]
    dense_out = generate(loaded.model, loaded.tokenizer, prompts)
    sparse_out = generate(sparse.model, sparse.tokenizer, prompts)
    for p, r, d, s in zip(prompts, refs, dense_out, sparse_out):
        print("prompt   :", p.splitlines()[-2] if "\n" in p else p)
        if r:
            print("reference:", r)
        print("dense    :", d.text)
        print("pruned   :", s.text, "" if d.text == s.text else "   (differs)")
        print()


def cmd_sweep(args) -> None:
    import pandas as pd

    from mlprune.pipeline import PruneSpec, sweep
    from mlprune.plots import sweep_figure

    extra = None
    if args.task:
        from mlprune.zeroshot import sweep_eval

        extra = sweep_eval(args.task, limit=args.task_limit, norm=args.norm,
                           batch_size=args.batch_size, seed=args.seed)
        extra.check_resume(args.csv)
    loaded, corpus = _load(args)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows = sweep(loaded, corpus, methods=args.methods.split(","), sparsities=sparsities,
                 pairs=args.pair or ["fr-en"], limit=args.limit, out_csv=args.csv,
                 base=PruneSpec(shots=args.shots, samples=args.samples, seed=args.seed),
                 batch_size=args.batch_size, progress=_bar(), extra_eval=extra)
    table = pd.DataFrame(rows)
    if extra is not None:  # the CSV has every column; the terminal gets the summary ones
        summary = ("_acc_en", "_acc_non_en", "_rankc_mean", "_diff_non_en", "_p_non_en")
        table = table[[c for c in table.columns if c not in extra.columns or c.endswith(summary)]]
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {args.csv}", file=sys.stderr)
    if args.figure:
        _write_figure(sweep_figure(table, "chrf", dequantized_from=loaded.dequantized_from), args.figure)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, corpus=True):
        sp.add_argument("--model", default=None,
                        help="hub id, model folder, .gguf file; default: embedded Gemma 3 270M")
        sp.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as saved)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="run code shipped with a hub model (off unless you ask)")
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--seed", type=int, default=0)
        if corpus:
            sp.add_argument("--corpus", default="builtin", help=CORPUS_HELP)
            sp.add_argument("--shots", type=int, default=4)
            sp.add_argument("--samples", type=int, default=16, help="calibration prompts")

    a = sub.add_parser("analyze", help="find large-magnitude features while the model translates")
    common(a)
    a.add_argument("--pair", action="append", default=[], help="src-tgt, repeatable")
    a.add_argument("--mono", action="append", default=[], help="monolingual language, repeatable")
    a.add_argument("--rule", default="ratio:100", help="top-k:8, ratio:100 or absolute:500")
    a.add_argument("--top", type=int, default=5, help="dimensions shown per layer")
    a.add_argument("--json", help="write the per-layer analysis here")
    a.add_argument("--figure", help="write the per-layer top-dimension figure (.html or .png)")
    a.set_defaults(func=cmd_analyze)

    pr = sub.add_parser("prune", help="prune and export a model")
    common(pr)
    pr.add_argument("--method", default="wanda", help="wanda, ratio, magnitude, random")
    pr.add_argument("--calibration", default="mt", help="mt (translation), mono, code")
    pr.add_argument("--pair", default="fr-en")
    pr.add_argument("--other", default="code", help="second set of the ratio method")
    pr.add_argument("--sparsity", type=float, default=0.5)
    pr.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8")
    pr.add_argument("--invert", action="store_true", help="prune the highest scores (ablation)")
    pr.add_argument("--protect", default=None, help="never prune detected dims: top-k:8, ratio:100")
    pr.add_argument("--layers", default=None, help="layer range, e.g. 0-11")
    pr.add_argument("--blocks", default=None, help="attn, mlp or attn,mlp")
    pr.add_argument("--mode", default="sequential", help="sequential (as Wanda) or one-shot")
    pr.add_argument("--eval", type=int, default=0, metavar="N",
                    help="also evaluate on N held-out sentences and store it in the report")
    pr.add_argument("--out", required=True)
    pr.add_argument("--overwrite", action="store_true")
    pr.set_defaults(func=cmd_prune)

    e = sub.add_parser(
        "eval", help="few-shot translation (chrF, BLEU, language, perplexity) or zero-shot tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Few-shot translation by default. With --task: zero-shot multiple choice "
                    "(accuracy per language, RankC consistency with English; with --pruned, "
                    "dense vs pruned with a paired bootstrap). With --lm-eval: run "
                    "lm-evaluation-harness on a model folder (needs 'pip install lm-eval' and "
                    "a reachable Hugging Face hub, which serves the benchmarks' data).",
        epilog="examples:\n"
               "  mlprune eval --task nli --task sentiment --limit 40\n"
               "  mlprune eval --task my_task.jsonl --pruned runs/wanda-mt-50\n"
               "  mlprune eval --lm-eval xnli,xcopa --langs fr,sw --pruned runs/wanda-mt-50\n"
               "  mlprune eval --lm-eval pawsx --pruned runs/wanda-mt-50 --dry-run")
    common(e)
    e.add_argument("--pair", default="fr-en")
    e.add_argument("--limit", type=int, default=None,
                   help="held-out sentences; with --task items per language; with --lm-eval "
                        "examples per lm-eval task")
    e.add_argument("--json", help="write the metrics here")
    e.add_argument("--task", action="append", default=[],
                   help="zero-shot task: nli, sentiment or a JSONL file of {id, lang, prompt, "
                        "choices, label} (repeatable)")
    e.add_argument("--pruned", "--compare-to", dest="pruned", default=None, metavar="DIR",
                   help="with --task: also score this model (e.g. an mlprune export) and test "
                        "the difference; with --lm-eval: the model to evaluate")
    e.add_argument("--langs", default=None, help="languages to keep, e.g. en,fr,sw")
    e.add_argument("--norm", default="token", choices=("token", "byte", "none"),
                   help="score of a choice: log-likelihood per token (default), per byte, or "
                        "summed (none)")
    e.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    e.add_argument("--lm-eval", default=None, metavar="BENCHMARKS",
                   help="xnli, xstorycloze, xcopa and/or pawsx (comma-separated), zero-shot "
                        "through lm-evaluation-harness")
    e.add_argument("--lm-eval-out", default="lm_eval_results",
                   help="folder where lm-eval writes its results")
    e.add_argument("--dry-run", action="store_true",
                   help="with --lm-eval: print the lm_eval command instead of running it")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="dense and pruned generations side by side")
    common(c)
    c.add_argument("--pruned", required=True, help="folder written by mlprune prune")
    c.add_argument("--prompt", default=None)
    c.add_argument("--pair", default="fr-en")
    c.add_argument("--limit", type=int, default=5)
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("sweep", help="methods x sparsities x pairs -> CSV and figure")
    common(s)
    s.add_argument("--methods", default="wanda-mt,wanda-mono,magnitude,random")
    s.add_argument("--sparsities", default="0,0.1,0.2,0.3,0.4,0.5")
    s.add_argument("--pair", action="append", default=[])
    s.add_argument("--limit", type=int, default=16, help="held-out sentences per point")
    s.add_argument("--csv", default="sweep.csv", help="results, appended row by row (resumable)")
    s.add_argument("--figure", default=None, help="chrF against sparsity (.html or .png)")
    s.add_argument("--task", action="append", default=[],
                   help="also score a zero-shot task per row: nli, sentiment or a JSONL file "
                        "(repeatable); adds accuracy per language, the non-English mean, "
                        "RankC with English and the difference from dense with its p-value")
    s.add_argument("--task-limit", type=int, default=None, help="items per language per task")
    s.add_argument("--norm", default="token", choices=("token", "byte", "none"),
                   help="zero-shot choice score: per token (default), per byte, or summed")
    s.set_defaults(func=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MlpruneError as e:
        print(f"mlprune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlprune: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
