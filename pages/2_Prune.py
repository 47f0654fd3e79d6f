"""Prune: pick a method and settings, move the sparsity slider, watch the pruned output."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict

import streamlit as st

from mlprune import MlpruneError, plots, service, ui
from mlprune.allocation import ALLOCATIONS
from mlprune.export import build_report, export_pruned
from mlprune.features import Rule
from mlprune.mwanda import PARTS
from mlprune.pipeline import PruneSpec
from mlprune.prompts import MIX_PREFIX, eval_items, parse_pair
from mlprune.protocol import PROTOCOLS
from mlprune.prune import METHODS, MODES

METHOD_HELP = {
    "wanda": "|W| x ||X||, X from the calibration set",
    "ratio": "Wanda with columns specific to code down-weighted (the paper's BLOOM variant)",
    "m-wanda": "M-Wanda: Wanda on a calibration mix, with the languages' spread, the MLP "
               "neurons' activation probability and per-layer sparsity from cross-lingual "
               "correlation (needs the pooled set or a mix)",
    "magnitude": "|W| only (no data)",
    "random": "seeded random scores (a floor)",
}
CALIBRATIONS = {"mt": "translation demonstrations", "mono": "monolingual (the source language)",
                "code": "code snippets", "pooled": "every X→English direction, equal weights",
                "mix": "a mix of your own"}
ALLOCATION_HELP = {"uniform": "every layer at the target",
                   "owl": "OWL: layers with more outlier scores pruned less",
                   "cwl": "M-Wanda's: layers where languages diverge pruned less (needs a mix)"}
PATTERNS = ["unstructured", "2:4", "4:8", "other N:M"]
BLOCKS = ["attn", "mlp"]  # all of them by default, as the spec's blocks=None means
# Widgets w.prune_<field> that start from the interactive preset (ui.spec_defaults).
SPEC_FIELDS = ("method", "calibration", "mode", "sparsity", "pattern", "invert", "protect",
               "shots", "samples", "seed", "protocol", "allocation", "allocation_range",
               "outlier_threshold")
PROTECT_RULE = "top-k:4"  # the rule box's text when the Features page has chosen none


def settings(loaded, corpus) -> tuple[PruneSpec, float, str]:
    """The widgets; returns the spec, the sparsity and the pattern."""
    n_layers = len(loaded.layers)
    pairs = service.all_pairs(corpus.languages)
    captured = ui.features(loaded)
    first = captured.pairs[0] if captured and captured.pairs else None
    ui.valid_choice("w.prune_pair", pairs, first or service.default_pairs(corpus.languages)[0])
    ui.default_all(ui.spec_defaults("prune", SPEC_FIELDS))
    ui.default("w.prune_pattern_other", "1:4")
    to_english = [p for p in pairs if p.endswith("-en")][:3]
    ui.default("w.prune_mix", MIX_PREFIX + ",".join(f"{p}=1" for p in to_english))
    parts = ui.spec_defaults("prune", ("mwanda_parts",))["w.prune_mwanda_parts"]
    ui.default("w.prune_mwanda_parts", [p for p in parts.split(",") if p])
    ui.default("w.prune_protect_rule", captured.rule if captured and captured.rule
               else PROTECT_RULE)
    ui.default("w.prune_blocks", BLOCKS)
    layers = st.session_state.get("w.prune_layers")
    if not layers or layers[1] > n_layers - 1:
        st.session_state["w.prune_layers"] = (0, n_layers - 1)

    c1, c2, c3, c4 = st.columns(4)
    method = c1.selectbox("Method", list(METHODS), key="w.prune_method",
                          help="; ".join(f"{m}: {h}" for m, h in METHOD_HELP.items()))
    calibration = c2.selectbox("Calibration set", list(CALIBRATIONS), key="w.prune_calibration",
                               format_func=CALIBRATIONS.get,
                               disabled=method not in ("wanda", "m-wanda"),
                               help="ratio always uses translation vs code; m-wanda needs "
                                    "several languages: pooled or a mix")
    if calibration == "mix":
        calibration = c2.text_input("Mix (set=weight, ...)", key="w.prune_mix",
                                    help="pairs translate (fr-en), single languages are "
                                         "monolingual (fr); weights are normalised").strip()
    pair = c3.selectbox("Direction", pairs, key="w.prune_pair", format_func=service.pair_label)
    mode = c4.radio("Calibration mode", list(MODES), key="w.prune_mode", horizontal=True,
                    help="one-shot: statistics of the dense model, exact at every sparsity. "
                         "sequential (as Wanda): layer l's statistics with layers < l pruned, "
                         "exact at the sparsity they were taken with.")
    c1, c2, c3 = st.columns([2, 1, 2])
    pattern_choice = c2.radio("Pattern", PATTERNS, key="w.prune_pattern")
    pattern = pattern_choice
    if pattern_choice == "other N:M":
        pattern = c2.text_input("N:M", key="w.prune_pattern_other").strip()
    structured = pattern != "unstructured"
    sparsity = c1.slider("Sparsity (% of each row's weights pruned)", 0, 95, step=5,
                         key="w.prune_sparsity", disabled=structured,
                         help="N:M patterns fix the sparsity at N/M")
    if structured and re.fullmatch(r"\d+:\d+", pattern):
        n, m = (int(x) for x in pattern.split(":"))
        c1.caption(f"{pattern}: {n} of every {m} consecutive inputs pruned"
                   + (f" ({n / m:.0%})" if m else ""))
    protect = c3.toggle("Protect detected features", key="w.prune_protect",
                        help="weights in the input columns of the detected large-magnitude "
                             "dimensions are never pruned")
    protect_rule = c3.text_input("Detection rule", key="w.prune_protect_rule",
                                 disabled=not protect,
                                 help="top-k:4, ratio:100 or absolute:500 (the Features page's "
                                      "rule is the default)")
    c1, c2, c3 = st.columns([2, 2, 2])
    lo, hi = c1.slider("Layers to prune", 0, n_layers - 1, key="w.prune_layers")
    blocks = c2.multiselect("Modules", BLOCKS, key="w.prune_blocks")
    allocation = c3.radio("Per-layer sparsity", list(ALLOCATIONS), key="w.prune_allocation",
                          horizontal=True,
                          help="; ".join(f"{a}: {h}" for a, h in ALLOCATION_HELP.items())
                               + ". The target stays the mean over layers, weighted by size.")
    mwanda_parts = ",".join(PARTS)
    if method == "m-wanda":
        chosen = st.multiselect("M-Wanda parts (drop one to ablate it)", list(PARTS),
                                key="w.prune_mwanda_parts",
                                help="variance: the languages' spread in the score; cwl: "
                                     "per-layer sparsity from cross-lingual correlation (sets "
                                     "the allocation); prob: MLP neurons' activation "
                                     "probability. None left: Wanda on the mix.")
        mwanda_parts = ",".join(chosen) or "none"
    with st.expander("More settings", expanded=st.session_state["w.prune_protocol"] != "clean"):
        e1, e2, e3, e4, e5, e6 = st.columns(6)
        shots = e1.number_input("Shots per calibration prompt", 1, 16, step=1,
                                key="w.prune_shots")
        samples = e2.number_input("Calibration prompts", 1, 256, step=1, key="w.prune_samples")
        seed = e3.number_input("Seed", 0, 10_000, step=1, key="w.prune_seed")
        protocol = e4.radio("Protocol", list(PROTOCOLS), key="w.prune_protocol",
                            help="clean: calibration demonstrations end with a newline. paper: "
                                 "they end with the EOS token, as the authors' code did.")
        invert = e5.toggle("Invert (prune the highest scores)", key="w.prune_invert",
                           help="the paper's ablation")
        allocation_range = e6.slider("Allocation range λ", 0.0, 0.3, step=0.01,
                                     key="w.prune_allocation_range",
                                     help="owl/cwl: OWL's lambda: the layers' sparsities span "
                                          "2 x lambda, their mean the target (one layer may "
                                          "sit up to ~2 x lambda from it)")
        outlier_threshold = e6.number_input("Outlier threshold M", 0.5, 100.0, step=0.5,
                                            key="w.prune_outlier_threshold",
                                            help="owl: a score above M times its layer's mean "
                                                 "is an outlier")
        if protocol == "paper":
            st.caption("The paper protocol sets the calibration prompts' separator (EOS). The "
                       "mode and the number of prompts stay as chosen here, one-shot and few "
                       "to keep this page live; the authors' run is sequential with 100 prompts "
                       "(pick them above, or `mlprune prune --protocol paper`).")
    spec = PruneSpec(method=method,
                     calibration=calibration if method in ("wanda", "m-wanda") else "mt",
                     pair=pair, sparsity=sparsity / 100, pattern=pattern, invert=invert,
                     protect=protect_rule.strip() if protect else None,
                     layers=f"{lo}-{hi}", blocks=",".join(blocks) if blocks else "none",
                     mode=mode, shots=int(shots), samples=int(samples), seed=int(seed),
                     protocol=protocol, allocation=allocation,
                     allocation_range=float(allocation_range),
                     outlier_threshold=float(outlier_threshold), mwanda_parts=mwanda_parts)
    return spec, sparsity / 100, pattern


def ranking(loaded, corpus, spec: PruneSpec) -> service.CalibratedRanking | None:
    """The cached ranking of these settings, or a button that makes it."""
    ranked = ui.shared().ranking(loaded, corpus, spec)
    if ranked is None:
        intro = st.empty()
        with intro.container():
            st.info("These settings need scores ranked once (one pass over the calibration "
                    "prompts for wanda and ratio). After that the sparsity slider and the "
                    "pattern re-prune from the ranking, with no new pass over data.")
            clicked = st.button("Calibrate and rank", type="primary")
        if clicked:
            with ui.errors() as ok:
                bar, progress = ui.progress_bar("Calibrating and ranking")
                ranked = ui.shared().make_ranking(loaded, corpus, spec, progress=progress)
                bar.empty()
            if not ok.ok:
                return None
            intro.empty()
    if ranked is None:
        return None
    calib = (f", calibrated on {ranked.calibration.prompts.name} "
             f"({len(ranked.calibration.prompts)} prompts, {ranked.spec.protocol} protocol)"
             if ranked.calibration else "")
    st.caption(f"Ranking ready: {ranked.spec.label}{calib}, {len(ranked.ranking.modules)} "
               f"modules, made in {ranked.seconds:.1f} s. The slider re-prunes from it.")
    if ranked.approximate_at and ranked.approximate_at != f"{spec.sparsity:.0%} {spec.pattern}":
        c1, c2 = st.columns([4, 1])
        c1.warning(f"Sequential statistics were taken at {ranked.approximate_at}; at other "
                   "settings these masks approximate Wanda's.")
        if c2.button("Recalibrate here"):
            with ui.errors():
                bar, progress = ui.progress_bar("Recalibrating")
                ranked = ui.shared().make_ranking(loaded, corpus, spec, progress=progress)
                bar.empty()
    return ranked


def preview(loaded, corpus, state: service.SessionPruning) -> None:
    """Dense and pruned output of one held-out sentence, updated with every slider move: the
    pruned one streams in token by token, then both show where they differ."""
    src, tgt = parse_pair(state.spec.pair)
    item = eval_items(corpus, src, tgt, shots=state.spec.shots, limit=1)[0]
    with ui.lock_wait(loaded):
        dense = ui.shared().dense_generations(loaded, [item.prompt], service.PREVIEW_TOKENS)[0]
    st.markdown(f"**Live preview**: {service.pair_label(state.spec.pair)}, a held-out "
                f"sentence: *{item.source}*")
    label = f"{state.masks.pattern} {state.masks.target:.0%}"
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("Dense")
        dense_box = st.empty()
    with c2:
        st.markdown(f"Pruned · {state.masks.pattern} · {state.masks.target:.0%}")
        pruned_box = st.empty()
        if state.generated(item.prompt, service.PREVIEW_TOKENS) is None:
            with dense_box:  # shown while the pruned answer streams; highlighted after
                ui.output_box(dense, None, "dense", compact=True)
        out, seconds = ui.streamed_output(pruned_box, loaded, state, item.prompt,
                                          service.PREVIEW_TOKENS, label=label, compact=True)
        fa, fb = service.diff_flags(dense.tokens, out.tokens)
        with pruned_box:
            ui.output_box(out, fb, "pruned", compact=True, label=label)
        st.caption(f"generated in {seconds:.2f} s" if seconds > 0.01
                   else "from this session's cache")
    with dense_box:
        ui.output_box(dense, fa, "dense", compact=True)


def export_section(loaded, state: service.SessionPruning) -> None:
    ranked = state.ranking
    report = build_report(
        loaded, state.masks, spec=asdict(state.spec),
        calibration_texts=ranked.calibration.prompts.texts if ranked.calibration else None,
        timings={"calibrate_and_rank": ranked.seconds})
    slug = re.sub(r"[^A-Za-z0-9]+", "-", loaded.name).strip("-").lower()
    ui.default("w.export_dir", f"runs/{slug}-pruned")
    folder = st.text_input("Folder", key="w.export_dir")
    c1, c2, c3 = st.columns([1, 1, 2])
    overwrite = c3.checkbox("Overwrite if it exists", key="w.export_overwrite",
                            help="Replaces an earlier mlprune export in that folder; any "
                                 "other non-empty folder is refused and left as it is.")
    if c1.button("Export the pruned model"):
        with ui.errors() as ok, st.spinner("Writing safetensors, masks and report"):
            out = export_pruned(loaded, state.masks, folder, report, overwrite=overwrite)
        if ok.ok:
            st.success(f"Wrote {out} (weights, tokenizer, masks.safetensors, mlprune_report.json)")
    c2.download_button("Download the report (JSON)", json.dumps(report, indent=2,
                                                                 ensure_ascii=False),
                       file_name="mlprune_report.json", mime="application/json")
    note = service.dequant_text(loaded.dequantized_from)
    if note:
        st.caption(f"The report records it: {note}")


def main() -> None:
    ready = ui.page("Prune")
    if ready is None:
        return
    loaded, corpus = ready
    spec, sparsity, pattern = settings(loaded, corpus)
    with ui.errors() as ok:
        if spec.blocks == "none":
            raise MlpruneError("Pick at least one kind of module to prune (attn, mlp).")
        spec.validate()
        if spec.protect:
            Rule.parse(spec.protect)  # a bad rule is reported now, not after a calibration
        ranked = ranking(loaded, corpus, spec)
    if not ok.ok or ranked is None:
        return
    with ui.errors() as ok:
        start = time.perf_counter()
        masks = ranked.masks(sparsity, pattern)
        took = time.perf_counter() - start
    if not ok.ok:
        return
    state = ui.set_session_pruning(loaded, ranked, spec, masks)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Sparsity reached", f"{masks.overall_sparsity():.1%}",
              help="of the weights of the selected modules")
    m2.metric("Weights pruned", f"{sum(c.numel() for c in masks.pruned_cols.values()):,}")
    m3.metric("Masks built in", f"{took * 1000:.0f} ms", help="from the cached ranking")
    m4.metric("Protected weights pruned for N:M", masks.protected_pruned())
    with ui.errors():
        preview(loaded, corpus, state)
    q = loaded.dequantized_from
    ui.plot(plots.sparsity_figure(masks, dequantized_from=q))
    st.subheader("One module's mask")
    ui.valid_choice("w.mask_module", masks.modules)
    ui.default("w.mask_view", "whole")
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
    ui.plot(plots.mask_figure(masks, name, crop=crop, dequantized_from=q))
    with st.expander("Export"):
        with ui.errors():
            export_section(loaded, state)


main()
