"""Every widget of the Prune page is built from PruneSpec's field metadata: its label, help
and options are the field's (mlprune.spec), and its first value is the interactive preset's,
in the units the widget shows. A choice list or help text retyped on the page fails here.
(The command line has the same check: tests/test_protocol.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from mlprune import ui
from mlprune.spec import BLOCKS, CUSTOM_MIX, OTHER_PATTERN, PruneSpec, spec_field

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # a first tiny-model load takes longer than AppTest's 3 s
PREFIX = "w.prune_"
KINDS = ("selectbox", "radio", "multiselect", "slider", "select_slider", "number_input",
         "toggle", "checkbox", "text_input", "text_area")
CHOOSERS = ("Selectbox", "Radio", "Multiselect", "SelectSlider")  # widgets offering options
# Boxes for a field's free choice (a typed mix, a typed N:M, the protect rule): the page's own.
OWN = {"mix", "pattern_other", "protect_rule"}
LABELLED = {"calibration"}  # shows each choice by its description in the spec
ELSEWHERE = {"pair", "layers"}  # options from the corpus and the model; help from the spec


@pytest.fixture
def prune_page(monkeypatch, tiny_folder, corpus_file) -> AppTest:
    """The Prune page of a fresh session on the tiny model and the en/fr corpus."""
    monkeypatch.setenv("MLPRUNE_MODEL", str(tiny_folder))
    monkeypatch.setenv("MLPRUNE_CORPUS", str(corpus_file))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    return _run(_run(at).switch_page("pages/2_Prune.py"))


def _run(at: AppTest) -> AppTest:
    at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def _widgets(at: AppTest) -> dict:
    """The page's widgets by the name after ``w.prune_``."""
    found = {}
    for kind in KINDS:
        for w in getattr(at, kind, []):
            if w.key and w.key.startswith(PREFIX):
                assert w.key[len(PREFIX):] not in found, w.key
                found[w.key[len(PREFIX):]] = w
    return found


def _first_value(name: str, preset: PruneSpec, n_layers: int):
    """The preset's value of a field in the units its widget shows."""
    value = getattr(preset, name)
    shown = {"sparsity": lambda: round(value * 100), "protect": lambda: value is not None,
             "mwanda_parts": lambda: [p for p in value.split(",") if p],
             "blocks": lambda: list(BLOCKS) if value is None else value.split(","),
             "layers": lambda: (0, n_layers - 1) if value is None
             else tuple(int(x) for x in value.split("-"))}
    return shown[name]() if name in shown else value


def _options(name: str) -> list[str]:
    """What a choice field's widget offers, as AppTest shows options (their text)."""
    choices = spec_field(name)["choices"]
    return [str(choices[c] if name in LABELLED else c) for c in choices]


def test_every_prune_widget_comes_from_the_spec(prune_page):
    at, preset = prune_page, PruneSpec.preset(ui.SPEC_PRESET)
    first = {name: w.value for name, w in _widgets(at).items()}
    # show the widgets that only some settings draw: M-Wanda's parts, a typed mix, a typed N:M
    at.selectbox(key=PREFIX + "method").set_value("m-wanda")
    at.selectbox(key=PREFIX + "calibration").set_value(CUSTOM_MIX)
    at.radio(key=PREFIX + "pattern").set_value(OTHER_PATTERN)
    widgets = _widgets(_run(at))
    first.setdefault("mwanda_parts", widgets["mwanda_parts"].value)  # drawn now, untouched
    assert set(widgets) == {k[len(PREFIX):] for k in at.session_state
                            if isinstance(k, str) and k.startswith(PREFIX)}  # none missed
    fields = {name for name in widgets if name not in OWN}
    assert fields == {f for f in PruneSpec.__dataclass_fields__ if "label" in spec_field(f)}
    n_layers = widgets["layers"].max + 1
    for name in sorted(fields):
        w, field = widgets[name], spec_field(name)
        assert (w.label, w.help) == (field["label"], field["help"]), name
        if "choices" in field:
            assert list(w.options) == _options(name), name
        else:
            # no list of choices of the page's own: a field with none is typed or slid
            assert name in ELSEWHERE or type(w).__name__ not in CHOOSERS, name
        assert first[name] == _first_value(name, preset, n_layers), name
    assert first["pair"] == preset.pair  # the corpus offers it (en/fr)

