"""mlprune dashboard: the home page (model and corpus) and the navigation to the task pages.

Run it with ``streamlit run app.py``. The default model is the embedded Gemma 3 270M, or the
spec in the MLPRUNE_MODEL environment variable; the default corpus is the built-in one, or
the file in MLPRUNE_CORPUS.
"""

from __future__ import annotations

import os

import streamlit as st

from mlprune import MlpruneError, service, ui
from mlprune.corpus import flores_corpus, language_name, read_corpus
from mlprune.models import DEFAULT_MODEL, native_bfloat16, split_precision, with_precision
from mlprune.prompts import split_rows

SOURCES = {
    "embedded": "Embedded default: Gemma 3 270M",
    "hub": "Hugging Face hub id",
    "folder": "Local folder",
    "gguf": "GGUF file",
}
PLACEHOLDERS = {"hub": "google/gemma-3-270m", "folder": "/path/to/model-folder",
                "gguf": "/path/to/model.gguf"}
PRECISIONS = {"": "as saved (float32 for the embedded model: the reference)",
              "bfloat16": "bfloat16 (faster where the CPU or GPU has it)"}
CORPORA = {"builtin": "Built-in corpus", "upload": "Upload a file (TSV, CSV, JSONL)",
           "flores": "FLORES+ (needs the Hugging Face hub)"}


def model_section() -> None:
    st.header("Model")
    current, precision = split_precision(ui.model_spec())
    ui.default("w.model_source", ui.source_of(current))
    ui.default("w.model_precision", precision or "")
    for kind in PLACEHOLDERS:
        ui.default(f"w.model_{kind}", current if ui.source_of(current) == kind else "")
    source = st.radio("Where the model comes from", list(SOURCES), format_func=SOURCES.get,
                      key="w.model_source", horizontal=True)
    if source == "embedded":
        spec = DEFAULT_MODEL
        st.caption("Gemma 3 270M (base), shipped on PyPI as a Q4_K_M GGUF and de-quantized "
                   "once into a cached safetensors copy (~2 min the first time on 2 cores, seconds after).")
    else:
        spec = st.text_input(SOURCES[source], key=f"w.model_{source}",
                             placeholder=PLACEHOLDERS[source]).strip()
    precision = st.radio("Precision", list(PRECISIONS), format_func=PRECISIONS.get,
                         key="w.model_precision", horizontal=True,
                         help="bfloat16 halves the weights; on CPUs with native bf16 "
                              "(AVX512-BF16, AMX) and GPUs it decodes faster (1.8x at batch 8, "
                              "1.6x at batch 1 in the README's run). "
                              "float32 is the reference every figure in the README uses; an "
                              "explicit precision stays in the spec (model@bfloat16).")
    if precision == "bfloat16" and not native_bfloat16():
        st.caption("This machine has no native bfloat16 (no AVX512-BF16 or AMX, no GPU with "
                   "it): bfloat16 is emulated here and slower than float32.")
    if st.button("Load model", type="primary"):
        with ui.errors() as ok:
            if not spec:
                raise MlpruneError(f"Type a {SOURCES[source].lower()} first.")
            spec = with_precision(spec, precision)
            ui.loaded_model(spec)
        if ok.ok:
            ui.set_model_spec(spec)
    with ui.errors() as ok:
        loaded = ui.loaded_model()
    if not ok.ok:
        return
    facts = loaded.facts()
    st.subheader(facts["model"])
    cols = st.columns(6)
    n = facts["parameters"]
    cols[0].metric("Parameters", f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}")
    cols[1].metric("Layers", facts["layers"])
    cols[2].metric("Hidden size", facts["hidden_size"])
    cols[3].metric("Linear modules", facts["linear_modules"])
    cols[4].metric("Device", facts["device"])
    cols[5].metric("dtype", facts["dtype"])
    seconds = ui.shared().load_seconds(ui.model_spec())
    st.caption(f"Source: {facts['source']} ({ui.model_spec()})"
               + (f"; loaded in {seconds:.1f} s" if seconds is not None else ""))
    note = ui.dequant_text(loaded.dequantized_from)
    if note:
        st.warning(note)


def corpus_section() -> None:
    st.header("Corpus")
    ui.default("w.corpus_source", "builtin")
    choice = st.radio("Parallel corpus", list(CORPORA), format_func=CORPORA.get,
                      key="w.corpus_source", horizontal=True)
    if choice == "builtin":
        if os.environ.get(service.CORPUS_ENV):
            st.caption(f"{service.CORPUS_ENV} sets the default corpus here: "
                       f"{os.environ[service.CORPUS_ENV]}")
        if ui.corpus_origin() not in (None, "default"):
            if st.button("Use the built-in corpus"):
                with ui.errors() as ok:
                    corpus = service.default_corpus()
                if ok.ok:
                    ui.set_corpus(corpus, "default")
    elif choice == "upload":
        upload = st.file_uploader("One column per language, a header of language codes "
                                  "(en, fr, zh...), one aligned sentence per row",
                                  type=["tsv", "csv", "jsonl", "txt", "json"], key="corpus_upload")
        if upload is not None:
            marker = (upload.name, upload.size)
            if ui.corpus_origin() != marker:
                with ui.errors() as ok:
                    fmt = upload.name.rsplit(".", 1)[-1].lower() if "." in upload.name else "tsv"
                    corpus = read_corpus(upload.getvalue(), name=upload.name, fmt=fmt)
                if ok.ok:
                    ui.set_corpus(corpus, marker)
    else:
        if st.button("Load FLORES+ (dev split)"):
            with ui.errors() as ok, st.spinner("Fetching FLORES+ from the hub"):
                corpus = flores_corpus("dev")
            if ok.ok:
                ui.set_corpus(corpus, "flores")
    corpus = ui.require_corpus()
    if corpus is None:
        return
    pool, test = split_rows(corpus)
    st.subheader(f"{corpus.name}: {len(corpus)} aligned sentences")
    st.caption(f"{len(pool)} for demonstrations and calibration, {len(test)} held out for "
               "evaluation (a fixed split). Languages: "
               + ", ".join(f"{c} ({language_name(c)})" for c in corpus.languages))
    st.dataframe(corpus.table.head(8), hide_index=True)


def home() -> None:
    st.title("mlprune")
    st.markdown(
        "See the **large-magnitude features** of a multilingual LLM while it translates, and "
        "prune it with **Wanda calibrated on translation demonstrations** "
        "(Kim et al., EMNLP 2024 Findings). Pick a model and a corpus here, then: "
        "**Features** (which dimensions are large, per layer, token and language), "
        "**Prune** (method, sparsity, pattern, protection; live), **Compare** (dense and "
        "pruned side by side), **Sweep** (methods x sparsities x directions) and **Paper** "
        "(the authors' experiment grid on this model: each claim, what it finds, p-values).")
    model_section()
    corpus_section()


st.set_page_config(page_title="mlprune", page_icon=":scissors:", layout="wide")
ui.keep_widget_state()
navigation = st.navigation([
    st.Page(home, title="Home", icon=":material/home:", default=True),
    st.Page("pages/1_Features.py", title="Features", icon=":material/bar_chart:"),
    st.Page("pages/2_Prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/3_Compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/4_Sweep.py", title="Sweep", icon=":material/stacked_line_chart:"),
    st.Page("pages/5_Paper.py", title="Paper", icon=":material/article:"),
])
status = st.sidebar.container()  # filled after the page, so it shows what the page just did
navigation.run()
with status:
    ui.sidebar_status()
