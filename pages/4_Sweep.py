"""Sweep: methods x sparsities x directions, with progress, cancel, charts and a CSV."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import streamlit as st

from mlprune import plots, service, ui
from mlprune.pipeline import SIGNIFICANCE_COLUMNS, SWEEP_METHODS, PruneSpec

SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
SPEC_FIELDS = ("samples", "shots")  # w.sw_samples, w.sw_shots: the base spec's


def cancel() -> None:
    """The Cancel button: a click interrupts the running sweep at its next progress update
    (Streamlit stops a script at its next st.* call when a new run is asked for)."""
    st.session_state["sweep_running"] = None
    st.session_state["sweep_cancelled"] = True
    event = st.session_state.get("sweep_stop")
    if event is not None:
        event.set()


def run(loaded, corpus, config: dict, out_csv: Path) -> None:
    bar, progress = ui.progress_bar("Sweeping")
    beat = st.empty()
    stop = st.session_state["sweep_stop"] = threading.Event()
    start = time.perf_counter()

    def should_stop() -> bool:
        # Drawing is a yield point: a pending Cancel click stops the run right here.
        beat.caption(f"running for {time.perf_counter() - start:.0f} s; rows are saved as "
                     "they are measured, so a cancelled sweep resumes where it stopped")
        return stop.is_set()

    with ui.errors():  # the preset validates shots and samples: a bad value is a message
        base = PruneSpec.preset(ui.SPEC_PRESET, shots=config["shots"], samples=config["samples"])
        service.run_sweep(loaded, corpus, methods=config["methods"],
                          sparsities=config["sparsities"], pairs=config["pairs"], base=base,
                          limit=config["limit"], out_csv=out_csv, progress=progress,
                          should_stop=should_stop,
                          extra_eval=service.sweep_extra_eval(config["extra"]))
    st.session_state["sweep_running"] = None
    bar.empty()
    beat.empty()


def main() -> None:
    ready = ui.page("Sweep")
    if ready is None:
        return
    loaded, corpus = ready
    st.caption("Every method x sparsity x direction: unstructured, one-shot, one ranking per "
               "method and direction; chrF, BLEU, output language and perplexity of the "
               "held-out slice.")
    pairs = service.all_pairs(corpus.languages)
    ui.valid_choices("w.sw_methods", list(SWEEP_METHODS), ["wanda-mt", "magnitude"])
    ui.valid_choices("w.sw_sparsities", SPARSITIES, [0.0, 0.3, 0.5])
    ui.valid_choices("w.sw_pairs", pairs, service.default_pairs(corpus.languages)[:1])
    ui.default("w.sw_limit", 8)
    ui.default_all(ui.spec_defaults("sw", SPEC_FIELDS))
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods", list(SWEEP_METHODS), key="w.sw_methods")
    sparsities = c2.multiselect("Sparsities", SPARSITIES, key="w.sw_sparsities",
                                format_func=lambda s: f"{s:.0%}")
    chosen_pairs = c3.multiselect("Directions", pairs, key="w.sw_pairs",
                                  format_func=service.pair_label)
    c1, c2, c3, c4 = st.columns(4)
    limit = c1.number_input("Held-out sentences per cell", 1, 500, step=1, key="w.sw_limit")
    samples = c2.number_input("Calibration prompts", 1, 256, step=1, key="w.sw_samples")
    shots = c3.number_input("Shots", 1, 16, step=1, key="w.sw_shots")
    ui.valid_choices("w.sw_extra", list(service.SWEEP_EXTRA_EVALS), [])
    extra = c4.multiselect("Zero-shot tasks", list(service.SWEEP_EXTRA_EVALS), key="w.sw_extra",
                           help=f"Accuracy per language, RankC with English and the "
                                f"difference from dense ({service.ZERO_SHOT_ITEMS} items per "
                                "language); adds ~30 s per task and cell on 2 CPU cores.")
    config = {"methods": methods, "sparsities": sorted(sparsities), "pairs": chosen_pairs,
              "limit": int(limit), "samples": int(samples), "shots": int(shots), "extra": extra}
    out_csv = service.sweep_csv(ui.session_id(), loaded, corpus, limit=config["limit"],
                                samples=config["samples"], shots=config["shots"], extra=extra)
    cells = len(methods) * len(sparsities) * len(chosen_pairs)
    b1, b2, b3 = st.columns([1, 1, 4])
    if b1.button(f"Run {cells} cells", type="primary", disabled=cells == 0):
        st.session_state["sweep_running"] = config
        st.session_state["sweep_cancelled"] = False
    b2.button("Cancel", on_click=cancel)
    b3.caption("Rows already measured with these settings are kept and not measured again.")
    if st.session_state.get("sweep_running") == config:
        run(loaded, corpus, config, out_csv)
    elif st.session_state.get("sweep_running"):
        st.session_state["sweep_running"] = None  # the settings changed under it: stop
    table = service.sweep_table(service.read_sweep_csv(out_csv), methods, sparsities,
                                chosen_pairs)
    if st.session_state.get("sweep_cancelled"):
        st.warning(f"Sweep cancelled; {len(table)} finished rows are kept. Run it again to "
                   "resume.")
    if table.empty:
        st.info("No results yet for these settings.")
        return
    q = loaded.dequantized_from
    metrics = {"chrF": "chrf", "perplexity": "perplexity"}
    for col in table.columns:  # zero-shot columns, when an extra evaluation added them
        if col.endswith(("_acc_non_en", "_acc_en", "_rankc_mean")) and table[col].notna().any():
            metrics[col.replace("_", " ")] = col
    for tab, metric in zip(st.tabs(list(metrics)), metrics.values()):
        with tab:
            ui.plot(plots.sweep_figure(table, metric, dequantized_from=q))
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


main()
