"""The whole flow from one spec: calibrate -> rank -> masks, and sweeps over many specs.

The command line, the dashboard and the benchmarks all go through these functions, so a
pruned model means the same thing wherever it was made. What a spec or a sweep's grid is,
and how it is checked, is :mod:`mlprune.spec`'s; a sweep's CSV file is
:mod:`mlprune.sweep_csv`'s (both re-exported here, where callers have always found them).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlprune import MlpruneError, Progress, cache_name, no_progress
from mlprune.capture import ActivationStats, Cancelled, capture, padding_side
from mlprune.corpus import ParallelCorpus
from mlprune.evaluate import evaluate_translation, paired_translation_test
from mlprune.features import detected_dims
from mlprune.models import LoadedModel, cache_dir, onloaded
from mlprune.prompts import (
    PromptSet,
    calibration_mix,
    calibration_prompts,
    is_mix,
    parse_pair,
    pooled_prompts,
)
from mlprune.prune import (
    MaskSet,
    Ranking,
    allocate,
    pruned,
    rank_modules,
    select_modules,
    sequential_run,
)
from mlprune.spec import PRESETS, SWEEP_METHODS, PruneSpec, SweepSpec  # noqa: F401
from mlprune.storage import ResultStore, atomic_save, check_same_source
from mlprune.sweep_csv import (  # noqa: F401
    KEY_COLUMNS,
    SIGNIFICANCE_COLUMNS,
    SWEEP_COLUMNS,
    append_row,
    read_sweep_rows,
    resume_csv,
)


@dataclass
class Calibration:
    """Statistics behind a ranking: the calibration set's, and the ratio method's second set
    (its prompts too, which a sequential pass replays through the pruned layers)."""

    prompts: PromptSet
    stats: ActivationStats
    other: ActivationStats | None = None
    seconds: float = 0.0
    other_prompts: PromptSet | None = None


@dataclass
class PruneResult:
    spec: PruneSpec
    ranking: Ranking
    masks: MaskSet
    calibration: Calibration | None
    timings: dict = field(default_factory=dict)


def model_fingerprint(loaded: LoadedModel) -> str:
    """A short id of the model's current weights: name, shapes and a sample of values (an
    offloaded model's read from its offloaded copy: the same id as loaded in memory)."""
    h = hashlib.sha256(loaded.name.encode())
    for name, _ in list(loaded.model.named_parameters())[:64]:
        owner, _, leaf = name.rpartition(".")
        module = loaded.model.get_submodule(owner)
        with onloaded(module, recurse=False):
            param = getattr(module, leaf)
            h.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            h.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def corpus_hash(corpus: ParallelCorpus) -> str:
    """A short id of a corpus's content (every sentence of every language, in order; its
    name left out), computed once per corpus object."""
    found = corpus.__dict__.get("_mlprune_hash")
    if found is None:
        found = hashlib.sha256(corpus.table.to_csv(index=False).encode()).hexdigest()[:16]
        corpus.__dict__["_mlprune_hash"] = found
    return found


def task_hash(extra_eval: Callable | None) -> str | None:
    """A short id of the zero-shot tasks an ``extra_eval`` scores (its ``tasks``: every item
    and its normalisation), None when it scores none."""
    tasks = getattr(extra_eval, "tasks", None)
    if not tasks:
        return None
    what = [getattr(extra_eval, "norm", None),
            [[t.name, [[it.id, it.lang, it.prompt, list(it.choices), it.label] for it in t.items]]
             for t in tasks]]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()[:16]


def sweep_key(loaded: LoadedModel, corpus: ParallelCorpus,
              extra_eval: Callable | None = None) -> dict:
    """What a sweep's rows were measured on (:data:`KEY_COLUMNS`): the model's fingerprint,
    the corpus's hash and the zero-shot tasks' hash (None without tasks). Every row and
    every store carries it, so rows of another model or corpus are never taken for these."""
    return {"model_fingerprint": model_fingerprint(loaded), "corpus_hash": corpus_hash(corpus),
            "task_hash": task_hash(extra_eval)}


STATS_VERSION = "3"  # bumped when ActivationStats gain fields: older cache entries are not read


def cached_capture(loaded: LoadedModel, prompts: PromptSet, *, batch_size: int = 8,
                   progress: Progress = no_progress,
                   should_stop: Callable[[], bool] | None = None,
                   pad_to: int | None = None, pad_side: str | None = None) -> ActivationStats:
    """Capture, saved to the cache folder as soon as it is done and read back next time,
    so a crash later never costs the calibration again (a cached read reports no progress).
    ``pad_to``/``pad_side``: :func:`~mlprune.capture.capture`'s."""
    padding = pad_to
    if pad_to is not None and padding_side(loaded.tokenizer, pad_side) == "left":
        padding = f"{pad_to}:left"  # right-padded entries keep the key they had before sides
    what = f"{STATS_VERSION}\x00{padding}\x00{prompts.key}{model_fingerprint(loaded)}"
    key = hashlib.sha256(what.encode()).hexdigest()
    # the name only helps a reader: it comes from corpus columns (user text), so it is made
    # harmless; the hash is what identifies the entry
    path = cache_dir() / "stats" / f"{cache_name(prompts.name)}-{key[:20]}.safetensors"
    if path.is_file():
        try:
            return ActivationStats.load(path)
        except MlpruneError:
            path.unlink(missing_ok=True)  # a damaged cache entry: capture again
    stats = capture(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size,
                    progress=progress, should_stop=should_stop, pad_to=pad_to, pad_side=pad_side)
    stats.save(path)
    return stats


def calibration_stats(loaded: LoadedModel, corpus: ParallelCorpus, calibration: str,
                      spec: PruneSpec, *, what: str = "calibration", batch_size: int = 8,
                      progress: Progress = no_progress,
                      should_stop: Callable[[], bool] | None = None
                      ) -> tuple[PromptSet, ActivationStats]:
    """One calibration set's prompts and cached statistics, under the spec's shots, samples,
    seed, protocol and padding. A mix captures (or reads from the cache) each of its sets
    alone and combines them with its weights (:meth:`ActivationStats.combine`); its prompts
    are the pooled prompt set, which a sequential pass collects per part."""
    kw = dict(shots=spec.shots, samples=spec.samples, seed=spec.seed, separator=spec.separator)
    if not is_mix(calibration):
        prompts = calibration_prompts(corpus, calibration, spec.pair, **kw)
        stats = cached_capture(loaded, prompts, batch_size=batch_size, should_stop=should_stop,
                               pad_to=spec.pad_to, pad_side=spec.pad_side,
                               progress=lambda s, f: progress(f"{what} ({prompts.name}), {s}", f))
        return prompts, stats
    parts = calibration_mix(corpus, calibration, **kw)
    captured = []
    for i, (ps, _) in enumerate(parts):
        captured.append(cached_capture(
            loaded, ps, batch_size=batch_size, should_stop=should_stop, pad_to=spec.pad_to,
            pad_side=spec.pad_side,
            progress=lambda s, f, i=i, n=ps.name: progress(
                f"{what} ({n}, set {i + 1}/{len(parts)}), {s}", (i + f) / len(parts))))
    prompts = pooled_prompts(calibration, parts)
    meta = {**{k: v for k, v in captured[0].meta.items() if k not in ("texts", "src", "tgt",
                                                                      "lang")},
            "prompts": calibration, "kind": "mix"}
    if spec.pad_to:
        meta.update(pad_to=spec.pad_to, pad_side=padding_side(loaded.tokenizer, spec.pad_side))
    stats = ActivationStats.combine(captured, [w for _, w in parts], [ps.name for ps, _ in parts],
                                    meta=meta)
    return prompts, stats


def cached_masks(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec, path: str | Path,
                 *, batch_size: int = 8, progress: Progress = no_progress) -> MaskSet:
    """The spec's masks, read back from ``path`` when an earlier run made them there, else
    pruned and saved there (atomically), so a stopped grid or benchmark never prunes twice.
    A damaged file is made again. The caller names the file after what the masks depend on."""
    path = Path(path)
    if path.is_file():
        try:
            return MaskSet.load(path)
        except Exception:  # noqa: BLE001 - a damaged file is made again
            path.unlink(missing_ok=True)
    masks = prune(loaded, corpus, spec, batch_size=batch_size, progress=progress).masks
    atomic_save(path, masks.save)
    return masks


def calibrate(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec, *,
              batch_size: int = 8, progress: Progress = no_progress,
              should_stop: Callable[[], bool] | None = None) -> Calibration:
    """The dense model's statistics on the spec's calibration set (and second set), cached."""
    start = time.perf_counter()
    prompts, stats = calibration_stats(loaded, corpus, spec.calibration, spec,
                                       batch_size=batch_size, progress=progress,
                                       should_stop=should_stop)
    other = other_prompts = None
    if spec.method == "ratio":
        other_prompts, other = calibration_stats(loaded, corpus, spec.other, spec,
                                                 what="second set", batch_size=batch_size,
                                                 progress=progress, should_stop=should_stop)
    return Calibration(prompts, stats, other, time.perf_counter() - start, other_prompts)


def rank(loaded: LoadedModel, spec: PruneSpec, calib: Calibration | None, *,
         batch_size: int = 8, checkpoint_dir: str | Path | None = None,
         progress: Progress = no_progress) -> Ranking:
    """Rank the selected modules by the spec's method (sequential mode re-captures per layer).
    With ``checkpoint_dir``, each finished layer of the sequential pass and of the ranking is
    saved there as it is done, and a run given the same folder resumes from them."""
    modules = select_modules(loaded.model, spec.layers, spec.blocks)
    protect = None
    if spec.protect:
        if calib is None:
            raise MlpruneError("Protecting features needs calibration statistics.")
        protect = detected_dims(calib.stats, spec.protect)
    stats = calib.stats if calib else None
    other = calib.other if calib else None
    # the allocation reads the dense statistics, in sequential mode too (before the pass)
    allocation = allocate(loaded.model, stats, kind=spec.layer_allocation, method=spec.method,
                          other=other, modules=modules, strength=spec.allocation_range,
                          threshold=spec.outlier_threshold, seed=spec.seed, mwanda=spec.mwanda)
    if spec.mode == "sequential" and spec.uses_activations:
        # the ratio method's second set is replayed through the pruned layers too, as the
        # authors' prune_mt.py runs both sets through each pruned layer
        run = sequential_run(
            loaded.model, loaded.tokenizer, calib.prompts, calib.stats, method=spec.method,
            sparsity=spec.sparsity, pattern=spec.pattern, other=other, invert=spec.invert,
            protect=protect, modules=modules, seed=spec.seed, batch_size=batch_size,
            pad_to=spec.pad_to, pad_side=spec.pad_side, allocation=allocation,
            mwanda=spec.mwanda, checkpoint_dir=checkpoint_dir,
            other_prompts=calib.other_prompts if other is not None else None,
            progress=lambda s, f: progress(f"sequential calibration, {s}", f))
        stats, other = run.stats, run.other if run.other is not None else other
    return rank_modules(loaded.model, stats, method=spec.method, other=other,
                        invert=spec.invert, protect=protect, modules=modules, seed=spec.seed,
                        allocation=allocation, mwanda=spec.mwanda, checkpoint_dir=checkpoint_dir,
                        progress=lambda s, f: progress(f"ranking, {s}", f))


def prune(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec, *, batch_size: int = 8,
          checkpoint_dir: str | Path | None = None,
          progress: Progress = no_progress) -> PruneResult:
    """Calibrate (when the method needs data), rank and build masks. The model stays dense.
    ``checkpoint_dir``: where the sequential pass and the ranking save each finished layer,
    and resume from."""
    spec.validate()
    t0 = time.perf_counter()
    calib = calibrate(loaded, corpus, spec, batch_size=batch_size, progress=progress) \
        if spec.needs_calibration else None
    t1 = time.perf_counter()
    ranking = rank(loaded, spec, calib, batch_size=batch_size, checkpoint_dir=checkpoint_dir,
                   progress=progress)
    t2 = time.perf_counter()
    masks = ranking.masks(spec.sparsity, spec.pattern)
    masks.meta.update(spec=asdict(spec))
    t3 = time.perf_counter()
    return PruneResult(spec, ranking, masks, calib,
                       {"calibrate": t1 - t0, "rank": t2 - t1, "masks": t3 - t2})


# --------------------------------------------------------------------------- sweep

METRICS = ("chrf", "bleu", "target_language_rate", "perplexity", "n")  # a row's, in order


def paired_vs_dense(dense_outputs: list[dict], outputs: list[dict], lang: str) -> dict:
    """:func:`~mlprune.evaluate.paired_translation_test` of ``outputs`` (system b) against
    ``dense_outputs`` (system a), both ``evaluate_translation``'s ``outputs`` of the same
    sentences; BLEU tokenized for the target language ``lang``."""
    references = [o["reference"] for o in dense_outputs]
    if references != [o["reference"] for o in outputs]:
        raise MlpruneError("The dense and pruned outputs are not of the same sentences; "
                           "they cannot be compared pair by pair.")
    hyps_a, hyps_b = [o["output"] for o in dense_outputs], [o["output"] for o in outputs]
    return paired_translation_test(references, hyps_a, hyps_b,
                                   metrics=tuple(SIGNIFICANCE_COLUMNS), lang=lang)


class _SweepRun:
    """A sweep's measuring, cell by cell, and what its cells share: each pair's dense row
    (the same for every method) and the dense outputs its p-values compare to."""

    def __init__(self, loaded: LoadedModel, corpus: ParallelCorpus, key: dict, *,
                 limit: int | None, batch_size: int, extra_eval: Callable | None,
                 should_stop: Callable[[], bool] | None):
        self.loaded, self.corpus, self.key = loaded, corpus, key
        self.limit, self.batch_size = limit, batch_size
        self.extra_eval, self.should_stop = extra_eval, should_stop
        self.dense: dict[str, tuple[dict, dict]] = {}  # pair -> dense metrics and extra columns
        self.dense_outputs: dict[str, list[dict]] = {}  # pair -> the dense outputs

    def evaluate(self, pair: str, spec: PruneSpec) -> dict:
        """Translation metrics of the held-out slice, on the weights the model has now."""
        return evaluate_translation(self.loaded.model, self.loaded.tokenizer, self.corpus,
                                    *parse_pair(pair), shots=spec.shots, limit=self.limit,
                                    batch_size=self.batch_size)

    def cell(self, pair: str, method: str, spec: PruneSpec,
             sparsities: list[float]) -> Iterator[dict]:
        """The rows of one (pair, method) at these sparsities, each yielded once measured
        (with the model dense again); calibrated and ranked once, when first pruning."""
        ranking = None
        for s in sparsities:
            if self.should_stop is not None and self.should_stop():
                raise Cancelled("Sweep cancelled; finished rows are kept.")
            if s == 0 and pair in self.dense:
                (metrics, extra), masks = self.dense[pair], None
            else:
                if s > 0 and ranking is None:  # calibrate and rank only when pruning
                    calib = calibrate(self.loaded, self.corpus, spec, batch_size=self.batch_size,
                                      should_stop=self.should_stop) \
                        if spec.needs_calibration else None
                    ranking = rank(self.loaded, spec, calib)
                masks = ranking.masks(s) if s > 0 else None
                with pruned(self.loaded.model, masks):
                    metrics = self.evaluate(pair, spec)
                    extra = self.extra_eval(self.loaded, method, s) if self.extra_eval else {}
                if s == 0:
                    self.dense[pair] = metrics, extra
                    self.dense_outputs[pair] = metrics["outputs"]
            p_values = self.p_values(pair, spec, s, metrics)
            yield {"pair": pair, "method": method, "sparsity": float(s),
                   "pattern": SweepSpec.PATTERN, **{k: metrics[k] for k in METRICS},
                   "sparsity_reached": masks.overall_sparsity() if masks else 0.0, **p_values,
                   **self.key, **extra}

    def p_values(self, pair: str, spec: PruneSpec, sparsity: float, metrics: dict) -> dict:
        """:data:`SIGNIFICANCE_COLUMNS` of a row against its pair's dense outputs (empty on a
        dense row); generated once more when this run has none in memory."""
        if not sparsity > 0:
            return dict.fromkeys(SIGNIFICANCE_COLUMNS.values())
        if pair not in self.dense_outputs:
            with pruned(self.loaded.model, None):
                self.dense_outputs[pair] = self.evaluate(pair, spec)["outputs"]
        test = paired_vs_dense(self.dense_outputs[pair], metrics["outputs"], parse_pair(pair)[1])
        return {col: test[m]["p_value"] for m, col in SIGNIFICANCE_COLUMNS.items()}


def _rows_so_far(store: str | Path | ResultStore | None, out_csv: str | Path | None,
                 settings: dict, key: dict) -> tuple[ResultStore | None, list[dict]]:
    """The opened store (None without one) and the rows already measured: the store's, whose
    settings must be these, else the CSV's, each of which must be of this model and corpus."""
    if store is not None:
        store = ResultStore.open(store)
        store.claim(settings)
        return store, store.rows()
    if out_csv:  # the writing path: refuse a CSV not a sweep's, drop a row torn by a crash
        resume_csv(out_csv)
    done = read_sweep_rows(out_csv) if out_csv else []
    for r in done:  # a CSV keeps no settings: each row says what it was measured on
        check_same_source(out_csv, key, r)
    return None, done


def sweep(loaded: LoadedModel, corpus: ParallelCorpus, *, methods: list[str], sparsities: list[float],
          pairs: list[str], base: PruneSpec | None = None,
          limit: int | None = 16, out_csv: str | Path | None = None, batch_size: int = 8,
          progress: Progress = no_progress, should_stop: Callable[[], bool] | None = None,
          extra_eval: Callable[[LoadedModel, str, float], dict] | None = None,
          store: str | Path | ResultStore | None = None) -> list[dict]:
    """Evaluate every method x sparsity x pair (unstructured, one-shot; one ranking per
    method and pair: each (pair, method) is a cell a runner can run on its own).

    Each row is written as soon as it is measured, and rows already there are not measured
    again, so an interrupted sweep resumes where it stopped: to ``store`` (a
    :class:`~mlprune.store.ResultStore` or its path: one transaction per row, safe for
    concurrent workers; ``out_csv`` is then an export written at the end), else appended to
    ``out_csv``. A store records the settings its rows were measured with (model, limit,
    spec, extra columns) and refuses rows of other settings. Every pruned row
    carries the p-values of its chrF and BLEU difference from the dense model on the same
    sentences (:data:`SIGNIFICANCE_COLUMNS`, :func:`paired_vs_dense`). The dense outputs come
    from this run's dense row of the pair; when the sweep has none in memory (resumed past it,
    or 0 is not among the sparsities) they are generated once more: greedy decoding of the
    same prompts gives the same outputs.
    """
    grid = SweepSpec(methods, sparsities, pairs, base or PruneSpec()).validate()
    settings = sweep_settings(loaded, grid.base, limit, extra_eval, corpus=corpus)
    key = {k: settings[k] for k in KEY_COLUMNS}
    store, done = _rows_so_far(store, out_csv, settings, key)
    seen = {(r["pair"], r["method"], float(r["sparsity"]), r["pattern"]) for r in done}
    rows, count = list(done), len(seen)
    run = _SweepRun(loaded, corpus, key, limit=limit, batch_size=batch_size,
                    extra_eval=extra_eval, should_stop=should_stop)
    for pair in grid.pairs:
        for method in grid.methods:
            todo = [s for s in grid.sparsities
                    if (pair, method, float(s), SweepSpec.PATTERN) not in seen]
            if not todo:
                continue
            for row in run.cell(pair, method, grid.cell(pair, method), todo):
                rows.append(row)
                if store is not None:
                    store.add(row)
                elif out_csv:
                    append_row(out_csv, row)
                count += 1
                progress(f"{pair} {method} {row['sparsity']:.2f}", count / grid.size)
    if store is not None and out_csv:
        store.export_csv(out_csv)
    return rows


def sweep_settings(loaded: LoadedModel, base: PruneSpec, limit: int | None,
                   extra_eval: Callable | None = None, *, corpus: ParallelCorpus) -> dict:
    """What a sweep row's numbers depend on besides its cell: the model (its name and
    fingerprint), the corpus (its hash), the held-out limit, the base spec's fields a cell
    does not set, and the extra columns with their tasks' hash (:func:`sweep_key`)."""
    per_cell = SweepSpec.cell_fields()
    settings = {"model": loaded.name, "dequantized_from": loaded.dequantized_from,
                "limit": limit, "spec": {k: v for k, v in asdict(base).items() if k not in per_cell},
                "extra": list(getattr(extra_eval, "columns", [])),
                **sweep_key(loaded, corpus, extra_eval)}
    dtype = loaded.facts()["dtype"]
    if dtype != "float32":  # a bf16 sweep never resumes (or is mixed into) an fp32 one
        settings["dtype"] = dtype
    return settings
