"""The verdict's report: claims, accuracy curves and translation, from the measured cells.

Every number here is recomputed from the cells in ``out/cells`` (no model needed), so a
reader can check each one. Each comparison resamples calibration seeds and items together
(:func:`mlprune.zeroshot.statistics.hierarchical_bootstrap`) and reports the mean difference,
its 95% interval, p, the spread over seeds and the smallest difference the grid could detect
(80% power at 0.05), with what would reach 2 points where the grid does not. Claims tested at
several sparsities are corrected for the number tried (Holm); such a claim holds if any
sparsity shows it after the correction. The report as Markdown (the report's file, the
README's section, the Paper page's table) is :mod:`mlprune.reports.verdict_markdown`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlprune.reports.render import read_json
from mlprune.verdict import DENSE, VerdictGrid, iter_cells
from mlprune.zeroshot.statistics import hierarchical_bootstrap, holm, rankc_item

TARGET = 0.02  # the detectable difference the pooled comparisons aim for (2 points)
ALPHA = 0.05


# --------------------------------------------------------------------------- reading cells


class Measured:
    """The cells of one folder, indexed for comparisons."""

    def __init__(self, out: str | Path):
        self.zs: dict[tuple, dict] = {}  # (method, lang, pattern, protocol, seed, task, eval lang)
        self.mt: dict[tuple, dict] = {}  # (method, lang, pattern, protocol, seed, pair)
        self.analysis: list[dict] = []
        for cell in iter_cells(out):
            v = cell.get("variant", {})
            key = (v.get("method"), v.get("lang"), v.get("pattern"), v.get("protocol"),
                   v.get("seed"))
            kind, *rest = cell.get("evaluation", "").split(":")
            if kind == "zs":
                self.zs[(*key, rest[0], rest[1])] = cell
            elif kind == "mt":
                self.mt[(*key, rest[0])] = cell
            elif kind == "analysis":
                self.analysis.append(cell)

    def dense_key(self) -> tuple:
        """The dense model's key (one model: no calibration, pattern or seed)."""
        return (DENSE, "", "", "one-shot", 0)

    def zs_scores(self, key: tuple, task: str, lang: str, what: str = "correct"
                  ) -> dict[str, float] | None:
        """id -> 1/0 correctness (or the per-choice scores) of one model on one task+language."""
        cell = self.zs.get((*key, task, lang))
        if cell is None:
            return None
        if what == "choices":
            return {it["id"]: _token_scores(it) for it in cell["items"]}
        return {it["id"]: float(it["predicted"] == it["label"]) for it in cell["items"]}


def _token_scores(item: dict) -> list[float]:
    return [lp / max(n, 1) for lp, n in zip(item["logprob"], item["n_tokens"])]


def _vkey(method: str, lang: str, pattern: str, seed: int, protocol: str = "one-shot") -> tuple:
    if method == DENSE:
        return (DENSE, "", "", "one-shot", 0)
    return (method, lang, pattern, protocol, seed)


# --------------------------------------------------------------------------- comparisons


def _matrix(m: Measured, side: dict, blocks: list[tuple[str, str, str]], seeds: list[int],
            score) -> tuple[np.ndarray, list[str]] | None:
    """Seeds x items of one side over ``blocks`` (calibration language, task, evaluation
    language); the items of each block in id order; None where any cell is missing."""
    rows = []
    for seed in seeds:
        row, strata = [], []
        for calib_lang, task, eval_lang in blocks:
            key = _vkey(side["method"], calib_lang, side["pattern"], seed,
                        side.get("protocol", "one-shot"))
            scores = score(m, key, task, eval_lang)
            if scores is None:
                return None
            for item_id in sorted(scores):
                row.append(scores[item_id])
                strata.append(f"{eval_lang}:{task}")
        rows.append(row)
    return np.asarray(rows, dtype=float), strata


def _correct(m: Measured, key: tuple, task: str, lang: str):
    return m.zs_scores(key, task, lang)


def _rankc(m: Measured, key: tuple, task: str, lang: str):
    """id -> RankC of the model's choice ranking in ``lang`` with its ranking in English."""
    ref = m.zs_scores(key, task, "en", "choices")
    other = m.zs_scores(key, task, lang, "choices")
    if ref is None or other is None:
        return None
    return {i: rankc_item(ref[i], other[i]) for i in other if i in ref
            and len(ref[i]) == len(other[i])}


def compare(m: Measured, a: dict, b: dict, blocks: list[tuple[str, str, str]],
            seeds: list[int], score=_correct, resamples: int = 4000) -> dict | None:
    """b - a over ``blocks`` with the seeds both sides have (dense: one model), tested with the
    seeds x items bootstrap; None where a cell is missing."""
    # a grid still running: keep the blocks both sides have for at least one seed, and the
    # seeds each side has for all of them (the report names both)
    blocks = [blk for blk in blocks if all(
        _have(m, side, [blk], [0] if side["method"] == DENSE else seeds, score)
        for side in (a, b))]
    if not blocks:
        return None
    seeds_a = [0] if a["method"] == DENSE else _have(m, a, blocks, seeds, score)
    seeds_b = [0] if b["method"] == DENSE else _have(m, b, blocks, seeds, score)
    if not seeds_a or not seeds_b:
        return None
    ma, mb = _matrix(m, a, blocks, seeds_a, score), _matrix(m, b, blocks, seeds_b, score)
    if ma is None or mb is None or ma[0].shape[1] != mb[0].shape[1]:
        return None
    sig = hierarchical_bootstrap(ma[0], mb[0], strata=ma[1], n_resamples=resamples)
    plan = sig.plan(TARGET)
    return {"a": a, "b": b, "mean_a": float(ma[0].mean()), "mean_b": float(mb[0].mean()),
            "diff": sig.diff, "ci_low": sig.low, "ci_high": sig.high, "p_value": sig.p_value,
            "detectable_diff": sig.detectable_diff, "seed_diff_min": sig.seed_diff_min,
            "seed_diff_max": sig.seed_diff_max, "seed_sd_b": sig.seed_sd_b,
            "n_items": sig.n_items, "n_strata": sig.n_strata, "seeds_a": seeds_a,
            "seeds_b": seeds_b, "langs": sorted({el for _, _, el in blocks}),
            "tasks": sorted({t for _, t, _ in blocks}),
            "seeds_needed_for_target": plan.seeds_needed,
            "items_needed_for_target": plan.items_needed}


def _have(m: Measured, side: dict, blocks, seeds: list[int], score) -> list[int]:
    """The seeds for which every block of this side is measured."""
    return [s for s in seeds if all(
        score(m, _vkey(side["method"], cl, side["pattern"], s, side.get("protocol", "one-shot")),
              t, el) is not None for cl, t, el in blocks)]


def _side(method: str, pattern: str = "", protocol: str = "one-shot") -> dict:
    return {"method": method, "pattern": pattern, "protocol": protocol}


# --------------------------------------------------------------------------- the report


def build_report(out: str | Path, grid: VerdictGrid) -> dict:
    """Claims, curves and translation from the folder's cells (missing cells are left out and
    counted)."""
    out = Path(out)
    m = Measured(out)
    manifest = json.loads((out / "grid.json").read_text(encoding="utf-8")) \
        if (out / "grid.json").is_file() else {}
    seeds = list(grid.seeds)
    own = [(x, t, x) for x in grid.langs for t in grid.tasks]  # calibrated in X, scored in X
    patterns = [str(s) for s in grid.sparsities]
    report: dict = {
        "model": manifest.get("model"), "model_fingerprint": manifest.get("model_fingerprint"),
        "dequantized_from": manifest.get("dequantized_from"),
        "corpus": manifest.get("corpus"), "tasks": list(grid.tasks),
        "grid": {"langs": list(grid.langs), "seeds": seeds, "sparsities": list(grid.sparsities),
                 "samples": grid.samples, "shots": grid.shots, "task_limit": grid.task_limit,
                 "mt_direction": "en->X (X the evaluated language)",
                 "paper_protocol": {"langs": list(grid.paper_langs),
                                    "samples": grid.paper_samples,
                                    "patterns": list(grid.translation_patterns)},
                 "translation": {"patterns": list(grid.translation_patterns),
                                 "sentences": grid.translation_limit}},
        "cells": {"zeroshot": len(m.zs), "translation": len(m.mt), "analysis": len(m.analysis),
                  "expected": len(grid.cells())},
        "items_per_language": _items_per_language(m, grid),
    }
    report["curves"] = curves(m, grid)
    comparisons: dict[str, list[dict]] = {}
    dense = _side(DENSE)
    for name, a_method in (("mt_vs_dense", DENSE), ("mt_vs_mono", "wanda-mono")):
        rows = []
        for p in patterns:
            a = dense if a_method == DENSE else _side(a_method, p)
            c = compare(m, a, _side("wanda-mt", p), own, seeds)
            if c is not None:
                c["pattern"] = p
                rows.append(c)
        for c, adj in zip(rows, holm([c["p_value"] for c in rows])):
            c["p_holm"] = adj
        comparisons[name] = rows
    comparisons["mono_vs_dense"] = [c for p in patterns if (c := compare(
        m, dense, _side("wanda-mono", p), own, seeds)) is not None]
    rankc_blocks = [(x, t, x) for x in grid.langs for t in grid.tasks]
    comparisons["rankc_mt_vs_mono"] = [c for c in [compare(
        m, _side("wanda-mono", "0.5"), _side("wanda-mt", "0.5"), rankc_blocks, seeds,
        score=_rankc)] if c is not None]
    comparisons["rankc_mt_vs_dense"] = [c for c in [compare(
        m, dense, _side("wanda-mt", "0.5"), rankc_blocks, seeds, score=_rankc)] if c is not None]
    # 50%, scored in every language: each variant calibrated once (first language or pooled)
    wide_blocks = [(grid.langs[0], t, x) for x in grid.langs for t in grid.tasks]
    wide = []
    for method in grid.wide:
        for a in (_side("wanda-mt", "0.5"), dense):
            c = compare(m, a, _side(method, "0.5"), wide_blocks, seeds)
            if c is not None:
                wide.append(c)
            wo = [(grid.langs[0], "wordorder", x) for x in grid.langs] \
                if "wordorder" in grid.tasks else []
            c = compare(m, a, _side(method, "0.5"), wo, seeds) if wo else None
            if c is not None:
                c["only_task"] = "wordorder"
                wide.append(c)
    comparisons["wide"] = wide
    paper = []
    for lang in grid.paper_langs:
        blocks = [(lang, t, lang) for t in grid.tasks]
        for p in grid.translation_patterns:
            for a in (_side("wanda-mono", p, "paper"), dense):
                c = compare(m, a, _side("wanda-mt", p, "paper"), blocks, seeds)
                if c is not None:
                    c["pattern"] = p
                    paper.append(c)
    comparisons["paper_protocol"] = paper
    report["comparisons"] = comparisons
    report["translation"] = translation(m, grid)
    report["analysis"] = analysis(m)
    report["analysis_claims"] = analysis_claims(report["analysis"])
    report["claims"] = claims(report, grid)
    return report


SHARED_RULE = 0.5  # mlprune's threshold, not the paper's: see analysis()


def analysis(m: Measured) -> dict | None:
    """The overlaps of the analysis cell, summarised per measure as a 'sharing' score:
    (observed - chance) / (same set, other draw - chance), 0 for unrelated rankings and 1 for
    as much agreement as two draws of one prompt set reach. Cross-direction sharing is
    between X->en sets of different languages; translation-vs-monolingual sharing is between
    X->en and X's monolingual set."""
    if not m.analysis:
        return None
    cell = m.analysis[0]
    out = {"fractions": cell["fractions"], "chance": cell["chance"], "measures": {}}
    for measure, chance in cell["chance"].items():
        cross, specific, raw_cross, raw_specific, seeds_seen = [], [], [], [], 0
        for row in cell["seeds"]:
            table, ceiling = row[measure], row.get(f"{measure}_same_set_other_seed")
            mts = sorted(k for k in table if k.startswith("mt:"))
            if not ceiling:
                continue
            seeds_seen += 1

            def share(a: str, b: str, table=table, ceiling=ceiling, chance=chance) -> float:
                ceil = (ceiling[a] + ceiling[b]) / 2
                return (table[a][b] - chance) / (ceil - chance) if ceil != chance else 0.0

            pairs = [(a, b) for a in mts for b in mts if a < b]
            if pairs:
                cross.append(float(np.mean([share(a, b) for a, b in pairs])))
                raw_cross.append(float(np.mean([table[a][b] for a, b in pairs])))
            lang_pairs = [(a, "mono:" + a[3:].split("-")[0]) for a in mts]
            lang_pairs = [(a, b) for a, b in lang_pairs if b in table]
            if lang_pairs:
                specific.append(float(np.mean([share(a, b) for a, b in lang_pairs])))
                raw_specific.append(float(np.mean([table[a][b] for a, b in lang_pairs])))
        out["measures"][measure] = {
            "cross_direction": cross, "translation_vs_monolingual": specific,
            "raw_cross_direction": raw_cross, "raw_translation_vs_monolingual": raw_specific,
            "n_seeds": seeds_seen}
    return out


def analysis_claims(a: dict | None) -> list[dict]:
    """Claim 4: the large dimensions are shared across languages, and specific to
    translation, by both measures. 'Holds' uses mlprune's rule, stated with each claim:
    shared when the mean sharing is at least SHARED_RULE in every seed (more than halfway
    from chance to the agreement of two draws of one set); specific when, in every seed,
    translation and monolingual sets share less than translation directions do."""
    if not a:
        return []
    out = []
    for measure, label in (("top_in_top", "top-5% in top-5%"),
                           ("top_in_bottom", "top-40% in bottom-40%, the paper's measure")):
        v = a["measures"].get(measure)
        if not v or not v["cross_direction"]:
            continue
        cross, spec = v["cross_direction"], v["translation_vs_monolingual"]
        raw_c, raw_s = v["raw_cross_direction"], v["raw_translation_vs_monolingual"]
        chance = a["chance"][measure]
        out.append({"claim": f"Large dimensions are shared across X->en directions ({label})",
                    "paper": "yes (Figures 1, 3)",
                    "found": f"overlap {np.mean(raw_c):.2f} (chance {chance:.2f}); sharing "
                             f"{min(cross):.2f}-{max(cross):.2f} over {len(cross)} seeds",
                    "effect": float(np.mean(cross)), "ci": [min(cross), max(cross)],
                    "p_value": None, "detectable": None,
                    "holds": all(x >= SHARED_RULE for x in cross), "n": f"{len(cross)} seeds",
                    "rule": f"mlprune's: sharing >= {SHARED_RULE} in every seed"})
        if spec:
            out.append({"claim": f"Large dimensions while translating differ from those while "
                                 f"reading one language ({label})",
                        "paper": "yes (Figure 2)",
                        "found": f"overlap {np.mean(raw_s):.2f} vs {np.mean(raw_c):.2f} across "
                                 f"directions; sharing {np.mean(spec):.2f} vs "
                                 f"{np.mean(cross):.2f}",
                        "effect": float(np.mean(spec) - np.mean(cross)), "ci": None,
                        "p_value": None, "detectable": None,
                        "holds": all(s < c for s, c in zip(spec, cross)),
                        "n": f"{len(spec)} seeds",
                        "rule": "mlprune's: translation-vs-monolingual sharing below "
                                "cross-direction sharing in every seed"})
    return out


def _items_per_language(m: Measured, grid: VerdictGrid) -> dict:
    out = {}
    for (method, *_rest, task, lang), cell in m.zs.items():
        if method == DENSE:
            out.setdefault(task, {})[lang] = len(cell["items"])
    return out


def curves(m: Measured, grid: VerdictGrid) -> dict:
    """Per language: dense accuracy, and per method and sparsity the accuracy of each seed
    (both tasks pooled: the mean over their items), for the sparsity figure."""
    out = {}
    for lang in grid.langs:
        block = {"dense": None, "methods": {}}
        dense = [m.zs_scores(_vkey(DENSE, "", "", 0), t, lang) for t in grid.tasks]
        if all(d is not None for d in dense):
            block["dense"] = float(np.mean([v for d in dense for v in d.values()]))
        for method in ("wanda-mt", "wanda-mono"):
            points = []
            for s in grid.sparsities:
                per_seed = {}
                for seed in grid.seeds:
                    got = [m.zs_scores(_vkey(method, lang, str(s), seed), t, lang)
                           for t in grid.tasks]
                    if all(g is not None for g in got):
                        per_seed[seed] = float(np.mean([v for g in got for v in g.values()]))
                if per_seed:
                    vals = list(per_seed.values())
                    points.append({"sparsity": s, "mean": float(np.mean(vals)),
                                   "min": min(vals), "max": max(vals), "seeds": per_seed})
            block["methods"][method] = points
        out[lang] = block
    return out


def _sentence_chrf(cell: dict) -> list[float]:
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    return [metric.sentence_score(o["output"], [o["reference"]]).score / 100
            for o in cell["outputs"]]


def translation(m: Measured, grid: VerdictGrid) -> dict:
    """chrF per variant and language (corpus-level, mean over seeds), and wanda-mt against
    wanda-mono and dense on sentence chrF pooled over languages (seeds x sentences bootstrap)."""
    table = []
    for (method, lang, pattern, protocol, seed, pair), cell in sorted(
            m.mt.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        table.append({"method": method, "lang": lang, "pattern": pattern, "protocol": protocol,
                      "seed": seed, "pair": pair, "chrf": cell["chrf"], "bleu": cell["bleu"],
                      "target_language_rate": cell["target_language_rate"], "n": cell["n"]})
    tests = []
    for p in grid.translation_patterns:
        for a_method in ("wanda-mono", DENSE):
            rows_a, rows_b, strata = {}, {}, []
            ok = True
            for lang in grid.langs:
                pair = f"en-{lang}"
                for side, rows in (("wanda-mt", rows_b), (a_method, rows_a)):
                    for seed in (grid.seeds if side != DENSE else [0]):
                        key = (*_vkey(side, lang, p, seed), pair)
                        cell = m.mt.get(key)
                        if cell is None:
                            continue
                        rows.setdefault(seed, []).extend(_sentence_chrf(cell))
                strata += [lang] * (len(m.mt.get((*_vkey(DENSE, "", "", 0), pair), {})
                                        .get("outputs", [])))
            seeds_a = [s for s, r in rows_a.items() if len(r) == len(strata)]
            seeds_b = [s for s, r in rows_b.items() if len(r) == len(strata)]
            ok = bool(strata) and seeds_a and seeds_b
            if not ok:
                continue
            sig = hierarchical_bootstrap(np.asarray([rows_a[s] for s in seeds_a]),
                                         np.asarray([rows_b[s] for s in seeds_b]),
                                         strata=strata, n_resamples=4000)
            tests.append({"pattern": p, "a": a_method, "b": "wanda-mt", "metric":
                          "sentence chrF (0-1)", "diff": sig.diff, "ci_low": sig.low,
                          "ci_high": sig.high, "p_value": sig.p_value,
                          "detectable_diff": sig.detectable_diff, "n_items": sig.n_items,
                          "seeds_a": seeds_a, "seeds_b": seeds_b})
    inverted = [r for r in table if r["method"] == "wanda-mt-inv"]
    return {"table": table, "tests": tests, "inverted": inverted}


# --------------------------------------------------------------------------- claims


def _verdict(c: dict | None, p_key: str = "p_value") -> bool | None:
    """True: the paper's direction (b > a) at p < 0.05; False: the opposite at p < 0.05;
    None: the grid cannot tell."""
    if c is None or c.get(p_key) is None or c[p_key] >= ALPHA:
        return None
    return c["diff"] > 0


def _ruled_out_above(c: dict, p_key: str = "p_value") -> float | None:
    """For a null result from a grid with the power the verdict aims for (it detects
    :data:`TARGET` or less): the upper end of the CI, above which a gain is ruled out.
    None when the claim holds either way, or when the grid is too small to rule much out."""
    if _verdict(c, p_key) is not None or c.get("detectable_diff") is None:
        return None
    return c["ci_high"] if c["detectable_diff"] <= TARGET else None


def _points(x: float) -> str:
    return f"{x * 100:+.1f}"


def _claim(claim: str, paper: str, c: dict | None, *, p_key: str = "p_value",
           found: str = "", unit: str = "points") -> dict:
    if c is None:
        return {"claim": claim, "paper": paper, "found": "not measured yet", "holds": None,
                "effect": None, "ci": None, "p_value": None, "detectable": None, "n": None}
    return {"claim": claim, "paper": paper,
            "found": found or f"{c['mean_b']:.1%} vs {c['mean_a']:.1%}",
            "effect": c["diff"], "ci": [c["ci_low"], c["ci_high"]], "p_value": c.get(p_key),
            "detectable": c["detectable_diff"], "holds": _verdict(c, p_key),
            "gain_ruled_out_above": _ruled_out_above(c, p_key),
            "seeds": [len(c.get("seeds_a", [])), len(c.get("seeds_b", []))],
            "n": c["n_items"], "langs": c.get("langs"), "unit": unit,
            "seeds_needed_for_2_points": c.get("seeds_needed_for_target"),
            "items_needed_for_2_points": c.get("items_needed_for_target")}


def _best(rows: list[dict]) -> dict | None:
    """The row that speaks most for the claim: the lowest Holm-adjusted p in the paper's
    direction, else the largest difference."""
    if not rows:
        return None
    pos = [r for r in rows if r["diff"] > 0]
    return min(pos, key=lambda r: r.get("p_holm") or 1.0) if pos else \
        max(rows, key=lambda r: r["diff"])


def _curve_claim(claim: str, paper: str, rows: list[dict], against: str = "") -> dict:
    """A claim tested at each sparsity of the curve: the best row (Holm-adjusted p) and every
    sparsity's difference."""
    best = _best(rows)
    c = _claim(claim, paper, best, p_key="p_holm")
    if best is not None:
        c["found"] = (f"best at {float(best['pattern']):.0%}: {best['mean_b']:.1%} vs {against}"
                      f"{best['mean_a']:.1%}; at each sparsity: " + ", ".join(
                          f"{float(r['pattern']):.0%} {_points(r['diff'])}" for r in rows))
        c["sparsity"] = float(best["pattern"])
    return c


def claims(report: dict, grid: VerdictGrid) -> list[dict]:
    """The paper's claims, headline first, each with what this grid found."""
    comps = report["comparisons"]
    out = []
    out.append(_curve_claim("Pruning with translation calibration beats the unpruned model in "
                            "non-English zero-shot accuracy (any sparsity, Holm-corrected)",
                            "yes (the abstract's headline)", comps["mt_vs_dense"], "dense "))
    out.append(_curve_claim("wanda-mt beats wanda-mono in non-English zero-shot accuracy (same "
                            "languages, same sparsity; Holm over sparsities)",
                            "yes (zero-shot XNLI, MARC)", comps["mt_vs_mono"]))
    rc = comps["rankc_mt_vs_mono"][0] if comps["rankc_mt_vs_mono"] else None
    out.append(_claim("RankC consistency with English improves (wanda-mt vs wanda-mono, 50%)",
                      "yes (Table 3)", rc, unit="RankC x100",
                      found=f"RankC {rc['mean_b']:.3f} vs {rc['mean_a']:.3f}" if rc else ""))
    out += report.get("analysis_claims", [])
    for t in report["translation"]["tests"]:
        if t["a"] != "wanda-mono":
            continue
        t2 = {**t, "mean_a": float("nan"), "mean_b": float("nan")}
        out.append(_claim(f"Translation: wanda-mt keeps chrF better than wanda-mono "
                          f"({_plabel(t['pattern'])}, en->X pooled)", "yes (Table 1)", t2,
                          unit="sentence chrF x100",
                          found=f"sentence chrF {_points(t['diff'])} points"))
    inv = report["translation"]["inverted"]
    if inv:
        r = inv[0]
        mt = next((x for x in report["translation"]["table"] if x["method"] == "wanda-mt"
                   and x["lang"] == r["lang"] and x["pattern"] == r["pattern"]
                   and x["seed"] == r["seed"]), None)
        out.append({"claim": "Pruning the highest scores instead destroys translation",
                    "paper": "yes (the ablation)",
                    "found": f"chrF {r['chrf']:.1f} inverted vs "
                             f"{mt['chrf']:.1f}" if mt else f"chrF {r['chrf']:.1f}",
                    "effect": None, "ci": None, "p_value": None, "detectable": None,
                    "holds": (r["chrf"] < 0.5 * mt["chrf"]) if mt else None,
                    "n": r["n"], "rule": "holds: inverted chrF below half of wanda-mt's"})
    return out


def _plabel(p: str) -> str:
    return p if ":" in p else f"{float(p):.0%}"


def load_report(out: str | Path) -> dict | None:
    """A written verdict report, or None."""
    return read_json(Path(out) / "report.json")
