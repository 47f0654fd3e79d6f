"""Compare: dense and pruned generations side by side, and chrF on a held-out slice; and
interventions on the features (zero, mean, scale chosen dims, or LRP2) against dense."""

from __future__ import annotations

import streamlit as st

from mlprune import plots, service, ui
from mlprune.corpus import language_name
from mlprune.evaluate import chrf, language_of
from mlprune.models import hidden_size
from mlprune.pipeline import PruneSpec
from mlprune.prompts import eval_items, parse_pair
from mlprune.zeroshot import BUILTIN_TASKS

KINDS = {"fewshot": "Few-shot translation from the corpus", "free": "Free text"}
SPEC_FIELDS = ("shots",)  # w.cmp_shots: demonstrations per prompt, as the spec's


def language_line(text: str, target: str | None, candidates: tuple[str, ...]) -> str:
    found = language_of(text, candidates)
    if found is None:
        return "no output"
    if target is None:
        return f"looks like {language_name(found)}"
    # material icons ship with Streamlit; emoji need a font the browser may not have
    mark = ":green[:material/check_circle:]" if found == target else ":red[:material/cancel:]"
    return f"{mark} {language_name(found)}" + ("" if found == target else
                                               f" (expected {language_name(target)})")


def choose_prompt(corpus, state: service.SessionPruning | None
                  ) -> tuple[str, str | None, str | None]:
    """The prompt, its target language and reference (None for free text)."""
    ui.default("w.cmp_kind", "fewshot")
    kind = st.radio("Prompt", list(KINDS), format_func=KINDS.get, key="w.cmp_kind",
                    horizontal=True)
    if kind == "free":
        ui.default("w.cmp_text", "English: The weather is nice today.\nFrench:")
        text = st.text_area("Free text (the model continues it to the end of the line)",
                            key="w.cmp_text", height=110)
        return text, None, None
    pairs = ui.all_pairs(corpus.languages)
    ui.valid_choice("w.cmp_pair", pairs, state.spec.pair if state else
                    ui.default_pairs(corpus.languages)[0])
    c1, c2, c3 = st.columns([1, 1, 4])
    pair = c1.selectbox("Direction", pairs, key="w.cmp_pair", format_func=ui.pair_label)
    shots = c2.number_input("Shots", 1, 16, step=1, key="w.cmp_shots")
    src, tgt = parse_pair(pair)
    items = eval_items(corpus, src, tgt, shots=int(shots))
    ui.default("w.cmp_item", 0)
    if st.session_state["w.cmp_item"] >= len(items):
        st.session_state["w.cmp_item"] = 0
    i = c3.selectbox("Held-out sentence", range(len(items)), key="w.cmp_item",
                     format_func=lambda k: items[k].source[:90])
    item = items[i]
    with st.expander("The prompt"):
        st.code(item.prompt, language=None)
    st.caption(f"Reference: {item.reference}")
    return item.prompt, tgt, item.reference


def dense_and_pruned_outputs(loaded, corpus, state: service.SessionPruning | None, prompt: str,
                             target: str | None, reference: str | None) -> None:
    """The two outputs of one prompt in boxes, their languages and chrF, and token
    probabilities."""
    ui.default("w.cmp_max_new", service.PREVIEW_TOKENS)  # the Prune preview's outputs reused
    max_new = st.slider("Max new tokens", 8, 128, step=8, key="w.cmp_max_new")
    with ui.lock_wait(loaded):
        dense = ui.shared().dense_generations(loaded, [prompt], max_new)[0]
    candidates = tuple(corpus.languages)
    out = None
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("#### Dense")
        dense_box = st.empty()
        with dense_box:  # highlighted once the pruned output is there
            ui.output_box(dense, None, "dense")
        st.markdown(f"Output language: {language_line(dense.text, target, candidates)}")
        if reference:
            st.caption(f"chrF vs reference: {chrf([dense.text], [reference]):.1f}")
    with c2:
        if state is None:
            st.markdown("#### Pruned")
            st.info("No pruned model in this session yet: choose settings on the Prune page.")
            st.page_link("pages/2_Prune.py", label="Go to Prune", icon=":material/content_cut:")
        else:
            st.markdown(f"#### Pruned · {state.spec.label} · {state.masks.pattern} · "
                        f"{state.masks.target:.0%}")
            label = f"{state.masks.pattern} {state.masks.target:.0%}"
            pruned_box = st.empty()
            out, _ = ui.streamed_output(pruned_box, loaded, state, prompt, max_new, label=label)
            fa, fb = ui.diff_flags(dense.tokens, out.tokens)
            with pruned_box:
                ui.output_box(out, fb, "pruned", label=label)
            with dense_box:
                ui.output_box(dense, fa, "dense")
            st.markdown(f"Output language: {language_line(out.text, target, candidates)}")
            if reference:
                st.caption(f"chrF vs reference: {chrf([out.text], [reference]):.1f}")
    if out is not None:
        n_diff = sum(fb)
        st.caption(f"{n_diff} of {len(out.tokens)} pruned tokens differ from the dense output "
                   "(highlighted); hover a token for its probability, dotted = p < 0.5.")
    ui.plot(plots.token_probs_figure(dense, out, dequantized_from=loaded.dequantized_from))


def held_out_scores(loaded, corpus, state: service.SessionPruning | None) -> None:
    """evaluate_translation on a held-out slice, dense and (with masks) pruned."""
    st.subheader("chrF on a held-out slice")
    pair = current_pair(corpus, state)
    tgt = parse_pair(pair)[1]
    shots = int(st.session_state["w.cmp_shots"])
    ui.default("w.cmp_limit", 8)
    c1, c2 = st.columns([1, 3])
    limit = int(c1.number_input("Sentences", 1, 500, step=1, key="w.cmp_limit"))
    key = (service.model_key(loaded), service.corpus_key(corpus), pair, limit, shots,
           state.version if state else 0)
    if c2.button(f"Score {ui.pair_label(pair)} on {limit} held-out sentences"):
        with ui.errors() as ok:
            bar, progress = ui.progress_bar("Scoring")
            result = ui.shared().translation_scores(loaded, corpus, pair,
                                                    state.masks if state else None,
                                                    shots=shots, limit=limit, progress=progress)
            bar.empty()
        if ok.ok:
            st.session_state["compare_scores"] = {"key": key, "result": result}
    scores = st.session_state.get("compare_scores")
    if scores and scores["key"] == key:
        result = scores["result"]
        cols = st.columns(4)
        for i, name in enumerate(n for n in ("dense", "pruned") if n in result):
            r = result[name]
            cols[2 * i].metric(f"chrF, {name}", f"{r['chrf']:.1f}")
            cols[2 * i + 1].metric(f"in {language_name(tgt)}, {name}",
                                   f"{r['target_language_rate']:.0%}")
        n = result["dense"]["n"]
        st.caption(f"{n} held-out sentences of {ui.pair_label(pair)}; greedy, one line.")
        if "significance" in result:
            st.markdown(significance_line(result["significance"]))


def significance_line(test: dict) -> str:
    """Pruned against dense, per metric: the scores, the difference and its p-value."""
    parts = [f"{r['metric']} {r['a']:.1f} → {r['b']:.1f} (pruned − dense {r['difference']:+.1f}, "
             f"**p = {r['p_value']:.3f}**)" for r in test.values()]
    first = next(iter(test.values()))
    return (f"Paired test on the same n = {first['n']} sentences (sacrebleu's paired bootstrap, "
            f"{first['n_samples']} resamples): " + "; ".join(parts) + ". A small p says the "
            "difference is unlikely to be chance; with few sentences only large ones get there.")


def current_pair(corpus, state: service.SessionPruning | None) -> str:
    """The direction the page's prompts and held-out slice use."""
    pair = st.session_state.get("w.cmp_pair") or (state.spec.pair if state else None)
    return pair or ui.default_pairs(corpus.languages)[0]


def intervention_choice(loaded, corpus, state: service.SessionPruning | None):
    """The intervention widgets, as a spec (None when the choice is "none")."""
    st.subheader("Intervene on the features")
    st.caption("Act on chosen residual dimensions at chosen layers while the dense model "
               "generates (this session's pruning is not applied): set them to zero, to their "
               "mean over the calibration prompts, or scale them; or add LRP2's language vector "
               "(English minus the source language) after one layer and subtract it after a "
               "later one. The control repeats the intervention on as many random ordinary "
               "dimensions.")
    ui.default("w.iv_kind", "none")
    kind = st.radio("Intervention", list(ui.INTERVENTION_KINDS), key="w.iv_kind",
                    format_func=ui.INTERVENTION_KINDS.get, horizontal=True)
    if kind == "none":
        return None
    n_layers, hidden = len(loaded.layers), hidden_size(loaded.model)
    captured = ui.features(loaded)
    dims, layers, factor, lrp2 = [], None, None, None
    c1, c2, c3 = st.columns([3, 2, 1])
    if kind == "lrp2":
        options = list(range(n_layers))
        ui.valid_choice("w.iv_project", options, n_layers // 4)
        ui.valid_choice("w.iv_restore", ["none", *options], (3 * n_layers) // 4)
        first = c1.selectbox("Project to English after layer", options, key="w.iv_project")
        second = c2.selectbox("Project back after layer", ["none", *options], key="w.iv_restore")
        lrp2 = (int(first), None if second == "none" else int(second))
    else:
        ui.follow_detected_dims(service.detected_union(captured), hidden)
        dims = c1.multiselect("Dimensions", list(range(hidden)), key=ui.INTERVENTION_DIMS,
                              help="prefilled with the Features page's detected set; click a "
                                   "dimension in its layer x dimension figure to add it")
        if n_layers > 1:
            ui.default("w.iv_layers", (0, n_layers - 1))
            layers = c2.slider("Layers (decoder layer outputs)", 0, n_layers - 1,
                               key="w.iv_layers")
        if kind == "scale":
            ui.default("w.iv_factor", 0.5)
            factor = float(c3.number_input("Factor", min_value=0.0, step=0.25, key="w.iv_factor",
                                           help="below 1 weakens, above 1 amplifies"))
        if captured is None:
            st.caption("Capture features on the Features page to prefill the dimensions with "
                       "the detected large ones.")
    ui.default("w.iv_limit", 8)
    ui.default("w.iv_control", True)
    ui.default("w.iv_task", "none")
    ui.default("w.iv_task_limit", 5)
    d1, d2, d3, d4 = st.columns([1, 1, 1, 1])
    limit = int(d1.number_input("Held-out sentences", 1, 500, step=1, key="w.iv_limit"))
    task = d2.selectbox("Zero-shot task", ["none", *BUILTIN_TASKS], key="w.iv_task")
    task_limit = int(d3.number_input("Items per language", 1, 170, step=1, key="w.iv_task_limit"))
    control = d4.toggle("Random-dims control", key="w.iv_control")
    return service.intervention_spec(
        kind, pair=current_pair(corpus, state), dims=list(dims), layers=layers, factor=factor,
        lrp2_layers=lrp2, shots=int(st.session_state["w.cmp_shots"]),
        samples=PruneSpec.preset(ui.SPEC_PRESET).samples, limit=limit, control=control,
        task=None if task == "none" else task, task_limit=task_limit,
        detect=captured.rule if captured else None)


def intervened_outputs(loaded, corpus, spec, prompt: str, target: str | None) -> None:
    """Dense and intervened outputs of the page's prompt, side by side."""
    max_new = int(st.session_state["w.cmp_max_new"])
    with ui.lock_wait(loaded):
        dense = ui.shared().dense_generations(loaded, [prompt], max_new)[0]
    bar, progress = ui.progress_bar("Intervening")
    out = ui.shared().intervened_generations(loaded, corpus, spec, [prompt], max_new,
                                             progress=progress)[0]
    bar.empty()
    built = ui.shared().intervention(loaded, corpus, spec)
    fa, fb = ui.diff_flags(dense.tokens, out.tokens)
    candidates = tuple(corpus.languages)
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("#### Dense")
        ui.output_box(dense, fa, "dense")
        st.markdown(f"Output language: {language_line(dense.text, target, candidates)}")
    with c2:
        iv = built.intervention
        where = f"{len(iv.dims)} layer{'s' if len(iv.dims) > 1 else ''}"
        st.markdown(f"#### Intervened · {iv.label} · {where}")
        ui.output_box(out, fb, "intervened")
        st.markdown(f"Output language: {language_line(out.text, target, candidates)}")
    st.caption(f"{sum(fb)} of {len(out.tokens)} intervened tokens differ from the dense output.")


def intervention_scores(loaded, corpus, spec) -> None:
    """Dense, intervened and control on the held-out slice (and a zero-shot slice)."""
    key = (service.model_key(loaded), service.corpus_key(corpus), spec)
    what = f"{spec.limit} held-out sentences" + (f" and {spec.tasks[0]}" if spec.tasks else "")
    if st.button(f"Score the intervention on {what}"):
        with ui.errors() as ok:
            bar, progress = ui.progress_bar("Scoring")
            report = ui.shared().intervention_scores(loaded, corpus, spec, progress=progress)
            bar.empty()
        if ok.ok:
            st.session_state["intervention_scores"] = {"key": key, "report": report}
    scores = st.session_state.get("intervention_scores")
    if not scores or scores["key"] != key:
        return
    report = scores["report"]
    runs = report["translation"]["runs"]
    cols = st.columns(len(runs))
    for col, (name, r) in zip(cols, runs.items()):
        col.metric(f"chrF, {name}", f"{r['chrf']:.1f}")
    for test in report["translation"]["tests"]:
        c = test["chrf"]
        st.markdown(f"chrF {test['b']} − {test['a']}: {c['difference']:+.1f} "
                    f"(**p = {c['p_value']:.3f}**, n = {c['n']})")
    for task, block in report["zeroshot"].items():
        rows = []
        for name, table in block["runs"].items():
            rows.append({"run": name, **{r["lang"]: r["accuracy"] for r in table}})
        st.markdown(f"**{task}**: accuracy per language ({block['n_items']} items each)")
        st.dataframe(rows, hide_index=True)
        for test in block["tests"]:
            r = next((r for r in test["rows"] if r["lang"] == "non-en"), test["rows"][0])
            st.markdown(f"{task} {test['b']} − {test['a']} ({r['lang']}): {r['diff']:+.3f} "
                        f"(**p = {r['p_value']:.3f}**, n = {r['n']})")
    st.caption(" ".join(report["notes"]))


def main() -> None:
    ready = ui.page("Compare dense and pruned")
    if ready is None:
        return
    loaded, corpus = ready
    state = ui.session_pruning(loaded)
    ui.default_all(ui.spec_defaults("cmp", SPEC_FIELDS))
    with ui.errors() as ok:
        prompt, target, reference = choose_prompt(corpus, state)
    if not ok.ok:
        return
    with ui.errors():
        dense_and_pruned_outputs(loaded, corpus, state, prompt, target, reference)
    with ui.errors():
        held_out_scores(loaded, corpus, state)
    st.divider()
    with ui.errors() as ok:
        spec = intervention_choice(loaded, corpus, state)
    if ok.ok and spec is not None:
        with ui.errors():
            intervened_outputs(loaded, corpus, spec, prompt, target)
        with ui.errors():
            intervention_scores(loaded, corpus, spec)


main()
