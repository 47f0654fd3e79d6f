"""``mlprune reproduce``: the paper's experiment grid on one model, as a report.

The grid, under the paper protocol (EOS-separated demonstrations, sequential Wanda):

- Figure 2: the top dimensions per layer while translating and while reading one language;
- Figures 1 and 3: overlaps of the large dimensions across languages and directions;
- Table 1: few-shot translation (chrF, BLEU) of the dense model and of wanda-mono, wanda-mt,
  magnitude and random pruning at 50% unstructured and 2:4, each tested against wanda-mono
  with sacrebleu's paired bootstrap;
- zero-shot accuracy per language on every task, each variant against dense and wanda-mt
  against wanda-mono (the paper's key comparison), with a paired bootstrap and the smallest
  difference the test could detect; RankC consistency with English;
- the inverted ablation (prune the highest Wanda scores);
- optionally (``beyond``), methods past the paper at 50% unstructured: calibration on every
  X->English direction pooled, OWL's per-layer sparsity, M-Wanda and its ablations, each
  tested against wanda-mt as well;
- a claims table: each claim of the paper, the direction it reported, what this run found.

Every measured cell is written to ``out/cells`` as soon as it is done (masks to
``out/masks``), so a run that stops resumes where it stopped; the report is rebuilt from the
cells each time. Nothing here renders: the Markdown and HTML are
:mod:`mlprune.reports.reproduce`'s (``markdown``, ``write_report`` and ``load_report`` are
re-exported here), the figures :mod:`mlprune.plots`'.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mlprune import MlpruneError, Progress, no_progress, storage
from mlprune import zeroshot as zs
from mlprune.capture import ActivationStats, Cancelled
from mlprune.corpus import ParallelCorpus
from mlprune.evaluate import evaluate_translation, paired_translation_test
from mlprune.features import overlap_matrix, top_dims
from mlprune.models import LoadedModel
from mlprune.pipeline import SWEEP_METHODS, PruneSpec, cached_capture, cached_masks
from mlprune.prompts import monolingual_prompts, parse_pair, translation_prompts
from mlprune.protocol import get_protocol
from mlprune.prune import pruned
from mlprune.reports.render import lang_row
from mlprune.reports.reproduce import (  # noqa: F401 (markdown, load_report: re-exported)
    BASELINE,
    REFERENCE,
    load_report,
    markdown,
    points,
    write_report,
)
from mlprune.storage import atomic_write_text, slug, strict_json

# The grid's methods, as the sweep names them (spec fields of each); the paper's four are
# the grid's default, the rest (BEYOND) are optional variants at 50% unstructured.
METHODS = dict(SWEEP_METHODS)
PAPER_METHODS = ("wanda-mono", "wanda-mt", "magnitude", "random")
BEYOND = ("wanda-pooled", "wanda-owl", "m-wanda", "m-wanda-no-variance", "m-wanda-no-cwl",
          "m-wanda-no-prob")
REPORT_ENV = "MLPRUNE_REPORT"  # the report the dashboard's Paper page opens first
# The README's run, shipped with a clone of the project (reports only; cells and masks stay out)
SHIPPED_REPORT = Path(__file__).resolve().parents[1] / "bench" / "results" / "reproduce"


@dataclass(frozen=True)
class Grid:
    """What one reproduce run measures. :data:`FULL` (the default) is the README's run, sized
    for 2 CPU cores; :data:`QUICK` finishes in under 20 minutes there. The paper's own counts
    (100 calibration prompts, every task item) are ``--samples 100 --task-limit 0``."""

    pair: str = "fr-en"  # calibration (wanda-mt; wanda-mono reads its source language)
    langs: tuple[str, ...] = ("fr", "zh", "ru", "sw")  # X of the X-en analysis
    analysis_samples: int = 16
    samples: int = 16  # calibration prompts (the paper: 100)
    methods: tuple[str, ...] = ("wanda-mono", "wanda-mt", "magnitude", "random")
    patterns: tuple[str, ...] = ("0.5", "2:4")
    invert: bool = True  # the ablation: wanda-mt pruning its highest scores, at 50%
    translation_limit: int = 16
    tasks: tuple[str, ...] = ("wordorder", "completion")
    task_limit: int | None = 40  # items per language (None: all)
    zeroshot_patterns: tuple[str, ...] = ("0.5",)
    zeroshot_methods: tuple[str, ...] = ("wanda-mono", "wanda-mt")
    resamples: int = 2000
    seed: int = 0
    # variants beyond the paper (names of BEYOND), measured at 50% unstructured, translation
    # and zero-shot, each also against wanda-mt; none by default (they add ~1 prune each)
    beyond: tuple[str, ...] = ()

    def variants(self) -> list[tuple[str, PruneSpec | None]]:
        """(name, spec) of every model the grid measures; the dense model has no spec."""
        out: list[tuple[str, PruneSpec | None]] = [("dense", None)]
        for pattern in self.patterns:
            for method in self.methods:
                out.append((variant_name(method, pattern), self.spec(method, pattern)))
        if self.invert:
            out.append((variant_name("wanda-mt-inv", "0.5"),
                        self.spec("wanda-mt", "0.5", invert=True)))
        for method in self.beyond:
            if method not in METHODS:
                raise MlpruneError(f"Unknown variant '{method}': use {', '.join(BEYOND)}.")
            out.append((variant_name(method, "0.5"), self.spec(method, "0.5")))
        return out

    def spec(self, method: str, pattern: str, invert: bool = False) -> PruneSpec:
        """The paper-protocol spec of one variant."""
        structured = ":" in pattern
        return PruneSpec.preset(
            "paper", pair=self.pair, samples=self.samples, seed=self.seed, invert=invert,
            pattern=pattern if structured else "unstructured",
            sparsity=0.5 if structured else float(pattern), **METHODS[method])

    def scores_zeroshot(self, name: str) -> bool:
        """Whether the variant of this name is scored on the zero-shot tasks."""
        if name == "dense":
            return True
        method, pattern = name.rsplit(" ", 1)
        return (method in self.zeroshot_methods or method in self.beyond) and pattern in {
            _pattern_label(p) for p in self.zeroshot_patterns}


FULL = Grid()
QUICK = Grid(langs=("fr", "zh"), analysis_samples=8, samples=8,
             methods=("wanda-mono", "wanda-mt", "magnitude"), patterns=("0.5",),
             translation_limit=8, task_limit=20, resamples=1000)


def _pattern_label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{float(pattern):.0%}"


def variant_name(method: str, pattern: str) -> str:
    """'wanda-mt 50%', 'magnitude 2:4'."""
    return f"{method} {_pattern_label(pattern)}"


# --------------------------------------------------------------------------- cells


class Cells(storage.Cells):
    """The run's measured cells in ``out/cells``, one strict JSON file each
    (``cells/translation/dense.json``), with :class:`mlprune.storage.Cells`' policy: a cell that
    cannot be read is moved aside and measured again."""

    def __init__(self, out: str | Path):
        super().__init__(Path(out) / "cells")


# --------------------------------------------------------------------------- the run


def run(loaded: LoadedModel, corpus: ParallelCorpus, out: str | Path, grid: Grid = FULL, *,
        extra_tasks: tuple[str, ...] = (), batch_size: int = 8, progress: Progress = no_progress,
        should_stop: Callable[[], bool] | None = None) -> dict:
    """Measure every cell of the grid not measured yet, then write the report (JSON, Markdown,
    HTML) to ``out`` and return it."""
    out = Path(out)
    src, tgt = parse_pair(grid.pair)
    corpus.require(src, tgt, *grid.langs, "en")
    sample = get_protocol("paper").task_sample  # XNLI/MARC: the authors' 1000-item draw
    tasks = [zs.load_task(t, sample=sample).subset(grid.task_limit or None, None)
             for t in (*grid.tasks, *extra_tasks)]
    _claim_folder(out, grid, extra_tasks)
    cells = Cells(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def stop_check() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("Reproduce cancelled; finished cells are kept and the run resumes "
                            "where it stopped.")

    # 1. the analysis prompt sets (Figures 1-3)
    sets = analysis_sets(corpus, grid)
    stats: dict[str, ActivationStats] = {}
    for i, ps in enumerate(sets):
        stop_check()
        progress(f"analysis {ps.name}", i / len(sets))
        stats[ps.name] = cached_capture(
            loaded, ps, batch_size=batch_size, should_stop=should_stop,
            progress=_within(progress, f"analysis {ps.name}, ", i / len(sets), (i + 1) / len(sets)))
    progress("analysis", 1.0)

    # 2. every variant: masks, translation, zero-shot
    variants = grid.variants()
    for v, (name, spec) in enumerate(variants):
        todo_tr = cells.get("translation", name) is None
        todo_zs = [t for t in tasks if grid.scores_zeroshot(name)
                   and cells.get("zeroshot", name, t.name) is None]
        if not todo_tr and not todo_zs:
            continue
        stop_check()
        here = _within(progress, f"{name}: ", v / len(variants), (v + 1) / len(variants))
        masks = None if spec is None else cached_masks(
            loaded, corpus, spec, out / "masks" / f"{slug(name)}.safetensors",
            batch_size=batch_size, progress=here)
        with pruned(loaded.model, masks):
            if todo_tr:
                here("translation", 0.5)
                result = evaluate_translation(
                    loaded.model, loaded.tokenizer, corpus, src, tgt, shots=4,
                    limit=grid.translation_limit, batch_size=batch_size,
                    progress=_within(here, "translation, ", 0.5, 0.75))
                result["sparsity"] = masks.overall_sparsity() if masks else 0.0
                cells.put(result, "translation", name)
            for t in todo_zs:
                stop_check()
                here(f"zero-shot {t.name}", 0.75)
                scored = zs.evaluate_task(
                    loaded.model, loaded.tokenizer, t, batch_size=batch_size,
                    progress=_within(here, f"zero-shot {t.name}, ", 0.75, 1.0))
                # with each item's byte counts: with the task, enough to rebuild the result
                cells.put(zs.result_dict(scored, n_bytes=True), "zeroshot", name, t.name)
    progress("report", 1.0)
    report = build_report(loaded, grid, stats, cells, tasks)
    report["seconds_this_run"] = round(time.perf_counter() - started, 1)
    write_report(report, out, stats)
    return report


# What a cell's content depends on (methods, patterns and the rest only choose which cells exist,
# so a later run may add variants to a folder).
CELL_SETTINGS = ("pair", "langs", "analysis_samples", "samples", "translation_limit", "tasks",
                 "task_limit", "resamples", "seed")


def _claim_folder(out: Path, grid: Grid, extra_tasks: tuple[str, ...]) -> None:
    """Record the settings a folder's cells were measured with; refuse to mix in cells
    measured with other settings (adding methods or patterns is fine)."""
    manifest = out / "grid.json"
    settings = {k: v for k, v in asdict(grid).items() if k in CELL_SETTINGS}
    mine = strict_json({"settings": settings, "extra_tasks": list(extra_tasks)})
    if manifest.is_file() and manifest.read_text(encoding="utf-8") != mine:
        raise MlpruneError(f"{out} holds a run measured with other settings (see {manifest}); "
                           "choose another --out, or delete that folder to start again.")
    out.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        atomic_write_text(manifest, mine)


def _within(progress: Progress, prefix: str, start: float, end: float) -> Progress:
    """``progress`` for one part of a run: its stages prefixed, its fractions mapped into
    [start, end] of the whole."""
    return lambda stage, f: progress(f"{prefix}{stage}", start + (end - start) * min(f, 1.0))


def analysis_sets(corpus: ParallelCorpus, grid: Grid) -> list:
    """X-en translation, en-X (for the pair's language and zh) and monolingual prompt sets,
    EOS-separated as the paper's analysis."""
    kw = dict(shots=4, samples=grid.analysis_samples, seed=grid.seed,
              separator=get_protocol("paper").separator)
    sets = [translation_prompts(corpus, x, "en", **kw) for x in grid.langs]
    sets += [translation_prompts(corpus, "en", x, **kw) for x in grid.langs[:2]]
    sets += [monolingual_prompts(corpus, x, **kw) for x in ("en", *grid.langs)]
    return sets


# --------------------------------------------------------------------------- the report


def build_report(loaded: LoadedModel, grid: Grid, stats: dict[str, ActivationStats],
                 cells: Cells, tasks: list) -> dict:
    """The report from the measured cells (a variant or task not measured yet is left out)."""
    protocol = get_protocol("paper")
    src, _ = parse_pair(grid.pair)
    names = [n for n, _ in grid.variants()]
    translation = {n: c for n in names if (c := cells.get("translation", n)) is not None}
    report: dict = {
        "model": loaded.name, "dequantized_from": loaded.dequantized_from,
        "protocol": "paper", "grid": asdict(grid),
        "figure2": {
            "numbering": protocol.numbering, "top": protocol.top_n,
            "translating": top_dims(stats[f"mt:{src}-en"], protocol.top_n, protocol.numbering),
            "monolingual": top_dims(stats[f"mono:{src}"], protocol.top_n, protocol.numbering),
        },
        "overlap": _overlaps(stats, protocol.overlap_fraction),
        "table1": _table1(translation, grid),
        "zeroshot": {},
    }
    for task in tasks:
        results = {n: c for n in names if (c := cells.get("zeroshot", n, task.name)) is not None}
        if results:
            report["zeroshot"][task.name] = _zeroshot(task, results, grid)
    report["claims"] = claims(report, grid)
    return report


def _overlaps(stats: dict[str, ActivationStats], fraction: float) -> dict:
    """Figures 1 and 3: translation sets against each other, and against monolingual sets;
    both measures, averaged over layers and at the middle layer."""
    sets = dict(stats)
    mid = next(iter(sets.values())).n_layers // 2
    out = {"fraction": fraction, "fraction_top_in_top": 0.05, "middle_layer": mid}
    for measure, frac in (("top_in_bottom", fraction), ("top_in_top", 0.05)):
        out[measure] = overlap_matrix(sets, frac, measure, numbering="hidden_states") \
            .round(4).to_dict()
        out[f"{measure}_middle"] = overlap_matrix(sets, frac, measure, layer=mid,
                                                  numbering="hidden_states").round(4).to_dict()
    return out


def _table1(translation: dict[str, dict], grid: Grid) -> list[dict]:
    """Table 1: chrF and BLEU per variant, each tested against wanda-mono of its pattern (the
    inverted ablation also against the wanda-mt it inverts, the variants beyond the paper also
    against wanda-mt)."""
    rows = []
    for name, cell in translation.items():
        row = {"variant": name, "chrf": cell["chrf"], "bleu": cell["bleu"],
               "target_language_rate": cell["target_language_rate"],
               "perplexity": cell["perplexity"], "n": cell["n"], "sparsity": cell["sparsity"]}
        method, pattern = name.rsplit(" ", 1) if " " in name else (name, "")
        against = {"vs_" + BASELINE: translation.get(f"{BASELINE} {pattern}")}
        if method == "wanda-mt-inv":
            against["vs_uninverted"] = translation.get(f"wanda-mt {pattern}")
        if method in grid.beyond and method != REFERENCE:
            against["vs_" + REFERENCE] = translation.get(f"{REFERENCE} {pattern}")
        for suffix, base in against.items():
            if name == "dense" or base is None or method == BASELINE:
                continue
            test = paired_translation_test([o["reference"] for o in base["outputs"]],
                                           [o["output"] for o in base["outputs"]],
                                           [o["output"] for o in cell["outputs"]],
                                           lang=cell["pair"].split("-")[1])
            row.update({f"{m}_p_{suffix}": test[m]["p_value"] for m in ("chrf", "bleu")})
        rows.append(row)
    return rows


def _zeroshot(task, results: dict[str, dict], grid: Grid) -> dict:
    """Per variant: accuracy per language; each against dense, and wanda-mt against wanda-mono."""
    loaded_results = {n: zs.TaskResult.from_dict(task, c) for n, c in results.items()}
    out: dict = {"variants": {n: c["languages"] for n, c in results.items()},
                 "notes": sorted({note for c in results.values() for note in c["notes"]}),
                 "comparisons": []}
    dense = loaded_results.get("dense")
    for name, res in loaded_results.items():
        if name != "dense" and dense is not None:
            out["comparisons"].append(
                {"a": "dense", "b": name,
                 "rows": zs.compare_results(dense, res, n_resamples=grid.resamples,
                                            seed=grid.seed)})
    for pattern in grid.zeroshot_patterns:
        a = loaded_results.get(variant_name(BASELINE, pattern))
        b = loaded_results.get(variant_name("wanda-mt", pattern))
        if a is not None and b is not None:
            out["comparisons"].append(
                {"a": variant_name(BASELINE, pattern), "b": variant_name("wanda-mt", pattern),
                 "key": True,
                 "rows": zs.compare_results(a, b, n_resamples=grid.resamples, seed=grid.seed)})
        reference = loaded_results.get(variant_name(REFERENCE, pattern))
        for method in grid.beyond:
            other = loaded_results.get(variant_name(method, pattern))
            if reference is not None and other is not None and method != REFERENCE:
                out["comparisons"].append(
                    {"a": variant_name(REFERENCE, pattern), "b": variant_name(method, pattern),
                     "rows": zs.compare_results(reference, other, n_resamples=grid.resamples,
                                                seed=grid.seed)})
    return out


# --------------------------------------------------------------------------- claims


def _comparison(report: dict, task: str, a: str, b: str) -> dict | None:
    for comp in report["zeroshot"].get(task, {}).get("comparisons", []):
        if comp["a"] == a and comp["b"] == b:
            return lang_row(comp["rows"], "non-en")
    return None


def claims(report: dict, grid: Grid) -> list[dict]:
    """The paper's claims, the direction it reported, and what this run found (with p)."""
    out = []
    fig2 = report["figure2"]["translating"]["layers"]
    ratios = [layer["top"][0]["ratio_to_median"] for layer in fig2 if layer["top"]]
    out.append({"claim": "While translating, a few dimensions have very large magnitudes",
                "paper": "yes (Figure 2)",
                "found": f"largest dimension {max(ratios):.0f}x its layer's median "
                         f"(median over layers {sorted(ratios)[len(ratios) // 2]:.0f}x)",
                "effect": max(ratios), "p_value": None, "holds": max(ratios) >= 10,
                "n": f"{grid.analysis_samples} prompts"})
    src = parse_pair(grid.pair)[0]
    mt, mono = f"mt:{src}-en", f"mono:{src}"
    top = report["overlap"]["top_in_top"]
    pairs = [k for k in top if k.startswith("mt:") and k.endswith("-en")]
    shared = [top[a][b] for a in pairs for b in pairs if a < b]
    if shared:
        mean_shared = sum(shared) / len(shared)
        out.append({"claim": "The large dimensions are shared across X-to-English directions",
                    "paper": "yes (Figures 1, 3)",
                    "found": f"top-5% overlap between directions {mean_shared:.0%} on average",
                    "effect": mean_shared, "p_value": None, "holds": mean_shared >= 0.5,
                    "n": f"{len(pairs)} directions"})
    specific = top.get(mt, {}).get(mono)
    if specific is not None:
        out.append({"claim": "The large dimensions while translating differ from those while "
                             "reading one language (translation-specific features)",
                    "paper": "yes (Figure 2: translating vs monolingual)",
                    "found": f"top-5% overlap translating vs reading {src}: {specific:.0%}",
                    "effect": specific, "p_value": None, "holds": specific < 0.5,
                    "n": f"{grid.analysis_samples} prompts each"})
    by_name = {r["variant"]: r for r in report["table1"]}
    for pattern in grid.patterns:
        mt_row = by_name.get(variant_name("wanda-mt", pattern))
        base = by_name.get(variant_name(BASELINE, pattern))
        if mt_row and base:
            diff = mt_row["chrf"] - base["chrf"]
            p = mt_row.get(f"chrf_p_vs_{BASELINE}")
            out.append({"claim": f"Translation calibration keeps translation better than "
                                 f"monolingual calibration ({_pattern_label(pattern)})",
                        "paper": "wanda-mt > wanda-mono (translation, Table 1)",
                        "found": f"chrF {mt_row['chrf']:.1f} vs {base['chrf']:.1f} "
                                 f"({diff:+.1f})", "effect": diff, "p_value": p,
                        "holds": _holds(diff, p), "n": f"{mt_row['n']} sentences"})
    for task in report["zeroshot"]:
        for pattern in grid.zeroshot_patterns:
            a, b = variant_name(BASELINE, pattern), variant_name("wanda-mt", pattern)
            row = _comparison(report, task, a, b)
            if row is None:
                continue
            out.append({"claim": f"Translation calibration keeps non-English zero-shot accuracy "
                                 f"better than monolingual calibration: {task}, "
                                 f"{_pattern_label(pattern)}",
                        "paper": "wanda-mt > wanda-mono (zero-shot XNLI, MARC)",
                        "found": f"non-English accuracy {row['acc_b']:.1%} vs {row['acc_a']:.1%}"
                                 f" ({row['diff'] * 100:+.1f} points; detectable "
                                 f"{points(row.get('detectable_diff'))})",
                        "effect": row["diff"], "p_value": row["p_value"],
                        "holds": _holds(row["diff"], row["p_value"]), "n": f"{row['n']} items"})
    inv, mt50 = by_name.get("wanda-mt-inv 50%"), by_name.get("wanda-mt 50%")
    if inv and mt50:
        out.append({"claim": "Dropping the top-scoring weights instead destroys the model",
                    "paper": "yes (the ablation)",
                    "found": f"chrF {inv['chrf']:.1f} inverted vs {mt50['chrf']:.1f}",
                    "effect": inv["chrf"] - mt50["chrf"], "p_value": inv.get("chrf_p_vs_uninverted"),
                    "holds": _holds(mt50["chrf"] - inv["chrf"], inv.get("chrf_p_vs_uninverted")),
                    "n": f"{inv['n']} sentences"})
    return out


def _holds(diff: float, p: float | None) -> bool | None:
    """True when the paper's direction is found and significant, False when the opposite is,
    None when the run cannot tell (p >= 0.05)."""
    if p is None or p >= 0.05:
        return None
    return diff > 0


def shipped_report_dir() -> Path:
    """The folder of the report the Paper page shows first: MLPRUNE_REPORT, else the README's."""
    return Path(os.environ.get(REPORT_ENV) or SHIPPED_REPORT)


def config_for(quick: bool, **changes) -> Grid:
    """The quick or full grid with ``changes`` (e.g. pair) on top."""
    return replace(QUICK if quick else FULL, **changes)
