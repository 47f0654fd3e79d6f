"""Larger than one device: offloaded models give the statistics and masks of in-memory ones,
the memory plan's verdicts, per-layer checkpoints that resume, and half-precision loading."""

from __future__ import annotations

import pytest
import torch
from tiny import byte_tokenizer, save_tiny, tiny_model

from mlprune import MlpruneError, kernels
from mlprune.capture import capture
from mlprune.models import (
    CANNOT_FIT,
    FITS,
    STREAMS,
    LoadedModel,
    free_memory,
    is_offloaded,
    linear_modules,
    load_model,
    memory_plan,
    onloaded,
    parse_max_memory,
    placement,
)
from mlprune.prune import (
    applied_masks,
    pruned,
    rank_modules,
    sequential_stats_and_masks,
)

TEXTS = ["The cat sleeps on the sofa.", "Le chat dort sur le canapé.", "Où est la gare ?",
         "We go to the market tomorrow.", "short"]


def _weights(model) -> dict[str, torch.Tensor]:
    """Every parameter's value, offloaded ones read from their offloaded copy."""
    out = {}
    for name, module in model.named_modules():
        with onloaded(module, recurse=False):
            for leaf, p in module.named_parameters(recurse=False):
                out[f"{name}.{leaf}" if name else leaf] = p.detach().clone()
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny llama (hidden 64, 4 layers) loaded in memory and loaded with a CPU cap
    below its size, so that accelerate offloads most of it to disk."""
    folder = save_tiny(tmp_path_factory.mktemp("models") / "llama64", hidden=64, layers=4)
    dense = load_model(str(folder), dtype="float32")
    size = sum(p.numel() * p.element_size() for p in dense.model.parameters())
    offloaded = load_model(str(folder), dtype="float32", device_map="auto",
                           max_memory={"cpu": size // 3},
                           offload_folder=tmp_path_factory.mktemp("offload"))
    return dense, offloaded, size


def test_an_offloaded_model_gets_the_statistics_and_masks_of_the_in_memory_one(pair):
    dense, off, size = pair
    # really offloaded: the cap is below the model, layers sit on disk as meta tensors
    assert "disk" in off.model.hf_device_map.values() and is_offloaded(off.model)
    assert any(p.device.type == "meta" for p in off.model.parameters())
    assert off.plan is not None and off.plan.verdict == STREAMS and off.plan.caps["cpu"] < size
    assert "disk" in placement(off.model) and "disk" in off.facts()["device"]
    before = _weights(off.model)
    assert all(torch.equal(before[k], v) for k, v in _weights(dense.model).items())

    # bit-equal, not just close: the same fp32 kernels run on the same tensors in the same
    # batches; offloading changes where weights wait, never what a layer computes
    a = capture(dense.model, dense.tokenizer, TEXTS, batch_size=2)
    b = capture(off.model, off.tokenizer, TEXTS, batch_size=2)
    assert torch.equal(a.hidden_norms, b.hidden_norms)
    assert torch.equal(a.final_norms, b.final_norms)
    assert all(torch.equal(a.input_sqnorms[k], b.input_sqnorms[k]) for k in a.input_sqnorms)
    assert all(torch.equal(a.active_counts[k], b.active_counts[k]) for k in a.active_counts)
    for pattern in ("unstructured", "2:4"):
        sa, ma = sequential_stats_and_masks(dense.model, dense.tokenizer, TEXTS, a,
                                            method="wanda", sparsity=0.5, pattern=pattern,
                                            batch_size=2)
        sb, mb = sequential_stats_and_masks(off.model, off.tokenizer, TEXTS, b, method="wanda",
                                            sparsity=0.5, pattern=pattern, batch_size=2)
        assert ma.modules == mb.modules == list(linear_modules(dense.model))
        assert all(torch.equal(sa.input_sqnorms[k], sb.input_sqnorms[k]) for k in sa.input_sqnorms)
        assert all(torch.equal(ma.pruned_cols[k], mb.pruned_cols[k]) for k in ma.modules)
        assert mb.overall_sparsity() == 0.5
    # one-shot ranking reads each offloaded module's weights
    one_shot = rank_modules(dense.model, a).masks(0.5)
    assert all(torch.equal(one_shot.pruned_cols[k], rank_modules(off.model, b).masks(0.5)
                           .pruned_cols[k]) for k in one_shot.modules)
    # the offloaded weights are untouched, and nothing is left applied
    assert applied_masks(off.model) is None
    assert all(torch.equal(before[k], v) for k, v in _weights(off.model).items())


def test_masks_on_an_offloaded_model_prune_its_forward_and_its_export(pair, tmp_path):
    from mlprune.export import build_report, export_pruned
    from mlprune.pipeline import model_fingerprint

    dense, off, _ = pair
    for module in dense.model.modules():  # hooked (offloaded) linears keep torch's product:
        if type(module) is kernels.FewRowLinear:  # compare bits with torch's on both sides
            module.__class__ = torch.nn.Linear
    stats = capture(dense.model, dense.tokenizer, TEXTS)
    masks = rank_modules(dense.model, stats).masks(0.5, "2:4")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        before = off.model(ids).logits
        with pruned(dense.model, masks):
            want = dense.model(ids).logits
        with pruned(off.model, masks):
            got = off.model(ids).logits
            # a module held on the device while pruned reads pruned too
            q = linear_modules(off.model)["layers.2.attn.q"]
            with onloaded(q.module):
                assert torch.equal(q.weight == 0, ~masks.keep("layers.2.attn.q"))
        assert torch.equal(got, want) and not torch.equal(got, before)
        assert torch.equal(off.model(ids).logits, before)  # restored: dense again
    # the same id as in memory, so cached statistics are shared
    assert model_fingerprint(off) == model_fingerprint(dense)
    for loaded, out in ((dense, tmp_path / "dense"), (off, tmp_path / "off")):
        export_pruned(loaded, masks, out, build_report(loaded, masks))
    a, b = load_model(str(tmp_path / "dense")), load_model(str(tmp_path / "off"))
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert (b.model.get_submodule("model.layers.3.mlp.down_proj").weight == 0).float().mean() == 0.5


def test_the_memory_plan_from_a_config(tmp_path):
    from transformers import AutoConfig

    # Llama 7B's shape: 6,738,415,616 parameters (the "7B"), counted on the meta device
    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008,
                                  num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=32, vocab_size=32000)
    plan = memory_plan(config, "float32", free={"cpu": 64 * 10**9}, samples=16)
    assert plan.parameters == 6_738_415_616
    assert plan.weight_bytes == 6_738_415_616 * 4
    assert plan.layer_bytes == (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) * 4
    assert plan.cache_bytes == 2 * 16 * 512 * 4096 * 4
    assert plan.verdict == FITS and "fits in memory on cpu" in str(plan)
    half = memory_plan(config, "bfloat16", free={"cpu": 64 * 10**9})
    assert half.weight_bytes == 6_738_415_616 * 2
    # too little memory for the model, room on disk: one layer at a time
    plan = memory_plan(config, "float32", free={"cpu": 4 * 10**9, "disk": 10**11}, samples=16)
    assert plan.verdict == STREAMS and plan.check() is plan
    assert "streams one layer at a time through cpu" in str(plan)
    # caps (--max-memory) bound where weights wait, not the memory that runs a layer
    capped = memory_plan(config, "float32", free={"cpu": 64 * 10**9, "disk": 10**11},
                         caps={"cpu": "1GB"})
    assert capped.verdict == STREAMS and "weights capped at 1.0 GB" in str(capped)
    gpu = memory_plan(config, "float32", free={"cuda:0": 20 * 10**9, "cpu": 16 * 10**9})
    assert gpu.device == "cuda:0" and gpu.verdict == STREAMS
    assert memory_plan(config, "float16", free={"cuda:0": 20 * 10**9, "cpu": 0}).verdict == FITS
    # not even one layer: refused with the numbers
    tiny = memory_plan(config, "float32", free={"cpu": 10**9, "disk": 10**11}, samples=16)
    assert tiny.verdict == CANNOT_FIT and "cannot fit" in str(tiny)
    with pytest.raises(MlpruneError, match=r"even one layer at a time.*on cpu, which has 1\.0 GB"):
        tiny.check()
    # a layer fits on the GPU, but the weights have nowhere to wait
    with pytest.raises(MlpruneError, match="does not fit.*--offload-folder"):
        memory_plan(config, "float32", free={"cuda:0": 4 * 10**9, "cpu": 8 * 10**9}).check()


def test_memory_caps_and_free_memory(tmp_path):
    assert parse_max_memory("0=20GiB,cpu=60GiB") == {0: 20 * 2**30, "cpu": 60 * 2**30}
    assert parse_max_memory("cuda:1=1GB, disk=100") == {1: 10**9, "disk": 100}
    for bad in ("cpu", "gpu=1GB", "cpu=lots"):
        with pytest.raises(MlpruneError):
            parse_max_memory(bad)
    free = free_memory(tmp_path / "not-yet")
    assert free["cpu"] > 0 and free["disk"] > 0 and "disk" not in free_memory()


def test_a_model_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch):
    import mlprune.models as models

    folder = save_tiny(tmp_path / "m", hidden=64, layers=4)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("tried to load"))
    monkeypatch.setattr(models, "available_memory", lambda: 1000)
    with pytest.raises(MlpruneError, match="cannot run here even one layer at a time"):
        load_model(str(folder), device_map="auto", max_memory={"cpu": 1000},
                   offload_folder=tmp_path / "off")
    with pytest.raises(MlpruneError, match="device or a device map, not both"):
        load_model(str(folder), device="cpu", device_map="auto")


def _stats_and_masks_equal(a, b):
    (sa, ma), (sb, mb) = a, b
    assert ma.modules == mb.modules and ma.meta == mb.meta
    assert all(torch.equal(ma.pruned_cols[k], mb.pruned_cols[k]) for k in ma.modules)
    assert all(torch.equal(ma.protected[k], mb.protected[k]) for k in ma.modules)
    assert all(torch.equal(sa.input_sqnorms[k], sb.input_sqnorms[k]) for k in sa.input_sqnorms)
    assert all(torch.equal(sa.active_counts[k], sb.active_counts[k]) for k in sa.active_counts)


@pytest.mark.parametrize("stop_after", [0, 2])
def test_a_stopped_sequential_run_resumes_from_its_saved_layers(tmp_path, monkeypatch,
                                                                stop_after):
    from mlprune.capture import LayerRunner

    model, tok = tiny_model("llama", layers=4), byte_tokenizer()
    stats = capture(model, tok, TEXTS)
    run = dict(method="wanda", sparsity=0.5, protect={"embed": [1, 2]}, batch_size=2)
    whole = sequential_stats_and_masks(model, tok, TEXTS, stats, **run)

    def stop(stage, fraction):
        if stage == f"layer {stop_after + 1}/4":
            raise KeyboardInterrupt

    folder = tmp_path / "layers"
    with pytest.raises(KeyboardInterrupt):
        sequential_stats_and_masks(model, tok, TEXTS, stats, checkpoint_dir=folder,
                                   progress=stop, **run)
    assert [p.name for p in sorted(folder.glob("layer-*"))] == \
        [f"layer-{i:03d}.safetensors" for i in range(stop_after + 1)]
    assert applied_masks(model) is None  # stopped dense, as ever
    collected = []
    real = LayerRunner.collect
    monkeypatch.setattr(LayerRunner, "collect",
                        lambda self, i, names: collected.append(i) or real(self, i, names))
    resumed = sequential_stats_and_masks(model, tok, TEXTS, stats, checkpoint_dir=folder, **run)
    assert collected == list(range(stop_after + 1, 4))  # finished layers are not measured again
    _stats_and_masks_equal(whole, resumed)
    # all saved now: a third run only replays
    collected.clear()
    _stats_and_masks_equal(whole, sequential_stats_and_masks(model, tok, TEXTS, stats,
                                                             checkpoint_dir=folder, **run))
    assert collected == []


def test_a_stopped_ranking_resumes_from_its_saved_layers(tmp_path, monkeypatch):
    import mlprune.prune as prune_module

    model, tok = tiny_model("llama", layers=4), byte_tokenizer()
    stats = capture(model, tok, TEXTS)
    whole = rank_modules(model, stats, protect={"embed": [3]})
    per_layer = len(whole.modules) // 4

    def stop(stage, fraction):  # in the middle of layer 2
        if stage == f"module {2 * per_layer + 2}/{len(whole.modules)}":
            raise KeyboardInterrupt

    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        rank_modules(model, stats, protect={"embed": [3]}, checkpoint_dir=folder, progress=stop)
    assert sorted(p.name for p in (folder / "ranking").glob("layer-*")) == \
        ["layer-000.safetensors", "layer-001.safetensors"]
    scored = []
    real = prune_module.scores
    monkeypatch.setattr(prune_module, "scores",
                        lambda info, *a: scored.append(info.layer) or real(info, *a))
    resumed = rank_modules(model, stats, protect={"embed": [3]}, checkpoint_dir=folder)
    assert sorted(set(scored)) == [2, 3]  # the saved layers are read, not scored again
    assert resumed.modules == whole.modules
    assert all(torch.equal(whole.order[k], resumed.order[k]) for k in whole.modules)
    assert torch.equal(resumed.masks(0.5, "2:4").pruned_cols["layers.1.mlp.down"],
                       whole.masks(0.5, "2:4").pruned_cols["layers.1.mlp.down"])
    scored.clear()
    rank_modules(model, stats, protect={"embed": [3]}, checkpoint_dir=folder)
    assert scored == []
    # another ranking (method, protection, statistics) in the same folder: refused
    for other in (dict(method="magnitude"), dict(protect=None)):
        with pytest.raises(MlpruneError, match="holds the layers of another ranking"):
            rank_modules(model, stats if "method" not in other else None,
                         checkpoint_dir=folder, **{"protect": {"embed": [3]}, **other})
    # a sequential run may share the folder with its ranking, and the ranking follows it
    seq = tmp_path / "seq"
    run = dict(method="wanda", sparsity=0.5, batch_size=2)
    sequential_stats_and_masks(model, tok, TEXTS, stats, checkpoint_dir=seq, **run)
    rank_modules(model, stats, checkpoint_dir=seq)
    sequential_stats_and_masks(model, tok, TEXTS, stats, checkpoint_dir=seq, **run)
    assert (seq / "run.json").is_file() and (seq / "ranking" / "run.json").is_file()


def test_a_checkpoint_folder_of_another_run_is_refused(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    stats = capture(model, tok, TEXTS)
    folder = tmp_path / "layers"
    sequential_stats_and_masks(model, tok, TEXTS, stats, method="wanda", sparsity=0.5,
                               checkpoint_dir=folder)
    for other in (dict(sparsity=0.6), dict(sparsity=0.5, pattern="2:4")):
        with pytest.raises(MlpruneError, match="holds the layers of another sequential run"):
            sequential_stats_and_masks(model, tok, TEXTS, stats, method="wanda",
                                       checkpoint_dir=folder, **other)
    other_model = tiny_model("llama", seed=1)
    with pytest.raises(MlpruneError, match="another sequential run"):
        sequential_stats_and_masks(other_model, tok, TEXTS, capture(other_model, tok, TEXTS),
                                   method="wanda", sparsity=0.5, checkpoint_dir=folder)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(MlpruneError, match="not empty and holds no sequential run"):
        sequential_stats_and_masks(model, tok, TEXTS, stats, method="wanda", sparsity=0.5,
                                   checkpoint_dir=tmp_path / "busy")


def test_half_precision_models_get_float32_statistics_close_to_float32(tmp_path):
    folder = save_tiny(tmp_path / "m", hidden=64, layers=2)
    full = load_model(str(folder), dtype="float32")
    for dtype in ("bfloat16", "float16"):
        half = load_model(str(folder), dtype=dtype)
        assert next(half.model.parameters()).dtype == getattr(torch, dtype)
        a, b = capture(full.model, full.tokenizer, TEXTS), capture(half.model, half.tokenizer, TEXTS)
        assert b.hidden_norms.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in b.input_sqnorms.values())
        # bf16 keeps 8 significant bits (0.4%); through two layers the norms stay within 3%
        assert torch.allclose(a.hidden_norms, b.hidden_norms, rtol=3e-2, atol=1e-3)
        for k in a.input_sqnorms:
            assert torch.allclose(a.input_sqnorms[k], b.input_sqnorms[k], rtol=5e-2, atol=1e-3)
    with pytest.raises(MlpruneError, match="Unknown dtype 'float8'"):
        load_model(str(folder), dtype="float8")


def test_prune_command_streams_and_resumes(tmp_path, capsys):
    from mlprune.cli import main
    from mlprune.export import read_report

    folder = save_tiny(tmp_path / "m", hidden=64, layers=4)
    common = ["--model", str(folder), "--dtype", "float32", "--device-map", "auto",
              "--max-memory", "cpu=200KB", "--offload-folder", str(tmp_path / "off"),
              "--samples", "2", "--shots", "1", "--checkpoint-dir", str(tmp_path / "layers")]
    assert main(["prune", *common, "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "memory plan:" in err and "streams one layer at a time through cpu" in err
    assert len(list((tmp_path / "layers").glob("layer-*.safetensors"))) == 4
    assert len(list((tmp_path / "layers" / "ranking").glob("layer-*.safetensors"))) == 4
    assert read_report(tmp_path / "out")["sparsity_reached"] == 0.5
    # another sparsity in the same folder: refused in one sentence
    assert main(["prune", *common, "--sparsity", "0.4", "--out", str(tmp_path / "out2")]) == 2
    assert "another sequential run" in capsys.readouterr().err
    assert main(["prune", "--model", str(folder), "--max-memory", "cpu=1GB",
                 "--out", str(tmp_path / "out3")]) == 2
    assert "add --device-map auto" in capsys.readouterr().err


def test_loaded_model_without_device_map_is_unchanged(loaded):
    assert isinstance(loaded, LoadedModel) and loaded.plan is None
    assert placement(loaded.model) is None and not is_offloaded(loaded.model)


def test_the_gpu_bench_runs_its_checks_and_streaming_on_the_cpu(tmp_path):
    """bench/gpu.py on tiny shapes (CI has no GPU): the CUDA-path check and the capped-vs-
    in-memory comparison run on the CPU, disk offload standing in for the capped GPU, and
    write strict JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--sections", "check,scale", "--samples", "2",
                       "--scratch", str(tmp_path), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu-tiny.json").read_text())
    results = data["results"]
    assert results["check"]["ok"] is True
    streamed = results["scale"]["streamed"]
    assert "streams one layer at a time" in streamed["plan"] and "disk" in streamed["placement"]
    assert streamed["same_masks_one_shot"] == streamed["same_masks_sequential"] == 1.0
