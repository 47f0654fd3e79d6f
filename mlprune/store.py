"""Where sweep results live: one SQLite file, one transaction per measured row.

A sweep's rows are written here as they are measured, by one process or by many at once
(a worker process, Ray tasks), and read by whoever wants them, the dashboard included. Every
row is committed in its own transaction, so a worker killed mid-cell loses only the cell it
had not finished; the file is never left half-written. A row is identified by its cell
(pair, method, sparsity, pattern): a second write of the same cell, by a re-run or by another
worker, is ignored, so the table never holds a duplicate. CSV stays as an export
(:meth:`ResultStore.export_csv`).

Columns are those of the rows written: the key and the metrics first, and any extra column
(zero-shot accuracy...) added the first time a row carries it. SQLite's column names ignore
(ASCII) case, so a row's "chrF" is written to an existing column "chrf". Values are plain
numbers and strings; a non-finite number is stored as NULL (read back as None), so every row
is strict JSON.

The file is marked as mlprune's (SQLite's ``application_id``) with its schema version
(``user_version``). A SQLite file of another application, or a table of another schema, is
refused and left as it is; a store opened for viewing (``readonly=True``) is opened read-only
(``mode=ro``) and never written, repaired or switched to another journal mode.
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
APPLICATION_ID = 0x6D6C7072  # "mlpr": SQLite's header field naming the application of a file
SCHEMA_VERSION = 1  # user_version; 0 is a store written before the file was marked
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


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


def _fold(name: str) -> str:
    """A column name as SQLite compares it: ASCII letters without case, others as they are."""
    return name.translate(_ASCII_LOWER)


# What the rows were measured on, as pipeline.sweep_key records it: the model's weights, the
# corpus and the zero-shot tasks. A mismatch is named before any other setting, since it
# means the rows are not of this model or data at all.
SOURCE = {"model_fingerprint": "another model", "corpus_hash": "another corpus",
          "task_hash": "other zero-shot tasks"}


def check_same_source(where: str | Path, mine: dict, theirs: dict) -> None:
    """Refuse rows recorded with ``theirs`` (a store's settings, a CSV row) when they were
    measured on another model, corpus or zero-shot tasks than ``mine`` (keys of
    :data:`SOURCE`; those ``mine`` lacks are not compared), naming which."""
    for key, other in SOURCE.items():
        if key not in mine or mine[key] == theirs.get(key):
            continue
        if key == "model_fingerprint" and mine.get("model") == theirs.get("model") and any(
                mine.get(k) != theirs.get(k) for k in ("dtype", "dequantized_from")):
            continue  # the same model loaded otherwise: the precision is what to name
        if key not in theirs:
            raise MlpruneError(f"{where} holds rows recorded without the fingerprint of their "
                               "model, corpus and tasks (by an earlier mlprune); give another "
                               "results file.")
        was, now = (f"{d[key] or 'none'}" if key != "model_fingerprint" or not d.get("model")
                    else f"{d['model']} {d[key]}" for d in (theirs, mine))  # name beside id
        raise MlpruneError(f"{where} holds rows measured on {other} ({was}, not {now}); give "
                           "another results file.")


class ResultStore:
    """The rows of sweeps in one SQLite file (created on first use, WAL journal); with
    ``readonly``, an existing file opened for viewing only (``mode=ro``: never written)."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise MlpruneError(f"No results store at {self.path}.")
            with closing(self._connect()) as db:
                self._empty = self._check(db)  # (a worker may have only just created it)
            return
        self._empty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the file is checked before anything is written or its journal mode changed, so that
        # a SQLite file of another application is refused as it is
        with self._write(wal=False) as db:
            if self._check(db):
                db.execute(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, "
                           "pair TEXT NOT NULL, method TEXT NOT NULL, sparsity REAL NOT NULL, "
                           "pattern TEXT NOT NULL, UNIQUE (pair, method, sparsity, pattern))")
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                # new, or a store written before files were marked: mark it now
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        with closing(self._connect()):
            pass  # WAL from now on (a pragma that cannot run inside the transaction above)

    @classmethod
    def open(cls, store: str | Path | ResultStore) -> ResultStore:
        """``store`` itself, or the store at that path."""
        return store if isinstance(store, ResultStore) else cls(store)

    # ---- connections: one per operation, so any thread or process may use the same path

    def _connect(self, *, wal: bool = True) -> sqlite3.Connection:
        try:
            if self.readonly:
                # mode=ro: SQLite itself refuses every write, so viewing cannot change the file
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                     timeout=BUSY_TIMEOUT_S, isolation_level=None)
                return db
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            # WAL: readers never wait for the writer; FULL: a committed row survives a power cut
            if wal:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as e:
            raise MlpruneError(f"{self.path} is not a results store (SQLite): {e}.") from e
        return db

    def _check(self, db: sqlite3.Connection) -> bool:
        """True for an empty database (a store to create); raises MlpruneError for anything
        but a results store of a schema this mlprune knows. Reads only."""
        try:
            app = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                               "WHERE type = 'table'")}
            if app not in (0, APPLICATION_ID):
                raise MlpruneError(f"{self.path} belongs to another application (SQLite "
                                   f"application id {app}); it is not a results store.")
            if app == 0 and version == 0 and not tables:
                return True
            if version > SCHEMA_VERSION:
                raise MlpruneError(f"{self.path} was written by a newer mlprune (results "
                                   f"schema {version}); update mlprune to open it.")
            other = sorted(tables - {TABLE, "meta"})
            if app == 0 and other:  # an unmarked file is a store only if it holds nothing else
                raise MlpruneError(f"{self.path} is not a results store: it holds the table "
                                   f"{other[0]}.")
            for table, needs in ((TABLE, ("id", *KEY)), ("meta", ("key", "value"))):
                have = {_fold(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
                missing = [c for c in needs if c not in have]
                if missing:
                    raise MlpruneError(f"{self.path} is not a results store: it has no "
                                       f"{table} table with a column {missing[0]}.")
            if not self._one_row_per_cell(db):
                raise MlpruneError(f"{self.path} is not a results store: its {TABLE} table "
                                   f"does not keep one row per cell (UNIQUE {KEY}).")
        except sqlite3.DatabaseError as e:
            raise MlpruneError(f"{self.path} is not a results store (SQLite): {e}.") from e
        return False

    @staticmethod
    def _one_row_per_cell(db: sqlite3.Connection) -> bool:
        """Whether a unique index on exactly the key columns makes a second write of a cell
        an ignored one (INSERT OR IGNORE), as :meth:`add` relies on."""
        for _, name, unique, _, partial in db.execute(f"PRAGMA index_list({TABLE})"):
            if unique and not partial:
                columns = [_fold(r[2] or "")
                           for r in db.execute(f"PRAGMA index_info({_quote(name)})")]
                if sorted(columns) == sorted(KEY):
                    return True
        return False

    def _nothing(self) -> bool:
        """Whether a store opened for viewing is still an empty file (just created by a
        worker that has not written its tables yet): it then holds no rows."""
        if self._empty:
            with closing(self._connect()) as db:
                self._empty = self._check(db)
        return self._empty

    @contextmanager
    def _write(self, *, wal: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): writers queue, never race."""
        if self.readonly:
            raise MlpruneError(f"{self.path} was opened for viewing only; it is never written.")
        with closing(self._connect(wal=wal)) as db:
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
                # fetchall inside too: a damaged page is met while the rows are read
                return [d[0] for d in cursor.description], cursor.fetchall()
            except sqlite3.DatabaseError as e:
                raise MlpruneError(f"Could not read {self.path}: {e}.") from e

    # ---- rows

    def columns(self) -> list[str]:
        """The column names, in the order they were first written (the row id left out)."""
        if self._nothing():
            return []
        names, _ = self._read(f"SELECT * FROM {TABLE} LIMIT 0")
        return [n for n in names if n != "id"]

    def rows(self) -> list[dict]:
        """Every row, in the order they were committed, as dicts of all columns (None where a
        row has no value: the dense rows' p-values, a column added after it)."""
        if self._nothing():
            return []
        names, found = self._read(f"SELECT * FROM {TABLE} ORDER BY id")
        return [{k: v for k, v in zip(names, r) if k != "id"} for r in found]

    def add(self, row: dict) -> bool:
        """Commit one row; False when its cell was already there (the row is then ignored)."""
        missing = [k for k in KEY if row.get(k) is None]
        if missing:
            raise MlpruneError(f"A sweep row needs a value for {missing[0]}.")
        values = {k: _plain(v) for k, v in row.items() if k != "id"}
        values["sparsity"] = float(values["sparsity"])
        seen: dict[str, str] = {}
        for name in values:
            if _fold(name) in seen:
                raise MlpruneError(f"A sweep row has two columns whose names differ only in case "
                                   f"({seen[_fold(name)]}, {name}); a results store cannot keep "
                                   "both.")
            seen[_fold(name)] = name
        with self._write() as db:
            have = {_fold(r[1]): r[1] for r in db.execute(f"PRAGMA table_info({TABLE})")}
            for name in list(values):
                if _fold(name) not in have:  # a column this row is the first to carry
                    db.execute(f"ALTER TABLE {TABLE} ADD COLUMN {_quote(name)}")
                elif have[_fold(name)] != name:  # SQLite's names ignore case: "chrF" is "chrf"
                    values[have[_fold(name)]] = values.pop(name)
            cols = ", ".join(_quote(k) for k in values)
            marks = ", ".join("?" for _ in values)
            cursor = db.execute(f"INSERT OR IGNORE INTO {TABLE} ({cols}) VALUES ({marks})",
                                tuple(values.values()))
            return cursor.rowcount == 1

    def __len__(self) -> int:
        if self._nothing():
            return 0
        return self._read(f"SELECT COUNT(*) FROM {TABLE}")[1][0][0]

    # ---- what the rows were measured with

    def settings(self) -> dict | None:
        """The settings recorded by the first sweep that wrote here (None before one did)."""
        if self._nothing():
            return None
        _, found = self._read("SELECT value FROM meta WHERE key = 'settings'")
        return self._parse_settings(found[0][0]) if found else None

    def _parse_settings(self, text) -> dict:
        try:
            settings = json.loads(text)
        except (TypeError, ValueError):
            settings = None
        if not isinstance(settings, dict):
            raise MlpruneError(f"{self.path} holds damaged settings (not a JSON object); give "
                               "another results file.")
        return settings

    def claim(self, settings: dict) -> None:
        """Record the settings a sweep measures with, or refuse when the store holds rows
        measured with other settings (a row's numbers would not mean the same)."""
        text = json.dumps(settings, sort_keys=True, allow_nan=False)
        with self._write() as db:
            found = db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('settings', ?)", (text,))
                return
        mine, theirs = settings, self._parse_settings(found[0])
        if json.dumps(theirs, sort_keys=True) != text:
            check_same_source(self.path, mine, theirs)  # the model, corpus, tasks named first
            differ = next((k for k in sorted({*mine, *theirs})
                           if mine.get(k) != theirs.get(k)), "settings")
            raise MlpruneError(f"{self.path} holds rows measured with another {differ} "
                               f"({theirs.get(differ)!r}, not {mine.get(differ)!r}); give "
                               "another results file.")

    # ---- export

    def export_csv(self, path: str | Path) -> Path:
        """Write every row to a CSV file (empty cells for None), replacing it whole. An
        existing file is replaced only when it is an earlier export of this store (every cell
        it holds is here), never a file holding rows measured elsewhere."""
        path = Path(path)
        columns, rows = self.columns(), self.rows()
        if path.exists():
            self._check_replaceable(path, {_cell(r) for r in rows})
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")  # never a half-written CSV at path
        partial.write_bytes(text.getvalue().encode("utf-8"))
        partial.replace(path)
        return path

    def _check_replaceable(self, path: Path, cells: set[tuple]) -> None:
        """Refuse to replace ``path`` unless it is a CSV whose every row's cell is among
        ``cells`` (what an earlier export of this store holds); reads it only."""
        try:
            text = path.read_bytes().decode("utf-8-sig")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            found = [_cell(r) for r in reader]
        except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
            found = None  # not a CSV of sweep rows: it is not this store's export either
        if found is None or not set(found) <= cells:
            raise MlpruneError(f"{path} holds rows that are not in {self.path.name}; export to "
                               "another CSV file so that they are not lost.")


def _cell(row: dict) -> tuple:
    """The cell a row measures (its key), sparsity as a float."""
    return row["pair"], row["method"], float(row["sparsity"]), row["pattern"]
