"""Nothing lost, nothing corrupted: overwriting an export folder, viewing a results file and
the results store's schema never touch what mlprune did not write."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from mlprune import MlpruneError, sweeps
from mlprune.cli import main
from mlprune.export import REPORT, build_report, check_export_target, export_pruned, read_report
from mlprune.pipeline import read_sweep_rows, sweep
from mlprune.prune import rank_modules
from mlprune.store import APPLICATION_ID, SCHEMA_VERSION, ResultStore


def snapshot(root: Path) -> dict:
    """Every file under ``root`` (or ``root`` itself) with its bytes and mtime."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def row(s: float, **extra) -> dict:
    return {"pair": "fr-en", "method": "magnitude", "sparsity": s, "pattern": "unstructured",
            "chrf": 40 - 10 * s, **extra}


# --------------------------------------------------------------------------- export


def test_overwrite_replaces_only_an_earlier_export(tmp_path, loaded, capsys):
    masks = rank_modules(loaded.model, method="magnitude").masks(0.5)
    report = build_report(loaded, masks)
    thesis = tmp_path / "thesis"
    (thesis / "notes").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\section{Results}\n")
    (thesis / "notes" / "a.md").write_text("keep me\n")
    before = snapshot(thesis)
    with pytest.raises(MlpruneError, match="not an earlier mlprune export"):
        export_pruned(loaded, masks, thesis, report, overwrite=True)
    assert snapshot(thesis) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no partial, no .old
    assert main(["prune", "--model", str(tmp_path / "no-model"), "--corpus", "x.tsv",
                 "--out", str(thesis), "--overwrite"]) == 2
    assert "not an earlier mlprune export" in capsys.readouterr().err  # before any loading
    assert snapshot(thesis) == before

    out = export_pruned(loaded, masks, tmp_path / "out", report)
    assert REPORT in read_report(out)["files"] and "model.safetensors" in read_report(out)["files"]
    again = export_pruned(loaded, masks, out, report, overwrite=True)  # an earlier export
    assert again == out and read_report(out)["sparsity_reached"] == pytest.approx(0.5)
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    with pytest.raises(MlpruneError, match="holds notes.txt, which its earlier export"):
        export_pruned(loaded, masks, out, report, overwrite=True)
    assert snapshot(out) == before

    (out / "notes.txt").unlink()  # an export from before reports listed their files
    old = json.loads((out / REPORT).read_text())
    del old["files"]
    (out / REPORT).write_text(json.dumps(old))
    assert check_export_target(out, True) == out

    (tmp_path / "empty").mkdir()
    assert export_pruned(loaded, masks, tmp_path / "empty", report, overwrite=True).is_dir()
    (tmp_path / "file.bin").write_bytes(b"\x00data")
    with pytest.raises(MlpruneError, match="is not a folder"):
        export_pruned(loaded, masks, tmp_path / "file.bin", report, overwrite=True)
    assert (tmp_path / "file.bin").read_bytes() == b"\x00data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- viewing a CSV


def test_viewing_a_csv_changes_nothing_and_refuses_what_is_not_results(tmp_path, loaded,
                                                                       corpus):
    store = ResultStore(tmp_path / "r.sqlite")
    for s in (0.0, 0.5):
        store.add(row(s))
    whole = store.export_csv(tmp_path / "whole.csv")
    torn = tmp_path / "torn.csv"
    torn.write_bytes(whole.read_bytes()[:-9])  # the last row cut short, no final newline
    foreign = tmp_path / "marks.csv"
    foreign.write_bytes(b"name,score\nann,1\nbob,2")  # another program's CSV, no final newline
    latin = tmp_path / "latin.csv"
    latin.write_bytes("pair,method,sparsity,pattern\nfr-en,m,0.5,\xe9t\xe9\n".encode("latin-1"))
    before = {p: snapshot(p) for p in (whole, torn, foreign, latin)}

    table, settings = sweeps.open_results(whole)
    assert list(table["sparsity"]) == [0.0, 0.5] and settings is None
    table, _ = sweeps.open_results(torn)
    assert list(table["sparsity"]) == [0.0]  # the torn row is not shown as a result...
    for path, message in ((foreign, "not a sweep results file: it has no column pair"),
                          (latin, "not a sweep results CSV")):
        with pytest.raises(MlpruneError, match=message):
            sweeps.open_results(path)
    assert {p: snapshot(p) for p in before} == before  # ...and no file was changed

    # the sweep's writing path refuses another program's CSV before changing a byte of it
    with pytest.raises(MlpruneError, match="not a sweep CSV"):
        sweep(loaded, corpus, methods=["magnitude"], sparsities=[0.0], pairs=["fr-en"],
              limit=1, out_csv=foreign)
    assert snapshot(foreign) == before[foreign]


# --------------------------------------------------------------------------- viewing SQLite


def foreign_db(path: Path, application_id: int = 0) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO customers (name) VALUES ('Ann')")
        db.execute(f"PRAGMA application_id = {application_id}")
    return path


def test_viewing_a_sqlite_file_changes_nothing(tmp_path):
    own = ResultStore(tmp_path / "own.sqlite")
    own.claim({"model": "m", "limit": 2})
    for s in (0.5, 0.0):
        own.add(row(s))
    app = foreign_db(tmp_path / "app.db")
    other = foreign_db(tmp_path / "other.sqlite", application_id=0x12345678)
    before = {p: snapshot(p) for p in (own.path, app, other)}

    table, settings = sweeps.open_results(own.path)
    assert list(table["sparsity"]) == [0.0, 0.5] and settings == {"model": "m", "limit": 2}
    assert read_sweep_rows(own.path) == own.rows()
    with pytest.raises(MlpruneError, match="not a results store: it holds the table customers"):
        sweeps.open_results(app)
    with pytest.raises(MlpruneError, match="belongs to another application"):
        sweeps.open_results(other)
    for path in (app, other):  # a sweep given the file refuses it the same way
        with pytest.raises(MlpruneError, match="not a results store"):
            ResultStore(path)
    assert {p: snapshot(p) for p in before} == before
    with sqlite3.connect(f"{app.as_uri()}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["customers"]

    os.chmod(own.path, 0o444)  # a read-only file can be viewed
    table, _ = sweeps.open_results(own.path)
    assert len(table) == 2 and snapshot(own.path) == before[own.path]
    # tests run as root, who may write a 0444 file: the viewer's own connection must refuse
    viewer = ResultStore(own.path, readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        viewer._connect().execute("CREATE TABLE sneaky (x)")
    with pytest.raises(MlpruneError, match="viewing only"):
        viewer.add(row(0.9))
    assert snapshot(own.path) == before[own.path]
    with pytest.raises(MlpruneError, match="No results store"):
        ResultStore(tmp_path / "none.sqlite", readonly=True)
    assert not (tmp_path / "none.sqlite").exists()


def test_an_empty_store_a_worker_just_created_views_as_no_rows(tmp_path):
    path = tmp_path / "new.sqlite"
    path.write_bytes(b"")
    table, settings = sweeps.open_results(path)
    assert table.empty and settings is None and path.read_bytes() == b""


# --------------------------------------------------------------------------- the store


def test_a_store_is_marked_with_its_schema_and_an_unmarked_one_is_adopted(tmp_path):
    store = ResultStore(tmp_path / "new.sqlite")
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    legacy = tmp_path / "legacy.sqlite"  # as stores were written before they were marked
    with sqlite3.connect(legacy) as db:
        db.execute("CREATE TABLE sweep_rows (id INTEGER PRIMARY KEY, pair TEXT NOT NULL, "
                   "method TEXT NOT NULL, sparsity REAL NOT NULL, pattern TEXT NOT NULL, "
                   "UNIQUE (pair, method, sparsity, pattern))")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO sweep_rows (pair, method, sparsity, pattern) "
                   "VALUES ('fr-en', 'magnitude', 0.0, 'unstructured')")
    assert len(ResultStore(legacy, readonly=True)) == 1
    assert ResultStore(legacy).add(row(0.5)) and len(ResultStore(legacy)) == 2
    with sqlite3.connect(legacy) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        db.execute("PRAGMA user_version = 99")
    before = snapshot(legacy)
    with pytest.raises(MlpruneError, match="newer mlprune"):
        ResultStore(legacy)
    assert snapshot(legacy) == before


def test_a_table_that_would_keep_a_cell_twice_is_refused(tmp_path):
    path = tmp_path / "other-schema.sqlite"
    with sqlite3.connect(path) as db:  # the same tables, without UNIQUE on the cell
        db.execute("CREATE TABLE sweep_rows (id INTEGER PRIMARY KEY, pair TEXT, method TEXT, "
                   "sparsity REAL, pattern TEXT)")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    before = snapshot(path)
    with pytest.raises(MlpruneError, match="does not keep one row per cell"):
        ResultStore(path)  # (it would have taken the same cell twice)
    with pytest.raises(MlpruneError, match="does not keep one row per cell"):
        sweeps.open_results(path)
    assert snapshot(path) == before


def test_a_damaged_page_is_one_sentence(tmp_path):
    store = ResultStore(tmp_path / "d.sqlite")
    for i in range(300):
        store.add(row(i / 1000, note="x" * 50))
    with sqlite3.connect(store.path) as db:  # the table's last leaf: met after the first rows
        page = db.execute("PRAGMA page_size").fetchone()[0]
        leaf = db.execute("SELECT pageno FROM dbstat WHERE name = 'sweep_rows' AND "
                          "pagetype = 'leaf' ORDER BY path DESC LIMIT 1").fetchone()[0]
    data = bytearray(store.path.read_bytes())
    data[(leaf - 1) * page:(leaf - 1) * page + 100] = b"\xff" * 100
    store.path.write_bytes(bytes(data))
    with pytest.raises(MlpruneError, match="Could not read .*malformed"):
        store.rows()
    with pytest.raises(MlpruneError, match="malformed"):
        sweeps.open_results(store.path)


def test_damaged_settings_are_one_sentence(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    store.claim({"model": "m"})
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE meta SET value = '{not json' WHERE key = 'settings'")
    with pytest.raises(MlpruneError, match="damaged settings"):
        store.settings()
    with pytest.raises(MlpruneError, match="damaged settings"):
        store.claim({"model": "m"})


def test_a_column_differing_only_in_case_joins_its_column(tmp_path):
    store = ResultStore(tmp_path / "c.sqlite")
    assert store.add(row(0.0, acc_EN=0.5))
    assert store.add(row(0.5, acc_en=0.25))  # SQLite's names ignore case: the same column
    assert store.add(row(0.7, Acc_En=None))
    assert [r["acc_EN"] for r in store.rows()] == [0.5, 0.25, None]
    assert not store.add(row(0.5, ACC_EN=0.9))  # the same cell again: ignored as ever
    with pytest.raises(MlpruneError, match="differ only in case"):
        store.add(row(0.9, x=1, X=2))
    assert len(store) == 3


def test_an_export_csv_never_replaces_rows_measured_elsewhere(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.add(row(0.0))
    mine = store.export_csv(tmp_path / "r.csv")
    store.add(row(0.5))
    store.export_csv(mine)  # an earlier export of this store: replaced
    assert [r["sparsity"] for r in read_sweep_rows(mine)] == [0.0, 0.5]
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("pair,method,sparsity,pattern,chrf\nde-en,wanda,0.3,unstructured,33\n")
    notes = tmp_path / "notes.csv"
    notes.write_text("name\nann\n")
    before = {p: snapshot(p) for p in (theirs, notes)}
    for path in (theirs, notes):
        with pytest.raises(MlpruneError, match="holds rows that are not in r.sqlite"):
            store.export_csv(path)
    assert {p: snapshot(p) for p in before} == before

