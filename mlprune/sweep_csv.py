"""A sweep's results as a CSV file that is appended row by row: the columns, reading back
(a store too), and resuming into a file a crash left mid-row.

A row goes in one write with an fsync, so a crash leaves at most its last line torn (no
final newline); readers skip such a line and the sweep's writing path cuts it off before it
appends, so the row is measured again. A file that is not a sweep's is never changed.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from mlprune import MlpruneError
from mlprune.storage import KEY, ResultStore, is_store

# Per metric, the column holding the p-value of a row's difference from the dense row of the
# same pair (empty on dense rows): sacrebleu's paired bootstrap, dense as system a.
SIGNIFICANCE_COLUMNS = {"chrf": "chrf_p_vs_dense", "bleu": "bleu_p_vs_dense"}
KEY_COLUMNS = ("model_fingerprint", "corpus_hash", "task_hash")  # sweep_key's: text
SWEEP_COLUMNS = ["pair", "method", "sparsity", "pattern", "chrf", "bleu",
                 "target_language_rate", "perplexity", "n", "sparsity_reached",
                 *SIGNIFICANCE_COLUMNS.values(), *KEY_COLUMNS]


def read_sweep_rows(path: str | Path) -> list[dict]:
    """The complete rows of a sweep CSV or results store (by its suffix: .sqlite, .db), read
    without changing the file (a store is opened read-only). A CSV's last line without a
    final newline (cut short by a crash, or being written) is left out: a resumed sweep
    measures it again. Raises MlpruneError for a file that is not a sweep's results."""
    path = Path(path)
    if not path.is_file():
        return []
    if is_store(path):
        return ResultStore(path, readonly=True).rows()
    data = path.read_bytes()
    if b"\n" not in data and _torn_header(data):
        return []  # a header cut short on the first write: no row yet
    complete = data[: data.rfind(b"\n") + 1]  # bytes: a torn line may end mid-character
    try:
        reader = csv.DictReader(io.StringIO((complete or data).decode("utf-8-sig"), newline=""))
        rows = list(reader) if complete else []  # one line and no newline: a header only
    except (UnicodeDecodeError, csv.Error) as e:
        raise MlpruneError(f"{path} is not a sweep results CSV ({e}).") from e
    missing = [c for c in KEY if c not in (reader.fieldnames or [])]
    if missing:
        raise MlpruneError(f"{path} is not a sweep results file: it has no column {missing[0]}.")
    for line, r in enumerate(rows, start=2):
        if None in r:
            raise MlpruneError(f"Line {line} of {path} has more fields than its header.")
        for k, v in r.items():
            if v == "" or v is None:
                r[k] = None  # written for None (the dense rows' p-values)
            elif k not in ("pair", "method", "pattern", *KEY_COLUMNS):  # text, even "1e5"
                try:
                    r[k] = float(v)
                except (TypeError, ValueError):
                    pass
        bad = next((k for k in KEY if r[k] is None or (k == "sparsity"
                                                      and not isinstance(r[k], float))), None)
        if bad:
            raise MlpruneError(f"Line {line} of {path} has no valid {bad}; it is not a sweep "
                               "results file.")
    return rows


def _torn_header(data: bytes) -> bool:
    """Whether ``data`` (no newline in it) is the start of a sweep CSV's header, cut short on
    the first write (header and first row go in one write)."""
    mine = ",".join(SWEEP_COLUMNS).encode()
    return mine.startswith(data) or data.startswith(mine)


def resume_csv(path: str | Path) -> None:
    """(The sweep's writing path, before it appends.) Refuse a CSV that is not a sweep's, and
    cut off a last row torn by a crash mid-write (no final newline) so that it is measured
    again; a file that is not a sweep's is never changed."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut == len(data):
        _check_header(path, SWEEP_COLUMNS)
        return
    if cut == 0 and not _torn_header(data):
        raise MlpruneError(f"{path} is not a sweep CSV; give another CSV file to resume into.")
    if cut:
        _check_header(path, SWEEP_COLUMNS)
    with path.open("r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def _header(path: Path) -> list[str] | None:
    """The column names of a CSV file (None when it has none yet)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error) as e:
        raise MlpruneError(f"{path} is not a sweep results CSV ({e}).") from e


def _check_header(path: str | Path, columns: list[str]) -> None:
    """Refuse to resume into a sweep CSV written without some of these columns (an earlier
    version's): appended rows would not line up with its header."""
    header = _header(Path(path))
    missing = [c for c in columns if header is not None and c not in header]
    if any(c in missing for c in KEY):  # not even a cell's key: another program's file
        raise MlpruneError(f"{path} is not a sweep CSV; give another CSV file to resume into.")
    if missing:
        raise MlpruneError(f"{path} was written without the column {missing[0]} (by an earlier "
                           "mlprune); give another CSV file to resume into.")


def append_row(path: str | Path, row: dict) -> None:
    """Append one row in a single write and fsync it, writing the header for a new file."""
    path = Path(path)
    header = _header(path)
    new = header is None
    if not new and header != list(row):
        raise MlpruneError(f"The columns of this row do not match the header of {path}; give "
                           "another CSV file to resume into.")
    path.parent.mkdir(parents=True, exist_ok=True)
    line = io.StringIO(newline="")
    writer = csv.DictWriter(line, fieldnames=list(row))
    if new:
        writer.writeheader()
    writer.writerow(row)
    with path.open("a", newline="", encoding="utf-8") as f:
        f.write(line.getvalue())
        f.flush()
        os.fsync(f.fileno())
