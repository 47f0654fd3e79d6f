"""The words and HTML the dashboard shows, with no Streamlit: labels of directions, prompt
sets, interventions and earlier sweeps; the token HTML of an output and which tokens differ;
the de-quantization sentence; and the small parsers and option lists behind widgets (a typed
list of directions, a plotly click, the directions a corpus offers, a model spec's source).

:mod:`mlprune.ui` re-exports every name, so pages call them as ``ui.pair_label`` and so on;
:mod:`mlprune.service` uses them for its progress messages.
"""

from __future__ import annotations

import difflib
import html
import time

from mlprune.evaluate import Generation
from mlprune.models import DEFAULT_MODEL, split_precision
from mlprune.prompts import parse_pair

INTERVENTION_KINDS = {"none": "None", "zero": "Zero", "mean": "Set to mean",
                      "scale": "Scale", "lrp2": "LRP2 (language vector)"}


def pair_label(pair: str) -> str:
    """'fr-en' -> 'fr→en'."""
    src, tgt = parse_pair(pair)
    return f"{src}→{tgt}"


def prompt_set_label(name: str) -> str:
    """'mt:fr-en' -> 'fr→en', 'mono:en' -> 'en (mono)'."""
    kind, _, rest = name.partition(":")
    return pair_label(rest) if kind == "mt" else f"{rest} (mono)" if kind == "mono" else name


def comma_list(text: str) -> list[str]:
    """'fr→en, en-fr,' -> ['fr-en', 'en-fr']: a typed list of directions or languages."""
    return [item.strip().replace("→", "-") for item in text.split(",") if item.strip()]


def all_pairs(languages: list[str]) -> list[str]:
    """Every ordered pair of distinct languages, English targets first."""
    pairs = [f"{a}-{b}" for a in languages for b in languages if a != b]
    return sorted(pairs, key=lambda p: (p.split("-")[1] != "en", p.split("-")[0] != "en", p))


def default_pairs(languages: list[str],
                  wanted: tuple[str, ...] = ("fr-en", "en-fr", "zh-en")) -> list[str]:
    """The usual directions where the corpus has them, else the first available."""
    chosen = [p for p in wanted if set(p.split("-")) <= set(languages)]
    return chosen or all_pairs(languages)[:1]


def diff_flags(a: list[str], b: list[str]) -> tuple[list[bool], list[bool]]:
    """For two token lists, which tokens of each are not part of their common subsequence."""
    fa, fb = [True] * len(a), [True] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for i in range(block.size):
            fa[block.a + i] = False
            fb[block.b + i] = False
    return fa, fb


def generation_html(gen: Generation, differs: list[bool] | None = None) -> str:
    """Tokens as spans: differing ones highlighted, each token's probability on hover."""
    if not gen.tokens:
        return '<span class="mlp-empty" style="color:#888">(empty output)</span>'
    parts = []
    for i, (tok, p) in enumerate(zip(gen.tokens, gen.probs)):
        diff = bool(differs and differs[i])
        style = "background:#ffe08a;border-radius:3px;" if diff else ""
        # low-confidence tokens are underlined so they stand out without hovering
        if p < 0.5:
            style += "border-bottom:2px dotted #e8372c;"
        parts.append(f'<span class="mlp-tok{" mlp-diff" if diff else ""}" style="{style}" '
                     f'title="p = {p:.3f}">{html.escape(tok)}</span>')
    return "".join(parts)


def dequant_text(dequantized_from: str | None) -> str | None:
    """The sentence every view of a de-quantized model carries."""
    if not dequantized_from:
        return None
    bits = "4-bit " if dequantized_from.upper().startswith("Q4") else ""
    return (f"Weights de-quantized from {bits}({dequantized_from}): the magnitudes, pruning "
            "scores and outputs shown are those of the de-quantized model.")


def source_of(spec: str) -> str:
    """Which kind of model spec this is (embedded, gguf, folder, hub), to preselect it."""
    spec = split_precision(spec)[0]
    if spec in (DEFAULT_MODEL, "embedded", "default"):
        return "embedded"
    if spec.lower().endswith(".gguf"):
        return "gguf"
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return "folder"
    return "hub"


def sweep_label(found: dict) -> str:
    """One line naming an earlier sweep (one of :func:`mlprune.sweeps.recent_sweeps`) for a
    picker."""
    settings = found["settings"]
    spec, when = settings.get("spec", {}), time.localtime(found["path"].stat().st_mtime)
    return (f"{time.strftime('%Y-%m-%d %H:%M', when)} · {found['rows']} rows · "
            f"{settings.get('limit')} held-out · {spec.get('samples')} prompts of "
            f"{spec.get('shots')} shots" + (" · zero-shot" if settings.get("extra") else ""))


def dims_from_selection(selection: object) -> list[int]:
    """The dims of the points a user clicked in a layer x dimension figure (x is the dim)."""
    points = (selection or {}).get("points", []) if isinstance(selection, dict) else []
    dims = []
    for point in points:
        x = point.get("x") if isinstance(point, dict) else None
        if isinstance(x, (int, float)) and float(x).is_integer() and x >= 0:
            dims.append(int(x))
    return sorted(set(dims))
