"""The dashboard's service layer without Streamlit: the shared cache, the model lock, a
session's pruning, held-out scores, sweeps and the text helpers. Nothing here imports
Streamlit (the first test checks the module itself does not)."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch
from conftest import EN

from mlprune import MlpruneError, labels, pipeline, service, sweeps
from mlprune.capture import Cancelled, capture
from mlprune.evaluate import (
    Generation,
    evaluate_translation,
    generate,
    paired_translation_test,
)
from mlprune.models import load_model
from mlprune.pipeline import PruneSpec
from mlprune.prompts import analysis_prompts, eval_items, translation_prompts
from mlprune.prune import pruned, rank_modules

ONE_SHOT = PruneSpec(mode="one-shot", samples=2)


def test_the_service_imports_without_streamlit():
    code = "import sys, mlprune.service; print('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def counting(monkeypatch, module, name: str) -> dict:
    """Count the calls of ``module.name`` (still calling it)."""
    calls = {"n": 0}
    real = getattr(module, name)

    def wrapper(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# --------------------------------------------------------------------------- the cache


def test_statistics_and_rankings_are_made_once_per_cache(loaded, corpus, monkeypatch):
    captures = counting(monkeypatch, pipeline, "capture")
    cache = service.Shared()
    prompts = translation_prompts(corpus, "fr", "en", shots=2, samples=2)
    first = cache.stats(loaded, prompts)
    assert cache.stats(loaded, prompts) is first and captures["n"] == 1
    assert cache.ranking(loaded, corpus, ONE_SHOT) is None
    made = cache.make_ranking(loaded, corpus, ONE_SHOT)
    # another sparsity or pattern is the same ranking; another seed is not
    assert cache.ranking(loaded, corpus, replace(ONE_SHOT, sparsity=0.7)) is made
    assert cache.ranking(loaded, corpus, PruneSpec(mode="one-shot", samples=2, seed=1)) is None
    # a second cache (another process, another test) shares nothing with the first
    assert service.Shared().ranking(loaded, corpus, ONE_SHOT) is None
    cache.clear()
    assert cache.ranking(loaded, corpus, ONE_SHOT) is None


def test_a_calibrated_ranking_cuts_masks_that_carry_their_spec(loaded, corpus):
    made = service.Shared().make_ranking(loaded, corpus, ONE_SHOT)
    masks = made.masks(0.25, "2:4")
    assert masks.pattern == "2:4" and masks.meta["spec"]["pattern"] == "2:4"
    assert made.calibration.prompts.name == "mt:fr-en" and made.approximate_at is None
    sequential = service.Shared().make_ranking(loaded, corpus,
                                               PruneSpec(mode="sequential", samples=2))
    assert sequential.approximate_at == "50% unstructured"
    magnitude = service.Shared().make_ranking(loaded, corpus,
                                              PruneSpec(method="magnitude", mode="sequential"))
    assert magnitude.calibration is None and magnitude.approximate_at is None


def test_a_paper_protocol_capture_numbers_layers_as_the_paper(loaded, corpus):
    sets = analysis_prompts(corpus, ["fr-en"], ["en"], shots=2, samples=2, seed=0,
                            separator="eos")
    captured = service.Shared().capture(loaded, sets, protocol="paper")
    assert captured.protocol == "paper" and captured.numbering == "hidden_states"
    table = captured.detect("mt:fr-en", "top-k:1")
    n_layers = captured.stats["mt:fr-en"].n_layers
    assert list(table["layer"]) == list(range(n_layers + 1))
    assert (table["site"].iloc[0], table["site"].iloc[-1]) == ("embed", "final_norm")
    with pytest.raises(MlpruneError, match="Unknown protocol"):
        service.Shared().capture(loaded, sets, protocol="authors")


def test_capture_leaves_a_feature_capture_for_other_pages(loaded, corpus):
    sets = analysis_prompts(corpus, ["fr-en", "en-fr"], ["en"], shots=2, samples=2, seed=0)
    seen = []
    captured = service.Shared().capture(loaded, sets, progress=lambda s, f: seen.append((s, f)))
    assert list(captured.stats) == ["mt:fr-en", "mt:en-fr", "mono:en"]
    assert captured.pairs == ["fr-en", "en-fr"] and captured.model == service.model_key(loaded)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(seen) == 3 and all(s.endswith(", batch 1/1") for s, _ in seen)  # 2 prompts a set
    assert captured.rule is None
    table = captured.detect("mono:en", "top-k:2")
    assert captured.rule == "top-k:2" and len(table) == 4 and captured.detected is table


def test_analysis_prompts_are_the_clis_and_the_pages(corpus):
    sets = analysis_prompts(corpus, ["fr-en"], ["en", "fr"], shots=2, samples=3, seed=5)
    assert [s.name for s in sets] == ["mt:fr-en", "mono:en", "mono:fr"]
    assert all(len(s) == 3 and s.meta["seed"] == 5 for s in sets)
    assert sets[0].texts == translation_prompts(corpus, "fr", "en", shots=2, samples=3,
                                                seed=5).texts
    with pytest.raises(MlpruneError, match="at least one translation direction"):
        analysis_prompts(corpus, [], [], shots=2, samples=3, seed=0)


def test_a_load_job_shows_the_loaders_last_step(tiny_folder):
    job = service.LoadJob(str(tiny_folder))
    assert job.done.wait(120) and job.error is None and job.result is not None
    assert (job.fraction, job.message) == (1.0, "Model ready")


# --------------------------------------------------------------------------- the lock


def test_dense_generation_waits_while_another_session_generates_pruned(tiny_folder, corpus):
    """Session A holds its masks applied (as while it generates); session B asks for a dense
    output meanwhile. B must get the dense answer: it waits for A's lock, never computing on
    A's masked weights. Without the lock this fails (B finishes on pruned weights)."""
    shared = load_model(str(tiny_folder))
    fresh = load_model(str(tiny_folder))
    cache = service.Shared()
    prompt = eval_items(corpus, "fr", "en", shots=4)[1].prompt + " "  # not in any cache
    expected = generate(fresh.model, fresh.tokenizer, [prompt], max_new_tokens=24)[0]
    stats = capture(shared.model, shared.tokenizer, ["French: Bonjour.\nEnglish: Hello.\n"])
    masks = rank_modules(shared.model, stats).masks(0.9)
    with service.masked(shared, masks):  # a pruned output really differs here
        assert generate(shared.model, shared.tokenizer, [prompt], max_new_tokens=24)[0].text \
            != expected.text
    applied, b_started, b_done = threading.Event(), threading.Event(), threading.Event()
    result: list[Generation] = []

    def session_a():
        with service.masked(shared, masks):
            applied.set()
            b_started.wait(5)
            b_done.wait(1.0)  # with the lock, B cannot finish while we hold it

    def session_b():
        applied.wait(5)
        b_started.set()
        result.append(cache.dense_generations(shared, [prompt], 24)[0])
        b_done.set()

    threads = [threading.Thread(target=session_a), threading.Thread(target=session_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert (result[0].text, result[0].tokens) == (expected.text, expected.tokens)
    for name, value in shared.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[name]), name


# --------------------------------------------------------------------------- one session


def test_a_session_pruning_keeps_its_outputs_until_its_masks_change(loaded, corpus, monkeypatch):
    made = service.Shared().make_ranking(loaded, corpus, ONE_SHOT)
    spec = replace(ONE_SHOT, sparsity=0.7)
    first = service.next_pruning(None, loaded, made, spec, made.masks(0.7, "unstructured"))
    assert first.version == 1
    prompt = eval_items(corpus, "fr", "en", shots=2, limit=1)[0].prompt
    gens = counting(monkeypatch, service, "generate")
    out, _ = first.generations(loaded, [prompt], 16)
    again, _ = first.generations(loaded, [prompt], 16)
    assert again == out and gens["n"] == 1  # the second came from the session's outputs
    assert out == service.pruned_generations(loaded, first.masks, [prompt], 16)
    # the same settings on the next page run keep the object (and its outputs) ...
    same = service.next_pruning(first, loaded, made, spec, made.masks(0.7, "unstructured"))
    assert same is first
    # ... other settings are a new version with no outputs yet
    other_spec = replace(ONE_SHOT, sparsity=0.3)
    second = service.next_pruning(first, loaded, made, other_spec,
                                  made.masks(0.3, "unstructured"))
    assert second.version == 2 and not second.outputs


def test_held_out_scores_are_evaluate_translation_dense_cached(loaded, corpus, monkeypatch):
    cache = service.Shared()
    masks = cache.make_ranking(loaded, corpus, ONE_SHOT).masks(0.7, "unstructured")
    scores = cache.translation_scores(loaded, corpus, "fr-en", masks, shots=2, limit=3)
    settings = dict(shots=2, limit=3, max_new_tokens=service.HELD_OUT_TOKENS)
    dense = evaluate_translation(loaded.model, loaded.tokenizer, corpus, "fr", "en", **settings)
    with pruned(loaded.model, masks):
        sparse = evaluate_translation(loaded.model, loaded.tokenizer, corpus, "fr", "en",
                                      **settings)
    assert scores["dense"] == dense and scores["pruned"] == sparse
    assert scores["dense"]["n"] == 3
    # the paired test of pruned against dense: sacrebleu's, on these very outputs
    hyps = [[o["output"] for o in r["outputs"]] for r in (dense, sparse)]
    assert hyps[0] != hyps[1]
    direct = paired_translation_test([o["reference"] for o in dense["outputs"]], *hyps, lang="en")
    assert scores["significance"] == direct
    assert scores["significance"]["chrf"]["a"] == pytest.approx(dense["chrf"])
    assert scores["significance"]["chrf"]["b"] == pytest.approx(sparse["chrf"])
    evaluations = counting(monkeypatch, service, "evaluate_translation")
    again = cache.translation_scores(loaded, corpus, "fr-en", None, shots=2, limit=3)
    assert again == {"dense": dense} and evaluations["n"] == 0  # dense came from the cache


# --------------------------------------------------------------------------- sweeps


def test_a_cancelled_sweep_keeps_its_rows(tmp_path, loaded, corpus):
    out = tmp_path / "sweep.csv"
    seen = []

    def stop_after_two():
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(Cancelled):
        sweeps.run_sweep(loaded, corpus, methods=["magnitude"], sparsities=[0.0, 0.3, 0.6],
                          pairs=["fr-en"], base=PruneSpec(samples=2), limit=1, out_csv=out,
                          should_stop=stop_after_two)
    assert len(sweeps.read_results(out)) == 2
    with pytest.raises(MlpruneError, match="at least one method"):
        sweeps.run_sweep(loaded, corpus, methods=[], sparsities=[0.5], pairs=["fr-en"],
                          base=PruneSpec(), limit=1, out_csv=out)


def test_sweep_files_and_extra_columns(loaded, corpus, monkeypatch):
    where = dict(limit=4, samples=8, shots=4, extra=[])
    path = sweeps.sweep_store(loaded, corpus, **where)
    assert path == sweeps.sweep_store(loaded, corpus, **where) and path.suffix == ".sqlite"
    assert path != sweeps.sweep_store(loaded, corpus, **{**where, "limit": 5})
    assert sweeps.sweep_extra_eval([]) is None
    monkeypatch.setitem(sweeps.SWEEP_EXTRA_EVALS, "a", lambda m, meth, s: {"a": s})
    monkeypatch.setitem(sweeps.SWEEP_EXTRA_EVALS, "b", lambda m, meth, s: {"b": meth})
    assert sweeps.sweep_extra_eval(["a", "b"])(loaded, "random", 0.5) == {"a": 0.5,
                                                                           "b": "random"}
    rows = [{"pair": "fr-en", "method": m, "sparsity": s} for m in ("random", "magnitude")
            for s in (0.5, 0.0, 0.3)]
    table = sweeps.sweep_table(rows, ["magnitude"], [0.0, 0.5], ["fr-en"])
    assert list(table["sparsity"]) == [0.0, 0.5] and set(table["method"]) == {"magnitude"}


def test_results_made_elsewhere_open_as_they_are(tmp_path):
    from mlprune.store import ResultStore

    store = ResultStore(tmp_path / "a.sqlite")
    store.claim({"model": "m", "limit": 2})
    for s in (0.5, 0.0):
        store.add({"pair": "fr-en", "method": "magnitude", "sparsity": s,
                   "pattern": "unstructured", "chrf": 10 * s})
    table, settings = sweeps.open_results(tmp_path)  # a folder: its newest results file
    assert list(table["sparsity"]) == [0.0, 0.5] and settings == {"model": "m", "limit": 2}
    store.export_csv(tmp_path / "b.csv")
    assert sweeps.results_files(tmp_path)[0].name == "b.csv"
    table, settings = sweeps.open_results(tmp_path / "b.csv")
    assert list(table["chrf"]) == [0.0, 5.0] and settings is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not results")
    for path, message in ((tmp_path / "empty", "holds no results file"),
                          (tmp_path / "x.sqlite", "No results file or folder"),
                          (tmp_path / "notes.txt", "is not a results file")):
        with pytest.raises(MlpruneError, match=message):
            sweeps.results_files(path)
    assert sweeps.sweep_tasks(["zero-shot nli"]) == ("nli",)
    with pytest.raises(MlpruneError, match="cannot run in a worker process"):
        sweeps.sweep_tasks(["nope"])


# --------------------------------------------------------------------------- text helpers


def test_pairs_labels_and_notes():
    assert labels.all_pairs(["en", "fr", "zh"])[:2] == ["fr-en", "zh-en"]
    assert labels.default_pairs(["en", "fr"]) == ["fr-en", "en-fr"]
    assert labels.default_pairs(["de", "es"]) == ["de-es"]
    assert labels.pair_label("fr-en") == "fr→en"
    assert labels.prompt_set_label("mt:fr-en") == "fr→en"
    assert labels.prompt_set_label("mono:en") == "en (mono)"
    assert labels.comma_list(" fr→en, en-fr,, ") == ["fr-en", "en-fr"]
    assert "4-bit (Q4_K_M)" in labels.dequant_text("Q4_K_M")
    assert labels.dequant_text(None) is None
    assert labels.source_of("embedded:gemma3-270m") == "embedded"
    assert labels.source_of("/m/x.gguf") == "gguf" and labels.source_of("./m") == "folder"
    assert labels.source_of("google/gemma-3-270m") == "hub"


def test_token_diffs_and_their_html():
    fa, fb = labels.diff_flags(["The", " cat", "."], ["The", " dog", "."])
    assert fa == [False, True, False] and fb == [False, True, False]
    html = labels.generation_html(Generation("<b>", ["<b>"], [0.2]), [True])
    assert "&lt;b&gt;" in html and "mlp-diff" in html and 'title="p = 0.200"' in html
    assert "(empty output)" in labels.generation_html(Generation("", [], []))


def test_the_default_corpus_follows_the_variable(tmp_path, monkeypatch):
    path = tmp_path / "c.tsv"
    path.write_text("en\tde\n" + "".join(f"{e}\t{e}\n" for e in EN), "utf-8")
    monkeypatch.setenv(service.CORPUS_ENV, str(path))
    assert service.default_corpus().languages == ["en", "de"]
    monkeypatch.setenv(service.MODEL_ENV, "/some/folder")
    assert service.default_model_spec() == "/some/folder"
