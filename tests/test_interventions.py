"""Interventions on residual dims: the hooks change exactly the chosen dims at the chosen sites,
leave the model bit-identical once removed, and the statistics, controls, LRP2 vectors, the
experiment report and `mlprune intervene` are what they say."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.capture import encode
from mlprune.evaluate import generate
from mlprune.interventions import (
    Intervention,
    intervened,
    language_vectors,
    layer_site,
    lrp2_intervention,
    lrp2_sentences,
    make_intervention,
    parse_dims,
    parse_layers,
    random_control,
    random_like,
    residual_means,
)
from mlprune.models import decoder_layers

TEXTS = ["French: Le chat dort.\nEnglish: The cat sleeps.\n", "Il fait beau.", "Bonjour !\n"]


def streams(model, input_ids, attention_mask=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every residual site's hidden states in one forward, and the logits. Registered after
    an intervention's hooks, these readers see the edited states."""
    out: dict[str, torch.Tensor] = {}
    layers = decoder_layers(model)

    def embed(module, args, kwargs):
        out["embed"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def layer(i):
        def hook(module, args, output):
            out[layer_site(i)] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    handles = [layers[0].register_forward_pre_hook(embed, with_kwargs=True)]
    handles += [m.register_forward_hook(layer(i)) for i, m in enumerate(layers)]
    try:
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return out, logits


def left_padded(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = encode(tok, texts)
    width = max(map(len, ids))
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return input_ids, mask


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def deep():
    """A tiny llama with 4 layers, so there are sites before and after the edited one."""
    return tiny_model("llama", layers=4)


@pytest.fixture(scope="module")
def batch():
    return left_padded(byte_tokenizer(), TEXTS)


# --------------------------------------------------------------------------- the hooks


@pytest.mark.parametrize("arch", ["llama", "bloom", "gpt2"])  # bloom's layers return tuples
@pytest.mark.parametrize("site", ["embed", "layers.1.resid_post"])
def test_the_hook_changes_exactly_the_chosen_dims_at_the_chosen_site(arch, site):
    model = tiny_model(arch, layers=3)
    input_ids, mask = left_padded(byte_tokenizer(), TEXTS)
    dense, dense_logits = streams(model, input_ids, mask)
    dims = [3, 7, 20]
    with intervened(model, make_intervention("zero", {site: dims})):
        edited, logits = streams(model, input_ids, mask)
    order = list(dense)
    at = order.index(site)
    for name in order[:at]:  # upstream: untouched
        assert torch.equal(edited[name], dense[name]), name
    others = [d for d in range(dense[site].shape[-1]) if d not in dims]
    assert torch.equal(edited[site][..., others], dense[site][..., others])
    assert (edited[site][..., dims] == 0).all()
    assert not torch.equal(edited[order[-1]], dense[order[-1]])  # and it reaches downstream
    assert not torch.equal(logits, dense_logits)
    assert no_hooks_left(model)


def test_zero_mean_scale_and_add_write_what_they_should(deep, batch, tok):
    input_ids, mask = batch
    dense, _ = streams(deep, input_ids, mask)
    site, dims = "layers.1.resid_post", [0, 5, 31]
    means = residual_means(deep, tok, TEXTS)
    vec = torch.randn(32)
    cases = {"scale": make_intervention("scale", {site: dims}, factor=0.5),
             "amplify": make_intervention("scale", {site: dims}, factor=2.0),
             "mean": make_intervention("mean", {site: dims}, means=means),
             "add": Intervention("add", {site: tuple(dims)}, vectors={site: vec})}
    first = torch.zeros_like(mask, dtype=torch.bool)
    first[torch.arange(len(mask)), mask.argmax(dim=1)] = True  # each row's first real token
    for name, iv in cases.items():
        with intervened(deep, iv):
            edited, _ = streams(deep, input_ids, mask)
        got, was = edited[site][..., dims], dense[site][..., dims]
        if iv.kind == "scale":
            assert torch.equal(got, was * iv.factor), name
        elif iv.kind == "add":
            assert torch.equal(got, was + vec[dims]), name
        else:  # the first token's mean on first tokens, the other tokens' mean elsewhere
            assert torch.equal(got[first], means[site][0, dims].expand(int(first.sum()), -1))
            assert torch.equal(got[~first], means[site][1, dims].expand(int((~first).sum()), -1))


def test_removed_hooks_leave_logits_and_generations_bit_identical(deep, batch, tok):
    input_ids, mask = batch
    prompts = ["English: The cat\nFrench:", "Hello"]
    _, before = streams(deep, input_ids, mask)
    gen_before = generate(deep, tok, prompts, max_new_tokens=6)
    big = make_intervention("scale", {layer_site(i): list(range(32)) for i in range(4)}, factor=30)
    with intervened(deep, big):
        _, during = streams(deep, input_ids, mask)
        generate(deep, tok, prompts, max_new_tokens=6)
    assert not torch.equal(during, before)
    _, after = streams(deep, input_ids, mask)
    assert torch.equal(after, before)
    gen_after = generate(deep, tok, prompts, max_new_tokens=6)
    assert [(g.text, g.probs) for g in gen_after] == [(g.text, g.probs) for g in gen_before]
    assert no_hooks_left(deep)


def test_hooks_are_removed_when_the_block_raises(deep):
    with pytest.raises(RuntimeError, match="boom"):
        with intervened(deep, make_intervention("zero", {"embed": [1], "layers.2.resid_post": [4]})):
            assert not no_hooks_left(deep)
            raise RuntimeError("boom")
    assert no_hooks_left(deep)
    with pytest.raises(MlpruneError):  # a refused intervention registers nothing either
        with intervened(deep, make_intervention("zero", {"layers.9.resid_post": [1]})):
            pass
    assert no_hooks_left(deep)


@pytest.mark.parametrize("kind", ["mean", "add"])
def test_generation_with_a_kv_cache_edits_every_new_position(deep, tok, kind):
    """Greedy tokens made step by step with the cache are the argmax of one uncached forward
    over the whole sequence under the same intervention: every position was edited alike
    (for mean: only the true first token gets the first-token mean)."""
    site = "layers.0.resid_post"
    if kind == "mean":
        iv = make_intervention("mean", {site: list(range(0, 32, 2))},
                               means={site: torch.randn(2, 32) * 3})
    else:
        iv = Intervention("add", {site: None}, vectors={site: torch.randn(32) * 3})
    prompt = torch.tensor([encode(tok, ["French: Le chat"])[0]])
    with intervened(deep, iv), torch.inference_mode():
        out = deep.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                            max_new_tokens=8, do_sample=False, pad_token_id=0)
        logits = deep(input_ids=out, use_cache=False).logits
    new = out[0, prompt.shape[1]:]
    assert torch.equal(logits[0, prompt.shape[1] - 1:-1].argmax(-1), new)
    with torch.inference_mode():
        dense = deep.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(dense, out)


# --------------------------------------------------------------------------- statistics


def test_residual_means_are_the_hand_computed_means(deep, tok):
    first, rest, n_rest = {}, {}, 0
    for text in TEXTS:  # one at a time: no padding anywhere
        ids = torch.tensor([encode(tok, [text])[0]])
        hs, _ = streams(deep, ids)
        for site, h in hs.items():
            first[site] = first.get(site, 0) + h[0, 0].double()
            rest[site] = rest.get(site, 0) + h[0, 1:].double().sum(0)
        n_rest += ids.shape[1] - 1
    means = residual_means(deep, tok, TEXTS, batch_size=2)  # batched: padding excluded
    assert set(means) == {"embed"} | {layer_site(i) for i in range(4)}
    for site, m in means.items():
        assert m.shape == (2, 32)
        assert torch.allclose(m[0].double(), first[site] / len(TEXTS), atol=1e-5)
        assert torch.allclose(m[1].double(), rest[site] / n_rest, atol=1e-5)


def test_the_language_vector_is_the_mean_difference_of_sentence_means(deep, tok, corpus):
    def hand(lang):
        total = {}
        texts = lrp2_sentences(corpus, lang, 5)
        for text in texts:
            hs, _ = streams(deep, torch.tensor([encode(tok, [text])[0]]))
            for site, h in hs.items():
                total[site] = total.get(site, 0) + h[0].double().mean(0)
        return {s: v / len(texts) for s, v in total.items()}

    vectors = language_vectors(deep, tok, corpus, "fr", samples=5, batch_size=3)
    en, fr = hand("en"), hand("fr")
    for site, v in vectors.items():
        assert torch.allclose(v.double(), en[site] - fr[site], atol=1e-5)
    # the same rows in both languages, from the demonstration pool only
    en_rows = [corpus.table["en"].tolist().index(s) for s in lrp2_sentences(corpus, "en", 5)]
    fr_rows = [corpus.table["fr"].tolist().index(s) for s in lrp2_sentences(corpus, "fr", 5)]
    from mlprune.prompts import split_rows

    assert en_rows == fr_rows and set(en_rows) <= set(split_rows(corpus)[0])
    with pytest.raises(MlpruneError, match="both are 'en'"):
        language_vectors(deep, tok, corpus, "en")


def test_lrp2_projects_to_english_and_back(deep, batch):
    input_ids, mask = batch
    vectors = {layer_site(i): torch.randn(32) for i in range(-1, 4)}
    iv = lrp2_intervention(vectors, "layers.0.resid_post", "layers.2.resid_post")
    assert iv.kind == "add" and iv.dims == {"layers.0.resid_post": None, "layers.2.resid_post": None}
    assert torch.equal(iv.vectors["layers.2.resid_post"], -vectors["layers.2.resid_post"])
    dense, _ = streams(deep, input_ids, mask)
    with intervened(deep, lrp2_intervention(vectors, "embed")):
        edited, _ = streams(deep, input_ids, mask)
    assert torch.equal(edited["embed"], dense["embed"] + vectors["embed"])
    with pytest.raises(MlpruneError, match="must come after"):
        lrp2_intervention(vectors, "layers.2.resid_post", "layers.1.resid_post")


def test_random_control_is_ordinary_as_many_and_seeded():
    detected = {"embed": [1, 2], "layers.0.resid_post": [5, 1, 9], "layers.1.resid_post": []}
    a = random_control(detected, 64, seed=3)
    assert {s: len(d) for s, d in a.items()} == {s: len(d) for s, d in detected.items()}
    assert not {d for ds in a.values() for d in ds} & {1, 2, 5, 9}
    assert a == random_control(detected, 64, seed=3)
    assert a != random_control(detected, 64, seed=4)
    with pytest.raises(MlpruneError, match="ordinary ones are left"):
        random_control({"embed": list(range(40))}, 64)
    v = {"embed": torch.randn(64)}
    r = random_like(v, seed=1)
    assert math.isclose(float(r["embed"].norm()), float(v["embed"].norm()), rel_tol=1e-5)
    assert torch.equal(r["embed"], random_like(v, seed=1)["embed"])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("iv, message", [
    (Intervention("blur", {"embed": (1,)}), "Unknown intervention 'blur'"),
    (Intervention("zero", {"embed": (32,)}), "Dimension 32 is outside this model's hidden size"),
    (Intervention("zero", {"layers.4.resid_post": (1,)}), "Layer 4 is outside this model's layers 0-3"),
    (Intervention("scale", {"embed": (1,)}), "Scaling needs a finite factor"),
    (Intervention("scale", {"embed": (1,)}, factor=float("nan")), "Scaling needs a finite factor"),
    (Intervention("mean", {"embed": (1,)}), "no vector of shape [2, 32] for embed"),
    (Intervention("zero", {"final_norm": (1,)}), "'final_norm' is not a residual site"),
    (Intervention("zero", {"embed": ()}), "names no dimension"),
])
def test_bad_interventions_are_one_sentence(deep, iv, message):
    with pytest.raises(MlpruneError) as err:
        with intervened(deep, iv):
            pass
    assert message in str(err.value) and "\n" not in str(err.value)
    assert no_hooks_left(deep)


def test_layer_and_dim_lists():
    assert parse_layers(None, 3) == ["layers.0.resid_post", "layers.1.resid_post",
                                     "layers.2.resid_post"]
    assert parse_layers("embed,0-1", 3) == ["embed", "layers.0.resid_post", "layers.1.resid_post"]
    assert parse_layers("2,0,2", 3) == ["layers.2.resid_post", "layers.0.resid_post"]
    assert parse_dims("4-6,1,4") == [4, 5, 6, 1]
    for text, message in [("0-5", "Layer 3 is outside"), ("x", "not a layer"), ("3-1", "empty"),
                          (",", "at least one layer")]:
        with pytest.raises(MlpruneError, match=message):
            parse_layers(text, 3)
    with pytest.raises(MlpruneError, match="not a dimension"):
        parse_dims("a")


# --------------------------------------------------------------------------- experiments


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    from conftest import REPRODUCE_TASK

    path = tmp_path_factory.mktemp("tasks") / "tiny_task.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in REPRODUCE_TASK), encoding="utf-8")
    return path


def strict(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in strict JSON")
    return json.loads(text, parse_constant=refuse)


def test_the_experiment_reports_effect_control_and_significance(loaded, corpus, task_file,
                                                                 monkeypatch):
    from mlprune import experiments as ex
    from mlprune.features import detected_dims
    from mlprune.pipeline import cached_capture
    from mlprune.prompts import translation_prompts

    spec = ex.InterventionSpec(kind="mean", limit=2, samples=2, max_new_tokens=8, tasks=(str(task_file),),
                               task_limit=2, resamples=100)
    cells = ex.Cells()
    stages = []
    report = ex.run_intervention_experiment(loaded, corpus, spec, cells=cells,
                                            progress=lambda s, f: stages.append(s))
    assert report["runs"] == ["dense", "intervened", "control"]
    assert any(s.startswith("translation (control)") for s in stages)
    stats = cached_capture(loaded, translation_prompts(corpus, "fr", "en", shots=4, samples=2))
    detected = detected_dims(stats, "top-k:4")
    assert report["intervention"]["dims"] == {s: detected[s] for s in
                                              ("layers.0.resid_post", "layers.1.resid_post")}
    large = {d for ds in detected.values() for d in ds}
    for dims in report["control"]["dims"].values():
        assert len(dims) == 4 and not set(dims) & large
    tests = {(t["a"], t["b"]): t for t in report["translation"]["tests"]}
    assert set(tests) == {("dense", "intervened"), ("dense", "control"), ("control", "intervened")}
    for t in tests.values():
        assert 0 < t["chrf"]["p_value"] <= 1 and t["chrf"]["n"] == 2
    block = report["zeroshot"]["tiny_task"]
    assert set(block["runs"]) == {"dense", "intervened", "control"}
    rows = block["tests"][0]["rows"]
    assert {r["lang"] for r in rows} == {"en", "fr", "non-en"}
    assert all(0 < r["p_value"] <= 1 and r["n"] == 2 for r in rows if r["lang"] != "non-en")
    text = ex.markdown(report)
    assert "| intervened vs control |" in text and "### Zero-shot tiny_task" in text
    strict(json.dumps(json.loads(__import__("mlprune").zeroshot.strict_json(report))))
    # every cell is kept: the same run again measures nothing
    monkeypatch.setattr(ex, "translation_cell", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(ex, "task_cell", lambda *a, **k: pytest.fail("measured again"))
    assert ex.run_intervention_experiment(loaded, corpus, spec, cells=cells) == report


def test_lrp2_against_pruning_uses_each_languages_vector(loaded, corpus, task_file):
    from mlprune import experiments as ex

    spec = ex.InterventionSpec(kind="lrp2", layers="0,1", limit=2, samples=2, lrp2_samples=4,
                               max_new_tokens=8,
                               tasks=(str(task_file),), task_limit=2, compare_prune=0.5,
                               resamples=100)
    report = ex.run_intervention_experiment(loaded, corpus, spec)
    assert report["runs"] == ["dense", "intervened", "control", "pruned"]
    assert report["intervention"]["dims"] == {"layers.0.resid_post": None,
                                              "layers.1.resid_post": None}
    assert report["pruned"]["sparsity_reached"] == pytest.approx(0.5, abs=0.01)
    pairs = {(t["a"], t["b"]) for t in report["translation"]["tests"]}
    assert ("pruned", "intervened") in pairs and ("dense", "pruned") in pairs
    runs = report["zeroshot"]["tiny_task"]["runs"]
    english = {run: next(r for r in rows if r["lang"] == "en") for run, rows in runs.items()}
    assert english["intervened"] == english["dense"] == english["control"]  # v_en - v_en = 0
    built = ex.build_interventions(loaded, corpus, spec)
    assert built.for_run("intervened", "en") is None
    fr = built.for_run("intervened", "fr")
    vectors = language_vectors(loaded.model, loaded.tokenizer, corpus, "fr", samples=4)
    assert torch.allclose(fr.vectors["layers.0.resid_post"], vectors["layers.0.resid_post"])
    assert torch.allclose(fr.vectors["layers.1.resid_post"], -vectors["layers.1.resid_post"])


def test_mlprune_intervene_writes_strict_json_with_the_control(tiny_folder, corpus_file, task_file,
                                                                tmp_path, capsys):
    from mlprune.cli import main

    out = tmp_path / "run"
    assert main(["intervene", "--model", str(tiny_folder), "--corpus", str(corpus_file),
                 "--kind", "scale", "--factor", "0.5", "--layers", "1", "--dims", "3,7",
                 "--limit", "2", "--max-new-tokens", "8", "--samples", "2", "--task",
                 str(task_file), "--task-limit", "2",
                 "--resamples", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| intervened vs control |" in printed and "| control |" in printed
    report = strict((out / "report.json").read_text(encoding="utf-8"))
    assert report["intervention"]["dims"] == {"layers.1.resid_post": [3, 7]}
    assert report["intervention"]["factor"] == 0.5
    assert len(report["control"]["dims"]["layers.1.resid_post"]) == 2
    assert {"p_value", "difference", "n"} <= set(report["translation"]["tests"][0]["chrf"])
    assert (out / "report.md").read_text(encoding="utf-8").startswith("## Intervention")
    assert (out / "cells.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--kind", "scale"], "--kind scale needs --factor"),
    (["--kind", "zero", "--factor", "2"], "--factor applies to --kind scale only"),
    (["--dims", "32"], "Dimension 32 is outside this model's hidden size (dims 0-31)."),
    (["--layers", "0-5"], "Layer 2 is outside this model's layers 0-1."),
    (["--kind", "lrp2", "--layers", "0,1,0-1"], None),  # duplicates collapse: two layers
    (["--kind", "lrp2", "--dims", "3"], "LRP2 adds a whole language vector; --dims does not"),
    (["--detect", "ratio:100000"], "The rule ratio:100000 detects no dimension at the chosen"),
])
def test_mlprune_intervene_bad_input_is_one_sentence(tiny_folder, corpus_file, tmp_path, capsys,
                                                     args, message):
    from mlprune.cli import main

    code = main(["intervene", "--model", str(tiny_folder), "--corpus", str(corpus_file),
                 "--limit", "1", "--max-new-tokens", "4", "--samples", "2", "--control", "none",
                 *args])
    err = capsys.readouterr().err.splitlines()  # progress lines come before the error
    if message is None:
        assert code == 0
        return
    assert code == 2 and any(f"mlprune: {message}" in line for line in err)


def test_an_unknown_kind_is_one_sentence():
    from mlprune.experiments import InterventionSpec

    with pytest.raises(MlpruneError, match="Unknown intervention 'blur': use zero, mean, scale, lrp2."):
        InterventionSpec(kind="blur").validate()


def test_the_bench_script_runs_on_a_tiny_model_and_resumes(tiny_folder, corpus_file, task_file,
                                                           tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    from mlprune import experiments as ex

    path = Path(__file__).resolve().parents[1] / "bench" / "interventions.py"
    spec = importlib.util.spec_from_file_location("bench_interventions", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "interventions.json"
    argv = ["--model", str(tiny_folder), "--corpus", str(corpus_file), "--pairs", "fr-en",
            "--only", "scale x2,lrp2", "--limit", "1", "--task-limit", "1", "--tasks",
            str(task_file), "--max-new-tokens", "2", "--samples", "2", "--out", str(out),
            "--cells", str(tmp_path / "cells.json")]
    bench.main(argv)
    first = strict(out.read_text(encoding="utf-8"))
    assert [r["intervention"] for r in first["rows"]] == ["scale x2", "lrp2", "wanda-mt 50%"]
    row = first["rows"][0]
    assert {"chrf_p", "chrf_vs_control_p", "tiny_task_non_en_p", "tiny_task_non_en_control"} <= set(row)
    table = capsys.readouterr().out
    assert "| fr-en | scale x2 |" in table and "| fr-en | wanda-mt 50% |" in table
    monkeypatch.setattr(ex, "translation_cell", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(ex, "task_cell", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(ex, "prune", lambda *a, **k: pytest.fail("pruned again"))
    bench.main(argv)  # resumed: every cell was saved
    assert strict(out.read_text(encoding="utf-8"))["rows"] == first["rows"]
