"""Features: which hidden dimensions are large while the model translates."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from mlprune import plots, ui
from mlprune.features import overlap_matrix
from mlprune.prompts import analysis_prompts
from mlprune.protocol import PROTOCOLS, Protocol, get_protocol
from mlprune.service import FeatureCapture, detected_union
from mlprune.ui import comma_list, default_pairs, prompt_set_label

RULE_DEFAULTS = {"top-k": 4, "ratio": 100.0, "absolute": 100.0}
RULE_HELP = {"top-k": "the k largest dimensions of every layer",
             "ratio": "dimensions at least this many times the layer's median",
             "absolute": "dimensions whose magnitude is at least this value"}
SPEC_FIELDS = ("shots", "samples", "seed", "protocol")  # w.feat_shots ...: the sets' settings
PROTOCOL_HELP = {
    "clean": "demonstrations end with a newline; layers are the decoder layers' outputs; "
             "top 5 dimensions; overlap top-5% in top-5%",
    "paper": "the authors' setup: demonstrations end with the EOS token; layers numbered as "
             "output_hidden_states (0 = embedding output, the last after the final norm); "
             "top 20 dimensions; overlap top-40% in bottom-40%",
}


def detection(loaded, result: FeatureCapture) -> tuple[str, pd.DataFrame]:
    """The detection controls and the detected set (listed and downloadable)."""
    names = list(result.stats)
    ui.valid_choice("w.feat_set", names)
    ui.default("w.rule_kind", "ratio")
    for kind, value in RULE_DEFAULTS.items():
        ui.default(f"w.rule_{kind}", value)
    c1, c2, c3 = st.columns([2, 2, 2])
    name = c1.selectbox("Prompt set", names, format_func=prompt_set_label, key="w.feat_set")
    kind = c2.radio("Detection rule", list(RULE_DEFAULTS), key="w.rule_kind", horizontal=True)
    if kind == "top-k":
        value = c3.number_input("k per layer", 1, 64, step=1, key="w.rule_top-k",
                                help=RULE_HELP[kind])
    else:
        value = c3.number_input("ratio to the median" if kind == "ratio" else "magnitude",
                                min_value=0.001, step=10.0, key=f"w.rule_{kind}",
                                help=RULE_HELP[kind])
    rule = f"{kind}:{int(value) if kind == 'top-k' else value:g}"
    sites = result.stats[name].layer_view(result.numbering)[0]
    table = result.detect(name, rule)  # the Prune page protects these by default
    layers = table["layer"].nunique() if len(table) else 0
    m1, m2, m3 = st.columns(3)
    m1.metric("Detected dimensions", len(table), help=f"rule {rule} on {prompt_set_label(name)}")
    m2.metric("Layers with one", f"{layers} of {len(sites)}")
    m3.metric("Largest ratio to median",
              f"{table['ratio_to_median'].max():.0f}x" if len(table) else "-")
    with st.expander(f"The detected set ({len(table)} rows: layer, dim, magnitude, median, "
                     "ratio)", expanded=False):
        st.dataframe(table, hide_index=True, height=260)
    d1, d2, _ = st.columns([1, 1, 4])
    slug = name.replace(":", "_")
    d1.download_button("Download CSV", table.to_csv(index=False),
                       file_name=f"features-{slug}.csv", mime="text/csv")
    payload = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
               "prompt_set": name, "rule": rule, "dims": table.to_dict(orient="records")}
    d2.download_button("Download JSON", json.dumps(payload, indent=2),
                       file_name=f"features-{slug}.json", mime="application/json")
    return name, table


def layer_label(layer, protocol: Protocol, n_rows: int) -> str:
    """A layer choice as the protocol numbers it ("mean" is the mean over layers)."""
    if layer == "mean":
        return "mean over layers"
    if protocol.numbering == "hidden_states" and layer in (0, n_rows - 1):
        return f"layer {layer} ({'embeddings' if layer == 0 else 'after the final norm'})"
    return f"layer {layer}"


def figures(loaded, result: FeatureCapture, name: str, table: pd.DataFrame) -> None:
    """The capture's five views of set ``name``, one tab each."""
    tabs = st.tabs(["Top dimensions per layer", "Layer × dimension", "Tokens",
                    "Overlap across sets", "Two sets, dim by dim"])
    with tabs[0]:
        top_dims_tab(loaded, result, name)
    with tabs[1]:
        heatmap_tab(loaded, result, name, table)
    with tabs[2]:
        tokens_tab(loaded, result, name, table)
    with tabs[3]:
        overlap_tab(loaded, result, name)
    with tabs[4]:
        two_sets_tab(loaded, result, name)


def top_dims_tab(loaded, result: FeatureCapture, name: str) -> None:
    """The largest dimensions of every layer."""
    stats, protocol = result.stats[name], get_protocol(result.protocol)
    most = min(32, stats.hidden_norms.shape[1])
    ui.default(f"w.top_n_{protocol.name}", min(protocol.top_n, most))  # one per protocol
    n = st.slider("How many dimensions per layer", 1, most, key=f"w.top_n_{protocol.name}")
    ui.plot(plots.top_dims_figure(stats, n, title=f"Top {n} dimensions per layer "
                                                  f"({prompt_set_label(name)})",
                                  dequantized_from=loaded.dequantized_from,
                                  numbering=result.numbering))


def heatmap_tab(loaded, result: FeatureCapture, name: str, table: pd.DataFrame) -> None:
    """Magnitude per layer and dimension; a click adds a dimension to intervene on."""
    stats = result.stats[name]
    ui.plot(plots.layer_dim_heatmap(stats, table, title=f"Magnitude per layer and dimension "
                                    f"({prompt_set_label(name)}), detected circled",
                                    dequantized_from=loaded.dequantized_from,
                                    numbering=result.numbering),
            key="features_heatmap", on_select=ui.add_clicked_dims("features_heatmap"))
    hidden = stats.hidden_norms.shape[1]
    ui.follow_detected_dims(detected_union(result), hidden)
    st.multiselect("Dimensions to intervene on (the Compare page acts on them)",
                   list(range(hidden)), key=ui.INTERVENTION_DIMS,
                   help="starts as the detected set; click a dimension in the figure to add it")


def tokens_tab(loaded, result: FeatureCapture, name: str, table: pd.DataFrame) -> None:
    """Which tokens of one prompt carry the large values at one layer."""
    n_layers = result.stats[name].n_layers
    texts = result.prompts[name].texts
    ui.default("w.tok_prompt", 0)
    ui.default("w.tok_layer", n_layers // 2)
    ui.default("w.tok_only_detected", True)
    st.session_state["w.tok_prompt"] = min(st.session_state["w.tok_prompt"], len(texts) - 1)
    st.session_state["w.tok_layer"] = min(st.session_state["w.tok_layer"], n_layers - 1)
    if result.numbering != "sites" or result.prompts[name].segments is not None:
        st.caption("This view reads the prompt as text, one row per decoder layer's output "
                   "(layer l here is layer l + 1 of the paper's numbering); an EOS between "
                   "demonstrations shows as the text <eos>, not the token.")
    c1, c2, c3 = st.columns([1, 2, 2])
    idx = c1.number_input("Prompt", 0, len(texts) - 1, step=1, key="w.tok_prompt")
    layer = c2.slider("Layer", 0, n_layers - 1, key="w.tok_layer")
    only = c3.toggle("Only the detected dimensions", key="w.tok_only_detected")
    dims = sorted(set(table["dim"].astype(int))) if only and len(table) else None
    with ui.errors():
        with ui.lock_wait(loaded):
            tokens, mags = ui.shared().tokens(loaded, texts[idx])
        ui.plot(plots.token_figure(tokens, mags, layer, dims,
                                   title=f"Which tokens carry the large values "
                                         f"({prompt_set_label(name)}, prompt {idx}, layer {layer})",
                                   dequantized_from=loaded.dequantized_from))


def n_rows_of(result: FeatureCapture, name: str) -> int:
    """How many layers set ``name``'s figures show: the paper's numbering has L + 1."""
    return len(result.stats[name].layer_view(result.numbering)[0])


def overlap_tab(loaded, result: FeatureCapture, name: str) -> None:
    """How much the sets' large dimensions overlap, as a matrix."""
    names = list(result.stats)
    if len(names) < 2:
        st.info("Capture at least two sets (directions or languages) to compare them.")
        return
    protocol, n_rows = get_protocol(result.protocol), n_rows_of(result, name)
    # measure and x start from the protocol's (one widget each per protocol)
    measure_key, pct_key = f"w.ov_measure_{protocol.name}", f"w.ov_fraction_{protocol.name}"
    ui.default(measure_key, protocol.overlap)
    ui.default(pct_key, round(protocol.overlap_fraction * 100))
    ui.default("w.ov_layer", "mean")
    c1, c2, c3 = st.columns(3)
    measure = c1.radio("Measure", list(plots.OVERLAP_MEASURES), key=measure_key,
                       format_func=lambda m: m.replace("_", " ")
                       + (" (the paper's)" if m == "top_in_bottom" else ""),
                       help="; ".join(f"{m.replace('_', ' ')}: {h}"
                                      for m, h in plots.OVERLAP_MEASURES.items()))
    pct = c2.slider("x (% of dimensions)", 1, 50, key=pct_key)
    layer_options = ["mean", *range(n_rows)]
    ui.valid_choice("w.ov_layer", layer_options)
    where = c3.selectbox("Layer", layer_options, key="w.ov_layer",
                         format_func=lambda v: layer_label(v, protocol, n_rows))
    layer = None if where == "mean" else int(where)
    with ui.errors():
        matrix = overlap_matrix(result.stats, pct / 100, measure, layer, result.numbering)
        matrix.index = matrix.columns = [prompt_set_label(n) for n in names]
        ui.plot(plots.overlap_figure(matrix, measure, pct / 100, layer,
                                     dequantized_from=loaded.dequantized_from))


def two_sets_tab(loaded, result: FeatureCapture, name: str) -> None:
    """Two sets' magnitudes at one layer, dimension by dimension."""
    names = list(result.stats)
    if len(names) < 2:
        st.info("Capture at least two sets to compare them dimension by dimension.")
        return
    n_rows = n_rows_of(result, name)
    ui.valid_choice("w.cmp_a", names, names[0])
    ui.valid_choice("w.cmp_b", names, names[1])
    ui.default("w.cmp_layer", n_rows // 2)
    st.session_state["w.cmp_layer"] = min(st.session_state["w.cmp_layer"], n_rows - 1)
    c1, c2, c3 = st.columns(3)
    a = c1.selectbox("First set", names, format_func=prompt_set_label, key="w.cmp_a")
    b = c2.selectbox("Second set", names, format_func=prompt_set_label, key="w.cmp_b")
    layer = c3.slider("Layer", 0, n_rows - 1, key="w.cmp_layer")
    ui.plot(plots.direction_compare_figure(result.stats[a], result.stats[b],
                                           prompt_set_label(a), prompt_set_label(b), layer,
                                           dequantized_from=loaded.dequantized_from,
                                           numbering=result.numbering))


def main() -> None:
    ready = ui.page("Large-magnitude features")
    if ready is None:
        return
    loaded, corpus = ready
    st.caption("A few hidden dimensions carry magnitudes hundreds of times the layer's median "
               "while the model reads translation demonstrations. Capture some prompt sets, "
               "then detect and compare them. Corpus languages: "
               + ", ".join(corpus.languages) + ".")
    ui.default("w.directions", ", ".join(default_pairs(corpus.languages)))
    ui.default("w.baselines", ", ".join(
        [x for x in ("en", "fr", "zh") if x in corpus.languages] or corpus.languages[:1]))
    ui.default_all(ui.spec_defaults("feat", SPEC_FIELDS))
    c1, c2, c3, c4, c5, c6 = st.columns([3, 2, 1, 1, 1, 1])
    directions = c1.text_input("Translation directions (src-tgt, comma-separated)",
                               key="w.directions")
    baselines = c2.text_input("Monolingual baselines (languages)", key="w.baselines")
    shots = c3.number_input("Shots", 1, 16, step=1, key="w.feat_shots",
                            help="demonstrations per prompt")
    samples = c4.number_input("Samples", 1, 128, step=1, key="w.feat_samples",
                              help="prompts per set")
    seed = c5.number_input("Seed", 0, 10_000, step=1, key="w.feat_seed",
                           help="which demonstrations each prompt draws")
    protocol = c6.radio("Protocol", list(PROTOCOLS), key="w.feat_protocol",
                        help="; ".join(f"{p}: {h}" for p, h in PROTOCOL_HELP.items()))
    if st.button("Run capture", type="primary"):
        with ui.errors() as ok:
            sets = analysis_prompts(corpus, comma_list(directions), comma_list(baselines),
                                    shots=int(shots), samples=int(samples), seed=int(seed),
                                    separator=get_protocol(protocol).separator)
            bar, progress = ui.progress_bar("Capturing")
            result = ui.shared().capture(loaded, sets, progress=progress, protocol=protocol)
            bar.empty()
        if ok.ok:
            ui.set_features(result)
    result = ui.features(loaded)
    if result is None:
        st.info("Press **Run capture**: one pass of forward hooks over each prompt set "
                "(cached, so a second time is instant).")
        return
    st.caption(f"{len(result.stats)} sets captured in {result.seconds:.1f} s under the "
               f"{result.protocol} protocol ({PROTOCOL_HELP[result.protocol]}): "
               + ", ".join(prompt_set_label(n) for n in result.stats))
    if protocol != result.protocol:
        st.info(f"The sets below were captured under the {result.protocol} protocol; press "
                f"**Run capture** to capture them under {protocol}.")
    name, table = detection(loaded, result)
    figures(loaded, result, name, table)


main()
