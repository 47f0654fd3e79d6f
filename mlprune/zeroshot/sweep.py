"""Zero-shot columns for every row of a pruning sweep (``pipeline.sweep``'s ``extra_eval``)."""

from __future__ import annotations

import csv
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn

from mlprune import MlpruneError
from mlprune.zeroshot.loaders import load_task
from mlprune.zeroshot.results import TaskResult, compare_results, evaluate_task
from mlprune.zeroshot.scoring import NORMS
from mlprune.zeroshot.tasks import REFERENCE_LANG, Task


class SweepEval:
    """The ``extra_eval`` callback of ``pipeline.sweep``: zero-shot columns for every row.

    Called inside the sweep's pruned context with (loaded, method, sparsity). Dense (sparsity
    0) results are computed once per model and reused for every method; later rows add the
    difference from dense with its bootstrap p-value (NaN when the sweep did not measure the
    dense model in this session, e.g. when resuming past its rows).
    """

    def __init__(self, tasks: Sequence[Task], *, norm: str = "token", batch_size: int = 8,
                 n_resamples: int = 2_000, seed: int = 0, max_logits_mb: int = 256):
        if norm not in NORMS:
            raise MlpruneError(f"Unknown normalisation '{norm}': use {', '.join(NORMS)}.")
        if not tasks:
            raise MlpruneError("Name at least one zero-shot task.")
        self.tasks, self.norm, self.batch_size = list(tasks), norm, batch_size
        self.n_resamples, self.seed, self.max_logits_mb = n_resamples, seed, max_logits_mb
        # keyed by the model object itself (weakly): an id() could be reused by another model
        self._dense: weakref.WeakKeyDictionary[nn.Module, dict[str, TaskResult]] = (
            weakref.WeakKeyDictionary())

    @property
    def columns(self) -> list[str]:
        """The column names every row gets, in order (the same for every row, as CSV needs)."""
        cols = []
        for task in self.tasks:
            t, langs = task.name, task.languages
            cols += [f"{t}_acc_{lang}" for lang in langs] + [f"{t}_acc_non_en"]
            if REFERENCE_LANG in langs:
                cols += [f"{t}_rankc_{lang}" for lang in langs if lang != REFERENCE_LANG]
            cols += [f"{t}_rankc_mean", f"{t}_diff_en", f"{t}_p_en", f"{t}_diff_non_en",
                     f"{t}_p_non_en"]
        return cols

    def __call__(self, loaded, method: str, sparsity: float) -> dict:
        key = loaded.model
        dense = self._dense.get(key)
        if sparsity == 0 and dense is not None:
            results = dense
        else:
            results = {t.name: evaluate_task(loaded.model, loaded.tokenizer, t, norm=self.norm,
                                             batch_size=self.batch_size,
                                             max_logits_mb=self.max_logits_mb) for t in self.tasks}
            if sparsity == 0:
                self._dense[key] = dense = results
        row: dict[str, float] = {}
        for task in self.tasks:
            res = results[task.name]
            row.update(res.columns())
            cmp = {r["lang"]: r for r in compare_results(dense[task.name], res,
                                                         n_resamples=self.n_resamples,
                                                         seed=self.seed)} if dense else {}
            for lang, label in ((REFERENCE_LANG, "en"), ("non-en", "non_en")):
                r = cmp.get(lang)
                row[f"{task.name}_diff_{label}"] = r["diff"] if r else float("nan")
                row[f"{task.name}_p_{label}"] = r["p_value"] if r else float("nan")
        return {c: row.get(c, float("nan")) for c in self.columns}

    def check_resume(self, csv_path: str | Path) -> None:
        """Refuse to append to a sweep CSV whose header lacks these columns (rows would shift)."""
        path = Path(csv_path)
        if not path.is_file() or path.stat().st_size == 0:
            return
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise MlpruneError(f"{path} was written without the zero-shot columns of this sweep "
                               f"(e.g. {missing[0]}); give another CSV file to resume into.")


def sweep_eval(tasks: Sequence[str | Path | Task], *, limit: int | None = None,
               langs: Iterable[str] | None = None, norm: str = "token", batch_size: int = 8,
               n_resamples: int = 2_000, seed: int = 0,
               sample: int | None = None) -> SweepEval:
    """Build the zero-shot ``extra_eval`` callback for ``pipeline.sweep`` (CLI and dashboard).

    ``tasks`` are built-in names, JSONL paths or loaded tasks; ``limit`` keeps that many items
    per language; ``sample``: XNLI and MARC sources are cut to the authors' draw of that many
    items per language first (:func:`~mlprune.zeroshot.loaders.load_task`; the paper
    protocol's 1000).
    """
    loaded_tasks = [t if isinstance(t, Task) else load_task(t, sample=sample) for t in tasks]
    langs = list(langs) if langs is not None else None
    return SweepEval([t.subset(limit, langs) for t in loaded_tasks], norm=norm,
                     batch_size=batch_size, n_resamples=n_resamples, seed=seed)

