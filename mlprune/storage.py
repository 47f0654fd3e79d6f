"""Where mlprune's results live on disk: files that are never half-written, strict JSON, a
grid's measured cells, and the SQLite store of sweep rows.

Everything mlprune writes that a later run reads back (masks, statistics, checkpoints,
reports, cells, CSVs) goes through :func:`atomic_write`: the bytes land in a hidden sibling
``.name.partial`` that is renamed over the target, so a reader sees the old file or the new
one, never a torn one. Writers that want a file name of their own (safetensors'
``save_file``, a CSV writer) use :func:`atomic_save`; a folder (an exported model, a converted
checkpoint) is filled beside its target and renamed into place by :func:`atomic_folder`.

JSON is strict (:func:`strict_json`): a non-finite number is written as null, never as NaN or
Infinity, which jq and browsers refuse.

:class:`Cells` holds a grid's measured results, one JSON file per cell, with one policy for a
cell that cannot be read: it is moved aside (``name.json.damaged``, kept as evidence) and
reported as missing, so the grid measures it again.

:class:`ResultStore` holds a sweep's rows, one SQLite file written one row per transaction by
any number of processes at once (see its section below).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from mlprune import MlpruneError

PARTIAL = ".partial"  # suffix of a file being written; a leftover one is never read


def partial_path(path: Path) -> Path:
    """The hidden sibling a write goes to before it is renamed over ``path``."""
    return path.with_name(f".{path.name}{PARTIAL}")


def atomic_save(path: str | Path, write: Callable[[Path], Any], *, prefix: str | None = None,
                fsync: bool = False, mode: int | None = None) -> Path:
    """Call ``write(partial)`` and rename the partial file over ``path`` once it returns.
    If ``write`` raises, the partial file is removed and ``path`` is left as it was.

    ``prefix``: the partial file is a new one of a unique name starting with it (made by
    ``tempfile.mkstemp``: private to this user until renamed), for writers that may run at
    once or whose leftovers are told apart by name; without, it is ``.name.partial``.
    ``fsync``: its bytes reach the disk before the rename, so that a power cut leaves the old
    file or the whole new one. ``mode``: its permissions, set before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if prefix is None:
        partial = partial_path(path)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        partial = Path(name)
    try:
        write(partial)
        if fsync:
            fd = os.open(partial, os.O_RDWR)  # (writable: fsync on Windows needs it)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if mode is not None:
            os.chmod(partial, mode)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    return atomic_save(path, lambda partial: partial.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, text.encode("utf-8"))


def atomic_folder(path: str | Path, fill: Callable[[Path], Any], *, prefix: str | None = None,
                  replace: Callable[[Path], Any] | None = None,
                  keep: Callable[[Path], bool] | None = None) -> Path:
    """Call ``fill(folder)`` on a new empty sibling of ``path`` (a unique name starting with
    ``prefix``, by default ``.name.partial-``) and rename it to ``path`` once it returns; however
    it ends, nothing of the sibling is left behind.

    ``replace``: a file or folder already at ``path`` is first checked by ``replace(path)``
    (which raises to refuse), then moved aside and removed once the new folder is in place.
    Without, the rename fails (OSError) over a folder that is not empty, unless ``keep(path)``
    says that folder is whole (another process finished the same work first: theirs stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{path.name}{PARTIAL}-", dir=path.parent))
    try:
        fill(tmp)
        if replace is not None and (path.exists() or path.is_symlink()):
            replace(path)  # checked now, just before: it may have changed while filling
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)  # (onto the empty folder just made: a unique name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if keep is None or not keep(path):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def json_safe(obj: Any) -> Any:
    """A copy with every non-finite float (NaN, inf) as None and numpy scalars as Python ones."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj: Any) -> str:
    """JSON text that strict readers (jq, browsers) accept: non-finite numbers become null."""
    return json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically."""
    return atomic_write_text(path, strict_json(obj))


def slug(text: str) -> str:
    """``text`` as one file-name part: letters, digits, ``.``, ``_`` and ``-`` (never ``.``,
    ``..`` or empty, which would name a folder instead)."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return part if part.strip(".") else part.replace(".", "_") + "_"


class Cells:
    """A grid's measured results under ``root``, one strict JSON file per cell, named by its
    parts (``cells.path("translation", "dense")`` is ``root/translation/dense.json``).

    A cell that cannot be read (torn by a crash before writes were atomic, edited by hand) is
    renamed to ``<name>.json.damaged`` and read as missing: the grid measures it again and
    the damaged bytes stay on disk for whoever wants to look. ``on_damaged`` is told of each.
    """

    def __init__(self, root: str | Path, on_damaged: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.on_damaged = on_damaged

    def path(self, *parts: str) -> Path:
        """The file of the cell named by ``parts``."""
        *folders, name = [slug(p) for p in parts]
        return self.root.joinpath(*folders, f"{name}.json")

    def has(self, *parts: str) -> bool:
        """Whether the cell has been measured and can be read (a damaged one is moved aside)."""
        return self.get(*parts) is not None

    def get(self, *parts: str) -> dict | None:
        """The cell's value, or None if it is missing or damaged (then moved aside)."""
        path = self.path(*parts)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            if self.on_damaged is not None:
                self.on_damaged(f"{path} could not be read ({e}); kept as {aside.name} and "
                                "measured again")
            return None

    def put(self, value: dict, *parts: str) -> dict:
        """Write the cell atomically and return ``value``."""
        atomic_write_json(self.path(*parts), value)
        return value


# --------------------------------------------------------------------------- the sweep store
#
# Where sweep results live: one SQLite file, one transaction per measured row.
#
# A sweep's rows are written here as they are measured, by one process or by many at once
# (a worker process, Ray tasks), and read by whoever wants them, the dashboard included. Every
# row is committed in its own transaction, so a worker killed mid-cell loses only the cell it
# had not finished; the file is never left half-written. A row is identified by its cell
# (pair, method, sparsity, pattern): a second write of the same cell, by a re-run or by another
# worker, is ignored, so the table never holds a duplicate. CSV stays as an export
# (:meth:`ResultStore.export_csv`).
#
# Columns are those of the rows written: the key and the metrics first, and any extra column
# (zero-shot accuracy...) added the first time a row carries it. SQLite's column names ignore
# (ASCII) case, so a row's "chrF" is written to an existing column "chrf". Values are plain
# numbers and strings; a non-finite number is stored as NULL (read back as None), so every row
# is strict JSON.
#
# The file is marked as mlprune's (SQLite's ``application_id``) with its schema version
# (``user_version``). A SQLite file of another application, or a table of another schema, is
# refused and left as it is; a store opened for viewing (``readonly=True``) is opened read-only
# (``mode=ro``) and never written, repaired or switched to another journal mode.

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
        return atomic_write(path, text.getvalue().encode("utf-8"))  # never a half-written CSV

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
