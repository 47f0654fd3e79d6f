"""The commands that work on one model: ``analyze``, ``prune``, ``eval`` and ``compare``.

Each takes the parsed flags (its spec fields already filled in by
:func:`mlprune.cli.parser.spec_from_args`) and imports what it needs when it runs.
"""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path

from mlprune import MlpruneError
from mlprune.cli.common import (
    model_and_corpus,
    model_from_args,
    progress_bar,
    write_figure,
    write_json,
    write_strict_json,
)
from mlprune.spec import get_protocol, parse_pair

# --------------------------------------------------------------------------- analyze


def cmd_analyze(args: Namespace) -> None:
    """``mlprune analyze``: large-magnitude dims per layer while the model translates (and
    reads monolingual text), the sets' overlaps; printed, and as JSON and a figure on request."""
    from mlprune.capture import capture
    from mlprune.features import detect, overlap_matrix, top_dims
    from mlprune.prompts import analysis_prompts

    protocol = get_protocol(args.protocol)
    top = args.top or protocol.top_n
    fraction = args.overlap_fraction or protocol.overlap_fraction
    loaded, corpus = model_and_corpus(args)
    sets = analysis_prompts(corpus, args.pair, args.mono, shots=args.shots, samples=args.samples,
                            seed=args.seed, separator=protocol.separator)
    progress = progress_bar()
    stats = {}
    for ps in sets:
        stats[ps.name] = capture(loaded.model, loaded.tokenizer, ps, batch_size=args.batch_size,
                                 pad_to=args.pad_to, pad_side=args.pad_side,
                                 progress=lambda s, f, n=ps.name: progress(f"capture {n}, {s}", f))
    first = next(iter(stats.values()))
    numbering = protocol.numbering
    result = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
              "protocol": protocol.name, "numbering": numbering, "pad_to": args.pad_to,
              "pad_side": first.meta.get("pad_side"),
              "rule": args.rule, **top_dims(first, top, numbering),
              "sets": {name: top_dims(s, top, numbering) for name, s in stats.items()}}
    if len(stats) > 1:
        result["overlap"] = {
            "fraction": fraction,
            **{measure: overlap_matrix(stats, fraction, measure, numbering=numbering)
               .round(3).to_dict() for measure in ("top_in_top", "top_in_bottom")}}
    for name, s in stats.items():
        table = detect(s, args.rule, numbering)
        sites, norms = s.layer_view(numbering)
        print(f"\n{name}: {s.n_prompts} prompts, {s.n_tokens} tokens; dims detected by {args.rule}"
              f" (layers numbered as {'output_hidden_states' if numbering != 'sites' else 'layer outputs'})")
        print(f"{'layer':>5} {'median':>10}  top dimensions (x median)")
        for layer in range(len(sites)):
            part = table[table.layer == layer].head(top)
            tops = ", ".join(f"{int(r.dim)} ({r.ratio_to_median:.0f}x)" for r in part.itertuples())
            print(f"{layer:>5} {float(norms[layer].median()):>10.2f}  {tops or '-'}")
    if len(stats) > 1:
        for measure in ("top_in_top", "top_in_bottom"):
            what = "top-in-top" if measure == "top_in_top" else "top-in-bottom (the paper's)"
            print(f"\noverlap {what}, top {fraction:.0%} of dims, mean over layers:")
            print(overlap_matrix(stats, fraction, measure, numbering=numbering)
                  .to_string(float_format=lambda x: f"{x:.2f}"))
    if loaded.dequantized_from:
        print(f"\nnote: weights de-quantized from {loaded.dequantized_from}; magnitudes are those "
              "of the de-quantized model.")
    if args.json:
        write_json(args.json, result)
    if args.figure:
        from mlprune.plots import top_dims_figure

        fig = top_dims_figure(first, top, dequantized_from=loaded.dequantized_from,
                              numbering=numbering)
        write_figure(fig, args.figure)


# --------------------------------------------------------------------------- prune / eval


def cmd_prune(args: Namespace) -> None:
    """``mlprune prune``: prune by the spec, optionally evaluate, and export the model with its
    masks and report."""
    from dataclasses import asdict

    from mlprune.export import build_report, check_export_target, export_pruned
    from mlprune.pipeline import prune

    spec = args.spec
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MlpruneError(f"{out} already exists; choose another --out or pass --overwrite.")
    check_export_target(out, args.overwrite)  # before pruning: --overwrite replaces only an export
    loaded, corpus = model_and_corpus(args)
    result = prune(loaded, corpus, spec, batch_size=args.batch_size,
                   checkpoint_dir=args.checkpoint_dir, progress=progress_bar())
    metrics = {}
    if args.eval:
        from mlprune.evaluate import evaluate_translation
        from mlprune.prune import pruned

        with pruned(loaded.model, result.masks):
            metrics = evaluate_translation(loaded.model, loaded.tokenizer, corpus,
                                           *parse_pair(spec.pair), shots=spec.shots, limit=args.eval)
    t = time.perf_counter()
    report = build_report(loaded, result.masks, spec=asdict(spec),
                          calibration_texts=result.calibration.prompts.texts if result.calibration else [],
                          timings=result.timings, metrics=metrics)
    export_pruned(loaded, result.masks, out, report, overwrite=args.overwrite, format=args.format)
    print(f"pruned {spec.label} to {result.masks.overall_sparsity():.1%} ({result.masks.pattern}) "
          f"in {sum(result.timings.values()) + time.perf_counter() - t:.1f} s; saved to {out}")


def cmd_eval(args: Namespace) -> None:
    """Dispatch ``mlprune eval``: lm-eval benchmarks, zero-shot tasks, or translation."""
    if args.template and not args.task:
        raise MlpruneError("--template renders the records of a --task file; name one with --task.")
    if args.lm_eval:
        eval_lm_eval(args)
    elif args.task:
        eval_tasks(args)
    else:
        eval_translation(args)


def eval_lm_eval(args: Namespace) -> None:
    """lm-evaluation-harness benchmarks on a model folder (``--lm-eval``)."""
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
        write_strict_json(args.json, {"model": model, "lm_eval": results})


def eval_tasks(args: Namespace) -> None:
    """Zero-shot multiple-choice tasks (``--task``), one model or dense vs ``--pruned``."""
    from mlprune import zeroshot as zs

    if args.limit is not None and args.limit < 1:
        raise MlpruneError(f"--limit must be at least 1 item per language (got {args.limit}).")

    langs = args.langs.split(",") if args.langs else None
    sample = get_protocol(args.protocol).task_sample  # paper: the authors' 1000-item draw
    tasks = [zs.load_task(t, template=args.template, langs=langs, sample=sample)
             .subset(args.limit, langs) for t in args.task]  # fail before loading a model
    args.corpus = None  # zero-shot tasks need no parallel corpus
    loaded, _ = model_and_corpus(args)
    bar = progress_bar()

    def score(model, tokenizer, who):
        return [zs.evaluate_task(model, tokenizer, t, norm=args.norm, batch_size=args.batch_size,
                                 progress=lambda s, f, t=t: bar(f"{who}: {t.name}", f))
                for t in tasks]

    dense = score(loaded.model, loaded.tokenizer, "scoring")
    report = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
              "tasks": {r.task: zs.result_dict(r) for r in dense}}
    if args.pruned:
        other = model_from_args(args, args.pruned)
        sparse = score(other.model, other.tokenizer, "scoring pruned")
        report.update(pruned=other.name, pruned_tasks={r.task: zs.result_dict(r) for r in sparse},
                      comparison={})
        for a, b in zip(dense, sparse):
            rows = zs.compare_results(a, b, n_resamples=args.resamples, seed=args.seed)
            report["comparison"][a.task] = rows
            print(zs.format_comparison(f"{a.task} ({args.norm}-normalised)", rows,
                                       note=zs.rankc_note(a)))
            print()
    else:
        for r in dense:
            print(zs.format_result(r))
            print()
    if args.json:
        write_strict_json(args.json, report)


def eval_translation(args: Namespace) -> None:
    """Few-shot translation on held-out sentences; with ``--pruned``, both models on the same
    sentences and sacrebleu's paired test of chrF and BLEU."""
    from mlprune.evaluate import (
        SACREBLEU_DEFAULT_SEED,
        evaluate_translation,
        paired_translation_test,
    )

    src, tgt = parse_pair(args.pair)
    loaded, corpus = model_and_corpus(args)
    bar = progress_bar()

    def translate(model, tokenizer, who):
        return evaluate_translation(model, tokenizer, corpus, src, tgt, shots=args.shots,
                                    limit=args.limit, batch_size=args.batch_size,
                                    progress=lambda s, f: bar(f"{who}, {s}", f))

    def line(name, r):
        return (f"{name}{args.pair}: chrF {r['chrf']:.1f}  BLEU {r['bleu']:.1f}  target-language "
                f"{r['target_language_rate']:.0%}  perplexity {r['perplexity']:.1f}  (n={r['n']})")

    result = translate(loaded.model, loaded.tokenizer, "translating")
    result["model"] = loaded.name
    result["dequantized_from"] = loaded.dequantized_from
    if not args.pruned:
        print(line("", result))
    else:
        other = model_from_args(args, args.pruned)
        sparse = translate(other.model, other.tokenizer, "translating (pruned)")
        sparse["model"] = other.name
        test = paired_translation_test(
            [o["reference"] for o in result["outputs"]], [o["output"] for o in result["outputs"]],
            [o["output"] for o in sparse["outputs"]], method=args.paired_test,
            seed=SACREBLEU_DEFAULT_SEED + args.seed, lang=tgt)
        print(line("dense  ", result))
        print(line("pruned ", sparse))
        kind = {"bs": "paired bootstrap", "ar": "paired approximate randomization"}[args.paired_test]
        for t in test.values():
            print(f"{t['metric']}: pruned - dense {t['difference']:+.2f}, p = {t['p_value']:.4f} "
                  f"(sacrebleu {kind}, {t['n_samples']} samples, seed {t['seed']})")
        result.update(pruned=sparse, significance=test)
    if args.json:
        write_strict_json(args.json, result)


def cmd_compare(args: Namespace) -> None:
    """``mlprune compare``: dense and pruned generations of the same prompts, side by side."""
    from mlprune.evaluate import generate
    from mlprune.prompts import eval_items, parse_pair

    loaded, corpus = model_and_corpus(args)
    sparse = model_from_args(args, args.pruned)
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
