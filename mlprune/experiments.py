"""Intervention experiments: the direct test of "these dimensions matter for translation".

One :class:`InterventionSpec` -> the dense model, the intervened one (zero, mean, scale the
chosen residual dims, or LRP2's language vectors), a control (the same intervention on as
many random ordinary dims; for LRP2 a random vector of the same norm) and, on request,
wanda-mt pruning, each measured on the held-out translation slice (chrF, BLEU, with
sacrebleu's paired test) and on zero-shot tasks (accuracy per language with a paired
bootstrap and the smallest difference detectable at that size). The CLI (``mlprune
intervene``), the dashboard's Compare page and ``bench/interventions.py`` all call
:func:`run_intervention_experiment` or its parts.

It lives here, beside reproduce and export, and not in :mod:`mlprune.interventions`,
because it needs calibration statistics, pruning and the paired tests of
:mod:`mlprune.pipeline` and :mod:`mlprune.zeroshot`, which sit above the hooks in the import
order; the hooks stay a small module beside capture.

Every measured cell (one run on translation, or on one task) can be kept in a
:class:`Cells` store under a key naming exactly what was measured, so a long run resumes
where it stopped and runs that share a cell (the dense model) measure it once. The report
is rendered by :mod:`mlprune.reports.interventions` (``markdown`` and ``write_report`` are
re-exported here).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mlprune import MlpruneError, Progress, no_progress
from mlprune import zeroshot as zs
from mlprune.corpus import ParallelCorpus
from mlprune.evaluate import evaluate_translation
from mlprune.features import Rule, detected_dims
from mlprune.interventions import (
    LRP2_SAMPLES,
    Intervention,
    intervened,
    lrp2_intervention,
    lrp2_sentences,
    make_intervention,
    parse_layers,
    random_control,
    random_like,
    residual_means,
    sentence_means,
)
from mlprune.models import LoadedModel, hidden_size
from mlprune.pipeline import (
    PruneSpec,
    cached_capture,
    model_fingerprint,
    paired_vs_dense,
    prune,
)
from mlprune.prompts import parse_pair, translation_prompts
from mlprune.prune import MaskSet, check_sparsity, pruned
from mlprune.reports.interventions import markdown, write_report  # noqa: F401 (re-exported)
from mlprune.storage import atomic_write_json

KINDS = ("zero", "mean", "scale", "lrp2")
RUNS = ("dense", "intervened", "control", "pruned")
# b against a: each change against dense, and the intervention against its control and
# against pruning (LRP2 vs wanda-mt, the paper's comparison)
COMPARISONS = (("dense", "intervened"), ("dense", "control"), ("control", "intervened"),
               ("dense", "pruned"), ("pruned", "intervened"))
REFERENCE = "en"  # LRP2's pivot language


@dataclass(frozen=True)
class InterventionSpec:
    """Everything that decides an intervention experiment, as plain values."""

    pair: str = "fr-en"  # the held-out translation direction, and the calibration prompts'
    kind: str = "zero"  # zero | mean | scale | lrp2
    factor: float | None = None  # scale: below 1 weakens, above 1 amplifies
    layers: str | None = None  # "0-11", "3,9", "embed,0-3"; None: every layer (lrp2: 2 layers)
    dims: tuple[int, ...] | None = None  # the same dims at every chosen layer; None: detect
    detect: str = "top-k:4"  # the rule that picks dims per layer, and the control's exclusions
    control: bool = True  # also run the same intervention on random ordinary dims
    seed: int = 0  # the calibration prompts' and the control's draws
    limit: int = 16  # held-out sentences
    max_new_tokens: int = 64  # per translation (generation stops at the end of the line)
    shots: int = 4
    samples: int = 16  # calibration prompts for detection and means
    lrp2_samples: int = LRP2_SAMPLES  # sentences per language vector (the authors': 100)
    tasks: tuple[str, ...] = ()  # zero-shot tasks: built-in names or task files
    task_limit: int | None = 20  # items per language (None: all)
    compare_prune: float | None = None  # also prune wanda-mt at this sparsity
    resamples: int = 2000  # zero-shot paired bootstrap

    def validate(self) -> InterventionSpec:
        """Check every field that needs no model; returns the spec."""
        if self.kind not in KINDS:
            raise MlpruneError(f"Unknown intervention '{self.kind}': use {', '.join(KINDS)}.")
        if self.kind == "scale" and self.factor is None:
            raise MlpruneError("--kind scale needs --factor, e.g. 0.5 to weaken the dimensions or "
                               "2 to amplify them.")
        if self.kind != "scale" and self.factor is not None:
            raise MlpruneError(f"--factor applies to --kind scale only, not {self.kind}.")
        if self.factor is not None and not float("-inf") < self.factor < float("inf"):
            raise MlpruneError(f"The factor must be a finite number; got {self.factor}.")
        if self.kind == "lrp2" and self.dims:
            raise MlpruneError("LRP2 adds a whole language vector; --dims does not apply to it.")
        Rule.parse(self.detect)
        if self.max_new_tokens < 1:
            raise MlpruneError("A translation needs room for at least one new token.")
        if self.limit < 1:
            raise MlpruneError(f"The number of held-out sentences must be at least 1; got {self.limit}.")
        if self.task_limit is not None and self.task_limit < 1:
            raise MlpruneError(f"The number of task items per language must be at least 1; "
                               f"got {self.task_limit}.")
        if self.samples < 1 or self.lrp2_samples < 1 or self.shots < 1:
            raise MlpruneError("Shots and samples must be at least 1.")
        if self.compare_prune is not None and not 0 < check_sparsity(self.compare_prune):
            raise MlpruneError("--compare-prune needs a sparsity above 0, e.g. 0.5.")
        return self

    @property
    def language(self) -> str:
        """LRP2's language X: the pair's side that is not English."""
        src, tgt = parse_pair(self.pair)
        return tgt if src == REFERENCE else src

    def prune_spec(self) -> PruneSpec:
        """wanda-mt on the same pair and calibration settings (sequential, as Wanda)."""
        return PruneSpec(method="wanda", calibration="mt", pair=self.pair,
                         sparsity=float(self.compare_prune or 0.5), shots=self.shots,
                         samples=self.samples, seed=self.seed).validate()


# --------------------------------------------------------------------------- cells


class Cells:
    """Measured cells by key, in memory; with ``path``, one JSON file rewritten (atomically)
    after every new cell, and read back first, so a stopped run resumes.

    Not :class:`mlprune.storage.Cells` (a folder with a file per cell): an experiment's cells
    are few and keyed by hash, and one file travels whole. A file that is not such a store
    is refused rather than moved aside: it may be something else the user named by mistake.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._data: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                self._data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise MlpruneError(f"{self.path} is not a cells file of an intervention run "
                                   f"({e}); delete it to start again.") from e

    def get(self, key: str) -> dict | None:
        """The cell of ``key``, or None if it was not measured."""
        return self._data.get(key)

    def put(self, key: str, value: dict) -> None:
        """Keep the cell (and rewrite the file, when there is one)."""
        self._data[key] = value
        if self.path is not None:
            atomic_write_json(self.path, self._data)


def cell_key(*parts) -> str:
    """A short stable key of what a cell measured (JSON of its parts, hashed)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- building


@dataclass
class BuiltInterventions:
    """The intervention of a spec, its control, and what was found on the way."""

    intervention: Intervention
    control: Intervention | None
    dims: dict[str, dict[str, list[dict]]]  # "intervened"/"control" -> site -> dim, ratio
    by_language: Callable[[str, str], Intervention | None] | None = None  # LRP2: (lang, run)

    def for_run(self, run: str, lang: str | None = None) -> Intervention | None:
        """The intervention of a run ("intervened" or "control"), for items in ``lang``
        (LRP2 uses each language's own vector; English items run dense)."""
        if self.by_language is not None and lang is not None:
            return self.by_language(lang, run)
        return self.intervention if run == "intervened" else self.control


def _lrp2_sites(spec: InterventionSpec, n_layers: int) -> list[str]:
    default = f"{n_layers // 4},{(3 * n_layers) // 4}" if n_layers > 1 else "0"
    sites = parse_layers(spec.layers or default, n_layers)
    if len(sites) > 2:
        raise MlpruneError("LRP2 takes one layer (project to English there) or two (project, "
                           f"then project back), e.g. --layers 3,9; got {len(sites)}.")
    return sites


def build_interventions(loaded: LoadedModel, corpus: ParallelCorpus, spec: InterventionSpec, *,
                        batch_size: int = 8,
                        progress: Progress = no_progress) -> BuiltInterventions:
    """The spec's intervention and control on this model: dims detected (or given) per chosen
    layer, means or language vectors computed, the control's dims drawn. Fails with one
    sentence on a layer or dim the model does not have."""
    spec.validate()
    model, tok = loaded.model, loaded.tokenizer
    n_layers, hidden = len(loaded.layers), hidden_size(model)
    if spec.kind == "lrp2":
        return _build_lrp2(loaded, corpus, spec, _lrp2_sites(spec, n_layers), batch_size, progress)
    sites = parse_layers(spec.layers, n_layers)
    bad = [d for d in spec.dims or () if not 0 <= d < hidden]
    if bad:  # before any pass over data
        raise MlpruneError(f"Dimension {bad[0]} is outside this model's hidden size "
                           f"(dims 0-{hidden - 1}).")
    src, tgt = parse_pair(spec.pair)
    prompts = translation_prompts(corpus, src, tgt, shots=spec.shots, samples=spec.samples,
                                  seed=spec.seed)
    stats = cached_capture(loaded, prompts, batch_size=batch_size,
                           progress=lambda s, f: progress(f"calibration ({prompts.name}), {s}", f))
    detected = detected_dims(stats, spec.detect)
    if spec.dims is not None:
        chosen = {s: list(spec.dims) for s in sites}
    else:
        chosen = {s: detected.get(s, []) for s in sites}
        if not any(chosen.values()):
            raise MlpruneError(f"The rule {spec.detect} detects no dimension at the chosen layers; "
                               "try top-k:4 or a lower ratio, or name --dims.")
    means = None
    if spec.kind == "mean":
        means = residual_means(model, tok, prompts, batch_size=batch_size,
                               progress=lambda s, f: progress(f"residual means, {s}", f))
    label = f"{spec.kind}{f' x{spec.factor:g}' if spec.kind == 'scale' else ''}"
    iv = make_intervention(spec.kind, chosen, factor=spec.factor, means=means,
                           label=f"{label} ({'given' if spec.dims else spec.detect} dims)")
    iv.check(model)
    control = None
    controls: dict[str, list[int]] = {}
    if spec.control:
        exclude = {d for ds in detected.values() for d in ds} | {d for ds in chosen.values() for d in ds}
        controls = random_control({s: d for s, d in chosen.items() if d}, hidden, spec.seed, exclude)
        control = make_intervention(spec.kind, controls, factor=spec.factor, means=means,
                                    label=f"{label} (random ordinary dims)")
    sites_stats = stats.sites()

    def described(dims_by_site: dict[str, list[int]]) -> dict[str, list[dict]]:
        out = {}
        for site, dims in dims_by_site.items():
            norms = sites_stats[site]
            median = float(norms.median().clamp_min(1e-12))
            out[site] = [{"dim": d, "magnitude": float(norms[d]),
                          "ratio_to_median": float(norms[d]) / median} for d in dims]
        return out

    return BuiltInterventions(iv, control, {"intervened": described(iv.dims),
                                            "control": described(controls)})


def _build_lrp2(loaded: LoadedModel, corpus: ParallelCorpus, spec: InterventionSpec,
                sites: list[str], batch_size: int, progress: Progress) -> BuiltInterventions:
    means: dict[str, dict] = {}  # per language, once (English is every vector's reference)

    def mean_of(lang: str) -> dict:
        if lang not in means:
            means[lang] = sentence_means(
                loaded.model, loaded.tokenizer, lrp2_sentences(corpus, lang, spec.lrp2_samples,
                                                               spec.seed),
                batch_size=batch_size, progress=_stage(progress, f"language vector ({lang})"))
        return means[lang]

    def vectors(lang: str) -> dict:  # language_vectors(), with the English means reused
        return {s: mean_of(REFERENCE)[s] - v for s, v in mean_of(lang).items()}

    def build(lang: str, run: str) -> Intervention | None:
        if lang == REFERENCE:
            return None  # v_en - v_en: nothing to add
        iv = lrp2_intervention(vectors(lang), *sites, label=f"lrp2 {lang}")
        if run == "control":
            return Intervention("add", dict(iv.dims), vectors=random_like(iv.vectors, spec.seed),
                                label=f"lrp2 {lang} (random vector, same norm)")
        return iv

    iv = build(spec.language, "intervened")
    iv.check(loaded.model)
    control = build(spec.language, "control") if spec.control else None

    def by_language(lang: str, run: str) -> Intervention | None:
        if run == "control" and not spec.control:
            return None
        return build(lang, run)

    return BuiltInterventions(iv, control, {}, by_language)


# --------------------------------------------------------------------------- measuring


@contextmanager
def _under(loaded: LoadedModel, masks: MaskSet | None, iv: Intervention | None) -> Iterator:
    """The model pruned by ``masks`` or intervened by ``iv`` (never both), under its lock."""
    with pruned(loaded.model, masks), intervened(loaded.model, iv):
        yield loaded.model


def translation_cell(loaded: LoadedModel, corpus: ParallelCorpus, pair: str, *, shots: int,
                     limit: int, masks: MaskSet | None = None, iv: Intervention | None = None,
                     max_new_tokens: int = 64, batch_size: int = 8,
                     progress: Progress = no_progress) -> dict:
    """``evaluate_translation`` on the held-out slice under masks or an intervention."""
    with _under(loaded, masks, iv) as model:
        return evaluate_translation(model, loaded.tokenizer, corpus, *parse_pair(pair),
                                    shots=shots, limit=limit, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=progress)


def task_cell(loaded: LoadedModel, task: zs.Task, *, masks: MaskSet | None = None,
              iv_for: Callable[[str], Intervention | None] | None = None, batch_size: int = 8,
              progress: Progress = no_progress) -> zs.TaskResult:
    """Zero-shot scores of a task under masks or ``iv_for(lang)``, each language's items
    under its own intervention (in task order)."""
    langs = task.languages
    scored: dict[tuple[str, str], zs.ItemScores] = {}
    for i, lang in enumerate(langs):
        part = task.subset(None, [lang])
        with _under(loaded, masks, iv_for(lang) if iv_for else None) as model:
            result = zs.evaluate_task(model, loaded.tokenizer, part, batch_size=batch_size,
                                      progress=lambda s, f, i=i: progress(s, (i + f) / len(langs)))
        scored.update({(s.item.id, s.item.lang): s for s in result.scored})
    return zs.TaskResult(task.name, [scored[(it.id, it.lang)] for it in task.items])


def _stage(progress: Progress, prefix: str) -> Progress:
    return lambda stage, f: progress(f"{prefix}, {stage}", f)


class _Measuring:
    """One experiment's cells: each looked up by a key naming what it depends on, measured
    when missing; wanda-mt's masks made on first need (a resumed run may have every pruned
    cell already)."""

    def __init__(self, loaded: LoadedModel, corpus: ParallelCorpus, spec: InterventionSpec,
                 built: BuiltInterventions, cells: Cells, batch_size: int, progress: Progress):
        self.loaded, self.corpus, self.spec, self.built = loaded, corpus, spec, built
        self.cells, self.batch_size, self.progress = cells, batch_size, progress
        # what every cell depends on: the model's weights and the corpus's sentences
        self.model_id = [model_fingerprint(loaded), corpus.name,
                         hashlib.sha256(corpus.table.to_csv(index=False).encode()).hexdigest()[:16]]
        self.prune_key = cell_key("pruned", self.model_id, asdict(spec.prune_spec()))
        self._masks: list[MaskSet] = []

    def masks(self) -> MaskSet:
        """wanda-mt's masks, pruned (and their sparsity kept as a cell) on first call."""
        if not self._masks:
            self._masks.append(prune(self.loaded, self.corpus, self.spec.prune_spec(),
                                     batch_size=self.batch_size,
                                     progress=_stage(self.progress, "pruning wanda-mt")).masks)
            self.cells.put(self.prune_key, {"sparsity_reached": self._masks[0].overall_sparsity()})
        return self._masks[0]

    def depends(self, run: str) -> dict:
        """What a run's cells depend on, beyond the model."""
        if run == "dense":
            return {}
        if run == "pruned":
            return asdict(self.spec.prune_spec())
        return {**asdict(replace(self.spec, tasks=(), task_limit=None, limit=0, max_new_tokens=0,
                                 compare_prune=None, control=True, resamples=0)), "run": run}

    def translation(self, run: str) -> dict:
        """The run's held-out translation cell."""
        spec = self.spec
        key = cell_key("translation", self.model_id, spec.pair, spec.shots, spec.limit,
                       spec.max_new_tokens, self.depends(run))
        cell = self.cells.get(key)
        if cell is None:
            cell = translation_cell(
                self.loaded, self.corpus, spec.pair, shots=spec.shots, limit=spec.limit,
                masks=self.masks() if run == "pruned" else None,
                iv=None if run in ("dense", "pruned") else self.built.for_run(run),
                max_new_tokens=spec.max_new_tokens, batch_size=self.batch_size,
                progress=_stage(self.progress, f"translation ({run})"))
            self.cells.put(key, cell)
        return cell

    def task(self, task: zs.Task, run: str) -> zs.TaskResult:
        """The run's result on ``task``, from its cell."""
        key = cell_key("task", self.model_id, task.name,
                       [(it.id, it.lang, it.prompt, it.choices, it.label) for it in task.items],
                       self.depends(run))
        cell = self.cells.get(key)
        if cell is None:
            result = task_cell(
                self.loaded, task, masks=self.masks() if run == "pruned" else None,
                iv_for=None if run in ("dense", "pruned")
                else (lambda lang, run=run: self.built.for_run(run, lang)),
                batch_size=self.batch_size, progress=_stage(self.progress, f"{task.name} ({run})"))
            cell = zs.result_dict(result, n_bytes=True)  # with the task, enough to rebuild it
            self.cells.put(key, cell)
        return zs.TaskResult.from_dict(task, cell)


def _check_lrp2_languages(spec: InterventionSpec, corpus: ParallelCorpus,
                          tasks: list[zs.Task]) -> None:
    if spec.kind == "lrp2":
        missing = sorted({lang for t in tasks for lang in t.languages} - set(corpus.languages))
        if missing:
            raise MlpruneError(f"LRP2 needs a language vector for every task language, but the "
                               f"corpus '{corpus.name}' has no sentences in {', '.join(missing)}.")


def run_intervention_experiment(loaded: LoadedModel, corpus: ParallelCorpus,
                                spec: InterventionSpec, *, batch_size: int = 8,
                                cells: Cells | None = None, built: BuiltInterventions | None = None,
                                progress: Progress = no_progress) -> dict:
    """Dense, intervened, control (and wanda-mt when asked) on the held-out translation
    slice and on every task, with the paired tests of :data:`COMPARISONS`: pure data, ready
    for :func:`markdown` and strict JSON. ``cells`` keeps measured cells (resume, reuse);
    ``built`` is the spec's :func:`build_interventions` when the caller already has it."""
    spec.validate()
    cells = cells if cells is not None else Cells()
    tasks = [zs.load_task(t).subset(spec.task_limit) for t in spec.tasks]  # fail before work
    _check_lrp2_languages(spec, corpus, tasks)
    if built is None:
        built = build_interventions(loaded, corpus, spec, batch_size=batch_size,
                                    progress=_stage(progress, "setup"))
    runs = ["dense", "intervened"] + (["control"] if built.control else []) \
        + (["pruned"] if spec.compare_prune else [])
    measuring = _Measuring(loaded, corpus, spec, built, cells, batch_size, progress)
    tgt = parse_pair(spec.pair)[1]
    # copies: whoever edits the report leaves the cells whole
    translation = {run: dict(measuring.translation(run)) for run in runs}
    tested = [(a, b) for a, b in COMPARISONS if a in runs and b in runs]
    report = {
        "model": loaded.name, "dequantized_from": loaded.dequantized_from,
        "spec": asdict(spec), "runs": runs,
        "intervention": built.intervention.to_dict(),
        "control": built.control.to_dict() if built.control else None,
        "dims": built.dims,
        "pruned": {"method": "wanda-mt", "sparsity": spec.compare_prune}
        if spec.compare_prune else None,
        "translation": {"pair": spec.pair, "runs": translation,
                        "tests": [{"a": a, "b": b, **paired_vs_dense(translation[a]["outputs"],
                                                                      translation[b]["outputs"], tgt)}
                                  for a, b in tested]},
        "zeroshot": {},
        "notes": _notes(spec, built),
    }
    for task in tasks:
        results = {run: measuring.task(task, run) for run in runs}
        report["zeroshot"][task.name] = {
            "n_items": len(task.ids), "languages": task.languages,
            "runs": {run: r.table() for run, r in results.items()},
            "tests": [{"a": a, "b": b, "rows": zs.compare_results(
                results[a], results[b], n_resamples=spec.resamples, seed=spec.seed)}
                for a, b in tested],
        }
    if report["pruned"] is not None:
        report["pruned"]["sparsity_reached"] = (cells.get(measuring.prune_key) or {}).get(
            "sparsity_reached")
    return report


def _notes(spec: InterventionSpec, built: BuiltInterventions) -> list[str]:
    notes = []
    if spec.kind == "mean":
        notes.append("mean: each chosen dim is set to its calibration mean at the first token on "
                     "each sequence's first token and to its mean over the other tokens elsewhere.")
    if spec.kind == "lrp2":
        notes.append(f"lrp2: v_en - v_{spec.language} (mean over {spec.lrp2_samples} sentences of "
                     "each sentence's mean hidden state) added at the first layer and subtracted "
                     "at the second, at every position; zero-shot items use their own language's "
                     "vector (English items run dense). The control adds a random vector of the "
                     "same norm.")
    elif built.control is not None:
        notes.append("control: the same intervention on as many random dims per layer, none of "
                     f"them chosen or detected by {spec.detect} at any layer.")
    notes.append("p: translation, sacrebleu's paired bootstrap (1000 resamples) of b against a; "
                 "zero-shot, a paired bootstrap over items (translations resampled together).")
    return notes
