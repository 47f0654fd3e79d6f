"""Safety: nothing a user gives is executed or unpickled, and the dashboard stays private.
(Two sessions never see each other's masks: test_dashboard.py, which fails without the lock.)"""

from __future__ import annotations

from tiny import save_tiny

from mlprune.models import load_model
from mlprune.pipeline import PruneSpec


def test_remote_code_stays_off_unless_asked(tmp_path, monkeypatch):
    import transformers

    folder = save_tiny(tmp_path / "m")
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(folder))
    load_model(str(folder), trust_remote_code=True)
    assert seen == [False, True]


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


def test_no_pickle_is_ever_loaded():
    """torch.load (pickle) appears nowhere in the library; weights come from safetensors."""
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "mlprune").glob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, path.name
