"""Where sweep results live: one SQLite file, one transaction per measured row.

A sweep's rows are written here as they are measured, by one process or by many at once
(a worker process, Ray tasks), and read by whoever wants them, the dashboard included. Every
row is committed in its own transaction, so a worker killed mid-cell loses only the cell it
had not finished; the file is never left half-written. A row is identified by its cell
(pair, method, sparsity, pattern): a second write of the same cell, by a re-run or by another
worker, is ignored, so the table never holds a duplicate. CSV stays as an export
(:meth:`ResultStore.export_csv`).

Columns are those of the rows written: the key and the metrics first, and any extra column
(zero-shot accuracy...) added the first time a row carries it. Values are plain numbers and
strings; a non-finite number is stored as NULL (read back as None), so every row is strict
JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from mlprune import MlpruneError

STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
KEY = ("pair", "method", "sparsity", "pattern")
TABLE = "sweep_rows"
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another's transaction (each is one row)


def is_store(path: str | Path) -> bool:
    """Whether ``path`` names a results store (by its suffix) rather than a CSV file."""
    return Path(path).suffix.lower() in STORE_SUFFIXES


def _plain(value):
    """A value as SQLite keeps it: numbers as int or float (numpy's too), non-finite as None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise MlpruneError(f"A sweep row holds a {type(value).__name__}; only numbers and text can "
                       "be stored.")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ResultStore:
    """The rows of sweeps in one SQLite file (created on first use, WAL journal)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, "
                       "pair TEXT NOT NULL, method TEXT NOT NULL, sparsity REAL NOT NULL, "
                       "pattern TEXT NOT NULL, UNIQUE (pair, method, sparsity, pattern))")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")

    @classmethod
    def open(cls, store: str | Path | ResultStore) -> ResultStore:
        """``store`` itself, or the store at that path."""
        return store if isinstance(store, ResultStore) else cls(store)

    # ---- connections: one per operation, so any thread or process may use the same path

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            # WAL: readers never wait for the writer; FULL: a committed row survives a power cut
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as e:
            raise MlpruneError(f"{self.path} is not a results store (SQLite): {e}.") from e
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): writers queue, never race."""
        with closing(self._connect()) as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(e, sqlite3.DatabaseError):
                    raise MlpruneError(f"Could not write to {self.path}: {e}.") from e
                raise

    def _read(self, sql: str, args: tuple = ()) -> tuple[list[str], list[tuple]]:
        with closing(self._connect()) as db:
            try:
                cursor = db.execute(sql, args)
            except sqlite3.DatabaseError as e:
                raise MlpruneError(f"Could not read {self.path}: {e}.") from e
            return [d[0] for d in cursor.description], cursor.fetchall()

    # ---- rows

    def columns(self) -> list[str]:
        """The column names, in the order they were first written (the row id left out)."""
        names, _ = self._read(f"SELECT * FROM {TABLE} LIMIT 0")
        return [n for n in names if n != "id"]

    def rows(self) -> list[dict]:
        """Every row, in the order they were committed, as dicts of all columns (None where a
        row has no value: the dense rows' p-values, a column added after it)."""
        names, found = self._read(f"SELECT * FROM {TABLE} ORDER BY id")
        return [{k: v for k, v in zip(names, r) if k != "id"} for r in found]

    def add(self, row: dict) -> bool:
        """Commit one row; False when its cell was already there (the row is then ignored)."""
        missing = [k for k in KEY if row.get(k) is None]
        if missing:
            raise MlpruneError(f"A sweep row needs a value for {missing[0]}.")
        values = {k: _plain(v) for k, v in row.items() if k != "id"}
        values["sparsity"] = float(values["sparsity"])
        with self._write() as db:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({TABLE})")}
            for name in values:
                if name not in have:  # a column this row is the first to carry
                    db.execute(f"ALTER TABLE {TABLE} ADD COLUMN {_quote(name)}")
            cols = ", ".join(_quote(k) for k in values)
            marks = ", ".join("?" for _ in values)
            cursor = db.execute(f"INSERT OR IGNORE INTO {TABLE} ({cols}) VALUES ({marks})",
                                tuple(values.values()))
            return cursor.rowcount == 1

    def __len__(self) -> int:
        return self._read(f"SELECT COUNT(*) FROM {TABLE}")[1][0][0]

    # ---- what the rows were measured with

    def settings(self) -> dict | None:
        """The settings recorded by the first sweep that wrote here (None before one did)."""
        _, found = self._read("SELECT value FROM meta WHERE key = 'settings'")
        return json.loads(found[0][0]) if found else None

    def claim(self, settings: dict) -> None:
        """Record the settings a sweep measures with, or refuse when the store holds rows
        measured with other settings (a row's numbers would not mean the same)."""
        text = json.dumps(settings, sort_keys=True, allow_nan=False)
        with self._write() as db:
            found = db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('settings', ?)", (text,))
                return
        mine, theirs = settings, json.loads(found[0])
        if json.dumps(theirs, sort_keys=True) != text:
            differ = next((k for k in sorted({*mine, *theirs})
                           if mine.get(k) != theirs.get(k)), "settings")
            raise MlpruneError(f"{self.path} holds rows measured with another {differ} "
                               f"({theirs.get(differ)!r}, not {mine.get(differ)!r}); give "
                               "another results file.")

    # ---- export

    def export_csv(self, path: str | Path) -> Path:
        """Write every row to a CSV file (empty cells for None), replacing it whole."""
        path = Path(path)
        columns = self.columns()
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows())
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")  # never a half-written CSV at path
        partial.write_bytes(text.getvalue().encode("utf-8"))
        partial.replace(path)
        return path
