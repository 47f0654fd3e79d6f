"""Fidelity to the authors' code (hwichan0720/pruning_for_multilinguality): padding on the
tokenizer's side, the ratio variant's second set replayed through the pruned layers,
monolingual prompts of `shots` sentences, OWL's 2-lambda spread, the 1000-item draw of XNLI
and MARC, and --task-limit counted per language."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from mlprune import MlpruneError
from mlprune.allocation import Allocation, layer_sparsities, spread
from mlprune.capture import batches, capture, padding_side
from mlprune.cli import build_parser, main, spec_from_args
from mlprune.models import linear_modules
from mlprune.pipeline import PruneSpec, calibrate, prune
from mlprune.prompts import calibration_prompts, monolingual_prompts
from mlprune.protocol import DIFFERENCES, PROTOCOLS
from mlprune.prune import MaskSet, pruned, rank_modules, sequential_run
from mlprune.zeroshot import Task, TaskItem, load_task

TEXTS = ["Hello there, friend.", "Bonjour tout le monde, ça va ?", "short"]
CODE = ["def f(x):\n    return x + 1\n", "for i in range(3):\n    print(i)\n",
        "import os\nprint(os.getcwd())\n"]


# --------------------------------------------------------------------------- 1. padding side


def _authors_scaler_rows(model, tok, texts, n):
    """The authors' WrappedGPT: each prompt tokenized with padding="max_length" (on the
    tokenizer's padding_side), run alone with no attention mask, and scaler_row the running
    mean over prompts of ||X_j||^2 over all n positions."""
    infos = linear_modules(model)
    scaler = {name: torch.zeros(info.in_features) for name, info in infos.items()}
    seen = {"n": 0}

    def hook(name):
        def fn(module, args):
            inp = args[0].reshape(-1, args[0].shape[-1]).t().float()
            k = seen["n"]
            scaler[name] *= k / (k + 1)
            scaler[name] += torch.norm(inp, p=2, dim=1) ** 2 / (k + 1)
        return fn

    handles = [info.module.register_forward_pre_hook(hook(name)) for name, info in infos.items()]
    try:
        for text in texts:
            ids = tok([text], padding="max_length", max_length=n, truncation=True,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                model.model(input_ids=ids)  # no attention mask, as prepare_calibration_input
            seen["n"] += 1
    finally:
        for h in handles:
            h.remove()
    return scaler


def test_left_padding_equals_the_authors_running_mean():
    model = tiny_model("llama")
    tok = byte_tokenizer()
    tok.padding_side = "left"  # as BLOOM's and Llama's tokenizers pad
    n = 24
    ids = tok([TEXTS[2]], padding="max_length", max_length=n).input_ids[0]
    assert ids[0] == tok.pad_token_id and ids[-1] != tok.pad_token_id  # really on the left
    stats = capture(model, tok, TEXTS, batch_size=2, pad_to=n)  # the tokenizer's side
    assert stats.meta["pad_side"] == "left" and stats.n_tokens == len(TEXTS) * n
    scaler = _authors_scaler_rows(model, tok, TEXTS, n)
    for name in scaler:
        torch.testing.assert_close(stats.input_sqnorms[name] / stats.n_prompts, scaler[name],
                                   rtol=1e-4, atol=1e-5)
    # an explicit side overrides the tokenizer's, both ways
    right_tok = byte_tokenizer()
    assert right_tok.padding_side == "right"
    forced = capture(model, right_tok, TEXTS, batch_size=2, pad_to=n, pad_side="left")
    torch.testing.assert_close(forced.input_sqnorms["layers.1.mlp.down"],
                               stats.input_sqnorms["layers.1.mlp.down"])
    right = capture(model, tok, TEXTS, batch_size=2, pad_to=n, pad_side="right")
    assert right.meta["pad_side"] == "right"
    assert not torch.allclose(right.input_sqnorms["layers.1.attn.q"],
                              stats.input_sqnorms["layers.1.attn.q"])
    right_scaler = _authors_scaler_rows(model, right_tok, TEXTS, n)
    torch.testing.assert_close(right.input_sqnorms["layers.1.attn.q"] / right.n_prompts,
                               right_scaler["layers.1.attn.q"], rtol=1e-4, atol=1e-5)
    with pytest.raises(MlpruneError):
        capture(model, tok, TEXTS, pad_to=n, pad_side="middle")


def test_batches_pad_on_the_side_asked():
    left = next(batches([[5, 6], [7]], 2, 0, pad_to=4, side="left"))
    assert left[0].tolist() == [[0, 0, 0, 7], [0, 0, 5, 6]]
    assert left[1].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    right = next(batches([[5, 6], [7]], 2, 0, pad_to=4))
    assert right[0].tolist() == [[7, 0, 0, 0], [5, 6, 0, 0]]
    tok = byte_tokenizer()
    assert padding_side(tok) == "right" and padding_side(tok, "left") == "left"
    tok.padding_side = "left"
    assert padding_side(tok) == padding_side(tok, "tokenizer") == "left"


def test_spec_and_cli_carry_the_padding_side(loaded, corpus):
    assert PruneSpec().pad_side == "tokenizer"
    with pytest.raises(MlpruneError):
        PruneSpec(pad_side="up").validate()
    args = build_parser().parse_args(["prune", "--out", "x", "--pad-to", "40",
                                      "--pad-side", "left"])
    assert spec_from_args(args) == PruneSpec(pad_to=40, pad_side="left")
    kw = dict(samples=2, shots=1, mode="one-shot", pad_to=200)  # longer than every prompt
    left = calibrate(loaded, corpus, PruneSpec(pad_side="left", **kw))
    right = calibrate(loaded, corpus, PruneSpec(pad_side="right", **kw))
    assert (left.stats.meta["pad_side"], right.stats.meta["pad_side"]) == ("left", "right")
    # the cache keeps the two apart
    assert not torch.equal(left.stats.input_sqnorms["layers.1.attn.q"],
                           right.stats.input_sqnorms["layers.1.attn.q"])


def test_sequential_pass_pads_on_the_side_asked(loaded, corpus):
    kw = dict(samples=2, shots=1, pad_to=200, sparsity=0.5)
    left = prune(loaded, corpus, PruneSpec(pad_side="left", **kw))
    right = prune(loaded, corpus, PruneSpec(pad_side="right", **kw))
    assert any(not torch.equal(left.masks.pruned_cols[n], right.masks.pruned_cols[n])
               for n in left.masks.modules if n.startswith("layers.1."))


# --------------------------------------------------------------------------- 2. ratio replay


def _layers_below(masks: MaskSet, model, layer: int) -> MaskSet:
    infos = linear_modules(model)
    names = [n for n in masks.modules if infos[n].layer < layer]
    return MaskSet({n: masks.pruned_cols[n] for n in names},
                   {n: masks.in_features[n] for n in names}, masks.target, masks.pattern)


def test_ratio_second_set_is_replayed_through_the_pruned_layers():
    model = tiny_model("llama", layers=3)
    tok = byte_tokenizer()
    dense = capture(model, tok, TEXTS)
    other = capture(model, tok, CODE)
    run = sequential_run(model, tok, TEXTS, dense, method="ratio", sparsity=0.5, other=other,
                         other_prompts=CODE)
    infos = linear_modules(model)
    assert run.other is not other and run.other.meta["mode"] == "sequential"
    for layer in range(3):
        # by hand: the second set run through the model with layers < l pruned
        with pruned(model, _layers_below(run.masks, model, layer)):
            by_hand = capture(model, tok, CODE)
        for name in (n for n in infos if infos[n].layer == layer):
            torch.testing.assert_close(run.other.input_sqnorms[name], by_hand.input_sqnorms[name],
                                       rtol=1e-4, atol=1e-5)
            if layer == 0:  # nothing pruned before layer 0: the dense statistics
                torch.testing.assert_close(run.other.input_sqnorms[name],
                                           other.input_sqnorms[name])
    assert not torch.allclose(run.other.input_sqnorms["layers.2.attn.q"],
                              other.input_sqnorms["layers.2.attn.q"])
    # the masks are the ratio of the two sets as the pass saw them
    again = rank_modules(model, run.stats, method="ratio", other=run.other).masks(0.5)
    for name in run.masks.modules:
        assert torch.equal(again.pruned_cols[name], run.masks.pruned_cols[name])
    # without the second set's prompts it stays dense (as before)
    plain = sequential_run(model, tok, TEXTS, dense, method="ratio", sparsity=0.5, other=other)
    assert plain.other is other
    assert any(not torch.equal(plain.masks.pruned_cols[n], run.masks.pruned_cols[n])
               for n in run.masks.modules)


def test_ratio_replay_resumes_from_a_checkpoint(tmp_path, monkeypatch):
    from mlprune.capture import LayerRunner

    model = tiny_model("llama", layers=3)
    tok = byte_tokenizer()
    dense, other = capture(model, tok, TEXTS), capture(model, tok, CODE)
    run = dict(method="ratio", sparsity=0.5, other=other, other_prompts=CODE)
    whole = sequential_run(model, tok, TEXTS, dense, checkpoint_dir=tmp_path / "ck", **run)
    monkeypatch.setattr(LayerRunner, "collect",
                        lambda *a, **k: pytest.fail("a saved layer was collected again"))
    resumed = sequential_run(model, tok, TEXTS, dense, checkpoint_dir=tmp_path / "ck", **run)
    for name in whole.masks.modules:
        assert torch.equal(whole.masks.pruned_cols[name], resumed.masks.pruned_cols[name])
        torch.testing.assert_close(whole.other.input_sqnorms[name],
                                   resumed.other.input_sqnorms[name])


def test_pipeline_ratio_sequential_ranks_on_the_replayed_second_set(loaded, corpus):
    spec = PruneSpec(method="ratio", samples=2, sparsity=0.5, mode="sequential")
    result = prune(loaded, corpus, spec)
    calib = result.calibration
    assert calib.other_prompts is not None and calib.other_prompts.name == "code"
    run = sequential_run(loaded.model, loaded.tokenizer, calib.prompts, calib.stats,
                         method="ratio", sparsity=0.5, other=calib.other,
                         other_prompts=calib.other_prompts)
    for name in run.masks.modules:
        assert torch.equal(result.masks.pruned_cols[name], run.masks.pruned_cols[name])


# --------------------------------------------------------------------------- 3. monolingual


def test_paper_monolingual_prompts_hold_shots_sentences(corpus, loaded):
    paper = monolingual_prompts(corpus, "fr", shots=3, samples=4, separator="eos")
    assert all(len(lines) == 3 for lines in paper.segments)  # the authors' get_mono
    clean = monolingual_prompts(corpus, "fr", shots=3, samples=4)
    assert all(t.count("\n") == 6 for t in clean.texts)  # as long as a translation prompt
    assert (PROTOCOLS["paper"].mono_per_shot, PROTOCOLS["clean"].mono_per_shot) == (1, 2)
    assert any(row[0] == "sentences per monolingual prompt" for row in DIFFERENCES)
    spec = PruneSpec.preset("paper", calibration="mono", shots=2, samples=2, mode="one-shot")
    calib = calibrate(loaded, corpus, spec)
    assert [len(lines) for lines in calib.prompts.segments] == [2, 2]
    assert calibration_prompts(corpus, "mono", "fr-en", shots=2, samples=1).texts[0] \
        .count("\n") == 4


# --------------------------------------------------------------------------- 4. OWL spread


def test_owl_spread_is_two_lambda_wide_around_the_mean():
    importance, sizes = {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0}, dict.fromkeys(range(4), 1)
    per_layer = layer_sparsities(spread(importance, sizes, 0.08), sizes, 0.5)
    assert [round(per_layer[k], 10) for k in range(4)] == [0.54, 0.54, 0.54, 0.38]
    assert max(per_layer.values()) - min(per_layer.values()) == pytest.approx(2 * 0.08)
    assert 0.5 - per_layer[3] == pytest.approx(0.12)  # 1.5 lambda from the target, not lambda
    alloc = Allocation.from_importance("owl", importance, {f"m{k}": k for k in range(4)},
                                       {f"m{k}": 10 for k in range(4)}, 0.08)
    assert alloc.sparsities(0.5)[3] == pytest.approx(0.38)


# --------------------------------------------------------------------------- 5. paper draw


def _xnli_folder(tmp_path, n):
    folder = tmp_path / "xnli"
    folder.mkdir()
    for lang in ("en", "fr"):
        (folder / f"{lang}.test.jsonl").write_text("\n".join(
            json.dumps({"premise": f"{lang} premise {i}", "hypothesis": f"{lang} h {i}",
                        "label": i % 3}) for i in range(n)) + "\n", encoding="utf-8")
    return folder


def test_paper_sample_draws_the_authors_items_from_xnli_and_marc(tmp_path):
    folder = _xnli_folder(tmp_path, 30)
    task = load_task(f"xnli:{folder}", sample=10)
    order = [str(i) for i in np.random.default_rng(0).permutation(30)[:10]]
    for lang in ("en", "fr"):  # parallel files: the same items in both languages
        assert [it.id for it in task.items if it.lang == lang] == order
    assert len(load_task(f"xnli:{folder}")) == 60  # no sample: every item
    # MARC: 3-star reviews dropped first, as their MARC-2 files were made, then drawn
    stars = [1, 3, 5, 2, 3, 4, 5, 1, 3, 2, 4, 4]
    path = tmp_path / "de.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"r{i}", "review": f"text {i}", "stars": s})
                              for i, s in enumerate(stars)) + "\n", encoding="utf-8")
    kept = [f"r{i}" for i, s in enumerate(stars) if s != 3]
    marc = load_task(f"marc:{path}", sample=4)
    assert [it.id for it in marc.items] == [kept[i] for i in
                                            np.random.default_rng(0).permutation(len(kept))[:4]]
    # a task file of items is never sampled
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"id": str(i), "lang": "en", "prompt": "p",
                                           "choices": ["a", "b"], "label": 0})
                               for i in range(5)) + "\n", encoding="utf-8")
    assert len(load_task(items, sample=2)) == 5


def test_eval_under_the_paper_protocol_scores_the_draw(tiny_folder, tmp_path, monkeypatch):
    assert PROTOCOLS["paper"].task_sample == 1000 and PROTOCOLS["clean"].task_sample is None
    monkeypatch.setitem(PROTOCOLS, "paper", replace(PROTOCOLS["paper"], task_sample=3))
    folder = _xnli_folder(tmp_path, 8)
    for protocol, n in (("paper", 3), ("clean", 8)):
        out = tmp_path / f"{protocol}.json"
        assert main(["eval", "--model", str(tiny_folder), "--task", f"xnli:{folder}",
                     "--protocol", protocol, "--resamples", "10", "--json", str(out)]) == 0
        report = json.loads(out.read_text())["tasks"]["xnli"]
        assert {r["lang"]: r["n"] for r in report["languages"]} == {"en": n, "fr": n,
                                                                     "non-en": n}


# --------------------------------------------------------------------------- 6. task limit


def test_task_limit_counts_items_per_language_when_ids_differ():
    langs = ("en", "fr", "de", "sw", "zh")
    items = [TaskItem(f"{lang}-{i}", lang, "p", ("a", "b"), 0) for lang in langs
             for i in range(20)]
    small = Task("own-ids", items).subset(6)
    for lang in langs:
        assert [it.id for it in small.items if it.lang == lang] == [f"{lang}-{i}" for i in range(6)]
    assert len(small) == 30  # 6 per language, not 6 ids shared out among 5 languages


def test_task_limit_keeps_shared_ids_aligned():
    items = [TaskItem(str(i), lang, "p", ("a", "b"), 0) for i in (4, 2, 9, 7, 1)
             for lang in ("en", "fr")]
    items += [TaskItem("extra", "en", "p", ("a", "b"), 0)]
    small = Task("parallel", items).subset(3)
    for lang in ("en", "fr"):
        assert [it.id for it in small.items if it.lang == lang] == ["4", "2", "9"]
    # ids that are shared only in part: each language still gets its first three, in one order
    mixed = [TaskItem(f"e{i}", "en", "p", ("a", "b"), 0) for i in range(3)]
    mixed += [TaskItem(str(i), lang, "p", ("a", "b"), 0) for i in range(4) for lang in ("en", "fr")]
    part = Task("mixed", mixed).subset(3)
    assert [it.id for it in part.items if it.lang == "en"] == ["e0", "e1", "e2"]
    assert [it.id for it in part.items if it.lang == "fr"] == ["0", "1", "2"]
    with pytest.raises(MlpruneError):
        Task("parallel", items).subset(0)
