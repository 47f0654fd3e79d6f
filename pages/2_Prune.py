"""Prune: pick a method and settings, move the sparsity slider, watch the pruned output.

Every widget of a PruneSpec field is ``w.prune_<field>``, and its label, help and choices are
the field's metadata in :mod:`mlprune.spec` (:func:`spec_widget`): no choice list or help text
is typed here. Its first value is the interactive preset's (``ui.spec_defaults``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict

import streamlit as st

from mlprune import MlpruneError, plots, service, ui
from mlprune.export import build_report, export_pruned
from mlprune.features import Rule
from mlprune.prompts import eval_items
from mlprune.spec import (
    BLOCKS,
    CUSTOM_MIX,
    MIX_HELP,
    MIX_PREFIX,
    OTHER_PATTERN,
    PARTS,
    PruneSpec,
    parse_pair,
    spec_field,
)

# Widgets w.prune_<field> that start from the interactive preset (ui.spec_defaults).
SPEC_FIELDS = ("method", "calibration", "mode", "sparsity", "pattern", "invert", "protect",
               "shots", "samples", "seed", "protocol", "allocation", "allocation_range",
               "outlier_threshold")
# Boxes for what a field's free choice holds: a typed mix, a typed N:M, the protect rule.
OWN_WIDGETS = ("mix", "pattern_other", "protect_rule")
PROTECT_RULE = "top-k:4"  # the rule box's text when the Features page has chosen none
CHOOSE_CALIBRATION = ("wanda", "m-wanda")  # ratio always uses translation vs code


def spec_widget(where, widget: str, name: str, **kwargs):
    """The Streamlit ``widget`` (``selectbox``, ``slider``...) of PruneSpec's field ``name``
    in ``where`` (a column, or ``st``), keyed ``w.prune_<name>``: its label, help and, for a
    choice, its options come from the field's metadata; ``kwargs`` add the rest (bounds,
    options a corpus or model decides)."""
    field = spec_field(name)
    if "choices" in field:
        kwargs.setdefault("options", list(field["choices"]))
    return getattr(where, widget)(field["label"], key=f"w.prune_{name}", help=field["help"],
                                  **kwargs)


def first_values(loaded, corpus, pairs: list[str]) -> None:
    """Each widget's first value: the interactive preset's, where it decides one."""
    n_layers = len(loaded.layers)
    captured = ui.features(loaded)
    first = captured.pairs[0] if captured and captured.pairs else None
    ui.valid_choice("w.prune_pair", pairs, first or ui.default_pairs(corpus.languages)[0])
    ui.default_all(ui.spec_defaults("prune", SPEC_FIELDS))
    ui.default("w.prune_pattern_other", "1:4")
    to_english = [p for p in pairs if p.endswith("-en")][:3]
    ui.default("w.prune_mix", MIX_PREFIX + ",".join(f"{p}=1" for p in to_english))
    parts = ui.spec_defaults("prune", ("mwanda_parts",))["w.prune_mwanda_parts"]
    ui.default("w.prune_mwanda_parts", [p for p in parts.split(",") if p])
    ui.default("w.prune_protect_rule", captured.rule if captured and captured.rule
               else PROTECT_RULE)
    ui.default("w.prune_blocks", list(BLOCKS))  # all of them, as the spec's blocks=None means
    layers = st.session_state.get("w.prune_layers")
    if not layers or layers[1] > n_layers - 1:
        st.session_state["w.prune_layers"] = (0, n_layers - 1)


def calibration_row(pairs: list[str]) -> dict:
    """Method, calibration set, direction and calibration mode."""
    c1, c2, c3, c4 = st.columns(4)
    method = spec_widget(c1, "selectbox", "method")
    calibration = spec_widget(c2, "selectbox", "calibration",
                              format_func=spec_field("calibration")["choices"].get,
                              disabled=method not in CHOOSE_CALIBRATION)
    if calibration == CUSTOM_MIX:
        calibration = c2.text_input("Mix (set=weight, ...)", key="w.prune_mix",
                                    help=MIX_HELP).strip()
    pair = spec_widget(c3, "selectbox", "pair", options=pairs, format_func=ui.pair_label)
    mode = spec_widget(c4, "radio", "mode", horizontal=True)
    return {"method": method, "pair": pair, "mode": mode,
            "calibration": calibration if method in CHOOSE_CALIBRATION else "mt"}


def pattern_row() -> dict:
    """Sparsity, pattern and the protection of detected features."""
    c1, c2, c3 = st.columns([2, 1, 2])
    pattern = spec_widget(c2, "radio", "pattern")
    if pattern == OTHER_PATTERN:
        pattern = c2.text_input("N:M", key="w.prune_pattern_other").strip()
    structured = pattern != "unstructured"
    sparsity = spec_widget(c1, "slider", "sparsity", min_value=0, max_value=95, step=5,
                           disabled=structured)
    if structured and re.fullmatch(r"\d+:\d+", pattern):
        n, m = (int(x) for x in pattern.split(":"))
        c1.caption(f"{pattern}: {n} of every {m} consecutive inputs pruned"
                   + (f" ({n / m:.0%})" if m else ""))
    protect = spec_widget(c3, "toggle", "protect")
    protect_rule = c3.text_input("Detection rule", key="w.prune_protect_rule",
                                 disabled=not protect,
                                 help="top-k:4, ratio:100 or absolute:500 (the Features page's "
                                      "rule is the default)")
    return {"sparsity": sparsity / 100, "pattern": pattern,
            "protect": protect_rule.strip() if protect else None}


def module_row(n_layers: int, method: str) -> dict:
    """Which layers and module kinds are pruned, how sparsity is shared across layers, and
    M-Wanda's parts."""
    c1, c2, c3 = st.columns([2, 2, 2])
    lo, hi = spec_widget(c1, "slider", "layers", min_value=0, max_value=n_layers - 1)
    blocks = spec_widget(c2, "multiselect", "blocks")
    allocation = spec_widget(c3, "radio", "allocation", horizontal=True)
    mwanda_parts = ",".join(PARTS)
    if method == "m-wanda":
        mwanda_parts = ",".join(spec_widget(st, "multiselect", "mwanda_parts")) or "none"
    return {"layers": f"{lo}-{hi}", "blocks": ",".join(blocks) if blocks else "none",
            "allocation": allocation, "mwanda_parts": mwanda_parts}


def more_settings() -> dict:
    """The expander's settings: shots, prompts, seed, protocol, invert, OWL's lambda and M."""
    with st.expander("More settings", expanded=st.session_state["w.prune_protocol"] != "clean"):
        e1, e2, e3, e4, e5, e6 = st.columns(6)
        shots = spec_widget(e1, "number_input", "shots", min_value=1, max_value=16, step=1)
        samples = spec_widget(e2, "number_input", "samples", min_value=1, max_value=256, step=1)
        seed = spec_widget(e3, "number_input", "seed", min_value=0, max_value=10_000, step=1)
        protocol = spec_widget(e4, "radio", "protocol")
        invert = spec_widget(e5, "toggle", "invert")
        allocation_range = spec_widget(e6, "slider", "allocation_range", min_value=0.0,
                                       max_value=0.3, step=0.01)
        outlier_threshold = spec_widget(e6, "number_input", "outlier_threshold",
                                        min_value=0.5, max_value=100.0, step=0.5)
        if protocol == "paper":
            st.caption("The paper protocol sets the calibration prompts' separator (EOS). The "
                       "mode and the number of prompts stay as chosen here, one-shot and few "
                       "to keep this page live; the authors' run is sequential with 100 prompts "
                       "(pick them above, or `mlprune prune --protocol paper`).")
    return {"shots": int(shots), "samples": int(samples), "seed": int(seed),
            "protocol": protocol, "invert": invert, "allocation_range": float(allocation_range),
            "outlier_threshold": float(outlier_threshold)}


def settings(loaded, corpus) -> tuple[PruneSpec, float, str]:
    """The widgets; returns the spec, the sparsity and the pattern."""
    pairs = ui.all_pairs(corpus.languages)
    first_values(loaded, corpus, pairs)
    chosen = calibration_row(pairs)
    chosen.update(pattern_row())
    chosen.update(module_row(len(loaded.layers), chosen["method"]))
    chosen.update(more_settings())
    spec = PruneSpec(**chosen)
    return spec, spec.sparsity, spec.pattern


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
    st.markdown(f"**Live preview**: {ui.pair_label(state.spec.pair)}, a held-out "
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
        fa, fb = ui.diff_flags(dense.tokens, out.tokens)
        with pruned_box:
            ui.output_box(out, fb, "pruned", compact=True, label=label)
        st.caption(f"generated in {seconds:.2f} s" if seconds > 0.01
                   else "from this session's cache")
    with dense_box:
        ui.output_box(dense, fa, "dense", compact=True)


def export_section(loaded, state: service.SessionPruning) -> None:
    """Write the pruned model (weights, masks, report) to a folder, or download the report."""
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
    note = ui.dequant_text(loaded.dequantized_from)
    if note:
        st.caption(f"The report records it: {note}")


def main() -> None:
    """The page: settings, the ranking they need, then metrics, preview, figures, export."""
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
