"""Compare: dense and pruned generations side by side, and chrF on a held-out slice."""

from __future__ import annotations

import streamlit as st

from mlprune import dashboard as db
from mlprune import plots
from mlprune.corpus import language_name
from mlprune.evaluate import chrf, language_of, target_language_rate
from mlprune.prompts import eval_items, parse_pair

KINDS = {"fewshot": "Few-shot translation from the corpus", "free": "Free text"}


def box(inner: str, kind: str) -> str:
    return (f'<div class="mlp-out" data-kind="{kind}" style="border:1px solid #d8dde6;'
            'border-radius:6px;padding:.6em .9em;font-size:1.1em;line-height:1.9;'
            f'min-height:3em">{inner}</div>')


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


def choose_prompt(corpus, state) -> tuple[str, str | None, str | None]:
    """The prompt, its target language and reference (None for free text)."""
    db.default("w.cmp_kind", "fewshot")
    kind = st.radio("Prompt", list(KINDS), format_func=KINDS.get, key="w.cmp_kind",
                    horizontal=True)
    if kind == "free":
        db.default("w.cmp_text", "English: The weather is nice today.\nFrench:")
        text = st.text_area("Free text (the model continues it to the end of the line)",
                            key="w.cmp_text", height=110)
        return text, None, None
    pairs = db.all_pairs(corpus.languages)
    db.valid_choice("w.cmp_pair", pairs, state.spec.pair if state else
                    db.default_pairs(corpus.languages)[0])
    db.default("w.cmp_shots", 4)
    c1, c2, c3 = st.columns([1, 1, 4])
    pair = c1.selectbox("Direction", pairs, key="w.cmp_pair", format_func=db.pair_label)
    shots = c2.number_input("Shots", 1, 16, step=1, key="w.cmp_shots")
    src, tgt = parse_pair(pair)
    items = eval_items(corpus, src, tgt, shots=int(shots))
    db.default("w.cmp_item", 0)
    if st.session_state["w.cmp_item"] >= len(items):
        st.session_state["w.cmp_item"] = 0
    i = c3.selectbox("Held-out sentence", range(len(items)), key="w.cmp_item",
                     format_func=lambda k: items[k].source[:90])
    item = items[i]
    with st.expander("The prompt"):
        st.code(item.prompt, language=None)
    st.caption(f"Reference: {item.reference}")
    return item.prompt, tgt, item.reference


def side_by_side(loaded, corpus, state, prompt: str, target: str | None,
                 reference: str | None) -> None:
    db.default("w.cmp_max_new", db.PREVIEW_TOKENS)  # the Prune preview's outputs are reused
    max_new = st.slider("Max new tokens", 8, 128, step=8, key="w.cmp_max_new")
    dense = db.dense_generations(loaded, [prompt], max_new)[0]
    out = None
    if state is not None:
        gens, seconds = db.session_pruned_generations(loaded, state, [prompt], max_new)
        out = gens[0]
    fa, fb = db.diff_flags(dense.tokens, out.tokens if out else dense.tokens)
    candidates = tuple(corpus.languages)
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("#### Dense")
        st.markdown(box(db.generation_html(dense, fa if out else None), "dense"),
                    unsafe_allow_html=True)
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
            st.markdown(box(db.generation_html(out, fb), "pruned"), unsafe_allow_html=True)
            st.markdown(f"Output language: {language_line(out.text, target, candidates)}")
            if reference:
                st.caption(f"chrF vs reference: {chrf([out.text], [reference]):.1f}")
    if out is not None:
        n_diff = sum(fb)
        st.caption(f"{n_diff} of {len(out.tokens)} pruned tokens differ from the dense output "
                   "(highlighted); hover a token for its probability, dotted = p < 0.5.")
    db.plot(plots.token_probs_figure(dense, out, dequantized_from=loaded.dequantized_from))


def held_out_scores(loaded, corpus, state) -> None:
    st.subheader("chrF on a held-out slice")
    pair = st.session_state.get("w.cmp_pair") or (state.spec.pair if state else None)
    if pair is None:
        pair = db.default_pairs(corpus.languages)[0]
    src, tgt = parse_pair(pair)
    db.default("w.cmp_limit", 8)
    c1, c2 = st.columns([1, 3])
    limit = c1.number_input("Sentences", 1, 500, step=1, key="w.cmp_limit")
    key = (db.model_key(loaded), pair, int(limit), state.version if state else 0,
           st.session_state.get("w.cmp_shots", 4))
    if c2.button(f"Score {db.pair_label(pair)} on {int(limit)} held-out sentences"):
        with db.errors() as ok:
            items = eval_items(corpus, src, tgt, shots=int(st.session_state.get("w.cmp_shots", 4)),
                               limit=int(limit))
            prompts, refs = [it.prompt for it in items], [it.reference for it in items]
            bar, counts, _ = db.progress_bar("Dense")
            dense = db.dense_generations(loaded, prompts, 48, progress=counts)
            rows = {"dense": [g.text for g in dense]}
            bar.empty()
            if state is not None:
                bar, counts, _ = db.progress_bar("Pruned")
                rows["pruned"] = [g.text for g in db.pruned_generations(
                    loaded, state.masks, prompts, 48, progress=counts)]
                bar.empty()
            result = {name: {"chrf": chrf(h, refs),
                             "target": target_language_rate(h, tgt, tuple(corpus.languages))}
                      for name, h in rows.items()}
        if ok.ok:
            st.session_state["score"] = {"key": key, "result": result, "n": len(refs)}
    score = st.session_state.get("score")
    if score and score["key"] == key:
        cols = st.columns(4)
        for i, (name, r) in enumerate(score["result"].items()):
            cols[2 * i].metric(f"chrF, {name}", f"{r['chrf']:.1f}")
            cols[2 * i + 1].metric(f"in {language_name(tgt)}, {name}", f"{r['target']:.0%}")
        st.caption(f"{score['n']} held-out sentences of {db.pair_label(pair)}; greedy, one line.")


def main() -> None:
    ready = db.page("Compare dense and pruned")
    if ready is None:
        return
    loaded, corpus = ready
    state = db.session_pruned(loaded)
    with db.errors() as ok:
        prompt, target, reference = choose_prompt(corpus, state)
    if not ok.ok:
        return
    with db.errors():
        side_by_side(loaded, corpus, state, prompt, target, reference)
    with db.errors():
        held_out_scores(loaded, corpus, state)


main()
