"""Features: which hidden dimensions are large while the model translates."""

from __future__ import annotations

import json
import time

import streamlit as st

from mlprune import MlpruneError, plots
from mlprune import dashboard as db
from mlprune.features import detect, overlap_matrix
from mlprune.prompts import monolingual_prompts, parse_pair, translation_prompts

RULE_DEFAULTS = {"top-k": 4, "ratio": 100.0, "absolute": 100.0}
RULE_HELP = {"top-k": "the k largest dimensions of every layer",
             "ratio": "dimensions at least this many times the layer's median",
             "absolute": "dimensions whose magnitude is at least this value"}


def set_label(name: str) -> str:
    """'mt:fr-en' -> 'fr→en', 'mono:en' -> 'en (mono)'."""
    kind, _, rest = name.partition(":")
    return db.pair_label(rest) if kind == "mt" else f"{rest} (mono)" if kind == "mono" else name


def prompt_sets(corpus, directions: str, baselines: str, shots: int, samples: int) -> list:
    """The translation and monolingual prompt sets the settings name."""
    pairs = [p.strip().replace("→", "-") for p in directions.split(",") if p.strip()]
    langs = [x.strip() for x in baselines.split(",") if x.strip()]
    if not pairs and not langs:
        raise MlpruneError("Name at least one direction (e.g. fr-en) or monolingual language.")
    sets = [translation_prompts(corpus, *parse_pair(p), shots=shots, samples=samples)
            for p in pairs]
    sets += [monolingual_prompts(corpus, lang, shots=shots, samples=samples) for lang in langs]
    return sets


def run_capture(loaded, sets) -> dict:
    bar = st.progress(0.0, text="Capturing")
    start, stats = time.perf_counter(), {}
    for i, ps in enumerate(sets):
        def step(done, total, i=i, ps=ps):
            bar.progress((i + done / total) / len(sets),
                         text=f"Capturing {set_label(ps.name)}: batch {done}/{total}")
        stats[ps.name] = db.stats_for(loaded, ps, progress=step)
    bar.empty()
    return {"model": db.model_key(loaded), "stats": stats,
            "prompts": {ps.name: ps for ps in sets}, "seconds": time.perf_counter() - start}


def detection(loaded, result) -> tuple[str, str, object]:
    """The detection controls and the detected set (listed and downloadable)."""
    names = list(result["stats"])
    db.valid_choice("w.feat_set", names)
    db.default("w.rule_kind", "ratio")
    for kind, value in RULE_DEFAULTS.items():
        db.default(f"w.rule_{kind}", value)
    c1, c2, c3 = st.columns([2, 2, 2])
    name = c1.selectbox("Prompt set", names, format_func=set_label, key="w.feat_set")
    kind = c2.radio("Detection rule", list(RULE_DEFAULTS), key="w.rule_kind", horizontal=True)
    if kind == "top-k":
        value = c3.number_input("k per layer", 1, 64, step=1, key="w.rule_top-k",
                                help=RULE_HELP[kind])
    else:
        value = c3.number_input("ratio to the median" if kind == "ratio" else "magnitude",
                                min_value=0.001, step=10.0, key=f"w.rule_{kind}",
                                help=RULE_HELP[kind])
    rule = f"{kind}:{int(value) if kind == 'top-k' else value:g}"
    stats = result["stats"][name]
    table = detect(stats, rule)
    st.session_state["rule"] = rule  # the Prune page protects these by default
    layers = table["layer"].nunique() if len(table) else 0
    m1, m2, m3 = st.columns(3)
    m1.metric("Detected dimensions", len(table), help=f"rule {rule} on {set_label(name)}")
    m2.metric("Layers with one", f"{layers} of {stats.n_layers}")
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
    return name, rule, table


def figures(loaded, result, name: str, table) -> None:
    q = loaded.dequantized_from
    stats = result["stats"][name]
    names = list(result["stats"])
    n_layers = stats.n_layers
    tabs = st.tabs(["Top dimensions per layer", "Layer × dimension", "Tokens",
                    "Overlap across sets", "Two sets, dim by dim"])
    with tabs[0]:
        db.default("w.top_n", 5)
        n = st.slider("How many dimensions per layer", 1, 10, key="w.top_n")
        db.plot(plots.top_dims_figure(stats, n, title=f"Top {n} dimensions per layer "
                                                      f"({set_label(name)})", dequantized_from=q))
    with tabs[1]:
        db.plot(plots.layer_dim_heatmap(stats, table, title=f"Magnitude per layer and dimension "
                                        f"({set_label(name)}), detected circled",
                                        dequantized_from=q))
    with tabs[2]:
        texts = result["prompts"][name].texts
        db.default("w.tok_prompt", 0)
        db.default("w.tok_layer", n_layers // 2)
        db.default("w.tok_only_detected", True)
        st.session_state["w.tok_prompt"] = min(st.session_state["w.tok_prompt"], len(texts) - 1)
        st.session_state["w.tok_layer"] = min(st.session_state["w.tok_layer"], n_layers - 1)
        c1, c2, c3 = st.columns([1, 2, 2])
        idx = c1.number_input("Prompt", 0, len(texts) - 1, step=1, key="w.tok_prompt")
        layer = c2.slider("Layer", 0, n_layers - 1, key="w.tok_layer")
        only = c3.toggle("Only the detected dimensions", key="w.tok_only_detected")
        dims = sorted(set(table["dim"].astype(int))) if only and len(table) else None
        with db.errors():
            tokens, mags = db.tokens_for(loaded, texts[idx])
            db.plot(plots.token_figure(tokens, mags, layer, dims,
                                       title=f"Which tokens carry the large values "
                                             f"({set_label(name)}, prompt {idx}, layer {layer})",
                                       dequantized_from=q))
    with tabs[3]:
        if len(names) < 2:
            st.info("Capture at least two sets (directions or languages) to compare them.")
        else:
            db.default("w.ov_measure", "top_in_top")
            db.default("w.ov_fraction", 5)
            db.default("w.ov_layer", "mean")
            c1, c2, c3 = st.columns(3)
            measure = c1.radio("Measure", list(plots.OVERLAP_MEASURES), key="w.ov_measure",
                               format_func=lambda m: m.replace("_", " "))
            pct = c2.slider("x (% of dimensions)", 1, 25, key="w.ov_fraction")
            layer_options = ["mean", *range(n_layers)]
            db.valid_choice("w.ov_layer", layer_options)
            where = c3.selectbox("Layer", layer_options, key="w.ov_layer",
                                 format_func=lambda v: "mean over layers" if v == "mean"
                                 else f"layer {v}")
            layer = None if where == "mean" else int(where)
            with db.errors():
                matrix = overlap_matrix(result["stats"], pct / 100, measure, layer)
                matrix.index = matrix.columns = [set_label(n) for n in names]
                db.plot(plots.overlap_figure(matrix, measure, pct / 100, layer,
                                             dequantized_from=q))
    with tabs[4]:
        if len(names) < 2:
            st.info("Capture at least two sets to compare them dimension by dimension.")
        else:
            db.valid_choice("w.cmp_a", names, names[0])
            db.valid_choice("w.cmp_b", names, names[1])
            db.default("w.cmp_layer", n_layers // 2)
            st.session_state["w.cmp_layer"] = min(st.session_state["w.cmp_layer"], n_layers - 1)
            c1, c2, c3 = st.columns(3)
            a = c1.selectbox("First set", names, format_func=set_label, key="w.cmp_a")
            b = c2.selectbox("Second set", names, format_func=set_label, key="w.cmp_b")
            layer = c3.slider("Layer", 0, n_layers - 1, key="w.cmp_layer")
            db.plot(plots.direction_compare_figure(result["stats"][a], result["stats"][b],
                                                   set_label(a), set_label(b), layer,
                                                   dequantized_from=q))


def main() -> None:
    ready = db.page("Large-magnitude features")
    if ready is None:
        return
    loaded, corpus = ready
    st.caption("A few hidden dimensions carry magnitudes hundreds of times the layer's median "
               "while the model reads translation demonstrations. Capture some prompt sets, "
               "then detect and compare them. Corpus languages: "
               + ", ".join(corpus.languages) + ".")
    db.default("w.directions", ", ".join(db.default_pairs(corpus.languages)))
    db.default("w.baselines", ", ".join(
        [x for x in ("en", "fr", "zh") if x in corpus.languages] or corpus.languages[:1]))
    db.default("w.feat_shots", 4)
    db.default("w.feat_samples", 8)
    c1, c2, c3, c4 = st.columns([3, 2, 1, 1])
    directions = c1.text_input("Translation directions (src-tgt, comma-separated)",
                               key="w.directions")
    baselines = c2.text_input("Monolingual baselines (languages)", key="w.baselines")
    shots = c3.number_input("Shots", 1, 16, step=1, key="w.feat_shots",
                            help="demonstrations per prompt")
    samples = c4.number_input("Samples", 1, 128, step=1, key="w.feat_samples",
                              help="prompts per set")
    if st.button("Run capture", type="primary"):
        with db.errors() as ok:
            sets = prompt_sets(corpus, directions, baselines, int(shots), int(samples))
            result = run_capture(loaded, sets)
        if ok.ok:
            st.session_state["features"] = result
    result = st.session_state.get("features")
    if result is None or result["model"] != db.model_key(loaded):
        st.info("Press **Run capture**: one pass of forward hooks over each prompt set "
                "(cached, so a second time is instant).")
        return
    st.caption(f"{len(result['stats'])} sets captured in {result['seconds']:.1f} s: "
               + ", ".join(set_label(n) for n in result["stats"]))
    name, _, table = detection(loaded, result)
    figures(loaded, result, name, table)


main()
