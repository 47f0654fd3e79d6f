"""Which weights are pruned: :class:`MaskSet`, its files, and the checks its columns pass.

A mask set names, per module, the pruned input columns of each output row (every row prunes
as many weights: exact per-row sparsity, exact N:M); the :class:`Pattern` says which shape.
Its file is safetensors with a JSON header, written atomically and checked when read
(:func:`check_mask_set`), so a file that is damaged or made by hand is refused in one
sentence before any weight changes. The column checks are cached per tensor content: a
slider's next set, cut from the same ranking, costs nothing to check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.weak import WeakTensorKeyDictionary

from mlprune import MlpruneError
from mlprune.spec import Pattern, check_sparsity  # noqa: F401 - re-exported: the pattern syntax
from mlprune.storage import atomic_save


@dataclass
class MaskSet:
    """Which weights are pruned: per module, the pruned input columns of each output row.

    Every row of a module prunes the same number of weights (exact per-row sparsity, exact
    N:M), so ``pruned_cols[name]`` is an [out, k] index tensor; boolean masks derive from it.
    """

    pruned_cols: dict[str, torch.Tensor]
    in_features: dict[str, int]
    target: float
    pattern: str
    meta: dict = field(default_factory=dict)
    protected: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def modules(self) -> list[str]:
        """The pruned modules' names, in the set's order."""
        return list(self.pruned_cols)

    def keep(self, name: str) -> torch.Tensor:
        """Boolean keep-mask of one module, (out, in) like ``LinearInfo.weight``; True = kept."""
        cols = self.pruned_cols[name]
        mask = torch.ones(cols.shape[0], self.in_features[name], dtype=torch.bool)
        return mask.scatter_(1, cols.long(), False)

    def sparsity(self) -> dict[str, float]:
        """Sparsity reached per module."""
        return {n: c.shape[1] / self.in_features[n] for n, c in self.pruned_cols.items()}

    def overall_sparsity(self) -> float:
        """Sparsity reached over all the set's modules together."""
        total = sum(c.shape[0] * self.in_features[n] for n, c in self.pruned_cols.items())
        pruned = sum(c.numel() for c in self.pruned_cols.values())
        return pruned / max(total, 1)

    def protected_pruned(self) -> int:
        """Weights in protected columns that had to be pruned to keep an N:M pattern exact."""
        count = 0
        for name, cols in self.pruned_cols.items():
            prot = self.protected.get(name)
            if prot is not None and prot.any():
                count += int(prot[cols.long()].sum())
        return count

    def merge(self, other: MaskSet) -> MaskSet:
        """One mask set holding the modules of both; they must not share a module."""
        shared = [n for n in self.pruned_cols if n in other.pruned_cols]
        if shared:
            more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
            raise MlpruneError(f"Cannot merge two mask sets that both prune {shared[0]}{more}: "
                               "a module can have one mask only.")
        first = self if self.pruned_cols else other  # an empty set takes the other's target
        if other.pruned_cols and (other.pattern, other.target) != (first.pattern, first.target):
            raise MlpruneError(f"Cannot merge masks of {first.pattern} at {first.target:g} with "
                               f"masks of {other.pattern} at {other.target:g}.")
        return MaskSet({**self.pruned_cols, **other.pruned_cols},
                       {**self.in_features, **other.in_features}, first.target, first.pattern,
                       {**other.meta, **self.meta}, {**self.protected, **other.protected})

    def save(self, path: str | Path) -> None:
        """Masks as safetensors, written atomically: each module's pruned-column indices and
        protected columns, plus JSON metadata."""
        meta = {"target": str(self.target), "pattern": self.pattern, "meta": json.dumps(self.meta),
                "in_features": json.dumps(self.in_features)}
        tensors = {n: c.contiguous() for n, c in self.pruned_cols.items()}
        tensors.update({f"{_PROTECTED}{n}": p.contiguous() for n, p in self.protected.items()
                        if n in self.pruned_cols})
        # atomically: a save stopped half-way leaves the previous file whole, never a torn one
        atomic_save(path, lambda partial: save_file(tensors, str(partial), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        """Read masks written by :meth:`save` (files without protected columns read as none).

        Checked before anything uses them (:func:`check_mask_set`): a file whose columns are
        out of range, repeated in a row or not integers is refused in one sentence."""
        tensors, meta = _read_safetensors(path, "masks")
        try:
            in_features = json.loads(meta["in_features"])
            if not isinstance(in_features, dict):
                raise TypeError("in_features is not a table of modules")
            pruned_cols = {n: tensors[n] for n in in_features}  # in saved (forward) order
            protected = {n: tensors[f"{_PROTECTED}{n}"] for n in in_features
                         if f"{_PROTECTED}{n}" in tensors}
            masks = cls(pruned_cols, in_features, float(meta["target"]), meta["pattern"],
                        json.loads(meta.get("meta", "{}")), protected)
        except (KeyError, ValueError, TypeError) as e:
            raise MlpruneError(f"{path} is not an mlprune masks file: its header is missing "
                               f"or damaged ({e}).") from e
        check_mask_set(masks, f" in {path}")
        return masks


def check_mask_set(masks: MaskSet, source: str = "") -> None:
    """Raise one sentence where ``masks`` cannot be masks of any model: a width that is not a
    positive whole number, a target outside [0, 1], an unknown pattern, protected columns of
    another shape, or pruned columns that are not [rows, k] integers, each in range and named
    once per row (:func:`_check_column_values`). ``source`` (" in file") joins the sentence.
    Whether they fit a model is checked when they are applied."""
    if not isinstance(masks.target, float) or not 0 <= masks.target <= 1:  # NaN fails too
        raise MlpruneError(f"The masks{source} have target {masks.target!r}, outside 0 to 1.")
    Pattern.parse(masks.pattern)
    if not isinstance(masks.meta, dict):
        raise MlpruneError(f"The masks{source} carry a header meta that is not a table.")
    for name, width in masks.in_features.items():
        if type(width) is not int or width <= 0:
            raise MlpruneError(f"The masks of {name}{source} give it {width!r} inputs, not a "
                               "positive whole number.")
        _check_column_values(name, masks.pruned_cols[name], width, source)
        prot = masks.protected.get(name)
        if prot is not None and (prot.dtype != torch.bool or tuple(prot.shape) != (width,)):
            raise MlpruneError(f"The protected columns of {name}{source} are {prot.dtype} of shape "
                               f"{tuple(prot.shape)}, not {width} booleans.")


# Key prefix of a module's protected columns in saved files (masks, rankings, checkpoints).
_PROTECTED = "protected/"


def _read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file; one sentence if missing or damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MlpruneError(f"No {what} file at {path}.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for damaged headers and data
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MlpruneError(f"{path} is not a readable {what} file ({first}).") from e
    return tensors, meta


def _check_columns(name: str, cols: torch.Tensor, weight: torch.Tensor) -> None:
    """One sentence, before any weight changes, for columns that do not fit ``weight``: a
    column out of range would name a weight of another row, and one named twice in a row
    would be saved as 0.0 the second time by a take that zeroes as it reads."""
    if cols.dim() != 2 or cols.shape[0] != weight.shape[0]:
        raise MlpruneError(f"The masks of {name} have shape {tuple(cols.shape)}, which does not "
                           f"fit its {weight.shape[0]} output rows.")
    _check_column_values(name, cols, weight.shape[1])


_COLUMN_TYPES = (torch.int16, torch.int32, torch.int64)  # what rankings write and kernels move


def _check_column_values(name: str, cols: torch.Tensor, width: int, source: str = "") -> None:
    """One sentence unless ``cols`` is [rows, k] integers, each in 0..width-1 and named once
    per row (any order: a ranking's columns come lowest score first). Read once per tensor
    content (cached), so a slider's next set costs nothing here."""
    if cols.dim() != 2:
        raise MlpruneError(f"The masks of {name}{source} have shape {tuple(cols.shape)}, not "
                           "[rows, pruned columns].")
    if cols.dtype not in _COLUMN_TYPES:
        raise MlpruneError(f"The masks of {name}{source} hold {cols.dtype} values, not column "
                           "numbers (int16, int32 or int64).")
    lo, hi, repeat = _column_facts(cols, width)
    if lo < 0 or hi >= width:
        bad = lo if lo < 0 else hi
        raise MlpruneError(f"The masks of {name}{source} name column {bad}, but it has "
                           f"{width} inputs.")
    if repeat is not None:
        raise MlpruneError(f"The masks of {name}{source} name column {repeat[1]} twice in row "
                           f"{repeat[0]}; each pruned column must be named once.")


# facts about a column tensor (or the tensor it is a view of, such as a ranking's row order),
# read once per content: (its version counter, lowest, highest, first repeat in a row or None)
_COLUMN_FACTS = WeakTensorKeyDictionary()


def _column_facts(cols: torch.Tensor, width: int) -> tuple[int, int, tuple[int, int] | None]:
    """Lowest and highest column of ``cols`` and its first (row, column) named twice in a row,
    or None. A view whose rows are runs of the rows of the tensor it views (a ranking's row
    order cut at a sparsity) takes that tensor's facts, read once for every sparsity."""
    root = cols._base
    if root is not None and _rows_within(cols, root):
        lo, hi, repeat = _tensor_facts(root)
        if lo >= 0 and hi < width and repeat is None:  # true of the rows, so of their runs
            return lo, hi, None
    return _tensor_facts(cols)


def _tensor_facts(t: torch.Tensor) -> tuple[int, int, tuple[int, int] | None]:
    seen = _COLUMN_FACTS.get(t)
    if seen is None or seen[0] != t._version:  # an in-place change bumps the version
        seen = _COLUMN_FACTS[t] = (t._version, *_scan_columns(t))
    return seen[1:]


def _rows_within(cols: torch.Tensor, root: torch.Tensor) -> bool:
    """Whether every row of the view ``cols`` is a run of one row of the contiguous 2-D
    ``root``: then a column is named twice in a row of ``cols`` only if in one of ``root``."""
    if (root.dim() != 2 or cols.dtype != root.dtype or not root.is_contiguous()
            or root.shape[1] == 0 or cols.numel() == 0):
        return False
    n = root.shape[1]
    if (cols.shape[1] > 1 and cols.stride(1) != 1) or (cols.shape[0] > 1 and cols.stride(0) % n):
        return False
    row, col = divmod(cols.storage_offset() - root.storage_offset(), n)
    last = row + (cols.shape[0] - 1) * (cols.stride(0) // n)
    return 0 <= row and last < root.shape[0] and col + cols.shape[1] <= n


def _scan_columns(cols: torch.Tensor) -> tuple[int, int, tuple[int, int] | None]:
    """:func:`_tensor_facts` read from the data: per block of rows, a bitmap of the columns
    seen (~3 ns a column; a row sort where columns are negative or huge)."""
    if cols.dim() != 2 or cols.numel() == 0:
        return (0, -1, None) if cols.numel() == 0 else (*(int(x) for x in torch.aminmax(cols)), None)
    lo, hi = (int(x) for x in torch.aminmax(cols))
    rows, k = cols.shape
    if k < 2:
        return lo, hi, None
    data = cols.cpu().numpy()
    bitmap = 0 <= lo and hi < 1 << 16
    width = hi + 1 if bitmap else 0
    step = max(1, (1 << 20) // max(k, width))
    if bitmap:  # one flat index per block: ~4x faster than np.put_along_axis
        seen = np.empty(step * width, dtype=np.bool_)
        where = np.empty((step, k), dtype=np.intp)
        starts = (np.arange(step, dtype=np.intp) * width)[:, None]
    for r0 in range(0, rows, step):
        block = data[r0:r0 + step]
        if bitmap:
            n = block.shape[0]
            seen[:n * width] = False
            np.add(block, starts[:n], out=where[:n])
            seen[where[:n].reshape(-1)] = True
            bad = np.flatnonzero(np.count_nonzero(seen[:n * width].reshape(n, width), axis=1) != k)
        else:
            ordered = np.sort(block, axis=1)
            bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1))
        if bad.size:
            row = np.sort(block[bad[0]])
            return lo, hi, (r0 + int(bad[0]), int(row[1:][row[1:] == row[:-1]][0]))
    return lo, hi, None
