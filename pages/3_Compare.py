"""Compare: dense and pruned generations side by side, and chrF on a held-out slice."""

from __future__ import annotations

import streamlit as st

from mlprune import plots, service, ui
from mlprune.corpus import language_name
from mlprune.evaluate import chrf, language_of
from mlprune.prompts import eval_items, parse_pair

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
    pairs = service.all_pairs(corpus.languages)
    ui.valid_choice("w.cmp_pair", pairs, state.spec.pair if state else
                    service.default_pairs(corpus.languages)[0])
    c1, c2, c3 = st.columns([1, 1, 4])
    pair = c1.selectbox("Direction", pairs, key="w.cmp_pair", format_func=service.pair_label)
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
    dense = ui.shared().dense_generations(loaded, [prompt], max_new)[0]
    out = state.generations(loaded, [prompt], max_new)[0][0] if state is not None else None
    fa, fb = service.diff_flags(dense.tokens, out.tokens if out else dense.tokens)
    candidates = tuple(corpus.languages)
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("#### Dense")
        ui.output_box(dense, fa if out else None, "dense")
        st.markdown(f"Output language: {language_line(dense.text, target, candidates)}")
        if reference:
            st.caption(f"chrF vs reference: {chrf([dense.text], [reference]):.1f}")
    with c2:
        if out is None:
            st.markdown("#### Pruned")
            st.info("No pruned model in this session yet: choose settings on the Prune page.")
            st.page_link("pages/2_Prune.py", label="Go to Prune", icon=":material/content_cut:")
        else:
            st.markdown(f"#### Pruned · {state.spec.label} · {state.masks.pattern} · "
                        f"{state.masks.target:.0%}")
            ui.output_box(out, fb, "pruned")
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
    pair = st.session_state.get("w.cmp_pair") or (state.spec.pair if state else None)
    if pair is None:
        pair = service.default_pairs(corpus.languages)[0]
    tgt = parse_pair(pair)[1]
    shots = int(st.session_state["w.cmp_shots"])
    ui.default("w.cmp_limit", 8)
    c1, c2 = st.columns([1, 3])
    limit = int(c1.number_input("Sentences", 1, 500, step=1, key="w.cmp_limit"))
    key = (service.model_key(loaded), service.corpus_key(corpus), pair, limit, shots,
           state.version if state else 0)
    if c2.button(f"Score {service.pair_label(pair)} on {limit} held-out sentences"):
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
        st.caption(f"{n} held-out sentences of {service.pair_label(pair)}; greedy, one line.")
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


main()
