"""Generation, metrics, perplexity, export, and the resumable sweep."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from mlprune import MlpruneError
from mlprune.capture import Cancelled, capture, encode
from mlprune.evaluate import (
    _trim,
    bleu,
    chrf,
    evaluate_translation,
    generate,
    generate_dense_and_pruned,
    language_of,
    paired_translation_test,
    perplexity,
    target_language_rate,
)
from mlprune.export import (
    MASKS,
    REPORT,
    build_report,
    export_pruned,
    load_compressed_tensors,
    read_report,
)
from mlprune.models import LoadedModel, linear_modules, load_model
from mlprune.pipeline import (
    SIGNIFICANCE_COLUMNS,
    PruneSpec,
    paired_vs_dense,
    prune,
    read_sweep_rows,
    sweep,
)
from mlprune.prune import MaskSet, pruned, rank_modules


def test_trim_stops_at_end_of_line_and_eos(tok):
    ids = tok("Bonjour\nHello", add_special_tokens=False)["input_ids"]
    g = _trim(tok, ids, [0.5] * len(ids))
    assert g.text == "Bonjour" and len(g.probs) == len(g.tokens) == 7
    ids = tok("Hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 70, 71]
    assert _trim(tok, ids, [0.9] * len(ids)).text == "Hi"


def test_generate_is_greedy_and_batched_consistently(llama, tok):
    prompts = ["French: Bonjour\nEnglish:", "a much longer prompt to force left padding here:"]
    batched = generate(llama, tok, prompts, max_new_tokens=8, batch_size=2)
    alone = [generate(llama, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]
    # the greedy continuation equals a manual argmax loop
    ids = torch.tensor([encode(tok, [prompts[0]])[0]])
    for _ in range(len(alone[0].tokens)):
        nxt = llama(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    manual = tok.decode(ids[0, len(encode(tok, [prompts[0]])[0]):])
    assert manual.split("\n")[0].strip() == alone[0].text
    assert all(0 < p <= 1 for p in alone[0].probs)


def test_long_steps_report_their_stage_with_its_count(loaded, corpus):
    """One progress protocol, (stage, fraction): each step says how far, the caller what."""
    seen = []
    prune(loaded, corpus, PruneSpec(pair="fr-en", samples=3, mode="sequential"), batch_size=2,
          progress=lambda stage, f: seen.append((stage, f)))
    n = len(linear_modules(loaded.model))
    assert seen == [("calibration (mt:fr-en), batch 1/2", 0.5),
                    ("calibration (mt:fr-en), batch 2/2", 1.0),
                    ("sequential calibration, layer 1/2", 0.5),
                    ("sequential calibration, layer 2/2", 1.0),
                    *[(f"ranking, module {i}/{n}", i / n) for i in range(1, n + 1)]]
    seen.clear()
    generate(loaded.model, loaded.tokenizer, ["a:", "b:", "c:"], max_new_tokens=2, batch_size=2,
             progress=lambda stage, f: seen.append((stage, f)))
    assert seen == [("prompt 2/3", 2 / 3), ("prompt 3/3", 1.0)]


def test_the_cli_bar_follows_the_stage_and_restarts_with_the_next(monkeypatch, capsys):
    import tqdm

    from mlprune.cli import _bar

    made = []

    class Counted(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Counted)
    bar = _bar()
    bar("calibration (mt:fr-en), batch 1/2", 0.5)
    bar("calibration (mt:fr-en), batch 2/2", 1.0)
    assert len(made) == 1  # the count moves within one stage's bar
    bar("ranking, module 1/4", 0.25)
    assert len(made) == 2  # the fraction went back: a new stage, a new bar
    err = capsys.readouterr().err
    assert "batch 1/2:  50%" in err and "batch 2/2: 100%" in err and "module 1/4:  25%" in err


def test_dense_and_pruned_generations_leave_model_dense(llama, tok):
    stats = capture(llama, tok, ["some calibration text", "more text here"])
    masks = rank_modules(llama, stats).masks(0.9)
    dense_weights = {k: v.clone() for k, v in llama.state_dict().items()}
    dense, sparse = generate_dense_and_pruned(llama, tok, ["Hello:"], masks, max_new_tokens=6)
    assert all(torch.equal(dense_weights[k], v) for k, v in llama.state_dict().items())
    assert dense[0].tokens != sparse[0].tokens or dense[0].probs != sparse[0].probs


def test_metrics():
    refs = ["The cat sleeps on the sofa.", "It is sunny today."]
    assert chrf(refs, refs) == pytest.approx(100)
    assert bleu(refs, refs) == pytest.approx(100)
    assert chrf(["xyz qqq", "zzz"], refs) < 20
    assert language_of("Le chat dort sur le canapé et il fait beau.", ("en", "fr", "de")) == "fr"
    assert target_language_rate(["Le chat dort sur le canapé.", "The cat sleeps on the sofa."],
                                "fr", ("en", "fr")) == 0.5


def test_perplexity_equals_direct_computation(llama, tok):
    texts = ["Hello world, this is a test.", "Short."]
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([encode(tok, [t])[0]])
        logp = torch.log_softmax(llama(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
    assert perplexity(llama, tok, texts, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-4)
    with pytest.raises(MlpruneError, match="too short"):
        perplexity(llama, tok, [""])


def test_export_round_trip(tmp_path, loaded, corpus):
    result = prune(loaded, corpus, PruneSpec(pair="fr-en", sparsity=0.5, samples=4, mode="sequential",
                                             protect="top-k:2"))
    report = build_report(loaded, result.masks, spec={"x": 1},
                          calibration_texts=result.calibration.prompts.texts, timings=result.timings)
    out = export_pruned(loaded, result.masks, tmp_path / "pruned", report)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", MASKS, REPORT}
    # the in-memory model stays dense
    assert all((linear_modules(loaded.model)[n].weight != 0).all() for n in result.masks.modules)
    # loads back with mlprune and with plain transformers, pruned weights zero
    back = load_model(str(out))
    plain = AutoModelForCausalLM.from_pretrained(out)
    masks = MaskSet.load(out / MASKS)
    for name in masks.modules:
        for model in (back.model, plain):
            w = linear_modules(model)[name].weight
            assert torch.equal(w == 0, ~masks.keep(name))
    rep = read_report(out)
    assert rep["sparsity_reached"] == pytest.approx(0.5)
    assert rep["calibration_texts"] == result.calibration.prompts.texts
    assert rep["method"] == "wanda" and rep["pattern"] == "unstructured"
    assert set(rep["sparsity_per_module"]) == set(result.masks.modules)
    with pytest.raises(MlpruneError, match="already exists"):
        export_pruned(loaded, result.masks, out, report)


@pytest.mark.parametrize("pattern, sparsity, fmt", [("2:4", 0.0, "sparse-24-bitmask"),
                                                     ("unstructured", 0.6, "sparse-bitmask")])
def test_compressed_tensors_export_reloads_to_the_pruned_weights(tmp_path, loaded, pattern,
                                                                  sparsity, fmt):
    masks = rank_modules(loaded.model, method="magnitude").masks(sparsity, pattern)
    with pruned(loaded.model, masks):
        expected = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = export_pruned(loaded, masks, tmp_path / "ct", build_report(loaded, masks),
                        format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["sparsity_config"]["format"] == fmt
    paths = {linear_modules(loaded.model)[n].path for n in masks.modules}
    assert set(config["sparsity_config"]["targets"]) == paths
    # every pruned module stored compressed (values + bitmask), not as its dense weight
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(f"{p}.bitmask" in keys and f"{p}.weight" not in keys for p in paths)
    # the library that wrote it reads it back into a fresh model: exactly the pruned weights
    fresh = AutoModelForCausalLM.from_config(loaded.model.config).eval()
    load_compressed_tensors(out, fresh)
    got = fresh.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert read_report(out)["format"] == "compressed-tensors"


def test_compressed_tensors_refuses_what_it_cannot_write(tmp_path, loaded, tok):
    from tiny import tiny_model

    gpt2 = LoadedModel(tiny_model("gpt2"), tok, "gpt2", "local")
    with pytest.raises(MlpruneError, match="Conv1D"):
        export_pruned(gpt2, rank_modules(gpt2.model, method="magnitude").masks(0.0, "2:4"),
                      tmp_path / "g", {}, format="compressed-tensors")
    masks = rank_modules(loaded.model, method="magnitude").masks(0.5)
    with pytest.raises(MlpruneError, match="Unknown export format"):
        export_pruned(loaded, masks, tmp_path / "x", {}, format="gguf")
    with pytest.raises(MlpruneError, match="no compressed-tensors"):
        export_pruned(loaded, masks, tmp_path / "hf", {})
        load_compressed_tensors(tmp_path / "hf", loaded.model)
    assert not (tmp_path / "x").exists()


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, loaded, corpus, monkeypatch):
    result = prune(loaded, corpus, PruneSpec(pair="fr-en", sparsity=0.5, samples=2, mode="one-shot"))
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        export_pruned(loaded, result.masks, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(dense[k], v) for k, v in loaded.model.state_dict().items())


def test_sweep_resumes_after_a_crash_with_the_same_table(tmp_path, loaded, corpus):
    kwargs = dict(methods=["wanda-mt", "magnitude"], sparsities=[0.0, 0.5], pairs=["fr-en"],
                  limit=2, base=PruneSpec(samples=2))
    full = sweep(loaded, corpus, out_csv=tmp_path / "full.csv", **kwargs)
    assert len(full) == 4
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        sweep(loaded, corpus, out_csv=tmp_path / "resumed.csv", should_stop=stop_after_two, **kwargs)
    partial = (tmp_path / "resumed.csv").read_text().splitlines()
    assert 1 < len(partial) < 5  # header + the rows finished before the stop
    resumed = sweep(loaded, corpus, out_csv=tmp_path / "resumed.csv", **kwargs)
    key = lambda r: (r["method"], float(r["sparsity"]))  # noqa: E731
    for a, b in zip(sorted(full, key=key), sorted(resumed, key=key)):
        assert a["method"] == b["method"] and float(a["sparsity"]) == float(b["sparsity"])
        assert float(a["chrf"]) == pytest.approx(float(b["chrf"]))
        assert float(a["perplexity"]) == pytest.approx(float(b["perplexity"]), rel=1e-5)
        for col in SIGNIFICANCE_COLUMNS.values():  # dense outputs made again when resumed
            assert a[col] == b[col] if a[col] is None else a[col] == pytest.approx(b[col])
    assert (tmp_path / "resumed.csv").read_text().count("\n") == 5


def _outputs(result: dict) -> list[str]:
    return [o["output"] for o in result["outputs"]]


def test_sweep_rows_carry_the_paired_test_against_dense(tmp_path, loaded, corpus, monkeypatch):
    """chrf_p_vs_dense and bleu_p_vs_dense are sacrebleu's paired test of the row's outputs
    against the dense outputs of the same sentences, as evaluate's function gives it directly;
    the same when a resumed sweep never measured the dense row itself."""
    import mlprune.pipeline as pipeline

    measured: list[dict] = []  # what the sweep's evaluations returned, outputs and all

    def recording(*args, **kwargs):
        measured.append(evaluate_translation(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(pipeline, "evaluate_translation", recording)
    kwargs = dict(methods=["magnitude"], sparsities=[0.0, 0.5], pairs=["fr-en"], limit=2,
                  base=PruneSpec(samples=2))
    rows = sweep(loaded, corpus, out_csv=tmp_path / "s.csv", **kwargs)
    dense_row, row = sorted(rows, key=lambda r: r["sparsity"])
    dense, sparse = measured
    assert (dense_row["chrf"], row["chrf"]) == (dense["chrf"], sparse["chrf"])
    assert all(dense_row[c] is None for c in SIGNIFICANCE_COLUMNS.values())
    assert _outputs(dense) != _outputs(sparse)  # else p would be 1 by definition
    direct = paired_translation_test([o["reference"] for o in dense["outputs"]],
                                     _outputs(dense), _outputs(sparse), lang="en")
    for metric, col in SIGNIFICANCE_COLUMNS.items():
        assert row[col] == direct[metric]["p_value"] and 0 < row[col] <= 1
    # written and read back: empty on the dense row, the same number on the pruned one
    read = sorted(read_sweep_rows(tmp_path / "s.csv"), key=lambda r: r["sparsity"])
    assert [(r["chrf_p_vs_dense"], r["bleu_p_vs_dense"]) for r in read] == \
        [(None, None), (row["chrf_p_vs_dense"], row["bleu_p_vs_dense"])]
    json.dumps(read, allow_nan=False)
    # resumed by a new call that never measured the dense row: its outputs are made again
    lines = (tmp_path / "s.csv").read_text().splitlines(keepends=True)
    dense_line = next(line for line in lines[1:] if ",0.0," in line)
    (tmp_path / "resumed.csv").write_text(lines[0] + dense_line)
    measured.clear()
    again = sweep(loaded, corpus, out_csv=tmp_path / "resumed.csv", **kwargs)
    assert len(measured) == 2 and _outputs(measured[1]) == _outputs(dense)  # pruned, dense
    again = next(r for r in again if r["sparsity"] == 0.5)
    assert [again[c] for c in SIGNIFICANCE_COLUMNS.values()] == \
        [row[c] for c in SIGNIFICANCE_COLUMNS.values()]


def test_identical_outputs_are_not_significant_and_old_csvs_are_refused(tmp_path, loaded, corpus):
    outputs = [{"reference": r, "output": o} for r, o in
               (("The cat sleeps.", "The cat sleeps."), ("It is sunny.", "It rains."))]
    # sacrebleu gives two identical systems its smallest p-value; no difference is p = 1
    from sacrebleu.metrics import CHRF
    from sacrebleu.significance import PairedTest

    refs, hyps = [o["reference"] for o in outputs], [o["output"] for o in outputs]
    _, direct = PairedTest([("a", hyps), ("b", hyps)], {"chrf": CHRF()}, references=[refs],
                           test_type="bs", n_samples=0)()
    assert direct[next(k for k in direct if k != "System")][1].p_value == pytest.approx(1 / 1001)
    raw = paired_translation_test(refs, hyps, hyps)
    assert raw["chrf"]["p_value"] == raw["bleu"]["p_value"] == 1.0
    same = paired_vs_dense(outputs, outputs, "en")
    assert same["chrf"]["p_value"] == same["bleu"]["p_value"] == 1.0
    assert same["chrf"]["difference"] == 0.0
    with pytest.raises(MlpruneError, match="not of the same sentences"):
        paired_vs_dense(outputs, outputs[::-1], "en")
    # a CSV from before the p-value columns: resuming into it would misalign the rows
    old = tmp_path / "old.csv"
    old.write_text("pair,method,sparsity,pattern,chrf,bleu,target_language_rate,perplexity,n,"
                   "sparsity_reached\nfr-en,magnitude,0.0,unstructured,1,1,1,1,1,0\n")
    with pytest.raises(MlpruneError, match="without the column chrf_p_vs_dense"):
        sweep(loaded, corpus, methods=["magnitude"], sparsities=[0.0, 0.5], pairs=["fr-en"],
              limit=1, out_csv=old)
    assert old.read_text().count("\n") == 2  # untouched


def test_sweep_command_prints_the_p_values(tiny_folder, corpus_file, tmp_path, capsys):
    from mlprune.cli import main

    assert main(["sweep", "--model", str(tiny_folder), "--corpus", str(corpus_file),
                 "--methods", "magnitude", "--sparsities", "0,0.5", "--limit", "2",
                 "--samples", "2", "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].split()
    assert header[-2:] == ["chrf_p_vs_dense", "bleu_p_vs_dense"]
    dense, pruned_row = (line.split() for line in out[1:3])
    assert dense[-2:] == ["-", "-"] and 0 < float(pruned_row[-2]) <= 1
    rows = read_sweep_rows(tmp_path / "s.csv")
    assert float(pruned_row[-2]) == pytest.approx(rows[1]["chrf_p_vs_dense"], abs=5e-4)


def test_spec_validation():
    for spec, message in [(PruneSpec(method="obs"), "Unknown method"), (PruneSpec(mode="x"), "Unknown mode"),
                          (PruneSpec(sparsity=1.0), "Sparsity"), (PruneSpec(pair="en-en"), "same language"),
                          (PruneSpec(samples=0), "at least 1"), (PruneSpec(pattern="8:4"), "smaller than M")]:
        with pytest.raises(MlpruneError, match=message):
            spec.validate()


def test_cli_end_to_end(tmp_path, tiny_folder, corpus_file, capsys):
    from mlprune.cli import main

    out_json = tmp_path / "a.json"
    assert main(["analyze", "--model", str(tiny_folder), "--corpus", str(corpus_file), "--pair", "fr-en",
                 "--mono", "en", "--samples", "3", "--json", str(out_json), "--figure",
                 str(tmp_path / "f.html")]) == 0
    data = json.loads(out_json.read_text())
    assert len(data["layers"]) == 2
    top = data["layers"][0]["top"][0]
    assert set(top) == {"dim", "magnitude", "ratio_to_median"} and "median" in data["layers"][0]
    assert set(data["sets"]) == {"mt:fr-en", "mono:en"}
    assert (tmp_path / "f.html").stat().st_size > 1000

    pruned_dir = tmp_path / "p"
    assert main(["prune", "--model", str(tiny_folder), "--corpus", str(corpus_file), "--pair", "fr-en",
                 "--sparsity", "0.5", "--pattern", "2:4", "--samples", "3", "--out", str(pruned_dir)]) == 0
    assert read_report(pruned_dir)["pattern"] == "2:4"
    metrics = tmp_path / "e.json"
    assert main(["eval", "--model", str(pruned_dir), "--corpus", str(corpus_file), "--pair", "fr-en",
                 "--limit", "2", "--json", str(metrics)]) == 0
    assert {"chrf", "bleu", "target_language_rate", "perplexity", "n"} <= set(json.loads(metrics.read_text()))
    assert main(["compare", "--model", str(tiny_folder), "--pruned", str(pruned_dir), "--corpus",
                 str(corpus_file), "--limit", "1"]) == 0
    assert "pruned   :" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["prune", "--sparsity", "1.5", "--out", "x"], "Sparsity must be in [0, 1)"),
    (["prune", "--method", "obs", "--out", "x"], "Unknown method 'obs'"),
    (["prune", "--pattern", "4:2", "--out", "x"], "smaller than M"),
    (["prune", "--pair", "fr-fr", "--out", "x"], "same language twice"),
    (["eval", "--model", "/does/not/exist"], "No model folder or .gguf file"),
])
def test_cli_bad_input_is_one_sentence(args, message, capsys):
    from mlprune.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mlprune: ") and message in err and "Traceback" not in err


def test_cli_missing_language(tiny_folder, corpus_file, capsys):
    from mlprune.cli import main

    assert main(["eval", "--model", str(tiny_folder), "--corpus", str(corpus_file), "--pair", "fr-ja"]) == 2
    assert "has no column for ja" in capsys.readouterr().err


@pytest.mark.parametrize("command, limit", [("eval", "-3"), ("eval", "0"), ("compare", "-1")])
def test_cli_refuses_a_limit_below_one(command, limit, tiny_folder, corpus_file, capsys):
    """A negative limit used to slice from the end: all but three sentences, quietly."""
    from mlprune.cli import main

    extra = ["--pruned", str(tiny_folder)] if command == "compare" else []
    assert main([command, "--model", str(tiny_folder), "--corpus", str(corpus_file), "--pair",
                 "fr-en", "--limit", limit, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"mlprune: The number of held-out sentences (limit) must be at least 1; got {limit}."
