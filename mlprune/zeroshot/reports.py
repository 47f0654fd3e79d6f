"""Zero-shot results as text tables and as strict JSON (no NaN: null)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from mlprune.zeroshot.tasks import REFERENCE_LANG

if TYPE_CHECKING:
    from mlprune.zeroshot.results import TaskResult

POWER = {"alpha": 0.05, "power": 0.8, "test": "two-sided paired test of binary outcomes "
         "(McNemar; Connor 1987 sample size solved for the difference)"}
ONE_MODEL_POWER = ("detect: the smallest accuracy change a paired test finds at p < 0.05 with "
                   "80% power at this n, if the other model erred independently of this one "
                   "(2 acc (1 - acc) of items discordant); models that err alike, as dense and "
                   "pruned ones do, need less; '-': no difference is detectable at this n.")
TWO_MODEL_POWER = ("detect: the smallest accuracy change a paired test finds at p < 0.05 with "
                   "80% power at this n and the observed discordance (disc: share of items "
                   "exactly one model gets right); '-': no difference is detectable.")


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


def rankc_note(result: TaskResult) -> str | None:
    """One line on items RankC could not use, or None when it used them all."""
    langs = result.languages
    if REFERENCE_LANG not in langs or len(langs) < 2:
        return None
    skipped = result.rankc_skipped()
    english = {s.item.id for s in result.by_lang(REFERENCE_LANG)}
    others = [s for s in result.scored if s.item.lang != REFERENCE_LANG]
    if not any(s.item.id in english for s in others):
        return ("RankC is undefined: no non-English item shares its id with an English one "
                "(the languages hold different items, e.g. MARC's reviews).")
    if sum(skipped.values()):
        return (f"RankC leaves out {sum(skipped.values())} of {len(others)} non-English items: "
                "their choices are in another order than in English (accuracy counts them all).")
    return None


def result_dict(result: TaskResult) -> dict:
    """JSON-ready summary of one result, with every item's per-choice log-likelihoods."""
    note = rankc_note(result)
    return {"task": result.task, "norm": result.norm, "languages": result.table(),
            "notes": [note] if note else [],
            "power": {**POWER, "discordance": "assumed: 2 acc (1 - acc), the other model erring "
                                              "independently (conservative)"},
            "items": [{"id": s.item.id, "lang": s.item.lang, "label": s.item.label,
                       "logprob": list(s.logprob), "n_tokens": list(s.n_tokens),
                       "predicted": s.predicted(result.norm)} for s in result.scored]}


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_result(result: TaskResult) -> str:
    """A plain-text table of one model's accuracy, consistency and power per language."""
    lines = [f"{result.task} (scores: {result.norm}-normalised log-likelihood; raw = summed)",
             f"{'lang':<7} {'n':>4} {'accuracy':>9} {'raw':>7} {'RankC':>7} {'detect':>7}"]
    for r in result.table():
        lines.append(f"{r['lang']:<7} {r['n']:>4} {_f(r['accuracy']):>9} "
                     f"{_f(r['accuracy_raw']):>7} {_f(r['rankc']):>7} "
                     f"{_f(r['detectable_diff']):>7}")
    note = rankc_note(result)
    return "\n".join(lines + ([note] if note else []) + [ONE_MODEL_POWER])


def format_comparison(task: str, rows: list[dict], names: tuple[str, str] = ("dense", "pruned"),
                      confidence: float = 0.95, note: str | None = None) -> str:
    """A plain-text table of two models' accuracy, difference, interval, p-value and power."""
    a, b = names
    ci = f"{confidence:.0%} CI"
    lines = [f"{task}: {b} - {a}, paired bootstrap over items",
             f"{'lang':<7} {'n':>4} {a:>8} {b:>8} {'diff':>7} {ci:>17} {'p':>6} "
             f"{'RankC ' + a:>12} {'RankC ' + b:>12} {'disc':>6} {'detect':>7}"]
    for r in rows:
        interval = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(f"{r['lang']:<7} {r['n']:>4} {_f(r['acc_a']):>8} {_f(r['acc_b']):>8} "
                     f"{r['diff']:>+7.3f} {interval:>17} {r['p_value']:>6.3f} "
                     f"{_f(r['rankc_a']):>12} {_f(r['rankc_b']):>12} "
                     f"{_f(r.get('discordance')):>6} {_f(r.get('detectable_diff')):>7}")
    return "\n".join(lines + ([note] if note else []) + [TWO_MODEL_POWER])
