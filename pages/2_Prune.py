"""Prune: pick a method and settings, move the sparsity slider, watch the pruned output."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict

import streamlit as st

from mlprune import MlpruneError, plots
from mlprune import dashboard as db
from mlprune.export import build_report, export_pruned
from mlprune.features import Rule
from mlprune.pipeline import PruneSpec
from mlprune.prompts import eval_items, parse_pair
from mlprune.prune import METHODS, MODES

METHOD_HELP = {
    "wanda": "|W| x ||X||, X from the calibration set",
    "ratio": "Wanda with columns specific to code down-weighted (the paper's BLOOM variant)",
    "magnitude": "|W| only (no data)",
    "random": "seeded random scores (a floor)",
}
CALIBRATIONS = {"mt": "translation demonstrations", "mono": "monolingual (the source language)",
                "code": "code snippets"}
PATTERNS = ["unstructured", "2:4", "4:8", "other N:M"]


def settings(loaded, corpus) -> tuple[PruneSpec, float, str]:
    """The widgets; returns the spec, the sparsity and the pattern."""
    n_layers = len(loaded.layers)
    pairs = db.all_pairs(corpus.languages)
    features = st.session_state.get("features")
    first = next((n[3:] for n in (features or {}).get("stats", {}) if n.startswith("mt:")), None)
    db.valid_choice("w.prune_pair", pairs, first or db.default_pairs(corpus.languages)[0])
    db.default("w.method", "wanda")
    db.default("w.calibration", "mt")
    db.default("w.mode", "one-shot")
    db.default("w.sparsity", 50)
    db.default("w.pattern", "unstructured")
    db.default("w.pattern_other", "1:4")
    db.default("w.protect", False)
    db.default("w.protect_rule", st.session_state.get("rule", "top-k:4"))
    db.default("w.blocks", ["attn", "mlp"])
    db.default("w.prune_shots", 4)
    db.default("w.prune_samples", 8)
    db.default("w.seed", 0)
    db.default("w.invert", False)
    layers = st.session_state.get("w.layers")
    if not layers or layers[1] > n_layers - 1:
        st.session_state["w.layers"] = (0, n_layers - 1)

    c1, c2, c3, c4 = st.columns(4)
    method = c1.selectbox("Method", list(METHODS), key="w.method",
                          help="; ".join(f"{m}: {h}" for m, h in METHOD_HELP.items()))
    calibration = c2.selectbox("Calibration set", list(CALIBRATIONS), key="w.calibration",
                               format_func=CALIBRATIONS.get,
                               disabled=method != "wanda",
                               help="ratio always uses translation vs code")
    pair = c3.selectbox("Direction", pairs, key="w.prune_pair", format_func=db.pair_label)
    mode = c4.radio("Calibration mode", list(MODES), key="w.mode", horizontal=True,
                    help="one-shot: statistics of the dense model, exact at every sparsity. "
                         "sequential (as Wanda): layer l's statistics with layers < l pruned, "
                         "exact at the sparsity they were taken with.")
    c1, c2, c3 = st.columns([2, 1, 2])
    pattern_choice = c2.radio("Pattern", PATTERNS, key="w.pattern")
    pattern = pattern_choice
    if pattern_choice == "other N:M":
        pattern = c2.text_input("N:M", key="w.pattern_other").strip()
    structured = pattern != "unstructured"
    sparsity = c1.slider("Sparsity (% of each row's weights pruned)", 0, 95, step=5,
                         key="w.sparsity", disabled=structured,
                         help="N:M patterns fix the sparsity at N/M")
    if structured and re.fullmatch(r"\d+:\d+", pattern):
        n, m = (int(x) for x in pattern.split(":"))
        c1.caption(f"{pattern}: {n} of every {m} consecutive inputs pruned"
                   + (f" ({n / m:.0%})" if m else ""))
    protect = c3.toggle("Protect detected features", key="w.protect",
                        help="weights in the input columns of the detected large-magnitude "
                             "dimensions are never pruned")
    protect_rule = c3.text_input("Detection rule", key="w.protect_rule", disabled=not protect,
                                 help="top-k:4, ratio:100 or absolute:500 (the Features page's "
                                      "rule is the default)")
    c1, c2 = st.columns([2, 2])
    lo, hi = c1.slider("Layers to prune", 0, n_layers - 1, key="w.layers")
    blocks = c2.multiselect("Modules", ["attn", "mlp"], key="w.blocks")
    with st.expander("More settings"):
        e1, e2, e3, e4 = st.columns(4)
        shots = e1.number_input("Shots per calibration prompt", 1, 16, step=1,
                                key="w.prune_shots")
        samples = e2.number_input("Calibration prompts", 1, 256, step=1, key="w.prune_samples")
        seed = e3.number_input("Seed", 0, 10_000, step=1, key="w.seed")
        invert = e4.toggle("Invert (prune the highest scores)", key="w.invert",
                           help="the paper's ablation")
    spec = PruneSpec(method=method, calibration=calibration if method == "wanda" else "mt",
                     pair=pair, sparsity=sparsity / 100, pattern=pattern, invert=invert,
                     protect=protect_rule.strip() if protect else None,
                     layers=f"{lo}-{hi}", blocks=",".join(blocks) if blocks else "none",
                     mode=mode, shots=int(shots), samples=int(samples), seed=int(seed))
    return spec, sparsity / 100, pattern


def ranking(loaded, corpus, spec: PruneSpec):
    """The cached ranking of these settings, or a button that makes it."""
    ranked = db.cached_ranking(loaded, corpus, spec)
    if ranked is None:
        intro = st.empty()
        with intro.container():
            st.info("These settings need scores ranked once (one pass over the calibration "
                    "prompts for wanda and ratio). After that the sparsity slider and the "
                    "pattern re-prune from the ranking, with no new pass over data.")
            clicked = st.button("Calibrate and rank", type="primary")
        if clicked:
            with db.errors() as ok:
                bar, _, stages = db.progress_bar("Calibrating and ranking")
                ranked = db.make_ranking(loaded, corpus, spec, progress=stages)
                bar.empty()
            if not ok.ok:
                return None
            intro.empty()
    if ranked is None:
        return None
    calib = (f", calibrated on {ranked.calibration.prompts.name} "
             f"({len(ranked.calibration.prompts)} prompts)" if ranked.calibration else "")
    st.caption(f"Ranking ready: {ranked.spec.label}{calib}, {len(ranked.ranking.modules)} "
               f"modules, made in {ranked.seconds:.1f} s. The slider re-prunes from it.")
    if ranked.approximate_at and ranked.approximate_at != f"{spec.sparsity:.0%} {spec.pattern}":
        c1, c2 = st.columns([4, 1])
        c1.warning(f"Sequential statistics were taken at {ranked.approximate_at}; at other "
                   "settings these masks approximate Wanda's.")
        if c2.button("Recalibrate here"):
            with db.errors():
                bar, _, stages = db.progress_bar("Recalibrating")
                ranked = db.make_ranking(loaded, corpus, spec, progress=stages)
                bar.empty()
    return ranked


def preview(loaded, corpus, state) -> None:
    """Dense and pruned output of one held-out sentence, updated with every slider move."""
    src, tgt = parse_pair(state.spec.pair)
    item = eval_items(corpus, src, tgt, shots=state.spec.shots, limit=1)[0]
    dense = db.dense_generations(loaded, [item.prompt], db.PREVIEW_TOKENS)[0]
    out, seconds = db.session_pruned_generations(loaded, state, [item.prompt],
                                                 db.PREVIEW_TOKENS)
    fa, fb = db.diff_flags(dense.tokens, out[0].tokens)
    st.markdown(f"**Live preview**: {db.pair_label(state.spec.pair)}, a held-out sentence: "
                f"*{item.source}*")
    c1, c2 = st.columns(2)
    c1.markdown("Dense")
    c1.markdown(box(db.generation_html(dense, fa), "dense"), unsafe_allow_html=True)
    label = f"Pruned · {state.masks.pattern} · {state.masks.target:.0%}"
    c2.markdown(label)
    c2.markdown(box(db.generation_html(out[0], fb), "pruned"), unsafe_allow_html=True)
    c2.caption(f"generated in {seconds:.2f} s" if seconds > 0.01 else "from this session's cache")


def box(inner: str, kind: str) -> str:
    return (f'<div class="mlp-out" data-kind="{kind}" style="border:1px solid #d8dde6;'
            'border-radius:6px;padding:.5em .8em;font-size:1.05em;line-height:1.8;'
            f'min-height:2.6em">{inner}</div>')


def export_section(loaded, ranked, state) -> None:
    spec = state.spec
    report = build_report(
        loaded, state.masks, spec=asdict(spec),
        calibration_texts=ranked.calibration.prompts.texts if ranked.calibration else None,
        timings={"calibrate_and_rank": ranked.seconds})
    slug = re.sub(r"[^A-Za-z0-9]+", "-", loaded.name).strip("-").lower()
    db.default("w.export_dir", f"runs/{slug}-pruned")
    folder = st.text_input("Folder", key="w.export_dir")
    c1, c2, c3 = st.columns([1, 1, 2])
    overwrite = c3.checkbox("Overwrite if it exists", key="w.export_overwrite")
    if c1.button("Export the pruned model"):
        with db.errors() as ok, st.spinner("Writing safetensors, masks and report"):
            out = export_pruned(loaded, state.masks, folder, report, overwrite=overwrite)
        if ok.ok:
            st.success(f"Wrote {out} (weights, tokenizer, masks.safetensors, mlprune_report.json)")
    c2.download_button("Download the report (JSON)", json.dumps(report, indent=2,
                                                                 ensure_ascii=False),
                       file_name="mlprune_report.json", mime="application/json")
    note = db.dequant_text(loaded.dequantized_from)
    if note:
        st.caption(f"The report records it: {note}")


def main() -> None:
    ready = db.page("Prune")
    if ready is None:
        return
    loaded, corpus = ready
    spec, sparsity, pattern = settings(loaded, corpus)
    with db.errors() as ok:
        if spec.blocks == "none":
            raise MlpruneError("Pick at least one kind of module to prune (attn, mlp).")
        spec.validate()
        if spec.protect:
            Rule.parse(spec.protect)  # a bad rule is reported now, not after a calibration
        ranked = ranking(loaded, corpus, spec)
    if not ok.ok or ranked is None:
        return
    with db.errors() as ok:
        start = time.perf_counter()
        masks = ranked.masks(sparsity, pattern)
        took = time.perf_counter() - start
    if not ok.ok:
        return
    state = db.set_pruned(loaded, ranked, spec, masks)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Sparsity reached", f"{masks.overall_sparsity():.1%}",
              help="of the weights of the selected modules")
    m2.metric("Weights pruned", f"{sum(c.numel() for c in masks.pruned_cols.values()):,}")
    m3.metric("Masks built in", f"{took * 1000:.0f} ms", help="from the cached ranking")
    m4.metric("Protected weights pruned for N:M", masks.protected_pruned())
    with db.errors():
        preview(loaded, corpus, state)
    q = loaded.dequantized_from
    db.plot(plots.sparsity_figure(masks, dequantized_from=q))
    st.subheader("One module's mask")
    db.valid_choice("w.mask_module", masks.modules)
    db.default("w.mask_view", "whole")
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
    name = c1.selectbox("Module", masks.modules, key="w.mask_module")
    view = c2.radio("View", ["whole", "crop"], key="w.mask_view", horizontal=True,
                    format_func=lambda v: "whole (averaged)" if v == "whole" else
                    "crop (every weight)")
    crop = None
    if view == "crop":
        out_f, in_f = masks.pruned_cols[name].shape[0], masks.in_features[name]
        row = c3.number_input("First row", 0, max(out_f - 1, 0), step=16, key="w.crop_row")
        col = c4.number_input("First input", 0, max(in_f - 1, 0), step=16, key="w.crop_col")
        crop = (int(row), int(col), 64)
    db.plot(plots.mask_figure(masks, name, crop=crop, dequantized_from=q))
    with st.expander("Export"):
        with db.errors():
            export_section(loaded, ranked, state)


main()
