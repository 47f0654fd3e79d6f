"""Safety: nothing a user gives is executed or unpickled, and the dashboard stays private.
(Two sessions never see each other's masks: test_dashboard.py, which fails without the lock.)"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil

import pytest
import torch
from tiny import byte_tokenizer, save_tiny, tiny_model

from mlprune import MlpruneError
from mlprune.models import load_model
from mlprune.pipeline import PruneSpec


def test_remote_code_and_pickle_stay_off_unless_asked(tmp_path, monkeypatch):
    import transformers

    folder = save_tiny(tmp_path / "m")
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append((kwargs.get("trust_remote_code"), kwargs.get("use_safetensors")))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(folder))
    load_model(str(folder), trust_remote_code=True)
    load_model(str(folder), allow_pickle=True)
    assert seen == [(False, True), (True, True), (False, None)]


class _Bomb:
    """Unpickling this creates ``marker``: proof that a pickle was read."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_only_folder(tmp_path):
    folder = save_tiny(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Bomb(marker)}, f)
    return folder, marker


def test_a_pickle_file_is_never_opened(tmp_path, monkeypatch):
    folder, marker = _pickle_only_folder(tmp_path)
    weights = str(folder / "pytorch_model.bin")
    opened, unpickled = [], []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_os_open(path, *args, **kwargs)

    def refuse(name):
        def call(*args, **kwargs):
            unpickled.append(name)
            raise AssertionError(f"{name} was called")
        return call

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load"), (torch.serialization, "load")]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    (folder / "config.json").read_text()  # the spies see what is opened
    with pytest.raises(MlpruneError) as refused:
        load_model(str(folder))
    monkeypatch.undo()
    message = str(refused.value)
    assert message == (f"{folder} has weights only as pickle files (.bin/.pt/.pth/.ckpt), which can "
                       "run code when loaded: convert them to safetensors, or pass --allow-pickle "
                       "(allow_pickle=True) if you trust the files.")
    assert not marker.exists() and unpickled == []
    assert str(folder / "config.json") in opened and weights not in opened


def _pickled_copy(tiny_folder, folder):
    """The tiny model with its weights as a pickle file only; and the model saved."""
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").unlink()
    model = tiny_model("llama")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def test_allow_pickle_reads_trusted_pickle_weights(tmp_path, tiny_folder, corpus_file, capsys):
    from mlprune.cli import main

    folder = tmp_path / "pickled"
    model = _pickled_copy(tiny_folder, folder)
    args = ["eval", "--model", str(folder), "--corpus", str(corpus_file), "--limit", "1"]
    assert main(args) == 2
    assert "pass --allow-pickle" in capsys.readouterr().err
    assert main(args + ["--allow-pickle"]) == 0
    loaded = load_model(str(folder), allow_pickle=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("command", [["compare"], ["eval"], ["eval", "--task", "nli"]])
def test_the_pruned_model_is_loaded_as_the_dense_one(command, tmp_path, tiny_folder, corpus_file,
                                                      capsys):
    """--pruned honours --allow-pickle (and --dtype, --device) as --model does."""
    from mlprune.cli import main

    folder = tmp_path / "pickled"
    _pickled_copy(tiny_folder, folder)
    args = [*command, "--model", str(tiny_folder), "--pruned", str(folder), "--corpus",
            str(corpus_file), "--limit", "1", "--dtype", "bfloat16"]
    assert main(args) == 2
    assert f"mlprune: {folder} has weights only as pickle files" in capsys.readouterr().err
    assert main(args + ["--allow-pickle"]) == 0
    err = capsys.readouterr().err
    assert f"model: {folder}:" in err and "bfloat16 on cpu" in err.split(f"model: {folder}:")[1]


def test_a_hub_model_without_safetensors_is_refused(monkeypatch):
    import transformers

    import mlprune.models as models

    asked = []

    def no_safetensors(repo, **kwargs):
        asked.append(kwargs.get("use_safetensors"))
        raise OSError(f"{repo} does not appear to have a file named model.safetensors or "
                      "model.safetensors.index.json and thus cannot be loaded with `safetensors`. "
                      "Please do not set `use_safetensors=True`.")

    monkeypatch.setattr(models, "_check_hub", lambda repo: None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_safetensors)
    with pytest.raises(MlpruneError, match="The hub model 'someone/old-model' has weights only as "
                                           "pickle files .* pass --allow-pickle"):
        load_model("someone/old-model")
    assert asked == [True]


def test_only_safetensors_are_written(tmp_path, loaded, corpus):
    from mlprune.export import build_report, export_pruned
    from mlprune.pipeline import prune

    result = prune(loaded, corpus, PruneSpec(pair="fr-en", samples=2, mode="one-shot"))
    out = export_pruned(loaded, result.masks, tmp_path / "o", build_report(loaded, result.masks))
    suffixes = {p.suffix for p in out.iterdir()}
    assert ".bin" not in suffixes and ".pt" not in suffixes and ".pkl" not in suffixes


def test_streamlit_config_is_private():
    from pathlib import Path

    import tomllib

    config = tomllib.loads((Path(__file__).parents[1] / ".streamlit" / "config.toml").read_text())
    assert config["browser"]["gatherUsageStats"] is False
    assert config["server"]["address"] in ("localhost", "127.0.0.1")
    assert config["server"]["fileWatcherType"] == "none"
