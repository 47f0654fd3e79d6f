"""Loading and architecture-agnostic discovery of layers and linear modules."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from mlprune import MlpruneError
from mlprune.models import decoder_layers, linear_modules, load_model

EXPECTED_ROLES = {
    "gemma3_text": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    "llama": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    "qwen2": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    "xglm": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"},
    "bloom": {"attn.qkv", "attn.o", "mlp.up", "mlp.down"},
    "gpt2": {"attn.qkv", "attn.o", "mlp.up", "mlp.down"},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layers_and_readable_module_names(arch):
    model = tiny_model(arch)
    assert len(decoder_layers(model)) == 2
    infos = linear_modules(model)
    for layer in (0, 1):
        roles = {n.split(".", 2)[2] for n, i in infos.items() if i.layer == layer}
        assert roles == EXPECTED_ROLES[arch]
    # the embeddings and LM head are never listed
    assert all(n.startswith("layers.") for n in infos)
    head = model.get_output_embeddings()
    assert all(i.module is not head for i in infos.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_weight_view_is_out_by_in_and_writes_reach_the_model(arch):
    model = tiny_model(arch)
    info = linear_modules(model)["layers.0.mlp.up"]
    w = info.weight
    assert w.shape == (info.module(torch.zeros(1, w.shape[1])).shape[-1], w.shape[1])
    x = torch.randn(3, w.shape[1])
    before = info.module(x)
    w[0, :] = 0  # zero every input of output 0
    after = info.module(x)
    bias = info.module.bias if info.module.bias is not None else torch.zeros(w.shape[0])
    assert torch.allclose(after[:, 0], bias[0].expand(3))
    assert torch.allclose(after[:, 1:], before[:, 1:])
    assert info.transposed == (arch == "gpt2")


def test_load_local_folder(tiny_folder):
    steps = []
    loaded = load_model(str(tiny_folder), progress=lambda stage, f: steps.append((stage, f)))
    assert steps == [(f"Loading weights from {tiny_folder}", 0.8), ("Model ready", 1.0)]
    assert loaded.source == "local"
    facts = loaded.facts()
    assert facts["layers"] == 2 and facts["hidden_size"] == 32 and facts["dtype"] == "float32"
    assert facts["dequantized_from"] is None


def test_missing_path_is_one_sentence(tmp_path):
    with pytest.raises(MlpruneError, match="No model folder or .gguf file at"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(MlpruneError, match="No GGUF file"):
        load_model(str(tmp_path / "x.gguf"))


def test_folder_without_weights(tmp_path):
    save_tiny(tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MlpruneError, match="no weight files"):
        load_model(str(tmp_path / "m"))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlpruneError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_truncated_safetensors_is_one_sentence(tmp_path):
    folder = save_tiny(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(MlpruneError, match="Could not read the model"):
        load_model(str(folder))


def test_corrupt_gguf_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(MlpruneError, match="Could not read the GGUF file"):
        load_model(str(bad))


def test_unreachable_hub_id_fails_fast(monkeypatch, tmp_path):
    import mlprune.models as models

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(MlpruneError, match="hub cannot be reached"):
        load_model("someone/not-a-cached-model")


def test_no_recognisable_layers():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(MlpruneError, match="No decoder layers found"):
        decoder_layers(Flat())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "xglm"])  # num_hidden_layers, n_layer, num_layers
@pytest.mark.parametrize("where", ["model", "inside a layer"])
def test_a_longer_module_list_elsewhere_does_not_win(arch, where):
    """An expert list (mixture of experts) can be longer than the decoder's list of layers."""
    model = tiny_model(arch)
    layers, names = decoder_layers(model), set(linear_modules(model))
    experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(5))
    if where == "model":
        model.experts = experts
    else:
        layers[0].experts = experts
    found = decoder_layers(model)
    assert len(found) == 2 and all(a is b for a, b in zip(found, layers))
    added = set(linear_modules(model)) - names  # the experts are modules of layer 0, if anything
    assert all(n.startswith("layers.0.") for n in added) and len(added) == (where != "model") * 5


def test_without_a_layer_count_the_longest_list_wins():
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.short = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
            self.long = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

    model = Blocks()
    assert decoder_layers(model) == list(model.long)


def test_saved_folder_loads_with_plain_transformers(tiny_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    assert len(decoder_layers(model)) == 2


def test_linear_modules_cover_every_prunable_weight():
    model = tiny_model("bloom")
    names = {i.path for i in linear_modules(model).values()}
    expected = {n.rsplit(".", 1)[0] for n, p in model.named_parameters()
                if n.endswith("weight") and p.dim() == 2 and ".h." in n}
    assert names == expected


def test_a_spec_may_name_its_precision(tmp_path):
    from mlprune.models import split_precision, with_precision

    assert split_precision("embedded:gemma3-270m@bfloat16") == ("embedded:gemma3-270m", "bfloat16")
    assert split_precision("org/model@bf16") == ("org/model", "bfloat16")
    assert split_precision("/models/v1@2") == ("/models/v1@2", None)  # not a precision
    assert split_precision("@bfloat16") == ("@bfloat16", None)
    assert with_precision("org/model@float16", "bfloat16") == "org/model@bfloat16"
    assert with_precision("org/model@float16", "") == "org/model"
    folder = save_tiny(tmp_path / "m", hidden=32, layers=2)
    half = load_model(f"{folder}@bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert load_model(f"{folder}@bf16", dtype="bfloat16").facts()["dtype"] == "bfloat16"
    with pytest.raises(MlpruneError, match="asks for bfloat16 and the dtype for float32"):
        load_model(f"{folder}@bfloat16", dtype="float32")


def test_native_bfloat16_reads_the_cpu_flags(monkeypatch):
    import mlprune.models as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, native in (("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16", True),
                          ("fpu avx512f avx2", False), (None, False)):
        class CpuInfo:
            def __init__(self, path):
                assert str(path) == "/proc/cpuinfo"

            def read_text(self, flags=flags):
                if flags is None:
                    raise OSError("no /proc here")
                return f"processor : 0\nflags : {flags}\n"
        monkeypatch.setattr(models, "Path", CpuInfo)
        assert models.native_bfloat16() is native


def _head(out: int = 3000, inp: int = 48, bias: bool = False):
    from mlprune.kernels import WeightMajorHead

    torch.manual_seed(0)
    plain = torch.nn.Linear(inp, out, bias=bias)
    fast = torch.nn.Linear(inp, out, bias=bias)
    fast.load_state_dict(plain.state_dict())
    fast.__class__ = WeightMajorHead
    return plain, fast


@pytest.mark.parametrize("bias", [False, True])
def test_the_fast_head_gives_nn_linears_logits(bias):
    plain, fast = _head(bias=bias)
    with torch.inference_mode():  # the compiled kernel: its own summation order
        for rows in (1, 8):
            x = torch.randn(rows, 1, 48)
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
            assert torch.equal(fast(x).argmax(-1), plain(x).argmax(-1))


@pytest.mark.parametrize("bias", [False, True])
def test_without_the_kernel_the_fast_head_uses_mkls_forms(bias, monkeypatch):
    from mlprune import kernels

    monkeypatch.setenv(kernels.NATIVE_ENV, "0")
    plain, fast = _head(bias=bias)
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):  # one row: split over threads (2) or plain (1)
            torch.set_num_threads(n)
            x = torch.randn(1, 1, 48)
            with torch.inference_mode():
                assert torch.equal(fast(x), plain(x)), n  # same GEMV per element: same bits
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        x8 = torch.randn(8, 1, 48)  # a decoding step at batch 8: its own summation order
        torch.testing.assert_close(fast(x8), plain(x8), rtol=1e-5, atol=1e-5)
        assert torch.equal(fast(x8).argmax(-1), plain(x8).argmax(-1))
        many = torch.randn(2, 40, 48)  # a prompt's pass: nn.Linear itself
        assert torch.equal(fast(many), plain(many))
        half = torch.randn(1, 48, dtype=torch.bfloat16)
        assert torch.equal(fast.to(torch.bfloat16)(half), plain.to(torch.bfloat16)(half))
    x = torch.randn(1, 48)  # with grad: nn.Linear's path, and gradients flow
    fast.float()(x).sum().backward()
    assert fast.weight.grad is not None


def test_a_loaded_cpu_model_decodes_through_the_fast_head_and_generates_the_same(monkeypatch,
                                                                                  tiny_folder):
    from mlprune import kernels

    monkeypatch.setattr(kernels, "_HEAD_MIN", 0)  # the tiny head counts as vocabulary-sized
    loaded = load_model(str(tiny_folder))
    model, tok = loaded.model, loaded.tokenizer
    head = model.get_output_embeddings()
    assert type(head) is kernels.WeightMajorHead
    assert set(model.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny_folder).state_dict())
    enc = tok(["French: Le chat.\nEnglish:", "Hi"], return_tensors="pt", padding=True,
              padding_side="left")
    with torch.inference_mode():
        fast = [model.generate(**enc, max_new_tokens=12, do_sample=False)]
        fast.append(model.generate(**{k: v[:1] for k, v in enc.items()}, max_new_tokens=12,
                                   do_sample=False))
        head.__class__ = torch.nn.Linear
        plain = [model.generate(**enc, max_new_tokens=12, do_sample=False),
                 model.generate(**{k: v[:1] for k, v in enc.items()}, max_new_tokens=12,
                                do_sample=False)]
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    monkeypatch.setattr(kernels, "_HEAD_MIN", 1 << 24)
    assert not kernels.speed_up_head(load_model(str(tiny_folder)).model)  # a small head stays


def test_a_converted_folder_builds_its_tokenizer_from_the_file(tiny_folder, tmp_path, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    from mlprune.models import MARKER, _converted_tokenizer

    assert _converted_tokenizer(tiny_folder) is None  # not converted by mlprune: AutoTokenizer's
    folder = tmp_path / "converted"
    shutil.copytree(tiny_folder, folder)
    (folder / MARKER).write_text('{"dequantized_from": "Q4_K"}')
    ours, theirs = _converted_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours is not None and type(ours) is type(theirs)
    texts = ["French: Le chat dort.\nEnglish:", "ça été 🙂", ""]
    assert ours(texts)["input_ids"] == theirs(texts)["input_ids"]
    assert (ours.pad_token_id, ours.eos_token_id) == (theirs.pad_token_id, theirs.eos_token_id)

    def not_called(*args, **kwargs):
        raise AssertionError("AutoTokenizer is the slow path")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", not_called)
    assert load_model(str(folder)).tokenizer(texts)["input_ids"] == theirs(texts)["input_ids"]
