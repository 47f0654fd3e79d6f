"""The ``mlprune`` command: analyze, prune, eval, compare, sweep, reproduce, intervene."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mlprune import MlpruneError, Progress

CORPUS_HELP = "corpus file (.tsv/.csv/.jsonl), 'builtin' (default) or 'flores:dev'"
# Every PruneSpec field is a flag of `mlprune prune`; the other commands take the few they use.
PRUNE_FIELDS = ("method", "calibration", "pair", "other", "sparsity", "pattern", "allocation",
                "allocation_range", "outlier_threshold", "mwanda_parts", "variance_weight",
                "prob_weight", "invert", "protect", "layers", "blocks", "mode", "shots",
                "samples", "seed", "protocol", "pad_to", "pad_side")


def _bar() -> Progress:
    """A :data:`mlprune.Progress` drawing one tqdm bar on stderr, its text the stage. Stages
    carry their counts ("calibration (mt:fr-en), batch 3/8"), so the text changes within a
    stage; the bar starts afresh, clock included, when the fraction goes back: a new stage."""
    from tqdm import tqdm

    bar: tqdm | None = None
    last = 0.0

    def update(stage: str, fraction: float) -> None:
        nonlocal bar, last
        if bar is None or fraction < last:
            if bar is not None:
                bar.close()
            bar = tqdm(total=100, leave=False, file=sys.stderr, desc=stage,  # drawn at once
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        last = fraction
        bar.set_description_str(stage, refresh=False)
        bar.n = round(fraction * 100)
        bar.refresh()

    return update


def _say(loaded) -> None:
    f = loaded.facts()
    note = f" (weights de-quantized from {f['dequantized_from']})" if f["dequantized_from"] else ""
    print(f"model: {f['model']}: {f['parameters'] / 1e6:.0f}M parameters, {f['layers']} layers, "
          f"hidden {f['hidden_size']}, {f['dtype']} on {f['device']}{note}", file=sys.stderr)


def _load_model(args, spec: str | None):
    """The model ``spec`` (a --model or --pruned value) as the command's --dtype, --device,
    --device-map, --max-memory, --offload-folder, --trust-remote-code and --allow-pickle say,
    with a progress bar; summarised on stderr. With a device map, the memory plan is printed
    first (one line), and a model that cannot fit even streamed is refused before loading."""
    from mlprune.models import load_model, parse_device_map, parse_max_memory, plan_load

    device_map = parse_device_map(getattr(args, "device_map", None))
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    offload_folder = getattr(args, "offload_folder", None)
    if device_map is None and (max_memory or offload_folder):
        raise MlpruneError("--max-memory and --offload-folder place a model with a device "
                           "map: add --device-map auto.")
    common = dict(dtype=getattr(args, "dtype", None),
                  trust_remote_code=getattr(args, "trust_remote_code", False),
                  allow_pickle=getattr(args, "allow_pickle", False))
    if device_map is not None:
        plan = plan_load(spec, max_memory=max_memory, offload_folder=offload_folder,
                         samples=getattr(args, "samples", None) or 0,
                         batch_size=getattr(args, "batch_size", 8), **common)
        print(plan, file=sys.stderr)
        plan.check()
    loaded = load_model(spec, device=getattr(args, "device", None), device_map=device_map,
                        max_memory=max_memory, offload_folder=offload_folder, progress=_bar(),
                        **common)
    _say(loaded)
    return loaded


def _load(args):
    """The command's model (--model) and corpus (--corpus, when the command takes one)."""
    from mlprune.corpus import read_corpus

    loaded = _load_model(args, args.model)
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
    from mlprune.protocol import get_protocol

    protocol = get_protocol(args.protocol)
    top = args.top or protocol.top_n
    fraction = args.overlap_fraction or protocol.overlap_fraction
    loaded, corpus = _load(args)
    sets = analysis_prompts(corpus, args.pair, args.mono, shots=args.shots, samples=args.samples,
                            seed=args.seed, separator=protocol.separator)
    progress = _bar()
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
        _write_json(args.json, result)
    if args.figure:
        from mlprune.plots import top_dims_figure

        fig = top_dims_figure(first, top, dequantized_from=loaded.dequantized_from,
                              numbering=numbering)
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


def cmd_prune(args) -> None:
    from dataclasses import asdict

    from mlprune.export import build_report, check_export_target, export_pruned
    from mlprune.pipeline import prune

    spec = args.spec
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MlpruneError(f"{out} already exists; choose another --out or pass --overwrite.")
    check_export_target(out, args.overwrite)  # before pruning: --overwrite replaces only an export
    loaded, corpus = _load(args)
    result = prune(loaded, corpus, spec, batch_size=args.batch_size,
                   checkpoint_dir=args.checkpoint_dir, progress=_bar())
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
    export_pruned(loaded, result.masks, out, report, overwrite=args.overwrite, format=args.format)
    print(f"pruned {spec.label} to {result.masks.overall_sparsity():.1%} ({result.masks.pattern}) "
          f"in {sum(result.timings.values()) + time.perf_counter() - t:.1f} s; saved to {out}")


def cmd_eval(args) -> None:
    """Dispatch ``mlprune eval``: lm-eval benchmarks, zero-shot tasks, or translation."""
    if args.template and not args.task:
        raise MlpruneError("--template renders the records of a --task file; name one with --task.")
    if args.lm_eval:
        eval_lm_eval(args)
    elif args.task:
        eval_tasks(args)
    else:
        eval_translation(args)


def _write_strict_json(path: str, data: dict) -> None:
    """Write JSON that strict readers accept (NaN, e.g. an undefined RankC, as null)."""
    from mlprune.export import atomic_write_text
    from mlprune.zeroshot import strict_json

    atomic_write_text(path, strict_json(data))
    print(f"wrote {path}", file=sys.stderr)


def eval_lm_eval(args) -> None:
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
        _write_strict_json(args.json, {"model": model, "lm_eval": results})


def eval_tasks(args) -> None:
    """Zero-shot multiple-choice tasks (``--task``), one model or dense vs ``--pruned``."""
    from mlprune import zeroshot as zs

    if args.limit is not None and args.limit < 1:
        raise MlpruneError(f"--limit must be at least 1 item per language (got {args.limit}).")
    from mlprune.protocol import get_protocol

    langs = args.langs.split(",") if args.langs else None
    sample = get_protocol(args.protocol).task_sample  # paper: the authors' 1000-item draw
    tasks = [zs.load_task(t, template=args.template, langs=langs, sample=sample)
             .subset(args.limit, langs) for t in args.task]  # fail before loading a model
    args.corpus = None  # zero-shot tasks need no parallel corpus
    loaded, _ = _load(args)
    bar = _bar()

    def score(model, tokenizer, who):
        return [zs.evaluate_task(model, tokenizer, t, norm=args.norm, batch_size=args.batch_size,
                                 progress=lambda s, f, t=t: bar(f"{who}: {t.name}", f))
                for t in tasks]

    dense = score(loaded.model, loaded.tokenizer, "scoring")
    report = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
              "tasks": {r.task: zs.result_dict(r) for r in dense}}
    if args.pruned:
        other = _load_model(args, args.pruned)
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
        _write_strict_json(args.json, report)


def eval_translation(args) -> None:
    """Few-shot translation on held-out sentences; with ``--pruned``, both models on the same
    sentences and sacrebleu's paired test of chrF and BLEU."""
    from mlprune.evaluate import (
        SACREBLEU_DEFAULT_SEED,
        evaluate_translation,
        paired_translation_test,
    )
    from mlprune.prompts import parse_pair

    src, tgt = parse_pair(args.pair)
    loaded, corpus = _load(args)
    bar = _bar()

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
        other = _load_model(args, args.pruned)
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
        _write_strict_json(args.json, result)


def cmd_compare(args) -> None:
    from mlprune.evaluate import generate
    from mlprune.prompts import eval_items, parse_pair

    loaded, corpus = _load(args)
    sparse = _load_model(args, args.pruned)
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


def _sweep_outputs(args) -> tuple[str | None, str | None]:
    """(store, csv) of a sweep: without --store, the local runner appends to the CSV
    (default sweep.csv) as before, and the other runners commit to a store beside it (the
    CSV then an export); with --store, the CSV is an export only when --csv is given."""
    if args.store:
        from mlprune.store import is_store

        if not is_store(args.store):
            raise MlpruneError(f"--store takes a .sqlite or .db file; got {args.store}.")
        return args.store, args.csv
    csv = args.csv or "sweep.csv"
    if args.runner == "local":
        return None, csv
    return str(Path(csv).with_suffix(".sqlite")), csv


def cmd_sweep(args) -> None:
    import pandas as pd

    from mlprune.plots import sweep_figure

    store, csv = _sweep_outputs(args)
    extra = None
    if args.task:
        from mlprune.protocol import get_protocol
        from mlprune.zeroshot import sweep_eval

        extra = sweep_eval(args.task, limit=args.task_limit, norm=args.norm,
                           batch_size=args.batch_size, seed=args.seed,
                           sample=get_protocol(args.spec.protocol).task_sample)
        if store is None:  # a store records its columns itself and refuses others
            extra.check_resume(csv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods, pairs = args.methods.split(","), args.pair or ["fr-en"]
    if args.runner == "local":
        from mlprune.pipeline import sweep

        loaded, corpus = _load(args)
        rows = sweep(loaded, corpus, methods=methods, sparsities=sparsities, pairs=pairs,
                     limit=args.limit, out_csv=csv, store=store, base=args.spec,
                     batch_size=args.batch_size, progress=_bar(), extra_eval=extra)
        dequantized_from = loaded.dequantized_from
    else:
        from mlprune.corpus import read_corpus
        from mlprune.runners import ModelSource, SweepJob, get_runner
        from mlprune.store import ResultStore

        source = ModelSource(args.model, args.dtype, args.device, args.trust_remote_code,
                             args.allow_pickle)
        job = SweepJob(source, read_corpus(args.corpus), store, tuple(methods),
                       tuple(sparsities), tuple(pairs), args.spec, args.limit,
                       args.batch_size, tasks=tuple(args.task), task_limit=args.task_limit,
                       task_norm=args.norm, task_seed=args.seed)
        rows = get_runner(args.runner).run(job, progress=_bar())
        results = ResultStore(store)
        if csv:
            results.export_csv(csv)
        dequantized_from = (results.settings() or {}).get("dequantized_from")
    from mlprune.pipeline import KEY_COLUMNS

    # what the rows were measured on stays in the files; the terminal shows the numbers
    table = pd.DataFrame(rows).drop(columns=list(KEY_COLUMNS), errors="ignore")
    if extra is not None:  # the CSV has every column; the terminal gets the summary ones
        summary = ("_acc_en", "_acc_non_en", "_rankc_mean", "_diff_non_en", "_p_non_en")
        table = table[[c for c in table.columns if c not in extra.columns or c.endswith(summary)]]
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
    print("chrf_p_vs_dense, bleu_p_vs_dense: sacrebleu's paired bootstrap p-value of the "
          "difference from the dense row of the same pair (1000 resamples; - on dense rows)")
    for path in (store, csv):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    if args.figure:
        _write_figure(sweep_figure(table, "chrf", dequantized_from=dequantized_from), args.figure)


# --------------------------------------------------------------------------- reproduce


def cmd_reproduce(args) -> None:
    from mlprune import reproduce

    changes = {k: v for k, v in (("pair", args.pair), ("seed", args.seed)) if v is not None}
    for name in ("translation_limit", "task_limit", "samples", "analysis_samples"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.patterns is not None:
        changes["patterns"] = tuple(p.strip() for p in args.patterns.split(",") if p.strip())
    if args.beyond is not None:
        chosen = [m.strip() for m in args.beyond.split(",") if m.strip()]
        changes["beyond"] = reproduce.BEYOND if chosen == ["all"] else tuple(chosen)
    grid = reproduce.config_for(args.quick, **changes)
    extra = tuple(args.task)
    for t in extra:  # a bad task file fails before the model loads
        from mlprune import zeroshot as zs

        zs.load_task(t)
    loaded, corpus = _load(args)
    report = reproduce.run(loaded, corpus, args.out, grid, extra_tasks=extra,
                           batch_size=args.batch_size, progress=_bar())
    print(reproduce.markdown(report))
    print(f"wrote {args.out}/report.md, report.html and report.json", file=sys.stderr)


# --------------------------------------------------------------------------- verdict


def _csv(text: str | None, cast=str) -> tuple | None:
    return None if text is None else tuple(cast(x.strip()) for x in text.split(",") if x.strip())


def cmd_verdict(args) -> None:
    from mlprune import verdict

    changes = {}
    for name, cast in (("langs", str), ("seeds", int), ("sparsities", float)):
        value = _csv(getattr(args, name), cast)
        if value is not None:
            changes[name] = value
    if args.task_limit is not None:
        changes["task_limit"] = args.task_limit or None
    grid = verdict.grid_for(args.quick, **changes)
    out = args.out or verdict.default_out()
    if args.status:
        for phase, p in verdict.status(out, grid).items():
            print(f"{phase:<12} {p['done']:>4} done {p['todo']:>4} to do "
                  f"({p['seconds'] / 60:.0f} min measured)")
        return
    extra = tuple(args.task)
    from mlprune import zeroshot as zs

    for t in extra:  # a bad task file fails before the model loads
        zs.load_task(t)
    if args.report_only:
        from mlprune.verdict_report import build_report, markdown, write_report

        report = build_report(out, replace_tasks(grid, extra))
        write_report(report, out)
        print(markdown(report))
        return
    loaded, corpus = _load(args)
    done = verdict.run(loaded, corpus, out, grid, extra_tasks=extra,
                       batch_size=args.batch_size, phases=_csv(args.phases),
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    from mlprune.verdict_report import build_report, markdown, write_report

    report = build_report(out, done["grid"])
    write_report(report, out)
    print(markdown(report))
    print(f"wrote {out}/report.md and report.json", file=sys.stderr)


def replace_tasks(grid, extra: tuple[str, ...]):
    """The grid with the user's extra tasks added to its own."""
    from dataclasses import replace

    return replace(grid, tasks=(*grid.tasks, *[t for t in extra if t not in grid.tasks]))


# --------------------------------------------------------------------------- intervene


def cmd_intervene(args) -> None:
    from mlprune import zeroshot as zs
    from mlprune.experiments import (
        Cells,
        InterventionSpec,
        markdown,
        run_intervention_experiment,
        write_report,
    )
    from mlprune.interventions import parse_dims

    spec = InterventionSpec(
        pair=args.pair, kind=args.kind, factor=args.factor, layers=args.layers,
        dims=tuple(parse_dims(args.dims)) if args.dims else None, detect=args.detect,
        control=args.control == "random", seed=args.seed, limit=args.limit,
        max_new_tokens=args.max_new_tokens, shots=args.shots,
        samples=args.samples, lrp2_samples=args.lrp2_samples, tasks=tuple(args.task),
        task_limit=args.task_limit or None, compare_prune=args.compare_prune,
        resamples=args.resamples).validate()
    for t in spec.tasks:  # a bad task fails before the model loads
        zs.load_task(t)
    out = Path(args.out) if args.out else None
    cells = Cells(out / "cells.json") if out is not None and out.suffix != ".json" else None
    loaded, corpus = _load(args)
    report = run_intervention_experiment(loaded, corpus, spec, batch_size=args.batch_size,
                                         cells=cells, progress=_bar())
    print(markdown(report))
    if out is not None:
        for path in write_report(report, out):
            print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------- parser


def add_spec_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """One flag per named PruneSpec field, its type, help and default read from the spec.

    Flags default to None ("not given"), so :func:`spec_from_args` can lay what was given
    over a preset; the help shows the spec's own default."""
    from dataclasses import fields

    from mlprune.pipeline import PruneSpec

    spec_fields = {f.name: f for f in fields(PruneSpec)}
    for name in names:
        f = spec_fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.default is False:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            kind = type(f.default) if f.default is not None else (int if name == "pad_to" else str)
            parser.add_argument(flag, type=kind, default=None, help=help_text,
                                metavar=f.metadata.get("metavar"))
    parser.add_argument("--preset", default=None,
                        help="start from a named preset: default, interactive (one-shot, as the "
                             "dashboard), paper (the authors' setup: --protocol paper, 100 "
                             "samples, sequential); flags given override it")
    parser.set_defaults(spec_fields=names)


def spec_from_args(args: argparse.Namespace):
    """The run's PruneSpec: the preset (``--protocol paper`` implies the paper preset), with
    every flag the user gave on top. Fills the namespace with the spec's values."""
    from mlprune.pipeline import PruneSpec

    names = getattr(args, "spec_fields", ())
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    preset = getattr(args, "preset", None) or ("paper" if given.get("protocol") == "paper"
                                               else "default")
    spec = PruneSpec.preset(preset, **given)
    for name in names:
        setattr(args, name, getattr(spec, name))
    return spec


def build_parser() -> argparse.ArgumentParser:
    from mlprune.export import FORMATS

    p = argparse.ArgumentParser(prog="mlprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, corpus=True, spec=True):
        sp.add_argument("--model", default=None,
                        help="hub id, model folder, .gguf file; default: embedded Gemma 3 270M")
        sp.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as saved)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
        sp.add_argument("--device-map", default=None, metavar="MAP",
                        help="place a model larger than one device with accelerate: auto, "
                             "balanced, sequential, or a JSON {module: device}; weights that do "
                             "not fit go to the CPU, then disk, and run one layer at a time")
        sp.add_argument("--max-memory", default=None, metavar="CAPS",
                        help="with --device-map: memory each device may take, e.g. "
                             "0=20GiB,cpu=60GiB or cpu=200MB")
        sp.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="with --device-map: where weights offloaded to disk go")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="run code shipped with a hub model (off unless you ask)")
        sp.add_argument("--allow-pickle", action="store_true",
                        help="also read pickle weights (.bin/.pt) when a model has no "
                             "safetensors; pickle can run code: only for files you trust")
        sp.add_argument("--batch-size", type=int, default=8)
        if corpus:
            sp.add_argument("--corpus", default="builtin", help=CORPUS_HELP)
        if spec:
            add_spec_arguments(sp, ("shots", "samples", "seed", "protocol", "pad_to", "pad_side")
                               if corpus else ("seed",))

    a = sub.add_parser("analyze", help="find large-magnitude features while the model translates")
    common(a)
    a.add_argument("--pair", action="append", default=[], help="src-tgt, repeatable")
    a.add_argument("--mono", action="append", default=[], help="monolingual language, repeatable")
    a.add_argument("--rule", default="ratio:100", help="top-k:8, ratio:100 or absolute:500")
    a.add_argument("--top", type=int, default=None,
                   help="dimensions shown per layer (default: 5; 20 under --protocol paper)")
    a.add_argument("--overlap-fraction", type=float, default=None, metavar="X",
                   help="overlaps compare the top X of dimensions (in (0, 0.5]; default 0.05; "
                        "0.4 under --protocol paper, as the authors' code)")
    a.add_argument("--json", help="write the per-layer analysis here")
    a.add_argument("--figure", help="write the per-layer top-dimension figure (.html or .png)")
    a.set_defaults(func=cmd_analyze)

    pr = sub.add_parser("prune", help="prune and export a model")
    common(pr, spec=False)
    add_spec_arguments(pr, PRUNE_FIELDS)
    pr.add_argument("--eval", type=int, default=0, metavar="N",
                    help="also evaluate on N held-out sentences and store it in the report")
    pr.add_argument("--out", required=True)
    pr.add_argument("--format", choices=FORMATS, default="hf",
                    help="hf: dense safetensors any from_pretrained reads (default); "
                         "compressed-tensors: llm-compressor's sparse format (2:4 bitmask for "
                         "2:4), needs pip install 'mlprune[deploy]'")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace --out if it holds an earlier mlprune export (any other "
                         "non-empty folder is refused and left as it is)")
    pr.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                    help="save each finished layer here (the sequential pass's statistics "
                         "and masks; every ranking's row orders, in DIR/ranking) and resume "
                         "from what is there (a run stopped at layer 40 of 80 goes on at 41)")
    pr.set_defaults(func=cmd_prune)

    e = sub.add_parser(
        "eval", help="few-shot translation (chrF, BLEU, language, perplexity) or zero-shot tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Few-shot translation by default (with --pruned: both models on the same "
                    "held-out sentences and sacrebleu's paired test of chrF and BLEU). With "
                    "--task: zero-shot multiple choice (accuracy per language, RankC consistency "
                    "with English, the smallest difference detectable at that size; with "
                    "--pruned, dense vs pruned with a paired bootstrap). With --lm-eval: run "
                    "lm-evaluation-harness on a model folder (needs 'pip install lm-eval' and "
                    "a reachable Hugging Face hub, which serves the benchmarks' data). "
                    "Under --protocol paper, XNLI and MARC are cut to the authors' draw of "
                    "1000 items per language (datasets' shuffle(seed=0), first 1000), then "
                    "to --limit.",
        epilog="task sources (--task, repeatable):\n"
               "  nli, sentiment        the built-in tasks\n"
               "  FILE.jsonl            items {id, lang, prompt, choices, label}\n"
               "  xnli:PATH             XNLI with the paper's template: XNLI-1.0's xnli.test.tsv,\n"
               "                        or rows {premise, hypothesis, label, lang} (.jsonl, .json,\n"
               "                        .csv, .parquet; a folder of fr.jsonl, de.jsonl ... works)\n"
               "  marc:PATH             MARC with the paper's template: amazon_reviews_multi JSON\n"
               "                        lines {review_id, stars, review_body, language}, or rows\n"
               "                        {id, lang, review, label 0/1 or stars}\n"
               "  xnli, marc            the same from the hub via 'datasets' (test split)\n"
               "  FILE --template T     records of FILE rendered with template xnli or marc\n"
               "\n"
               "examples:\n"
               "  mlprune eval --task nli --task sentiment --limit 40\n"
               "  mlprune eval --task xnli:XNLI-1.0/xnli.test.tsv --langs en,fr,sw --limit 200\n"
               "  mlprune eval --task reviews.jsonl --template marc --pruned runs/wanda-mt-50\n"
               "  mlprune eval --pair fr-en --limit 40 --pruned runs/wanda-mt-50\n"
               "  mlprune eval --lm-eval xnli,xcopa --langs fr,sw --pruned runs/wanda-mt-50\n"
               "  mlprune eval --lm-eval pawsx --pruned runs/wanda-mt-50 --dry-run")
    common(e)
    e.add_argument("--pair", default="fr-en")
    e.add_argument("--limit", type=int, default=None,
                   help="held-out sentences; with --task items per language (at least 1); "
                        "with --lm-eval examples per lm-eval task")
    e.add_argument("--json", help="write the metrics here (strict JSON: undefined values null)")
    e.add_argument("--task", action="append", default=[],
                   help="zero-shot task source (repeatable; see below)")
    e.add_argument("--template", default=None, choices=("xnli", "marc"),
                   help="render each --task FILE's records with the paper's XNLI or MARC "
                        "template")
    e.add_argument("--pruned", "--compare-to", dest="pruned", default=None, metavar="DIR",
                   help="also evaluate this model (e.g. an mlprune export) and test the "
                        "difference; with --lm-eval: the model to evaluate")
    e.add_argument("--langs", default=None, help="languages to keep, e.g. en,fr,sw")
    e.add_argument("--norm", default="token", choices=("token", "byte", "none"),
                   help="score of a choice: log-likelihood per token (default), per byte, or "
                        "summed (none)")
    e.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (--task)")
    e.add_argument("--paired-test", default="bs", choices=("bs", "ar"),
                   help="translation with --pruned: sacrebleu's paired bootstrap (bs, default) "
                        "or approximate randomization (ar); seed 12345 + --seed")
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
    s.add_argument("--csv", default=None,
                   help="results CSV, appended row by row (resumable; default sweep.csv); "
                        "with --store, a CSV export written at the end")
    s.add_argument("--store", default=None, metavar="PATH",
                   help="results store (.sqlite or .db): one transaction per measured row, "
                        "resumable, safe for many workers at once; the dashboard's Sweep page "
                        "opens it")
    s.add_argument("--runner", default="local", choices=("local", "process", "ray"),
                   help="where the cells run: local (this process, the default), process (a "
                        "worker process with its own copy of the model) or ray (one Ray task "
                        "per method and pair, a GPU each where the cluster has GPUs; "
                        "RAY_ADDRESS names a cluster, else Ray starts here; pip install "
                        "'mlprune[ray]'). Without --store, the non-local runners commit to "
                        "sweep.sqlite beside the CSV")
    s.add_argument("--figure", default=None, help="chrF against sparsity (.html or .png)")
    s.add_argument("--task", action="append", default=[],
                   help="also score a zero-shot task per row: nli, sentiment or a JSONL file "
                        "(repeatable); adds accuracy per language, the non-English mean, "
                        "RankC with English and the difference from dense with its p-value")
    s.add_argument("--task-limit", type=int, default=None, help="items per language per task")
    s.add_argument("--norm", default="token", choices=("token", "byte", "none"),
                   help="zero-shot choice score: per token (default), per byte, or summed")
    s.set_defaults(func=cmd_sweep)
    r = sub.add_parser(
        "reproduce", help="the paper's experiment grid on a model -> report (Markdown, HTML, JSON)",
        description="Runs the paper's grid under the paper protocol: Figure 2 (top dimensions "
                    "per layer), Figures 1 and 3 (overlaps), Table 1 (translation at 50%% and 2:4 "
                    "with significance against wanda-mono), zero-shot accuracy per language with "
                    "paired bootstraps, RankC, the inverted ablation and a claims table. Each "
                    "measured cell is kept in OUT/cells: run it again to resume.")
    common(r, spec=False)
    r.add_argument("--out", default="reproduce", help="report folder (resumes what is there)")
    r.add_argument("--quick", action="store_true",
                   help="a small grid (under 20 min on 2 cores for the embedded model)")
    r.add_argument("--pair", default=None, help="calibration and translation pair (default fr-en)")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--task", action="append", default=[],
                   help="add a zero-shot task to the grid and the claims (JSONL file, built-in "
                        "name, xnli:PATH or marc:PATH); repeatable")
    r.add_argument("--translation-limit", type=int, default=None, metavar="N",
                   help="held-out sentences translated per variant")
    r.add_argument("--task-limit", type=int, default=None, metavar="N",
                   help="zero-shot items per language (0: all; default 40, quick 20)")
    r.add_argument("--samples", type=int, default=None, metavar="N",
                   help="calibration prompts per pruned variant (default 16, quick 8; the "
                        "paper's: 100)")
    r.add_argument("--patterns", default=None, metavar="LIST",
                   help="sparsity patterns of the pruned variants, e.g. 0.5,2:4 (the default)")
    r.add_argument("--analysis-samples", type=int, default=None, metavar="N",
                   help="prompts per analysis set (default 16, quick 8)")
    r.add_argument("--beyond", default=None, metavar="LIST",
                   help="also measure variants beyond the paper at 50%% unstructured, each "
                        "tested against wanda-mt too: wanda-pooled (every X-en direction), "
                        "wanda-owl (OWL's per-layer sparsity), m-wanda, m-wanda-no-variance, "
                        "m-wanda-no-cwl, m-wanda-no-prob, or all (default: none)")
    r.set_defaults(func=cmd_reproduce)

    vd = sub.add_parser(
        "verdict", help="the paper's headline claim with seeds and power: pruned vs dense and "
                        "wanda-mt vs wanda-mono across sparsities and languages -> report",
        description="Runs the verdict grid (see mlprune/verdict.py): the sparsity curve of "
                    "wanda-mt and wanda-mono per calibration language and seed, evaluated in "
                    "that language on every task item; variants at 50%% in every language; "
                    "the paper's protocol; translation. Each cell is kept in OUT/cells: run it "
                    "again to resume. The claims table tests each claim with a bootstrap over "
                    "seeds and items.")
    common(vd, spec=False)
    vd.set_defaults(batch_size=16)
    vd.add_argument("--out", default=None,
                    help="cells and report folder (default: bench/results/verdict)")
    vd.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    vd.add_argument("--langs", default=None, metavar="LIST", help="e.g. fr,zh,ru,sw")
    vd.add_argument("--seeds", default=None, metavar="LIST", help="e.g. 0,1,2")
    vd.add_argument("--sparsities", default=None, metavar="LIST", help="e.g. 0.1,0.2,0.3,0.5")
    vd.add_argument("--task", action="append", default=[],
                    help="add a zero-shot task (JSONL file or built-in name); repeatable")
    vd.add_argument("--task-limit", type=int, default=None, metavar="N",
                    help="items per language (0 or default: all)")
    vd.add_argument("--phases", default=None, metavar="LIST",
                    help="only these phases: dense,curve,wide,paper,translation")
    vd.add_argument("--status", action="store_true", help="print what the folder holds; no run")
    vd.add_argument("--report-only", action="store_true",
                    help="rebuild the report from the cells; no model")
    vd.set_defaults(func=cmd_verdict)

    iv = sub.add_parser(
        "intervene", help="zero, mean-set, scale or LRP2-shift residual dims while translating; "
                          "against a random-dims control, with significance",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Act on chosen residual dimensions at chosen layers while the model "
                    "translates the held-out slice (and scores zero-shot tasks): set them to "
                    "zero, to their calibration mean, scale them, or add LRP2's language vector. "
                    "Runs dense, intervened and the same intervention on as many random "
                    "ordinary dims (and wanda-mt with --compare-prune); reports chrF/BLEU with "
                    "sacrebleu's paired test and accuracy per language with a paired bootstrap.",
        epilog="examples:\n"
               "  mlprune intervene --kind zero --detect top-k:4 --limit 40\n"
               "  mlprune intervene --kind scale --factor 0.5 --layers 0-5 --dims 12,301\n"
               "  mlprune intervene --kind mean --task wordorder --task completion --task-limit 20\n"
               "  mlprune intervene --kind lrp2 --layers 3,12 --compare-prune 0.5 --out runs/lrp2")
    common(iv, spec=False)
    add_spec_arguments(iv, ("shots", "samples", "seed"))
    iv.add_argument("--pair", default="fr-en", help="held-out direction and calibration prompts")
    iv.add_argument("--kind", default="zero", choices=("zero", "mean", "scale", "lrp2"),
                    help="what to do to the dims (default zero)")
    iv.add_argument("--factor", type=float, default=None,
                    help="--kind scale: multiply by this (below 1 weakens, above 1 amplifies)")
    iv.add_argument("--layers", default=None, metavar="LIST",
                    help="layer outputs to act on: 0-11, 3,9 or embed,0-3 (default: all; lrp2: "
                         "one layer to project to English, or two: project, then back; "
                         "default a quarter and three quarters of the depth)")
    iv.add_argument("--dims", default=None, metavar="LIST",
                    help="these dims at every chosen layer, e.g. 12,301 (default: detect)")
    iv.add_argument("--detect", default="top-k:4", metavar="RULE",
                    help="pick each layer's dims by this rule on the calibration statistics: "
                         "top-k:4 (default), ratio:100, absolute:500; with --dims, the dims the "
                         "control never draws")
    iv.add_argument("--control", default="random", choices=("random", "none"),
                    help="also run the same intervention on random ordinary dims (default)")
    iv.add_argument("--limit", type=int, default=16, help="held-out sentences (default 16)")
    iv.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                    help="tokens per translation at most (it stops at the end of the line)")
    iv.add_argument("--task", action="append", default=[],
                    help="zero-shot task: wordorder, completion, nli, sentiment or a JSONL "
                         "file (repeatable)")
    iv.add_argument("--task-limit", type=int, default=20, metavar="N",
                    help="items per language per task (0: all; default 20)")
    iv.add_argument("--compare-prune", type=float, default=None, metavar="SPARSITY",
                    help="also prune wanda-mt (translation calibration) at this sparsity")
    iv.add_argument("--lrp2-samples", type=int, default=100, metavar="N",
                    help="sentences per LRP2 language vector (the authors': 100)")
    iv.add_argument("--resamples", type=int, default=2000, help="zero-shot bootstrap resamples")
    iv.add_argument("--out", default=None,
                    help="a folder (report.json, report.md, and cells.json to resume from) or "
                         "a .json file")
    iv.set_defaults(func=cmd_intervene)
    return p


def _starting_line(argv: list[str]) -> None:
    """The first progress line of a command, at once: building the parser and loading a model
    import torch and transformers' model code first (~2-3 s on 2 cores)."""
    if argv and not argv[0].startswith("-") and not {"-h", "--help"} & set(argv):
        print(f"mlprune {argv[0]}: starting (importing torch and transformers)",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    # OpenMP's threads spin while they wait by default: on a machine whose cores are shared
    # (a dashboard, a second job) that made each forward pass ~10x slower (bench/scoring.py).
    # Set before torch is imported; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _starting_line(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        args.spec = spec_from_args(args)
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
