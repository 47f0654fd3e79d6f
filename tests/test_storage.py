"""storage: a write is whole or absent, JSON is strict, and a damaged cell is kept aside and
measured again (the one policy every grid follows)."""

from __future__ import annotations

import json
import math

import pytest

from mlprune.storage import Cells, atomic_save, atomic_write_json, slug, strict_json


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old", encoding="utf-8")

    def torn(partial):
        partial.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save(path, torn)
    assert path.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_json_is_strict(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "b.json", {"x": math.nan, "y": [math.inf, 1.5]})
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"x": None, "y": [None, 1.5]}
    assert "NaN" not in strict_json({"x": -math.inf}) and "Infinity" not in text


def test_a_damaged_cell_is_kept_aside_and_reads_as_missing(tmp_path):
    heard = []
    cells = Cells(tmp_path / "cells", on_damaged=heard.append)
    cells.put({"chrf": 50.0}, "translation", "dense")
    assert cells.get("translation", "dense") == {"chrf": 50.0}
    path = cells.path("translation", "dense")
    path.write_text('{"chrf": 5', encoding="utf-8")  # torn by hand
    assert not cells.has("translation", "dense")
    assert cells.get("translation", "dense") is None
    aside = path.with_name(path.name + ".damaged")
    assert aside.read_text(encoding="utf-8") == '{"chrf": 5'  # the evidence is not deleted
    assert len(heard) == 1 and "dense.json" in heard[0]
    cells.put({"chrf": 51.0}, "translation", "dense")  # measured again
    assert cells.get("translation", "dense") == {"chrf": 51.0} and aside.is_file()


def test_cell_names_are_safe_and_keep_dots(tmp_path):
    cells = Cells(tmp_path)
    path = cells.path("wanda-mt_fr_0.2_s1_one-shot", "zs:../../x:fr")
    assert path == tmp_path / "wanda-mt_fr_0.2_s1_one-shot" / "zs_.._.._x_fr.json"
    assert path.resolve().is_relative_to(tmp_path.resolve())
    for part in ("..", ".", ""):
        assert cells.path(part, "x").resolve().parent == (tmp_path / slug(part)).resolve()
        assert slug(part) not in ("", ".", "..")
