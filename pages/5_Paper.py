"""Paper: the authors' experiment grid on this model, as a report: claims, tables, figures.

The quick grid runs in a worker process with its own copy of the model
(``sweeps.start_reproduce``), so the other pages stay live while it runs; a report made
elsewhere (``mlprune reproduce --out FOLDER``) can be opened as it is.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from mlprune import plots, reproduce, sweeps, ui, verdict, verdict_report
from mlprune.models import cache_dir

JOB = "paper_job"
POLL_S = 1.0  # how often a running grid's progress is redrawn
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
    text = ui.dequant_text(report.get("dequantized_from"))
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


def show_verdict(report: dict | None) -> None:
    """The verdict grid's claims and its accuracy-against-sparsity figure per language."""
    if report is None:
        st.info("No verdict report yet: `mlprune verdict` measures it (resumable; see the "
                "README).")
        return
    text = ui.dequant_text(report.get("dequantized_from"))
    if text:
        st.caption(f":material/warning: {text}")
    g, cells = report["grid"], report["cells"]
    st.caption(f"{report['model']} · seeds {g['seeds']} · sparsities {g['sparsities']} · "
               f"calibration languages {g['langs']} · "
               f"{cells['zeroshot'] + cells['translation'] + cells.get('analysis', 0)}"
               f" of {cells['expected']} cells measured")
    st.table(pd.DataFrame(verdict_report.claims_rows(report)).set_index("claim"))
    cols = st.columns(2)
    for i, (lang, block) in enumerate(report["curves"].items()):
        with cols[i % 2]:
            ui.plot(plots.verdict_curve_figure(block, lang, report.get("dequantized_from")),
                    key=f"verdict-{lang}")


def start_quick(out: Path) -> None:
    with ui.errors():
        st.session_state[JOB] = sweeps.start_reproduce(ui.model_spec(), ui.session_corpus(),
                                                        out, reproduce.QUICK,
                                                        owner=ui.session_owner())
        st.rerun()  # draw the page again as it is while the grid runs (Start disabled)


def cancel() -> None:
    """Stop the worker at once; its finished cells are kept, and a new start resumes."""
    job = st.session_state.get(JOB)
    if job is not None:
        job.cancel()


def progress(out: Path) -> None:
    """The quick grid's progress, redrawn every POLL_S while it runs; then its outcome."""
    job = st.session_state.get(JOB)
    running = job is not None and not job.done()

    @st.fragment(run_every=POLL_S if running else None)
    def live() -> None:
        if running and job.done():
            st.rerun()  # it ended since the page was drawn: draw the report below it too
        if running and job.queued:
            ui.queued(job, "quick grid")
        elif running:
            st.progress(min(1.0, job.fraction), text=f"Reproducing (quick grid): {job.stage}")
            st.caption(f"running for {job.seconds:.0f} s in a worker process; the other pages "
                       "stay live meanwhile.")
        elif job is not None:
            with ui.errors() as ok:
                job.result()
            if ok.ok:
                st.success(f"Done: the report is in {out}.")

    live()


st.title("Paper: Kim et al. (EMNLP 2024 Findings), reproduced")
st.markdown("The paper's grid on one model: the large dimensions while translating "
            "(Figure 2), their overlap across languages and directions (Figures 1 and 3), "
            "translation after pruning (Table 1), zero-shot accuracy per language with paired "
            "tests, and each claim with what this model shows. `mlprune reproduce` makes the "
            "same report from the command line.")
verdict_tab, shipped, mine, opened = st.tabs(["The verdict", "The README's run",
                                              "Run the quick grid", "Open a report folder"])
with verdict_tab:
    show_verdict(verdict_report.load_report(verdict.default_out()))
with shipped:
    with ui.errors():
        show(reproduce.load_report(reproduce.shipped_report_dir()), "shipped")
with mine:
    out = cache_dir() / "reproduce" / ui.session_id()
    st.caption(f"Dense model, then each pruned variant, on the session's model and corpus; "
               f"cells are kept in {out}, so a cancelled run resumes. About 6 minutes on 2 "
               "idle cores for the embedded model (measured 2026-11-26).")
    job = st.session_state.get(JOB)
    c1, c2 = st.columns(2)
    if c1.button("Start the quick grid", type="primary",
                 disabled=job is not None and not job.done()):
        start_quick(out)
    c2.button("Cancel", on_click=cancel)
    progress(out)
    if (out / "report.json").is_file():
        with ui.errors():
            show(reproduce.load_report(out), "mine")
with opened:
    folder = st.text_input("Report folder", key="w.paper_open",
                           placeholder="the --out folder of mlprune reproduce")
    if folder.strip():
        with ui.errors():
            show(reproduce.load_report(Path(folder.strip()).expanduser()), "opened")
