"""The dashboard driven by Streamlit's AppTest on a tiny random model, and its figure builders.

Every page: widgets changed, buttons pressed, figures present, bad input shown as one
message (never an exception). And shared state: two sessions never see each other's masks,
and the shared model is dense whenever no session is generating with its masks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EN
from streamlit.testing.v1 import AppTest

from mlprune import MlpruneError, models, plots, prune, service, sweeps, ui
from mlprune.capture import Cancelled, capture, token_magnitudes
from mlprune.evaluate import Generation, generate
from mlprune.features import detect, overlap_matrix
from mlprune.models import load_model
from mlprune.pipeline import PruneSpec
from mlprune.prompts import (
    analysis_prompts,
    eval_items,
    monolingual_prompts,
    translation_prompts,
)
from mlprune.prune import rank_modules

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # AppTest's default is 3 s; a first tiny-model load or ranking takes longer


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def app_env(monkeypatch, tiny_folder, corpus_file):
    """The app's default model is the tiny llama folder and its corpus the small en/fr file;
    the Paper page's verdict tab reads no shipped verdict (a test gives it one)."""
    monkeypatch.setenv(service.MODEL_ENV, str(tiny_folder))
    monkeypatch.setenv(service.CORPUS_ENV, str(corpus_file))
    monkeypatch.setenv("MLPRUNE_VERDICT", str(tiny_folder / "no-verdict-here"))
    return tiny_folder


def new_app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)


def run(at: AppTest) -> AppTest:
    at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def goto(at: AppTest, page: str) -> AppTest:
    return run(at.switch_page(f"pages/{page}.py"))


def click(at: AppTest, label: str) -> AppTest:
    matches = [b for b in at.button if b.label.startswith(label)]
    assert matches, f"no button '{label}' in {[b.label for b in at.button]}"
    matches[0].click()
    return run(at)


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def values(data) -> list:
    """A plotly JSON array, plain or base64-typed (plotly >= 6 writes numbers as bdata)."""
    if isinstance(data, dict) and "bdata" in data:
        import base64

        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"]).tolist()
    return list(data)


def grid(data) -> list[list[float]]:
    """A plotly 2-D array (a heatmap's z), plain or base64-typed with its shape."""
    if isinstance(data, dict) and "bdata" in data:
        shape = [int(n) for n in str(data["shape"]).split(",")]
        return np.array(values(data)).reshape(shape).tolist()
    return [[float(v) for v in row] for row in data]


def chart_titles(at: AppTest) -> list[str]:
    return [c["layout"].get("title", {}).get("text", "") for c in charts(at)]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def outputs(at: AppTest) -> dict[str, str]:
    """The dense/pruned/intervened output boxes' HTML by kind."""
    found = {}
    for m in at.markdown:
        for kind in ("dense", "pruned", "intervened"):
            if f'data-kind="{kind}"' in m.value:
                found[kind] = m.value
    return found


def tokens_of(box: str) -> list[tuple[str, str]]:
    """(probability, token) pairs of an output box, without the diff highlighting."""
    import re

    return re.findall(r'title="p = ([0-9.]+)">(.*?)</span>', box)


def finish(at: AppTest, job_key: str = "sweep_job", timeout: float = 300) -> AppTest:
    """Rerun the page until the work it started in a worker process has ended (the browser
    gets those reruns from the page's polling fragment)."""
    job = at.session_state[job_key]
    job = getattr(job, "job", job)  # the Sweep page keeps its job in a SweepRun
    assert job.wait(timeout), f"still running after {timeout} s: {job.stage}"
    return run(at)


def pruned_app(sparsity: int = 70) -> AppTest:
    """A session that has ranked the default settings and pruned at ``sparsity``."""
    at = goto(run(new_app()), "2_Prune")
    if any(b.label == "Calibrate and rank" for b in at.button):
        click(at, "Calibrate and rank")
    at.slider(key="w.prune_sparsity").set_value(sparsity)
    return run(at)


def dense_weights(folder) -> dict[str, torch.Tensor]:
    return dict(load_model(str(folder)).model.state_dict())


# --------------------------------------------------------------------------- home


def test_home_shows_the_model_facts_and_the_corpus(app_env):
    at = run(new_app())
    assert metric(at, "Layers") == "2" and metric(at, "Hidden size") == "32"
    assert metric(at, "dtype") == "float32" and metric(at, "Device") == "cpu"
    assert at.radio(key="w.model_source").value == "folder"  # preselected from the spec
    assert any("enfr.tsv: 20 aligned sentences" in s.value for s in at.subheader)
    assert at.dataframe and not errors(at)
    captions = [c.value for c in at.caption]
    assert "none: the model is dense" in captions  # the sidebar's status


def test_home_loads_the_model_in_bfloat16_when_asked(app_env):
    at = run(new_app())
    assert at.radio(key="w.model_precision").value == ""  # as saved: float32 here
    at.radio(key="w.model_precision").set_value("bfloat16")
    run(at)
    warned = any("no native bfloat16" in c.value for c in at.caption)
    assert warned != models.native_bfloat16()  # said only where bf16 would be emulated
    click(at, "Load model")
    assert not errors(at) and metric(at, "dtype") == "bfloat16"
    assert any(c.value.endswith(", bfloat16") for c in at.caption)  # the sidebar says so too
    assert at.session_state["model_spec"].endswith("@bfloat16")
    assert next(ui.shared().model(at.session_state["model_spec"]).model.parameters()).dtype \
        == torch.bfloat16
    at = goto(at, "2_Prune")  # the pages prune and generate with the bf16 copy
    click(at, "Calibrate and rank")
    assert not errors(at) and outputs(at).get("pruned")
    at = run(at.switch_page("app.py"))
    assert at.radio(key="w.model_precision").value == "bfloat16"  # preselected from the spec
    at.radio(key="w.model_precision").set_value("")
    click(at, "Load model")
    assert metric(at, "dtype") == "float32" and "@" not in at.session_state["model_spec"]


def test_the_embedded_default_is_preselected_without_the_variable(monkeypatch):
    monkeypatch.delenv(service.MODEL_ENV, raising=False)
    at = AppTest.from_string(
        "from mlprune import ui\nimport streamlit as st\nst.write(ui.model_spec())")
    at.run()
    assert at.markdown[0].value == "embedded:gemma3-270m"


def test_a_model_that_cannot_be_found_is_one_message_and_the_page_stays(app_env, tmp_path):
    at = run(new_app())
    at.text_input(key="w.model_folder").set_value(str(tmp_path / "no-such-model"))
    click(at, "Load model")
    assert len(errors(at)) == 1 and "No model folder" in errors(at)[0]
    assert metric(at, "Layers") == "2"  # the session keeps its working model
    at.radio(key="w.model_source").set_value("gguf")
    run(at)
    at.text_input(key="w.model_gguf").set_value(str(tmp_path / "missing.gguf"))
    click(at, "Load model")
    assert errors(at) == [f"No GGUF file at {tmp_path / 'missing.gguf'}."]
    at.text_input(key="w.model_gguf").set_value("")
    click(at, "Load model")
    assert errors(at) == ["Type a gguf file first."]


def test_corpus_upload_flores_and_bad_files(app_env, monkeypatch):
    def offline(split="dev", langs=None):
        raise MlpruneError("FLORES+ could not be loaded: the Hugging Face hub is not reachable.")

    monkeypatch.setattr("mlprune.corpus.flores_corpus", offline)
    at = run(new_app())
    at.radio(key="w.corpus_source").set_value("upload")
    run(at)
    text = "en,de\n" + "".join(f'"{e}","{e} (de)"\n' for e in EN)
    at.file_uploader[0].set_value(("ende.csv", text.encode(), "text/csv"))
    run(at)
    assert any("ende.csv: 20 aligned sentences" in s.value for s in at.subheader)
    assert not errors(at)
    at.file_uploader[0].set_value(("broken.tsv", b"en\tfr\nonly one field\n", "text/plain"))
    run(at)
    assert errors(at) == ["Row 2 of 'broken.tsv' has 1 fields but the header has 2."]
    assert any("ende.csv" in s.value for s in at.subheader)  # the good corpus stays
    at.radio(key="w.corpus_source").set_value("flores")
    run(at)
    click(at, "Load FLORES+")
    assert len(errors(at)) == 1 and errors(at)[0].startswith("FLORES+ could not be loaded")
    at.radio(key="w.corpus_source").set_value("builtin")
    run(at)
    click(at, "Use the built-in corpus")  # MLPRUNE_CORPUS stands in for the built-in one
    assert any("enfr.tsv" in s.value for s in at.subheader)


# --------------------------------------------------------------------------- features


def test_features_capture_figures_thresholds_and_downloads(app_env):
    at = goto(run(new_app()), "1_Features")
    assert not at.get("plotly_chart")
    click(at, "Run capture")
    titles = chart_titles(at)
    assert len(titles) == 5
    assert titles[0].startswith("Top 5 dimensions per layer (fr→en)")
    assert "Magnitude per layer and dimension" in titles[1]
    assert "Which tokens carry the large values" in titles[2]
    assert "(x = 5%, mean over layers)" in titles[3]
    assert titles[4].startswith("fr→en vs en→fr, dimension by dimension")
    heatmap = charts(at)[1]
    assert heatmap["data"][0]["type"] == "heatmap"
    # thresholds update the detected set at once: top-k:2 on 2 layers is 4 dims
    at.radio(key="w.rule_kind").set_value("top-k")
    run(at)
    at.number_input(key="w.rule_top-k").set_value(2)
    run(at)
    assert metric(at, "Detected dimensions") == "4"
    captured = at.session_state[ui.FEATURES]
    assert captured.rule == "top-k:2" and len(captured.detected) == 4
    detected = charts(at)[1]["data"][1]  # the circled dims on the heatmap
    assert len(values(detected["x"])) == 4
    assert [d.label for d in at.get("download_button")] == ["Download CSV", "Download JSON"]
    at.selectbox(key="w.feat_set").set_value("mono:en")
    at.slider(key="w.top_n_clean").set_value(3)
    at.radio(key="w.ov_measure_clean").set_value("top_in_bottom")
    at.selectbox(key="w.ov_layer").set_value(1)
    at.toggle(key="w.tok_only_detected").set_value(False)
    run(at)
    titles = chart_titles(at)
    assert titles[0].startswith("Top 3 dimensions per layer (en (mono))")
    assert "bottom-x% (x = 5%, layer 1)" in titles[3]
    goto(at, "2_Prune")  # the Prune page protects what the Features page detected
    assert at.text_input(key="w.prune_protect_rule").value == "top-k:2"


def test_features_under_the_paper_protocol(app_env):
    """Paper: EOS-separated prompt sets, layers numbered as output_hidden_states (L + 1 rows:
    the embedding output first, the final norm last), top 20 dims, and the paper's overlap
    measure (top-40% in bottom-40%) by default; top-in-top stays one click away."""
    at = goto(run(new_app()), "1_Features")
    assert at.radio(key="w.feat_protocol").value == "clean"  # the interactive preset's
    at.radio(key="w.feat_protocol").set_value("paper")
    click(at, "Run capture")
    captured = at.session_state[ui.FEATURES]
    assert captured.protocol == "paper" and captured.numbering == "hidden_states"
    assert all(ps.segments is not None and ps.meta["separator"] == "eos"
               for ps in captured.prompts.values())
    stats = captured.stats["mt:fr-en"]
    n_rows = stats.n_layers + 1
    top, heatmap = charts(at)[0], charts(at)[1]
    assert top["layout"]["title"]["text"].startswith("Top 20 dimensions per layer (fr→en)")
    assert len(top["data"]) == 20 and sorted(set(values(top["data"][0]["x"]))) == \
        list(range(n_rows))
    assert "0 = embeddings" in heatmap["layout"]["yaxis"]["title"]["text"]
    assert len(grid(heatmap["data"][0]["z"])) == n_rows
    # the first row is the embedding output, the last the final norm's
    sites, norms = stats.layer_view("hidden_states")
    assert (sites[0], sites[-1]) == ("embed", "final_norm")
    assert metric(at, "Layers with one").endswith(f"of {n_rows}")
    titles = chart_titles(at)
    assert "bottom-x% (x = 40%, mean over layers)" in titles[3]
    expected = overlap_matrix(captured.stats, 0.4, "top_in_bottom", numbering="hidden_states")
    np.testing.assert_allclose(grid(charts(at)[3]["data"][0]["z"]), expected.to_numpy())
    at.radio(key="w.ov_measure_paper").set_value("top_in_top")
    at.slider(key="w.ov_fraction_paper").set_value(50)
    at.selectbox(key="w.ov_layer").set_value(n_rows - 1)  # after the final norm
    run(at)
    assert f"top-x% (x = 50%, layer {n_rows - 1})" in chart_titles(at)[3]
    expected = overlap_matrix(captured.stats, 0.5, "top_in_top", n_rows - 1, "hidden_states")
    np.testing.assert_allclose(grid(charts(at)[3]["data"][0]["z"]), expected.to_numpy())
    assert any("paper protocol" in c.value for c in at.caption)  # the sidebar says so
    # back to clean without capturing again: the figures stay those of the paper capture
    at.radio(key="w.feat_protocol").set_value("clean")
    run(at)
    assert any("captured under the paper protocol" in i.value for i in at.info)
    assert chart_titles(at)[0].startswith("Top 20 dimensions")
    click(at, "Run capture")
    captured = at.session_state[ui.FEATURES]
    assert captured.protocol == "clean" and captured.prompts["mt:fr-en"].segments is None
    assert chart_titles(at)[0].startswith("Top 5 dimensions")
    assert len(grid(charts(at)[1]["data"][0]["z"])) == stats.n_layers


def test_features_bad_input_is_one_message(app_env):
    at = goto(run(new_app()), "1_Features")
    at.text_input(key="w.directions").set_value("fr-en, zh-en")
    click(at, "Run capture")
    assert errors(at) == ["The corpus 'enfr.tsv' has no column for zh; it has en, fr."]
    at.text_input(key="w.directions").set_value("fr")
    click(at, "Run capture")
    assert errors(at) == ["'fr' is not a language pair; write it as src-tgt, e.g. fr-en."]
    at.text_input(key="w.directions").set_value("fr→en")
    at.number_input(key="w.feat_shots").set_value(16)
    click(at, "Run capture")
    assert "16 shots need 16 demonstration sentences" in errors(at)[0]
    at.number_input(key="w.feat_shots").set_value(2)
    click(at, "Run capture")  # and the page still works
    assert not errors(at) and len(at.get("plotly_chart")) == 5


# --------------------------------------------------------------------------- prune


def test_prune_slider_re_prunes_without_a_pass_over_data(app_env, monkeypatch):
    import mlprune.pipeline as pipeline

    at = goto(run(new_app()), "2_Prune")
    at.number_input(key="w.prune_samples").set_value(5)  # settings no other test ranked
    run(at)
    assert any("need scores ranked once" in i.value for i in at.info)
    click(at, "Calibrate and rank")
    assert metric(at, "Sparsity reached") == "50.0%"
    assert len(charts(at)) == 2 and set(outputs(at)) == {"dense", "pruned"}
    calls = {"capture": 0, "rank": 0}
    real_capture, real_rank = pipeline.capture, pipeline.rank_modules

    def counting_capture(*a, **k):
        calls["capture"] += 1
        return real_capture(*a, **k)

    def counting_rank(*a, **k):
        calls["rank"] += 1
        return real_rank(*a, **k)

    monkeypatch.setattr(pipeline, "capture", counting_capture)
    monkeypatch.setattr(pipeline, "rank_modules", counting_rank)
    for value, reached in ((70, "68.8%"), (25, "25.0%"), (60, "59.4%")):
        at.slider(key="w.prune_sparsity").set_value(value)
        run(at)
        assert metric(at, "Sparsity reached") == reached  # exact per row: int(32 * s) / 32
        assert f"reached {reached}" in chart_titles(at)[0]
        assert any(f"Pruned · unstructured · {value}%" in m.value for m in at.markdown)
    at.radio(key="w.prune_pattern").set_value("2:4")
    run(at)
    assert metric(at, "Sparsity reached") == "50.0%"
    assert calls == {"capture": 0, "rank": 0}  # masks came from the cached ranking
    state = at.session_state[ui.PRUNING]
    assert state.masks.pattern == "2:4" and state.spec.pattern == "2:4"


def test_prune_preview_streams_the_pruned_answer_then_highlights_it(app_env, monkeypatch):
    at = pruned_app(50)
    drawn = []  # every box the pages draw: (kind, finished?, tokens)
    real = ui.output_box

    def recording(gen, differs, kind, **kw):
        drawn.append((kind, kw.get("done", True), list(gen.tokens)))
        real(gen, differs, kind, **kw)

    monkeypatch.setattr(ui, "output_box", recording)
    at.slider(key="w.prune_sparsity").set_value(65)
    run(at)
    state = at.session_state[ui.PRUNING]
    final = state.generated(eval_items(at.session_state["corpus"], "fr", "en",
                                       shots=state.spec.shots, limit=1)[0].prompt,
                            service.PREVIEW_TOKENS)
    pruned = [(done, tokens) for kind, done, tokens in drawn if kind == "pruned"]
    streaming = [tokens for done, tokens in pruned if not done]
    # token by token: one growing box per token, then the finished one
    assert [len(t) for t in streaming] == list(range(1, len(final.tokens) + 1))
    assert all(t == final.tokens[:len(t)] for t in streaming)
    assert pruned[-1] == (True, final.tokens)
    assert [done for kind, done, _ in drawn if kind == "dense"] == [True, True]  # then highlighted
    box = outputs(at)["pruned"]
    assert 'data-state="done"' in box and 'data-label="unstructured 65%"' in box
    assert "generated in" in " ".join(c.value for c in at.caption)
    assert prune.applied_masks(ui.shared().model(str(app_env)).model) is None  # dense again
    drawn.clear()
    at.radio(key="w.mask_view").set_value("crop")  # same masks: read back, not streamed again
    run(at)
    assert [(k, d) for k, d, _ in drawn] == [("pruned", True), ("dense", True)]  # each once
    assert "from this session's cache" in " ".join(c.value for c in at.caption)


def test_prune_impossible_patterns_and_empty_selections_are_messages(app_env):
    at = pruned_app(50)
    at.radio(key="w.prune_pattern").set_value("other N:M")
    run(at)
    at.text_input(key="w.prune_pattern_other").set_value("3:7")
    run(at)
    assert errors(at) == ["3:7 needs input widths divisible by 7, but layers.0.attn.q has 32 "
                          "inputs."]
    at.text_input(key="w.prune_pattern_other").set_value("5:4")
    run(at)
    assert errors(at) == ["In the pattern 5:4, N must be at least 1 and smaller than M."]
    at.text_input(key="w.prune_pattern_other").set_value("1:4")
    run(at)
    assert not errors(at) and metric(at, "Sparsity reached") == "25.0%"
    at.multiselect(key="w.prune_blocks").set_value([])
    run(at)
    assert errors(at) == ["Pick at least one kind of module to prune (attn, mlp)."]
    at.multiselect(key="w.prune_blocks").set_value(["mlp"])
    at.toggle(key="w.prune_protect").set_value(True)
    run(at)
    at.text_input(key="w.prune_protect_rule").set_value("top-k:0")
    run(at)
    assert errors(at) == ["The value in 'top-k:0' must be a positive integer."]


def test_prune_protection_layers_mask_view_and_export(app_env, tmp_path):
    at = goto(run(new_app()), "2_Prune")
    at.toggle(key="w.prune_protect").set_value(True)
    run(at)
    at.text_input(key="w.prune_protect_rule").set_value("top-k:3")
    at.slider(key="w.prune_layers").set_value((1, 1))
    at.radio(key="w.prune_mode").set_value("sequential")
    run(at)
    click(at, "Calibrate and rank")
    state = at.session_state[ui.PRUNING]
    assert state.masks.modules == [f"layers.1.{m}" for m in
                                   ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate",
                                    "mlp.up", "mlp.down")]
    assert int(state.masks.protected["layers.1.attn.q"].sum()) == 3
    at.selectbox(key="w.mask_module").set_value("layers.1.mlp.up")
    run(at)
    title = chart_titles(at)[1]
    assert title.startswith("layers.1.mlp.up") and "3 protected input columns" in title
    at.radio(key="w.mask_view").set_value("crop")
    run(at)
    assert "one cell per weight" in chart_titles(at)[1]
    at.slider(key="w.prune_sparsity").set_value(60)
    run(at)
    assert any("Sequential statistics were taken at 50%" in w.value for w in at.warning)
    click(at, "Recalibrate here")
    at.text_input(key="w.export_dir").set_value(str(tmp_path / "out"))
    click(at, "Export the pruned model")
    report = json.loads((tmp_path / "out" / "mlprune_report.json").read_text())
    assert report["spec"]["protect"] == "top-k:3" and report["spec"]["sparsity"] == 0.6
    assert any("Wrote" in s.value for s in at.success)
    click(at, "Export the pruned model")  # it exists now: one message, not a traceback
    assert errors(at) == [f"{tmp_path / 'out'} already exists; choose another folder or allow "
                          "overwriting."]
    assert [d.label for d in at.get("download_button")] == ["Download the report (JSON)"]


def test_prune_under_the_paper_protocol_keeps_the_live_mode(app_env, tmp_path):
    at = goto(run(new_app()), "2_Prune")
    at.radio(key="w.prune_protocol").set_value("paper")
    run(at)
    assert any("authors' run is sequential with 100 prompts" in c.value for c in at.caption)
    click(at, "Calibrate and rank")
    state = at.session_state[ui.PRUNING]
    assert state.spec.protocol == "paper" and state.spec.mode == "one-shot"
    assert state.spec.samples == PruneSpec.preset(ui.SPEC_PRESET).samples
    assert state.ranking.calibration.prompts.segments is not None  # EOS-separated
    assert any("paper protocol" in c.value for c in at.caption)  # ranking and sidebar
    at.text_input(key="w.export_dir").set_value(str(tmp_path / "out"))
    click(at, "Export the pruned model")
    report = json.loads((tmp_path / "out" / "mlprune_report.json").read_text())
    assert (report["spec"]["protocol"], report["spec"]["mode"]) == ("paper", "one-shot")


def test_spec_defaults_are_the_presets_fields_in_widget_units():
    preset = PruneSpec.preset(ui.SPEC_PRESET)
    fields = tuple(f.name for f in dataclasses.fields(PruneSpec))
    defaults = ui.spec_defaults("x", fields)
    assert list(defaults) == [f"w.x_{name}" for name in fields]
    for name in fields:
        value = defaults[f"w.x_{name}"]
        if name == "sparsity":
            assert value / 100 == preset.sparsity
        elif name == "protect":
            assert value is (preset.protect is not None)
        else:
            assert value == getattr(preset, name), name
    # the preset, not the bare spec's defaults
    assert defaults["w.x_mode"] == preset.mode != PruneSpec().mode


def test_every_page_starts_from_the_interactive_preset(app_env):
    """No page types a spec default: untouched widgets give the preset's spec, and the
    Features page's seed picks the demonstrations."""
    preset = PruneSpec.preset(ui.SPEC_PRESET)
    at = goto(run(new_app()), "2_Prune")
    if any(b.label == "Calibrate and rank" for b in at.button):
        click(at, "Calibrate and rank")
    spec = at.session_state[ui.PRUNING].spec
    assert (spec.layers, spec.blocks) == ("0-1", "attn,mlp")  # every layer and module kind
    assert replace(spec, layers=None, blocks=None) == preset
    goto(at, "4_Sweep")
    assert (at.session_state["w.sw_samples"], at.session_state["w.sw_shots"]) == \
        (preset.samples, preset.shots)
    goto(at, "3_Compare")
    assert at.session_state["w.cmp_shots"] == preset.shots
    goto(at, "1_Features")
    assert [at.session_state[f"w.feat_{f}"] for f in ("shots", "samples", "seed")] == \
        [preset.shots, preset.samples, preset.seed]
    at.number_input(key="w.feat_seed").set_value(preset.seed + 3)
    click(at, "Run capture")
    texts = at.session_state[ui.FEATURES].prompts["mt:fr-en"].texts
    corpus = at.session_state["corpus"]
    expected = analysis_prompts(corpus, ["fr-en"], [], shots=preset.shots,
                                samples=preset.samples, seed=preset.seed + 3)[0].texts
    unseeded = analysis_prompts(corpus, ["fr-en"], [], shots=preset.shots,
                                samples=preset.samples, seed=preset.seed)[0].texts
    assert texts == expected and texts != unseeded


# --------------------------------------------------------------------------- compare


def test_compare_side_by_side_language_and_chrf(app_env):
    at = pruned_app(70)
    goto(at, "3_Compare")
    boxes = outputs(at)
    assert set(boxes) == {"dense", "pruned"}
    assert 'title="p = ' in boxes["pruned"]  # per-token probability on hover
    assert sum("Output language" in m.value for m in at.markdown) == 2
    assert any("Pruned · wanda-mt · unstructured · 70%" in m.value for m in at.markdown)
    assert chart_titles(at) == ["Probability of each generated token"]
    at.selectbox(key="w.cmp_item").set_value(2)
    run(at)
    at.number_input(key="w.cmp_limit").set_value(3)
    run(at)
    click(at, "Score fr→en on 3 held-out sentences")
    assert {m.label for m in at.metric} >= {"chrF, dense", "chrF, pruned", "in English, dense",
                                            "in English, pruned"}
    scores = at.session_state["compare_scores"]["result"]
    line = next(m.value for m in at.markdown if m.value.startswith("Paired test"))
    assert "n = 3 sentences" in line and "1000 resamples" in line
    for key in ("chrf", "bleu"):
        test = scores["significance"][key]
        assert f"p = {test['p_value']:.3f}" in line and f"{test['difference']:+.1f}" in line
        assert test["a"] == pytest.approx(scores["dense"][key])
    at.radio(key="w.cmp_kind").set_value("free")
    run(at)
    at.text_area(key="w.cmp_text").set_value("French: Bonjour.\nEnglish:")
    run(at)
    assert set(outputs(at)) == {"dense", "pruned"}
    assert any("looks like" in m.value or "no output" in m.value for m in at.markdown)


def test_compare_without_masks_shows_the_dense_side_and_a_way_to_prune(app_env):
    at = goto(run(new_app()), "3_Compare")
    assert set(outputs(at)) == {"dense"}
    assert any("No pruned model in this session yet" in i.value for i in at.info)


def test_compare_intervenes_on_the_features_dims_side_by_side_with_scores(app_env):
    at = goto(run(new_app()), "1_Features")
    click(at, "Run capture")
    at.radio(key="w.rule_kind").set_value("top-k")
    run(at)
    at.number_input(key="w.rule_top-k").set_value(2)
    run(at)
    detected = sorted(set(at.session_state[ui.FEATURES].detected["dim"].astype(int)))
    assert at.multiselect(key=ui.INTERVENTION_DIMS).value == detected  # prefilled
    goto(at, "3_Compare")
    assert set(outputs(at)) == {"dense"}  # no intervention until one is chosen
    at.radio(key="w.iv_kind").set_value("scale")
    run(at)
    assert at.multiselect(key=ui.INTERVENTION_DIMS).value == detected
    at.multiselect(key=ui.INTERVENTION_DIMS).set_value([3, 7])
    at.number_input(key="w.iv_factor").set_value(40.0)
    run(at)
    boxes = outputs(at)
    assert set(boxes) == {"dense", "intervened"} and boxes["dense"] != boxes["intervened"]
    assert any("Intervened · scale x40" in m.value for m in at.markdown)
    at.number_input(key="w.iv_limit").set_value(2)
    at.selectbox(key="w.iv_task").set_value("wordorder")
    at.number_input(key="w.iv_task_limit").set_value(1)
    run(at)
    click(at, "Score the intervention on 2 held-out sentences and wordorder")
    assert {"chrF, dense", "chrF, intervened", "chrF, control"} <= {m.label for m in at.metric}
    report = at.session_state["intervention_scores"]["report"]
    assert report["intervention"]["dims"] == {"layers.0.resid_post": [3, 7],
                                              "layers.1.resid_post": [3, 7]}
    lines = [m.value for m in at.markdown if m.value.startswith("chrF intervened − control")]
    assert len(lines) == 1 and "p = " in lines[0]
    assert at.dataframe and any(m.value.startswith("wordorder intervened − dense") for m in at.markdown)
    # LRP2: project after layer 0, back after layer 1
    at.radio(key="w.iv_kind").set_value("lrp2")
    run(at)
    at.selectbox(key="w.iv_project").set_value(0)
    at.selectbox(key="w.iv_restore").set_value(1)
    run(at)
    assert "intervened" in outputs(at) and not errors(at)
    # the shared model carries no hook afterwards
    model = ui.shared().model(str(app_env)).model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # bad input is one message: scale with no dims
    at.radio(key="w.iv_kind").set_value("zero")
    run(at)
    at.multiselect(key=ui.INTERVENTION_DIMS).set_value([])
    run(at)
    assert errors(at) == ["Pick at least one dimension to act on (the Features page's detected "
                          "set fills the list)."]


def test_clicked_points_become_dims():
    assert ui.dims_from_selection({"points": [{"x": 7, "y": 1}, {"x": 3.0}, {"x": 7},
                                                   {"y": 2}, {"x": "a"}]}) == [3, 7]
    assert ui.dims_from_selection(None) == [] == ui.dims_from_selection({})

    def page():
        import streamlit as st

        from mlprune import ui

        st.session_state[ui.INTERVENTION_DIMS] = [1]
        st.session_state["chart"] = {"selection": {"points": [{"x": 5}, {"x": 1}]}}
        ui.add_clicked_dims("chart")()
        st.write(st.session_state[ui.INTERVENTION_DIMS])

    at = AppTest.from_function(page).run()
    assert not at.exception and at.session_state[ui.INTERVENTION_DIMS] == [1, 5]


# --------------------------------------------------------------------------- sweep


def test_sweep_runs_draws_and_cancels(app_env):
    at = goto(run(new_app()), "4_Sweep")
    assert any("No results yet" in i.value for i in at.info)
    at.multiselect(key="w.sw_methods").set_value(["magnitude", "random"])
    at.multiselect(key="w.sw_sparsities").set_value([0.0, 0.5])
    at.number_input(key="w.sw_limit").set_value(2)
    run(at)
    click(at, "Run 4 cells")
    assert at.button[0].disabled  # while it runs in the worker
    finish(at)
    assert chart_titles(at) == ["chrf against sparsity", "perplexity against sparsity"]
    table = at.dataframe[0].value
    assert len(table) == 4 and set(table["method"]) == {"magnitude", "random"}
    dense_rows, pruned_rows = table[table["sparsity"] == 0], table[table["sparsity"] > 0]
    for col in ("chrf_p_vs_dense", "bleu_p_vs_dense"):
        assert dense_rows[col].isna().all()
        assert ((pruned_rows[col] > 0) & (pruned_rows[col] <= 1)).all()
    chrf_chart = charts(at)[0]
    hover = [t.get("customdata") for t in chrf_chart["data"]]
    assert all(h[0] == "dense" and h[1].startswith("p = ") for h in hover)
    assert [d.label for d in at.get("download_button")] == ["Download CSV"]
    assert not errors(at)
    click(at, "Cancel")
    assert any("Sweep cancelled; 4 finished rows are kept" in w.value for w in at.warning)
    at.multiselect(key="w.sw_methods").set_value([])
    run(at)
    assert at.button[0].disabled  # nothing to run


def test_sweep_with_zero_shot_tasks_adds_accuracy_consistency_and_significance(app_env, monkeypatch):
    monkeypatch.setattr(sweeps, "ZERO_SHOT_ITEMS", 3)
    at = goto(run(new_app()), "4_Sweep")
    at.multiselect(key="w.sw_methods").set_value(["magnitude"])
    at.multiselect(key="w.sw_sparsities").set_value([0.0, 0.5])
    at.number_input(key="w.sw_limit").set_value(1)
    at.multiselect(key="w.sw_extra").set_value(["zero-shot nli"])
    run(at)
    click(at, "Run 2 cells")
    finish(at)
    assert not errors(at)
    assert "nli_acc_non_en against sparsity" in chart_titles(at)
    table = at.dataframe[0].value.set_index("sparsity")
    assert {"nli_acc_en", "nli_acc_fr", "nli_rankc_fr", "nli_p_non_en"} <= set(table.columns)
    assert table.loc[0.0, "nli_diff_non_en"] == 0  # dense against itself
    assert 0 <= table.loc[0.5, "nli_p_non_en"] <= 1 and 0 <= table.loc[0.5, "nli_acc_fr"] <= 1


def test_while_a_sweep_runs_in_its_worker_another_sessions_compare_answers(app_env):
    """Issue 14: a sweep never holds the shared model's lock; another session's Compare
    generates while it runs, and Cancel stops the worker keeping its finished rows."""
    from mlprune.prune import model_lock

    a = goto(run(new_app()), "4_Sweep")
    a.multiselect(key="w.sw_methods").set_value(["magnitude", "random", "wanda-mt"])
    a.multiselect(key="w.sw_sparsities").set_value([s / 10 for s in range(10)])
    a.number_input(key="w.sw_limit").set_value(4)
    run(a)
    click(a, "Run 30 cells")
    sweep = a.session_state["sweep_job"]
    store = sweep.store
    deadline = time.monotonic() + 240
    while not sweeps.read_results(store) and time.monotonic() < deadline:
        assert not sweep.job.done(), sweep.job.error
        time.sleep(0.1)
    assert sweeps.read_results(store), "the worker measured nothing in 240 s"
    shared_model = ui.shared().model(str(app_env))
    lock = model_lock(shared_model.model)
    assert lock.acquire(blocking=False)  # the sweep's cells do not hold it ...
    lock.release()
    b = goto(run(new_app()), "3_Compare")  # ... so another session's Compare answers,
    b.radio(key="w.cmp_kind").set_value("free")  # on a text no cache holds: it generates
    run(b)
    b.text_area(key="w.cmp_text").set_value("English: A sweep runs in another tab.\nFrench:")
    run(b)
    assert set(outputs(b)) == {"dense"} and tokens_of(outputs(b)["dense"])
    measured = len(sweeps.read_results(store))
    assert not sweep.job.done() and measured < 30, "the sweep ended before Compare answered"
    run(a)  # the sweep's page shows its progress and the rows so far
    assert any(p.proto.text.startswith("Sweeping in a worker process") for p in a.get("progress"))
    click(a, "Cancel")
    assert sweep.job.wait(30) and isinstance(sweep.job.error, Cancelled)
    kept = len(sweeps.read_results(store))
    assert measured <= kept < 30
    assert any(f"Sweep cancelled; {kept} finished rows are kept" in w.value for w in a.warning)


def test_the_sweep_page_opens_results_made_elsewhere(app_env, loaded, corpus, tmp_path):
    from mlprune.pipeline import sweep

    sweep(loaded, corpus, methods=["magnitude"], sparsities=[0.0, 0.5], pairs=["fr-en"],
          limit=1, base=PruneSpec(samples=2), store=tmp_path / "made.sqlite")
    at = goto(run(new_app()), "4_Sweep")
    at.radio(key="w.sw_source").set_value("open")
    run(at)
    assert any("Type the path of a results store" in i.value for i in at.info)
    at.text_input(key="w.sw_open").set_value(str(tmp_path))  # a folder of results
    run(at)
    assert not errors(at)
    assert chart_titles(at) == ["chrf against sparsity", "perplexity against sparsity"]
    assert len(at.dataframe[0].value) == 2
    assert any(c.value.startswith("tiny-llama · 1 held-out sentences") for c in at.caption)
    at.text_input(key="w.sw_open").set_value(str(tmp_path / "nothing.sqlite"))
    run(at)
    assert errors(at) == [f"No results file or folder at {tmp_path / 'nothing.sqlite'}."]


# --------------------------------------------------------------------------- shared state


def test_two_sessions_never_see_each_others_pruning(app_env):
    reference = dense_weights(app_env)
    a = pruned_app(70)
    goto(a, "3_Compare")
    a_out = outputs(a)
    assert set(a_out) == {"dense", "pruned"} and a_out["dense"] != a_out["pruned"]
    shared_model = ui.shared().model(str(app_env))
    assert shared_model is not None
    # after session A pruned and generated, the one shared model is dense, bit for bit
    for name, value in shared_model.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    b = run(new_app())
    assert "none: the model is dense" in [c.value for c in b.caption]  # B's sidebar
    goto(b, "3_Compare")
    assert ui.PRUNING not in b.session_state and set(outputs(b)) == {"dense"}
    assert tokens_of(outputs(b)["dense"]) == tokens_of(a_out["dense"])
    # B's dense output is what a freshly loaded copy generates
    fresh = load_model(str(app_env))
    items = eval_items(a.session_state["corpus"], "fr", "en", shots=4)
    expected = generate(fresh.model, fresh.tokenizer, [items[0].prompt], max_new_tokens=48)[0]
    got = ui.shared().dense_generations(shared_model, [items[0].prompt], 48)[0]
    assert (got.text, got.tokens) == (expected.text, expected.tokens)
    # and A still has its masks
    assert a.session_state[ui.PRUNING].masks.overall_sparsity() > 0.6


def test_errors_are_messages_and_unexpected_ones_say_where_to_look():
    def page():
        import streamlit as st

        from mlprune import MlpruneError, ui

        with ui.errors() as first:
            raise MlpruneError("A readable sentence.")
        with ui.errors() as second:
            raise KeyError("oops")
        with ui.errors() as third:
            open("/nonexistent/file")
        st.write(first.ok, second.ok, third.ok)

    at = AppTest.from_function(page).run()
    assert not at.exception
    assert errors(at)[0] == "A readable sentence."
    assert errors(at)[1].startswith("Something went wrong (KeyError: 'oops')")
    assert "missing: /nonexistent/file" in errors(at)[2]


# --------------------------------------------------------------------------- figures


@pytest.fixture
def feature_stats(loaded, corpus):
    sets = [translation_prompts(corpus, "fr", "en", shots=2, samples=3),
            translation_prompts(corpus, "en", "fr", shots=2, samples=3),
            monolingual_prompts(corpus, "en", shots=2, samples=3)]
    return {ps.name: capture(loaded.model, loaded.tokenizer, ps) for ps in sets}


def test_feature_figures(loaded, feature_stats):
    stats = feature_stats["mt:fr-en"]
    table = detect(stats, "top-k:2")
    fig = plots.layer_dim_heatmap(stats, table, dequantized_from="Q4_K_M")
    assert fig.data[0].z.shape == (2, 32) and len(fig.data[1].x) == 4
    assert "de-quantized from Q4_K_M" in fig.layout.annotations[0].text
    assert not plots.layer_dim_heatmap(stats).layout.annotations  # no note when not
    tokens, mags = token_magnitudes(loaded.model, loaded.tokenizer, "French: Le chat.\n")
    fig = plots.token_figure(tokens, mags, 1, [3, 5])
    assert fig.data[0].z.shape == (len(tokens), 2) and list(fig.data[0].x) == ["3", "5"]
    assert plots.token_figure(tokens, mags, 0).data[0].z.shape == (len(tokens), 32)
    with pytest.raises(MlpruneError, match="outside"):
        plots.token_figure(tokens, mags, 5)
    saturated = mags.float().to(torch.float16)
    saturated[1, 0, 0] = float("inf")  # what fp16 makes of real models' ~1e5 magnitudes
    assert torch.isfinite(torch.tensor(plots.token_figure(tokens, saturated, 1).data[0].z)).all()
    assert mags.dtype == torch.bfloat16  # the library keeps range, not precision
    matrix = overlap_matrix(feature_stats, 0.1, "jaccard")
    fig = plots.overlap_figure(matrix, "jaccard", 0.1)
    assert fig.data[0].z.shape == (3, 3) and fig.data[0].z[0][0] == 1.0
    fig = plots.direction_compare_figure(stats, feature_stats["mt:en-fr"], "fr→en", "en→fr", 1)
    assert len(fig.data[0].x) == 32 and len(fig.data[1].x) == 6
    assert fig.layout.xaxis.type == "log"
    # the paper's numbering: L + 1 rows, 0 the embedding output, L after the final norm
    paper = detect(stats, "top-k:2", "hidden_states")
    fig = plots.layer_dim_heatmap(stats, paper, numbering="hidden_states")
    assert fig.data[0].z.shape == (3, 32) and list(fig.data[1].y) == [0, 0, 1, 1, 2, 2]
    assert "0 = embeddings" in fig.layout.yaxis.title.text
    for layer, row in ((0, stats.embed_norms), (2, stats.final_norms)):
        fig = plots.direction_compare_figure(stats, stats, "a", "b", layer,
                                             numbering="hidden_states")
        assert np.allclose(fig.data[0].x, row.float().clamp_min(1e-6).numpy())
    with pytest.raises(MlpruneError, match="outside 0-2"):
        plots.direction_compare_figure(stats, stats, "a", "b", 3, numbering="hidden_states")


def test_pruning_figures_and_token_views(loaded, feature_stats):
    stats = feature_stats["mt:fr-en"]
    masks = rank_modules(loaded.model, stats, protect={"layers.0.resid_post": [1, 2]}).masks(0.5)
    fig = plots.sparsity_figure(masks)
    kinds = {t.name for t in fig.data}
    assert {"attn.q", "mlp.down", "layer (all modules)"} <= kinds
    assert all(abs(y - 0.5) < 1e-9 for t in fig.data for y in t.y)
    fig = plots.mask_figure(masks, "layers.1.attn.q", max_side=16)
    strip, main = fig.data
    assert main.z.shape == (16, 16) and abs(main.z.mean() - 0.5) < 1e-6
    assert strip.z.sum() > 0  # protected columns marked
    assert "2 protected input columns" in fig.layout.title.text
    crop = plots.mask_figure(masks, "layers.1.attn.q", crop=(4, 8, 8))
    assert crop.data[1].z.shape == (8, 8) and crop.data[1].x[0] == 8
    with pytest.raises(MlpruneError, match="No mask"):
        plots.mask_figure(masks, "layers.9.attn.q")
    dense = Generation("The cat.", ["The", " cat", "."], [0.9, 0.8, 0.7])
    sparse = Generation("The dog.", ["The", " dog", "."], [0.9, 0.3, 0.7])
    fig = plots.token_probs_figure(dense, sparse)
    assert [t.name for t in fig.data] == ["dense", "pruned"]
