"""Paper: the authors' experiment grid on this model, as a report: claims, tables, figures."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import streamlit as st

from mlprune import plots, reproduce, service, ui
from mlprune.models import cache_dir

HOLDS = {True: "yes", False: "no (the opposite)", None: "cannot tell (p ≥ 0.05)"}


def claims_table(report: dict) -> pd.DataFrame:
    rows = []
    for c in report["claims"]:
        holds = HOLDS[c["holds"]] if c["p_value"] is not None else ("yes" if c["holds"] else "no")
        p = c["p_value"]
        rows.append({"claim": c["claim"], "paper": c["paper"], "found": c["found"],
                     "n": c["n"], "p": "—" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}"),
                     "holds here": holds})
    return pd.DataFrame(rows).set_index("claim")


def show(report: dict, key: str) -> None:
    text = service.dequant_text(report.get("dequantized_from"))
    if text:
        st.caption(f":material/warning: {text}")
    grid = report["grid"]
    st.caption(f"{report['model']} · paper protocol · calibration pair {grid['pair']} · "
               f"{grid['samples']} calibration prompts · translation on "
               f"{grid['translation_limit']} held-out sentences")
    st.subheader("Claims")
    st.table(claims_table(report))  # a table wraps its long sentences; a dataframe scrolls
    st.subheader("Table 1: translation")
    st.dataframe(pd.DataFrame(report["table1"]), hide_index=True, width="stretch")
    for task, block in report["zeroshot"].items():
        st.subheader(f"Zero-shot: {task}")
        comps = [{"comparison": f"{c['b']} vs {c['a']}", **r} for c in block["comparisons"]
                 for r in c["rows"] if r["lang"] == "non-en"]
        st.dataframe(pd.DataFrame(comps), hide_index=True, width="stretch")
        for note in block.get("notes", []):
            st.caption(note)
    st.subheader("Figures")
    for i, (_, fig) in enumerate(plots.report_figures(report)):
        ui.plot(fig, key=f"{key}-fig-{i}")


def run_quick(out: Path) -> None:
    loaded = ui.loaded_model()
    corpus = ui.session_corpus()
    stop = st.session_state["paper_stop"] = threading.Event()
    bar, progress = ui.progress_bar("Reproducing (quick grid)")
    with ui.errors() as ok, service.dense(loaded):
        reproduce.run(loaded, corpus, out, reproduce.QUICK, batch_size=service.CAPTURE_BATCH,
                      progress=progress, should_stop=stop.is_set)
    bar.empty()
    if ok.ok:
        st.success(f"Done: the report is in {out}.")


def cancel() -> None:
    event = st.session_state.get("paper_stop")
    if event is not None:
        event.set()


st.title("Paper: Kim et al. (EMNLP 2024 Findings), reproduced")
st.markdown("The paper's grid on one model: the large dimensions while translating "
            "(Figure 2), their overlap across languages and directions (Figures 1 and 3), "
            "translation after pruning (Table 1), zero-shot accuracy per language with paired "
            "tests, and each claim with what this model shows. `mlprune reproduce` makes the "
            "same report from the command line.")
shipped, mine = st.tabs(["The README's run", "Run the quick grid"])
with shipped:
    with ui.errors():
        show(reproduce.load_report(reproduce.shipped_report_dir()), "shipped")
with mine:
    out = cache_dir() / "reproduce" / ui.session_id()
    st.caption(f"Dense model, then each pruned variant, on the session's model and corpus; "
               f"cells are kept in {out}, so a cancelled run resumes. Under 20 minutes on 2 "
               "cores for the embedded model.")
    c1, c2 = st.columns(2)
    start = c1.button("Start the quick grid", type="primary")
    c2.button("Cancel", on_click=cancel)
    if start:
        run_quick(out)
    if (out / "report.json").is_file():
        with ui.errors():
            show(reproduce.load_report(out), "mine")
