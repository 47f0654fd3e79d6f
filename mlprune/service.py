"""The dashboard's work without Streamlit: the shared model cache, load jobs, cached
statistics, rankings and dense outputs, and a session's pruning.

Nothing here imports Streamlit, so all of it runs in tests, benchmarks or another front end.
Its neighbours hold the rest of the dashboard's work: :mod:`mlprune.holding` (the model's lock
and who holds it), :mod:`mlprune.sweeps` (sweeps and reproduce runs in worker processes,
results stores and files) and :mod:`mlprune.labels` (the words and HTML the pages show).

The cache is an object, not a module global. :class:`Shared` holds the loaded models and the
caches of everything no pruning changes (activation statistics, rankings, dense generations
and scores), and the operations that fill those caches are its methods: ``shared.stats(...)``,
``shared.ranking(...)``, ``shared.dense_generations(...)``. Whoever owns the process decides
how many there are: the dashboard keeps one per process (``ui.shared()``, an
``st.cache_resource``); a test makes its own ``Shared()`` and throws it away. No function here
reaches for a hidden singleton, so nothing needs patching to run it without Streamlit. The
tables themselves are private: callers ask the methods, never the LRU maps.

What is shared and what is not:

- Everything in a :class:`Shared` is read-only once made and the same for every session.
- Long work (a sweep, a reproduce run) does not touch the shared model at all: it runs in a
  worker process with its own copy (:func:`mlprune.sweeps.start_sweep`,
  :func:`mlprune.sweeps.start_reproduce`), so the model's lock is only ever held for short
  generations and every page stays live.
- A session's masks live in that session's :class:`SessionPruning` only. They touch the
  shared model's weights only inside ``prune.pruned(model, masks)``
  (:func:`mlprune.holding.masked`), which holds the model's lock and restores the dense
  weights before releasing it. Every other use of the model (dense generation, capture,
  ranking, sweeps) also holds that lock (:func:`mlprune.holding.dense`), so no session ever
  computes on weights another session has masked.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace

import pandas as pd

from mlprune import MlpruneError, Progress, no_progress, pipeline
from mlprune.capture import ActivationStats, token_magnitudes
from mlprune.corpus import ParallelCorpus, builtin_corpus, read_corpus
from mlprune.evaluate import Generation, evaluate_translation, generate, stream_generate
from mlprune.experiments import (
    BuiltInterventions,
    Cells,
    InterventionSpec,
    build_interventions,
    run_intervention_experiment,
)
from mlprune.features import detect
from mlprune.holding import (
    MAX_CALIBRATION_PROMPTS,
    MAX_CAPTURE_PROMPTS,
    MAX_GENERATION_PROMPTS,
    MAX_NEW_TOKENS,
    MAX_SCORED_SENTENCES,
    check_request,
    dense,
    masked,
)
from mlprune.interventions import intervened
from mlprune.labels import prompt_set_label
from mlprune.models import DEFAULT_MODEL, LoadedModel, load_model
from mlprune.pipeline import PruneSpec
from mlprune.prompts import PromptSet, parse_pair
from mlprune.protocol import get_protocol
from mlprune.prune import MaskSet, Ranking

MODEL_ENV = "MLPRUNE_MODEL"  # default model spec (tests point it at a tiny folder)
CORPUS_ENV = "MLPRUNE_CORPUS"  # default corpus file instead of the built-in one
PREVIEW_TOKENS = 32  # the Prune preview's and Compare's default cap: one shared cache entry
HELD_OUT_TOKENS = 48  # Compare's chrF slice: room for one translated sentence
CAPTURE_BATCH = 4  # small batches: a smoother progress bar, about the same speed on CPU


# --------------------------------------------------------------------------- keys


def model_key(loaded: LoadedModel) -> str:
    """Identifies one loaded model object (a reload is a new key, so caches never go stale)."""
    return f"{loaded.name}@{id(loaded.model):x}"


def corpus_key(corpus: ParallelCorpus) -> str:
    """Name and content hash of a corpus (computed once per corpus object)."""
    key = corpus.__dict__.get("_mlprune_key")
    if key is None:
        digest = hashlib.sha256(corpus.table.to_csv(index=False).encode()).hexdigest()[:16]
        key = corpus.__dict__["_mlprune_key"] = f"{corpus.name}:{digest}"
    return key


def ranking_key(loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec) -> tuple:
    """What a ranking depends on: the model, the corpus and the spec except sparsity/pattern."""
    rest = asdict(replace(spec, sparsity=0.0, pattern="unstructured"))
    return (model_key(loaded), corpus_key(corpus), tuple(sorted(rest.items())))


# --------------------------------------------------------------------------- what caches hold


@dataclass
class CalibratedRanking:
    """A ranking with the calibration and the spec it was made from; masks at any sparsity
    come from it in milliseconds."""

    ranking: Ranking
    calibration: pipeline.Calibration | None
    spec: PruneSpec
    seconds: float

    def masks(self, sparsity: float, pattern: str) -> MaskSet:
        """Masks at this sparsity and pattern, their meta carrying the full spec."""
        masks = self.ranking.masks(sparsity, pattern)
        masks.meta["spec"] = asdict(replace(self.spec, sparsity=float(sparsity), pattern=pattern))
        return masks

    @property
    def approximate_at(self) -> str | None:
        """Sequential statistics are exact only at the sparsity they were taken with."""
        if self.spec.mode != "sequential" or not self.spec.uses_activations:
            return None
        return f"{self.spec.sparsity:.0%} {self.spec.pattern}"


@dataclass
class FeatureCapture:
    """What the Features page leaves for the other pages: the prompt sets it captured, their
    statistics, the protocol they were built under, and the detection rule the user settled
    on with the dimensions it found."""

    model: str  # model_key of the model the statistics came from
    prompts: dict[str, PromptSet]
    stats: dict[str, ActivationStats]
    seconds: float
    rule: str | None = None
    detected: pd.DataFrame | None = None
    protocol: str = "clean"  # the prompts' separator and the figures' layer numbering

    @property
    def pairs(self) -> list[str]:
        """The translation directions captured, in capture order ('fr-en', ...)."""
        return [name[3:] for name in self.stats if name.startswith("mt:")]

    @property
    def numbering(self) -> str:
        """How the protocol numbers layers ("sites" or the paper's "hidden_states")."""
        return get_protocol(self.protocol).numbering

    def detect(self, name: str, rule: str) -> pd.DataFrame:
        """The dimensions ``rule`` detects in set ``name`` (layers in the protocol's
        numbering), remembered as the session's choice (the Prune page protects them by
        default)."""
        table = detect(self.stats[name], rule, self.numbering)
        self.rule, self.detected = rule, table
        return table


def detected_union(captured: FeatureCapture | None) -> list[int]:
    """Every dim the Features page's rule detected at any layer (sorted), or none."""
    if captured is None or captured.detected is None or not len(captured.detected):
        return []
    return sorted({int(d) for d in captured.detected["dim"]})


# --------------------------------------------------------------------------- process-wide


class LoadJob:
    """A model load in a background thread, so a page rerun never interrupts it half-way
    (the first conversion of the embedded model takes ~2 min on 2 cores)."""

    def __init__(self, spec: str, loader: Callable[..., LoadedModel] = load_model):
        self.spec = spec
        self.fraction, self.message = 0.0, "Starting"
        self.result: LoadedModel | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(loader,), daemon=True,
                                        name=f"mlprune-load-{spec}")
        self._thread.start()

    def _progress(self, stage: str, fraction: float) -> None:
        self.fraction, self.message = max(0.0, min(1.0, float(fraction))), stage

    def _run(self, loader) -> None:
        try:
            self.result = loader(self.spec, progress=self._progress)
        except BaseException as e:  # handed to the page, which shows it as a message
            self.error = e
        finally:
            self.seconds = time.perf_counter() - self.started
            self.done.set()


class _Lru(OrderedDict):
    """A small least-recently-used map (callers hold Shared's lock)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_fresh(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class Shared:
    """What every session of a process shares: models, and caches of what no pruning changes."""

    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, LoadJob] = OrderedDict()
        self._tables = {
            "stats": _Lru(64),  # (model, prompts) -> ActivationStats, ~1 MB each
            "rankings": _Lru(3),  # (model, corpus, spec minus sparsity) -> CalibratedRanking
            "dense": _Lru(512),  # (model, prompt, max_new_tokens) -> Generation
            "scores": _Lru(32),  # (model, corpus, pair, shots, limit) -> dense metrics
            "tokens": _Lru(8),  # (model, text) -> (tokens, |h|)
            "interventions": _Lru(8),  # (model, corpus, InterventionSpec) -> BuiltInterventions
            "intervened": _Lru(256),  # (model, corpus, spec, prompt, max_new_tokens) -> Generation
        }
        # measured cells of intervention experiments (dense ones are shared by every spec)
        self.intervention_cells = Cells()

    def _cached(self, table: str, key):
        with self._lock:
            return self._tables[table].get_fresh(key)

    def _store(self, table: str, key, value) -> None:
        with self._lock:
            self._tables[table].put(key, value)

    def clear(self) -> None:
        """Forget every cache and model (tests; a user never needs it)."""
        with self._lock:
            self._jobs.clear()
            for table in self._tables.values():
                table.clear()
            self.intervention_cells = Cells()

    # ---- models

    def load_job(self, spec: str) -> LoadJob:
        """The load of this spec: finished, running, or started now. One per spec."""
        with self._lock:
            job = self._jobs.get(spec)
            if job is not None and job.done.is_set() and job.error is not None:
                job = None  # a failed load is tried again when asked again
            if job is None:
                job = self._jobs[spec] = LoadJob(spec)
            self._jobs.move_to_end(spec)
            loaded_specs = [s for s, j in self._jobs.items() if j.done.is_set() and j.result]
            for old in loaded_specs[: max(0, len(loaded_specs) - self.max_models)]:
                # Sessions still holding the old model keep it alive until they move on.
                del self._jobs[old]
            return job

    def model(self, spec: str) -> LoadedModel | None:
        """The loaded model of this spec, if it is loaded (never starts a load)."""
        job = self._jobs.get(spec)
        return job.result if job is not None and job.done.is_set() else None

    def load_seconds(self, spec: str) -> float | None:
        """How long the load of this spec took (None when it was never asked for)."""
        job = self._jobs.get(spec)
        return job.seconds if job is not None else None

    # ---- statistics

    def stats(self, loaded: LoadedModel, prompts: PromptSet,
              progress: Progress = no_progress,
              should_stop: Callable[[], bool] | None = None) -> ActivationStats:
        """Activation statistics of a prompt set, cached per (model, prompts) in memory and
        on disk."""
        key = (model_key(loaded), prompts.name, hashlib.sha256(prompts.key.encode()).hexdigest())
        stats = self._cached("stats", key)
        if stats is None:
            with dense(loaded, f"capturing the statistics of {prompts.name}", progress):
                stats = pipeline.cached_capture(loaded, prompts, batch_size=CAPTURE_BATCH,
                                                progress=progress, should_stop=should_stop)
            self._store("stats", key, stats)
        return stats

    def capture(self, loaded: LoadedModel, sets: list[PromptSet],
                progress: Progress = no_progress, protocol: str = "clean") -> FeatureCapture:
        """The statistics of every prompt set (each cached), as the Features page's result;
        ``protocol`` is the one the sets were built under (it numbers the figures' layers)."""
        get_protocol(protocol)
        check_request("prompts to capture", sum(len(ps) for ps in sets), MAX_CAPTURE_PROMPTS)
        start, stats = time.perf_counter(), {}
        for i, ps in enumerate(sets):
            def step(stage: str, fraction: float, i=i, ps=ps) -> None:
                progress(f"{prompt_set_label(ps.name)}, {stage}", (i + fraction) / len(sets))
            stats[ps.name] = self.stats(loaded, ps, progress=step)
        return FeatureCapture(model_key(loaded), {ps.name: ps for ps in sets}, stats,
                              time.perf_counter() - start, protocol=protocol)

    def tokens(self, loaded: LoadedModel, text: str) -> tuple:
        """``capture.token_magnitudes`` of one text, cached per (model, text)."""
        key = (model_key(loaded), text)
        out = self._cached("tokens", key)
        if out is None:
            with dense(loaded, "reading one prompt's token magnitudes"):
                out = token_magnitudes(loaded.model, loaded.tokenizer, text)
            self._store("tokens", key, out)
        return out

    # ---- rankings

    def ranking(self, loaded: LoadedModel, corpus: ParallelCorpus,
                spec: PruneSpec) -> CalibratedRanking | None:
        """The ranking of this spec if some session already made it."""
        return self._cached("rankings", ranking_key(loaded, corpus, spec))

    def make_ranking(self, loaded: LoadedModel, corpus: ParallelCorpus, spec: PruneSpec,
                     progress: Progress = no_progress) -> CalibratedRanking:
        """Calibrate (one pass over the calibration prompts, or a cached one) and rank, once."""
        spec.validate()
        check_request("calibration prompts", spec.samples, MAX_CALIBRATION_PROMPTS)
        start = time.perf_counter()
        doing = f"{'calibrating' if spec.needs_calibration else 'ranking'} {spec.label}"
        with dense(loaded, doing, progress):  # scores read the weights: the dense ones
            calib = (pipeline.calibrate(loaded, corpus, spec, batch_size=CAPTURE_BATCH,
                                        progress=progress)
                     if spec.needs_calibration else None)
            ranking = pipeline.rank(loaded, spec, calib, batch_size=CAPTURE_BATCH,
                                    progress=progress)
        made = CalibratedRanking(ranking, calib, spec, time.perf_counter() - start)
        self._store("rankings", ranking_key(loaded, corpus, spec), made)
        return made

    # ---- dense outputs

    def dense_generations(self, loaded: LoadedModel, prompts: list[str],
                          max_new_tokens: int = 48,
                          progress: Progress = no_progress) -> list[Generation]:
        """Greedy dense continuations, cached for every session (they never depend on masks)."""
        _check_generation(prompts, max_new_tokens)
        keys = [(model_key(loaded), p, max_new_tokens) for p in prompts]
        found = {k: self._cached("dense", k) for k in keys}
        missing = [k[1] for k in keys if found[k] is None]
        if missing:
            with dense(loaded, "generating dense outputs", progress):
                fresh = generate(loaded.model, loaded.tokenizer, missing,
                                 max_new_tokens=max_new_tokens, progress=progress)
            for prompt, gen in zip(missing, fresh):
                key = (model_key(loaded), prompt, max_new_tokens)
                self._store("dense", key, gen)
                found[key] = gen
        return [found[k] for k in keys]

    def translation_scores(self, loaded: LoadedModel, corpus: ParallelCorpus, pair: str,
                           masks: MaskSet | None, *, shots: int, limit: int,
                           progress: Progress = no_progress) -> dict[str, dict]:
        """``evaluate.evaluate_translation`` on the held-out slice: ``{"dense": metrics}``
        (cached for every session), plus ``"pruned"`` with ``masks`` applied when given, and
        ``"significance"``: the paired test of pruned against dense on the same sentences
        (``pipeline.paired_vs_dense``: per metric, chrf and bleu, the scores, difference and
        p-value)."""
        src, tgt = parse_pair(pair)
        check_request("held-out sentences", limit, MAX_SCORED_SENTENCES)
        settings = dict(shots=shots, limit=limit, max_new_tokens=HELD_OUT_TOKENS)
        key = (model_key(loaded), corpus_key(corpus), pair, shots, limit)
        scores = {"dense": self._cached("scores", key)}
        if scores["dense"] is None:
            with dense(loaded, f"scoring {pair} on {limit} sentences", progress) as model:
                scores["dense"] = evaluate_translation(
                    model, loaded.tokenizer, corpus, src, tgt, **settings,
                    progress=lambda s, f: progress(f"dense ({s})", f))
            self._store("scores", key, scores["dense"])
        if masks is not None:
            with masked(loaded, masks, f"scoring {pair} pruned on {limit} sentences",
                        progress) as model:
                scores["pruned"] = evaluate_translation(
                    model, loaded.tokenizer, corpus, src, tgt, **settings,
                    progress=lambda s, f: progress(f"pruned ({s})", f))
            scores["significance"] = pipeline.paired_vs_dense(
                scores["dense"]["outputs"], scores["pruned"]["outputs"], tgt)
        return scores

    # ---- interventions

    def intervention(self, loaded: LoadedModel, corpus: ParallelCorpus, spec: InterventionSpec,
                     progress: Progress = no_progress) -> BuiltInterventions:
        """The spec's intervention and control (means and vectors computed once), under the
        model's lock: they read the dense model."""
        key = (model_key(loaded), corpus_key(corpus), _what_builds(spec.validate()))
        check_request("calibration prompts", spec.samples, MAX_CALIBRATION_PROMPTS)
        built = self._cached("interventions", key)
        if built is None:
            with dense(loaded, "building an intervention", progress):
                built = build_interventions(loaded, corpus, spec, batch_size=CAPTURE_BATCH,
                                            progress=progress)
            self._store("interventions", key, built)
        return built

    def intervened_generations(self, loaded: LoadedModel, corpus: ParallelCorpus,
                               spec: InterventionSpec, prompts: list[str], max_new_tokens: int = 48,
                               progress: Progress = no_progress) -> list[Generation]:
        """Greedy continuations with the spec's intervention on the dense model (hooks added
        and removed under the model's lock, so no session's masks are ever under them)."""
        _check_generation(prompts, max_new_tokens)
        what = _what_builds(spec)
        keys = [(model_key(loaded), corpus_key(corpus), what, p, max_new_tokens) for p in prompts]
        found = {k: self._cached("intervened", k) for k in keys}
        missing = [k[3] for k in keys if found[k] is None]
        if missing:
            built = self.intervention(loaded, corpus, spec, progress=progress)
            with dense(loaded, "generating with an intervention", progress) as model, \
                    intervened(model, built.intervention):
                fresh = generate(model, loaded.tokenizer, missing, max_new_tokens=max_new_tokens,
                                 batch_size=CAPTURE_BATCH, progress=progress)
            for prompt, gen in zip(missing, fresh):
                key = (model_key(loaded), corpus_key(corpus), what, prompt, max_new_tokens)
                self._store("intervened", key, gen)
                found[key] = gen
        return [found[k] for k in keys]

    def intervention_scores(self, loaded: LoadedModel, corpus: ParallelCorpus,
                            spec: InterventionSpec, progress: Progress = no_progress) -> dict:
        """``experiments.run_intervention_experiment`` on the dense model, under its lock:
        dense, intervened and control on the held-out slice (and the spec's tasks)."""
        check_request("held-out sentences", spec.limit, MAX_SCORED_SENTENCES)
        check_request("new tokens", spec.max_new_tokens, MAX_NEW_TOKENS)
        built = self.intervention(loaded, corpus, spec, progress=progress)
        with dense(loaded, "running an intervention experiment", progress):
            return run_intervention_experiment(loaded, corpus, spec, batch_size=CAPTURE_BATCH,
                                               cells=self.intervention_cells, built=built,
                                               progress=progress)


def pruned_generations(loaded: LoadedModel, masks: MaskSet, prompts: list[str],
                       max_new_tokens: int = 48,
                       progress: Progress = no_progress) -> list[Generation]:
    """Greedy continuations with a session's masks applied only while generating."""
    _check_generation(prompts, max_new_tokens)
    with masked(loaded, masks, "generating pruned outputs", progress):
        return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        progress=progress)


def _check_generation(prompts: list[str], max_new_tokens: int) -> None:
    check_request("prompts", len(prompts), MAX_GENERATION_PROMPTS)
    check_request("new tokens", max_new_tokens, MAX_NEW_TOKENS)


# --------------------------------------------------------------------------- one session


@dataclass
class SessionPruning:
    """A session's current pruning: its spec and masks, the ranking they were cut from, a
    version that changes with them, and the pruned outputs generated with these masks."""

    model: str  # model_key of the model the masks belong to
    spec: PruneSpec
    masks: MaskSet
    version: int
    ranking: CalibratedRanking
    outputs: dict[tuple[str, int], Generation] = field(default_factory=dict, repr=False)

    def generated(self, prompt: str, max_new_tokens: int = 48) -> Generation | None:
        """The pruned continuation of ``prompt`` if these masks made it already."""
        return self.outputs.get((prompt, max_new_tokens))

    def stream(self, loaded: LoadedModel, prompt: str,
               max_new_tokens: int = 48) -> Generator[str, None, Generation]:
        """The pruned continuation of one prompt as text pieces, each as soon as its token is
        made (``evaluate.stream_generate``): the masks are applied, under the model's lock,
        only while it generates. Returns the Generation and keeps it (:meth:`generated`,
        :meth:`generations`) once complete. Close it to stop early (a page rerun): the
        model is dense and unlocked again when ``close()`` returns."""
        done = self.generated(prompt, max_new_tokens)
        if done is None:
            _check_generation([prompt], max_new_tokens)
            done = yield from stream_generate(loaded.model, loaded.tokenizer, prompt,
                                              max_new_tokens=max_new_tokens,
                                              hold=lambda: masked(loaded, self.masks,
                                                                  "generating a pruned output"))
            self.outputs[(prompt, max_new_tokens)] = done
        else:
            yield from done.tokens
        return done

    def generations(self, loaded: LoadedModel, prompts: list[str],
                    max_new_tokens: int = 48) -> tuple[list[Generation], float]:
        """Pruned generations, made once per prompt for these masks; and the seconds spent."""
        todo = [p for p in prompts if (p, max_new_tokens) not in self.outputs]
        start = time.perf_counter()
        if todo:
            made = pruned_generations(loaded, self.masks, todo, max_new_tokens)
            self.outputs.update({(p, max_new_tokens): g for p, g in zip(todo, made)})
        return [self.outputs[(p, max_new_tokens)] for p in prompts], time.perf_counter() - start


def next_pruning(previous: SessionPruning | None, loaded: LoadedModel,
                 ranking: CalibratedRanking, spec: PruneSpec, masks: MaskSet) -> SessionPruning:
    """The session's pruning after this page run: the previous one (outputs and all) when
    nothing changed, else a new version."""
    if previous is not None and previous.model == model_key(loaded) and previous.spec == spec \
            and previous.ranking is ranking:
        return previous
    version = previous.version + 1 if previous is not None else 1
    return SessionPruning(model_key(loaded), spec, masks, version, ranking)


# --------------------------------------------------------------------------- interventions


def _what_builds(spec: InterventionSpec) -> InterventionSpec:
    """The spec without what only measuring reads (held-out size, tasks): the key of its
    intervention and of the generations made with it."""
    return replace(spec, limit=1, tasks=(), task_limit=None, max_new_tokens=1,
                   compare_prune=None, resamples=0)


def intervention_spec(kind: str, *, pair: str, dims: list[int], layers: tuple[int, int] | None,
                      factor: float | None, lrp2_layers: tuple[int, int | None] | None,
                      shots: int, samples: int, limit: int, control: bool,
                      task: str | None, task_limit: int, detect: str | None) -> InterventionSpec:
    """The Compare page's widgets as an :class:`~mlprune.experiments.InterventionSpec`
    (one clear sentence when they do not make one)."""
    if kind == "lrp2":
        if lrp2_layers is None:
            raise MlpruneError("Choose the layer where LRP2 projects to English.")
        first, second = lrp2_layers
        where, chosen = (f"{first}" if second is None else f"{first},{second}"), None
    else:
        if not dims:
            raise MlpruneError("Pick at least one dimension to act on (the Features page's "
                               "detected set fills the list).")
        lo, hi = layers if layers is not None else (None, None)
        where, chosen = (None if lo is None else f"{lo}-{hi}"), tuple(sorted(set(dims)))
    return InterventionSpec(pair=pair, kind=kind, factor=factor if kind == "scale" else None,
                            layers=where, dims=chosen, detect=detect or "top-k:4",
                            control=control, limit=limit, shots=shots, samples=samples,
                            tasks=(task,) if task else (), task_limit=task_limit,
                            max_new_tokens=HELD_OUT_TOKENS).validate()


# --------------------------------------------------------------------------- defaults


def default_model_spec() -> str:
    """MLPRUNE_MODEL when set, else the embedded default."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def default_corpus() -> ParallelCorpus:
    """MLPRUNE_CORPUS when set, else the built-in corpus."""
    path = os.environ.get(CORPUS_ENV)
    if path:
        return read_corpus(path)
    try:
        return builtin_corpus()
    except (FileNotFoundError, OSError) as e:  # a broken install, not bad input
        raise MlpruneError("The built-in corpus is missing from this install; upload a corpus "
                           "on the Home page instead.") from e
