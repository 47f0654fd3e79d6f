"""The commands that run grids of measured cells: ``sweep``, ``reproduce``, ``verdict`` and
``intervene``. Each resumes from what its output already holds."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

from mlprune import MlpruneError
from mlprune.cli.common import csv_values, model_and_corpus, progress_bar, write_figure
from mlprune.spec import SweepSpec, get_protocol
from mlprune.sweep_csv import KEY_COLUMNS

# --------------------------------------------------------------------------- sweep


def _sweep_outputs(args: Namespace) -> tuple[str | None, str | None]:
    """(store, csv) of a sweep: without --store, the local runner appends to the CSV
    (default sweep.csv) as before, and the other runners commit to a store beside it (the
    CSV then an export); with --store, the CSV is an export only when --csv is given."""
    if args.store:
        from mlprune.storage import is_store

        if not is_store(args.store):
            raise MlpruneError(f"--store takes a .sqlite or .db file; got {args.store}.")
        return args.store, args.csv
    csv = args.csv or "sweep.csv"
    if args.runner == "local":
        return None, csv
    return str(Path(csv).with_suffix(".sqlite")), csv


def cmd_sweep(args: Namespace) -> None:
    """``mlprune sweep``: methods x sparsities x pairs, on this process or a runner; the rows
    to a CSV or store, a table on stdout and a figure on request."""
    import pandas as pd

    from mlprune.plots import sweep_figure

    # the grid is checked before anything loads (a model, tasks) or any runner starts
    grid = SweepSpec(args.methods.split(","), [float(s) for s in args.sparsities.split(",")],
                     args.pair or ["fr-en"], args.spec).validate()
    store, csv = _sweep_outputs(args)
    extra = None
    if args.task:
        from mlprune.zeroshot import sweep_eval

        extra = sweep_eval(args.task, limit=args.task_limit, norm=args.norm,
                           batch_size=args.batch_size, seed=args.seed,
                           sample=get_protocol(args.spec.protocol).task_sample)
        if store is None:  # a store records its columns itself and refuses others
            extra.check_resume(csv)
    if args.runner == "local":
        from mlprune.pipeline import sweep

        loaded, corpus = model_and_corpus(args)
        rows = sweep(loaded, corpus, methods=list(grid.methods), sparsities=list(grid.sparsities),
                     pairs=list(grid.pairs), base=grid.base, limit=args.limit, out_csv=csv,
                     store=store, batch_size=args.batch_size, progress=progress_bar(),
                     extra_eval=extra)
        dequantized_from = loaded.dequantized_from
    else:
        from mlprune.corpus import read_corpus
        from mlprune.runners import ModelSource, SweepJob, get_runner
        from mlprune.storage import ResultStore

        source = ModelSource(args.model, args.dtype, args.device, args.trust_remote_code,
                             args.allow_pickle)
        job = SweepJob(source, read_corpus(args.corpus), store, grid.methods,
                       grid.sparsities, grid.pairs, grid.base, args.limit,
                       args.batch_size, tasks=tuple(args.task), task_limit=args.task_limit,
                       task_norm=args.norm, task_seed=args.seed)
        rows = get_runner(args.runner).run(job, progress=progress_bar())
        results = ResultStore(store)
        if csv:
            results.export_csv(csv)
        dequantized_from = (results.settings() or {}).get("dequantized_from")
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
        write_figure(sweep_figure(table, "chrf", dequantized_from=dequantized_from), args.figure)


# --------------------------------------------------------------------------- reproduce


def cmd_reproduce(args: Namespace) -> None:
    """``mlprune reproduce``: the paper's grid on a model, resumable, to a report folder."""
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
    loaded, corpus = model_and_corpus(args)
    report = reproduce.run(loaded, corpus, args.out, grid, extra_tasks=extra,
                           batch_size=args.batch_size, progress=progress_bar())
    print(reproduce.markdown(report))
    print(f"wrote {args.out}/report.md, report.html and report.json", file=sys.stderr)


# --------------------------------------------------------------------------- verdict


def cmd_verdict(args: Namespace) -> None:
    """``mlprune verdict``: the verdict grid (or its status, or its report from the cells)."""
    from mlprune import verdict

    changes = {}
    for name, cast in (("langs", str), ("seeds", int), ("sparsities", float)):
        value = csv_values(getattr(args, name), cast)
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
    loaded, corpus = model_and_corpus(args)
    done = verdict.run(loaded, corpus, out, grid, extra_tasks=extra,
                       batch_size=args.batch_size, phases=csv_values(args.phases),
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


def cmd_intervene(args: Namespace) -> None:
    """``mlprune intervene``: act on residual dims while translating, against a control."""
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
    loaded, corpus = model_and_corpus(args)
    report = run_intervention_experiment(loaded, corpus, spec, batch_size=args.batch_size,
                                         cells=cells, progress=progress_bar())
    print(markdown(report))
    if out is not None:
        for path in write_report(report, out):
            print(f"wrote {path}", file=sys.stderr)
