"""Sweep: methods x sparsities x directions, with progress, cancel, charts and a CSV.

The sweep runs in a worker process with its own copy of the model (``sweeps.start_sweep``),
so the shared model's lock is free and every other page stays live while it runs; its rows
are committed to a results store as they are measured and this page polls them. A results
file made elsewhere (``mlprune sweep --store``, another worker, a Ray cluster) can be opened
and shown without computing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from mlprune import plots, runners, sweeps, ui
from mlprune.pipeline import SIGNIFICANCE_COLUMNS, SWEEP_METHODS, PruneSpec

SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
SPEC_FIELDS = ("samples", "shots")  # w.sw_samples, w.sw_shots: the base spec's
JOB = "sweep_job"
POLL_S = 1.0  # how often a running sweep's progress and rows are redrawn
SOURCES = {"run": "Run a sweep", "open": "Open a results file"}


@dataclass
class SweepRun:
    """The session's sweep: the settings it was started with, its store, its worker."""

    config: dict
    store: Path
    job: runners.Job


def cancel() -> None:
    """The Cancel button: the worker is stopped at once; every finished row is already
    committed, so a new run resumes where it stopped."""
    st.session_state["sweep_cancelled"] = True
    run = st.session_state.get(JOB)
    if run is not None and not run.job.done():
        run.job.cancel()


def start(corpus, config: dict, store: Path) -> None:
    with ui.errors():  # the preset validates shots and samples: a bad value is a message
        base = PruneSpec.preset(ui.SPEC_PRESET, shots=config["shots"], samples=config["samples"])
        job = sweeps.start_sweep(ui.model_spec(), corpus, methods=config["methods"],
                                  sparsities=config["sparsities"], pairs=config["pairs"],
                                  base=base, limit=config["limit"], store=store,
                                  extra=config["extra"], owner=ui.session_owner())
        st.session_state[JOB] = SweepRun(config, store, job)
        st.session_state["sweep_cancelled"] = False
        st.rerun()  # draw the page again as it is while the sweep runs (Run disabled)


def show(table, dequantized_from: str | None) -> None:
    """Charts per metric, the table and its CSV."""
    metrics = {"chrF": "chrf", "perplexity": "perplexity"}
    for col in table.columns:  # zero-shot columns, when an extra evaluation added them
        if col.endswith(("_acc_non_en", "_acc_en", "_rankc_mean")) and table[col].notna().any():
            metrics[col.replace("_", " ")] = col
    for tab, metric in zip(st.tabs(list(metrics)), metrics.values()):
        with tab:
            ui.plot(plots.sweep_figure(table, metric, dequantized_from=dequantized_from))
    st.caption("`chrf_p_vs_dense`, `bleu_p_vs_dense`: p-value of the row's difference from the "
               "dense model on the same held-out sentences (sacrebleu's paired bootstrap, 1000 "
               "resamples; hover a point of the chrF chart to see it). Empty on dense rows; "
               "with a few sentences per cell only large differences reach p < 0.05.")
    if any(c.endswith("_p_non_en") for c in table.columns):
        st.caption("Zero-shot: `*_diff_*` is accuracy minus dense on the same items, `*_p_*` "
                   "its paired-bootstrap p-value; `*_rankc_*` is consistency with English.")
    st.dataframe(table, hide_index=True, column_config={
        col: st.column_config.NumberColumn(col, format="%.3f",
                                           help=f"p-value of the {metric} difference from dense")
        for metric, col in SIGNIFICANCE_COLUMNS.items()})
    st.download_button("Download CSV", table.to_csv(index=False), file_name="mlprune-sweep.csv",
                       mime="text/csv")


def results(config: dict, store: Path, dequantized_from: str | None) -> None:
    """Progress and rows of the session's sweep, redrawn every POLL_S while it runs."""
    run = st.session_state.get(JOB)
    running = run is not None and not run.job.done()

    @st.fragment(run_every=POLL_S if running else None)
    def live() -> None:
        if running and run.job.done():
            st.rerun()  # it ended since the page was drawn: draw the whole page again
        if running and run.job.queued:
            ui.queued(run.job, "sweep")
        elif running:
            other = "" if run.config == config else " (of other settings than those shown)"
            st.progress(min(1.0, run.job.fraction),
                        text=f"Sweeping in a worker process{other}: {run.job.stage}")
            st.caption(f"running for {run.job.seconds:.0f} s; rows are saved as they are "
                       "measured, so a cancelled sweep resumes where it stopped. The other "
                       "pages stay live meanwhile.")
        methods, sparsities, pairs = config["methods"], config["sparsities"], config["pairs"]
        table = sweeps.sweep_table(sweeps.read_results(store), methods, sparsities, pairs)
        if st.session_state.get("sweep_cancelled"):
            st.warning(f"Sweep cancelled; {len(table)} finished rows are kept. Run it again to "
                       "resume.")
        elif run is not None and run.job.done() and run.config == config:
            with ui.errors():
                run.job.result()  # a failure of the worker, as one message
        if table.empty:
            st.info("No results yet for these settings.")
            return
        show(table, dequantized_from)

    live()


def open_results() -> None:
    """An existing results file or folder, shown as it is (nothing is computed)."""
    path = st.text_input("Results file or folder", key="w.sw_open",
                         placeholder="/path/to/sweep.sqlite, a .csv, or a folder of them")
    if not path.strip():
        st.info("Type the path of a results store (.sqlite, .db) or CSV written by "
                "`mlprune sweep`, or of a folder holding them.")
        return
    with ui.errors():
        files = sweeps.results_files(path.strip())
        chosen = files[0] if len(files) == 1 else st.selectbox(
            "File", files, format_func=lambda p: p.name, key="w.sw_open_file")
        table, settings = sweeps.open_results(chosen)
        if settings:
            spec = settings.get("spec", {})
            st.caption(f"{settings.get('model')} · {settings.get('limit')} held-out sentences "
                       f"per cell · {spec.get('samples')} calibration prompts of "
                       f"{spec.get('shots')} shots · {spec.get('protocol')} protocol")
        if table.empty:
            st.info(f"{chosen.name} holds no rows yet.")
            return
        show(table, (settings or {}).get("dequantized_from"))


def main() -> None:
    st.title("Sweep")
    ui.default("w.sw_source", "run")
    source = st.radio("Results", list(SOURCES), format_func=SOURCES.get, horizontal=True,
                      key="w.sw_source", label_visibility="collapsed")
    if source == "open":
        open_results()
        return
    loaded, corpus = ui.require_model(), ui.require_corpus()
    if loaded is None or corpus is None:
        return
    st.caption("Every method x sparsity x direction: unstructured, one-shot, one ranking per "
               "method and direction; chrF, BLEU, output language and perplexity of the "
               "held-out slice.")
    pairs = ui.all_pairs(corpus.languages)
    ui.valid_choices("w.sw_methods", list(SWEEP_METHODS), ["wanda-mt", "magnitude"])
    ui.valid_choices("w.sw_sparsities", SPARSITIES, [0.0, 0.3, 0.5])
    ui.valid_choices("w.sw_pairs", pairs, ui.default_pairs(corpus.languages)[:1])
    ui.default("w.sw_limit", 8)
    ui.default_all(ui.spec_defaults("sw", SPEC_FIELDS))
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods", list(SWEEP_METHODS), key="w.sw_methods")
    sparsities = c2.multiselect("Sparsities", SPARSITIES, key="w.sw_sparsities",
                                format_func=lambda s: f"{s:.0%}")
    chosen_pairs = c3.multiselect("Directions", pairs, key="w.sw_pairs",
                                  format_func=ui.pair_label)
    c1, c2, c3, c4 = st.columns(4)
    limit = c1.number_input("Held-out sentences per cell", 1, 500, step=1, key="w.sw_limit")
    samples = c2.number_input("Calibration prompts", 1, 256, step=1, key="w.sw_samples")
    shots = c3.number_input("Shots", 1, 16, step=1, key="w.sw_shots")
    ui.valid_choices("w.sw_extra", list(sweeps.SWEEP_EXTRA_EVALS), [])
    extra = c4.multiselect("Zero-shot tasks", list(sweeps.SWEEP_EXTRA_EVALS), key="w.sw_extra",
                           help=f"Accuracy per language, RankC with English and the "
                                f"difference from dense ({sweeps.ZERO_SHOT_ITEMS} items per "
                                "language); adds ~30 s per task and cell on 2 CPU cores.")
    config = {"methods": methods, "sparsities": sorted(sparsities), "pairs": chosen_pairs,
              "limit": int(limit), "samples": int(samples), "shots": int(shots), "extra": extra}
    # named from the model, corpus and settings: a reloaded page finds the same sweep's rows
    store = sweeps.sweep_store(loaded, corpus, limit=config["limit"], samples=config["samples"],
                                shots=config["shots"], extra=extra)
    cells = len(methods) * len(sparsities) * len(chosen_pairs)
    run = st.session_state.get(JOB)
    running = run is not None and not run.job.done()
    b1, b2, b3 = st.columns([1, 1, 4])
    if b1.button(f"Run {cells} cells", type="primary", disabled=cells == 0 or running):
        start(corpus, config, store)
    b2.button("Cancel", on_click=cancel)
    b3.caption("Rows already measured with these settings are kept and not measured again. "
               "The sweep runs in a worker process with its own copy of the model.")
    results(config, store, loaded.dequantized_from)
    earlier(loaded, corpus, store)


def reopen(found: dict) -> None:
    """Set the widgets to an earlier sweep's settings (before they are drawn again)."""
    config = sweeps.sweep_config(found)
    for name in ("methods", "sparsities", "pairs", "limit", "samples", "shots", "extra"):
        if config[name] is not None:
            st.session_state[f"w.sw_{name}"] = config[name]


def earlier(loaded, corpus, store: Path) -> None:
    """This model's and corpus's earlier sweeps (a reloaded page's, another session's)."""
    found = [f for f in sweeps.recent_sweeps(loaded, corpus) if f["path"] != store]
    if not found:
        return
    with st.expander(f"Earlier sweeps of this model and corpus ({len(found)})"):
        chosen = st.selectbox("Sweep", found, format_func=ui.sweep_label,
                              key="w.sw_earlier")
        st.button("Show it", on_click=reopen, args=(chosen,),
                  help="Sets the settings above to that sweep's; its rows are shown, and a run "
                       "resumes it.")


main()
