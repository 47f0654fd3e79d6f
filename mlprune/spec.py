"""What decides a pruned model, written once: every setting, its vocabulary and its help.

:class:`PruneSpec` holds the settings of one pruned model; its fields' metadata (``help``,
and for the dashboard ``label`` and ``choices``) is where each choice and each help text is
written. The command line's flags (:mod:`mlprune.cli`) and the Prune page's widgets
(``pages/2_Prune.py``) are built from it, and :data:`PRESETS` names the starting points.
:class:`SweepSpec` is a sweep's grid, checked here and nowhere else.

This module sits at the bottom of the import graph (it imports only the package root), so
validating a spec reaches into no other module: the vocabularies live here, and the modules
that use them (prune, prompts, mwanda, allocation, protocol, tokens) import them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mlprune import MlpruneError

# --------------------------------------------------------------------------- vocabularies
# Each choice with the short description the command line's help and the page's widgets show.

METHOD_HELP = {
    "wanda": "|W| x ||X||, X from the calibration set",
    "ratio": "Wanda with columns specific to code down-weighted (the paper's BLOOM variant)",
    "m-wanda": "M-Wanda: Wanda on a calibration mix, with the languages' spread, the MLP "
               "neurons' activation probability and per-layer sparsity from cross-lingual "
               "correlation (needs the pooled set or a mix)",
    "magnitude": "|W| only (no data)",
    "random": "seeded random scores (a floor)",
}
METHODS = tuple(METHOD_HELP)
ACTIVATION_METHODS = ("wanda", "ratio", "m-wanda")  # their scores read calibration statistics

MODE_HELP = {
    "one-shot": "statistics of the dense model, exact at every sparsity",
    "sequential": "as Wanda: layer l's statistics with layers < l pruned, exact at the "
                  "sparsity they were taken with",
}
MODES = tuple(MODE_HELP)

CALIBRATIONS = ("mt", "mono", "code")  # the single sets; a mix is pooled or mix:...
POOLED = "pooled"  # every X->English direction of the corpus, equal weights
MIX_PREFIX = "mix:"
CUSTOM_MIX = "mix"  # the dashboard's choice for a mix typed as mix:...
CALIBRATION_HELP = {
    "mt": "translation demonstrations", "mono": "monolingual (the source language)",
    "code": "code snippets", POOLED: "every X→English direction, equal weights",
    CUSTOM_MIX: "a mix of your own",
}
MIX_HELP = "pairs translate (fr-en), single languages are monolingual (fr); weights are normalised"

PATTERNS = ("unstructured", "2:4", "4:8")  # the named ones; any N:M is accepted
OTHER_PATTERN = "other N:M"  # the dashboard's choice for a pattern typed as N:M

ALLOCATION_HELP = {
    "uniform": "every layer at the target",
    "owl": "OWL: layers with more outlier scores pruned less",
    "cwl": "M-Wanda's: layers where languages diverge pruned less (needs a mix)",
}
ALLOCATIONS = tuple(ALLOCATION_HELP)

PART_HELP = {
    "variance": "the languages' spread in the score",
    "cwl": "per-layer sparsity from cross-lingual correlation (sets the allocation)",
    "prob": "MLP neurons' activation probability",
}
PARTS = tuple(PART_HELP)  # M-Wanda's parts

PAD_SIDES = ("tokenizer", "left", "right")
BLOCKS = ("attn", "mlp")  # module kinds a run may prune; None (the default) is all of them


def listing(choices: dict[str, str]) -> str:
    """'a: what a is; b: what b is': a vocabulary as one line of help."""
    return "; ".join(f"{name}: {text}" for name, text in choices.items())


# --------------------------------------------------------------------------- value syntax


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float, with one clear sentence when it is outside [0, 1)."""
    if not 0 <= float(sparsity) < 1:
        raise MlpruneError(f"Sparsity must be in [0, 1); got {sparsity}.")
    return float(sparsity)


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` or N:M (prune the N lowest of every M consecutive inputs of a row)."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """From ``unstructured`` (or empty, ``none``) or ``N:M``; one clear sentence else."""
        if isinstance(text, Pattern):
            return text
        text = str(text).strip().lower()
        if text in ("", "unstructured", "none"):
            return cls()
        n, sep, m = text.partition(":")
        if not sep or not n.isdigit() or not m.isdigit():
            raise MlpruneError(f"'{text}' is not a pattern: use unstructured, 2:4 or 4:8.")
        n_, m_ = int(n), int(m)
        if not 0 < n_ < m_:
            raise MlpruneError(f"In the pattern {text}, N must be at least 1 and smaller than M.")
        return cls(n_, m_)

    @property
    def structured(self) -> bool:
        """Whether this is an N:M pattern (its sparsity fixed at N/M)."""
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pair(pair: str) -> tuple[str, str]:
    """'fr-en' -> ('fr', 'en'), with one clear sentence for anything else."""
    parts = pair.replace(">", "-").replace("->", "-").split("-")
    parts = [p.strip() for p in parts if p.strip()]
    if len(parts) != 2:
        raise MlpruneError(f"'{pair}' is not a language pair; write it as src-tgt, e.g. fr-en.")
    if parts[0] == parts[1]:
        raise MlpruneError(f"The pair '{pair}' names the same language twice.")
    return parts[0], parts[1]


def is_mix(calibration: str) -> bool:
    """Whether a calibration name is a mix of several sets (``pooled`` or ``mix:...``)."""
    return calibration == POOLED or calibration.startswith(MIX_PREFIX)


def mix_components(calibration: str, languages: list[str] | None = None) -> list[tuple[str, float]]:
    """The sets of a mix and their weights, normalised to sum to 1.

    ``mix:fr-en=1,de-en=2,zh`` lists its parts: a pair ``src-tgt`` is translation
    demonstrations, a single language monolingual text; ``=w`` gives a weight (default 1), so
    a language distribution is written as its shares. ``pooled`` is every X->English direction
    of ``languages`` (the corpus's), equally weighted. Parts are returned by set name
    (``mt:fr-en``, ``mono:zh``).
    """
    if calibration == POOLED:
        if languages is None:
            return []  # known once the corpus is: checked then
        if "en" not in languages or len(languages) < 2:
            raise MlpruneError("The pooled calibration mix needs a corpus with English and at "
                               "least one other language.")
        sources = [x for x in languages if x != "en"]
        return [(f"mt:{x}-en", 1 / len(sources)) for x in sources]
    if not calibration.startswith(MIX_PREFIX) or not calibration[len(MIX_PREFIX):].strip():
        raise MlpruneError(f"'{calibration}' is not a calibration mix: write it as "
                           "mix:fr-en=1,de-en=1 (pairs, or single languages for monolingual "
                           "text).")
    parts: dict[str, float] = {}
    for item in calibration[len(MIX_PREFIX):].split(","):
        what, _, weight = item.strip().partition("=")
        what = what.strip()
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            w = float("nan")
        if not what or not 0 <= w < float("inf"):
            raise MlpruneError(f"'{item.strip()}' in the calibration mix is not a set with a "
                               "weight: write fr-en=1 or fr=0.5 (weights at least 0).")
        name = f"mt:{'-'.join(parse_pair(what))}" if "-" in what or ">" in what else f"mono:{what}"
        if name in parts:
            raise MlpruneError(f"The calibration mix names {what} twice.")
        parts[name] = w
    total = sum(parts.values())
    if total <= 0:
        raise MlpruneError("The weights of a calibration mix cannot all be 0.")
    return [(name, w / total) for name, w in parts.items()]


@dataclass(frozen=True)
class MWanda:
    """Which parts of M-Wanda a run uses, and the weights of its score's terms."""

    parts: frozenset[str] = frozenset(PARTS)
    variance_weight: float = 1.0  # alpha
    prob_weight: float = 1.0  # gamma

    @classmethod
    def parse(cls, parts: str, variance_weight: float = 1.0, prob_weight: float = 1.0) -> MWanda:
        """From a comma list of parts (``variance,cwl,prob``; ``none`` for none)."""
        names = {p.strip() for p in str(parts).split(",") if p.strip()} - {"none"}
        unknown = names - set(PARTS)
        if unknown:
            raise MlpruneError(f"Unknown M-Wanda part {', '.join(sorted(unknown))}: use "
                               f"{', '.join(PARTS)} (comma-separated) or none.")
        for what, value in (("variance", variance_weight), ("prob", prob_weight)):
            if not 0 <= value < math.inf:
                raise MlpruneError(f"The weight of M-Wanda's {what} term must be at least 0; "
                                   f"got {value}.")
        return cls(frozenset(names), float(variance_weight), float(prob_weight))

    def __contains__(self, part: str) -> bool:
        return part in self.parts


# --------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    """How a protocol builds prompts and shows features (:mod:`mlprune.protocol` tells how
    ``paper`` differs from ``clean``). Its pruning settings (100 samples, sequential) are a
    preset of :class:`PruneSpec`, :data:`PRESETS` ``paper``."""

    name: str
    separator: str  # what ends each demonstration line: "newline" or "eos" (the token id)
    numbering: str  # "sites": embed + each layer's output; "hidden_states": as output_hidden_states
    top_n: int  # dimensions per layer in the top-dimensions (Figure 2) view
    overlap: str  # default overlap measure: "top_in_top" or "top_in_bottom" (the paper's)
    overlap_fraction: float  # x of top-x%
    mono_per_shot: int = 2  # sentences per shot of a monolingual prompt: 2 (as long as a
    #                         translation prompt) or 1 (the authors' get_mono: `shots` sentences)
    task_sample: int | None = None  # XNLI/MARC items per language: all, or the authors' draw
    #                                 (datasets' shuffle(seed=0).select(range(1000)))
    help: str = ""  # what the command line's help and the dashboard say of it


PROTOCOLS: dict[str, Protocol] = {
    "clean": Protocol("clean", separator="newline", numbering="sites", top_n=5,
                      overlap="top_in_top", overlap_fraction=0.05,
                      help="padding excluded; calibration demonstrations end with a newline"),
    "paper": Protocol("paper", separator="eos", numbering="hidden_states", top_n=20,
                      overlap="top_in_bottom", overlap_fraction=0.4, mono_per_shot=1,
                      task_sample=1000, help="the authors' setup: demonstrations end with the "
                                             "EOS token, as their code did"),
}


def get_protocol(name: str) -> Protocol:
    """The protocol of this name, with one clear sentence for anything else."""
    if name not in PROTOCOLS:
        raise MlpruneError(f"Unknown protocol '{name}': use {' or '.join(PROTOCOLS)}.")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------- the spec


def _setting(default: Any, help: str, *, label: str | None = None, choices: Any = None,
             **cli: Any) -> Any:
    """A spec field with its help; ``label`` and ``choices`` (what a widget offers: a tuple,
    or a dict of choice -> description) for the dashboard; ``cli``: argparse extras
    (metavar...)."""
    widget = {k: v for k, v in (("label", label), ("choices", choices)) if v is not None}
    return field(default=default, metadata={"help": help, **widget, **cli})


@dataclass(frozen=True)
class PruneSpec:
    """Everything that decides a pruned model. Plain values: hashable, JSON-able, cacheable.

    This is the one place where a setting, its default, its choices and its help are written:
    the command line's flags and the dashboard's widgets are built from these fields (see
    :func:`spec_field`).
    """

    method: str = _setting("wanda", listing(METHOD_HELP), label="Method",
                           choices=METHOD_HELP)
    calibration: str = _setting(
        "mt", f"calibration set: {listing(CALIBRATION_HELP)}, written "
              f"{MIX_PREFIX}fr-en=1,de-en=1,zh=0.5 ({MIX_HELP}; samples prompts per set); "
              "m-wanda needs several languages: pooled or a mix",
        label="Calibration set", choices=CALIBRATION_HELP, metavar="SET")
    pair: str = _setting("fr-en", "language pair src-tgt of the calibration and evaluation",
                         label="Direction")
    other: str = _setting("code", "second calibration set of the ratio method")
    sparsity: float = _setting(0.5, "share of each row's weights to prune, in [0, 1); with a "
                                    "layer-adaptive allocation, the mean over layers; N:M "
                                    "patterns fix it at N/M",
                               label="Sparsity (% of each row's weights pruned)")
    pattern: str = _setting("unstructured", f"{', '.join(PATTERNS)} or any N:M (the N lowest "
                                            "of every M consecutive inputs of a row pruned)",
                            label="Pattern", choices=(*PATTERNS, OTHER_PATTERN))
    allocation: str = _setting("uniform", f"sparsity per layer: {listing(ALLOCATION_HELP)}. The "
                                          "target stays the mean over layers, weighted by "
                                          "size; unstructured only",
                               label="Per-layer sparsity", choices=ALLOCATIONS)
    allocation_range: float = _setting(0.08, "owl/cwl: OWL's lambda: the layers' sparsities "
                                             "span 2*LAMBDA, their mean the target (so one "
                                             "layer may sit up to ~2*LAMBDA from it)",
                                       label="Allocation range λ", metavar="LAMBDA")
    outlier_threshold: float = _setting(5.0, "owl: a score above M times its layer's mean "
                                             "score is an outlier (OWL's M)",
                                        label="Outlier threshold M", metavar="M")
    mwanda_parts: str = _setting("variance,cwl,prob", "m-wanda: the parts used (drop one to "
                                                      "ablate it; none: Wanda on the mix): "
                                                      f"{listing(PART_HELP)}",
                                 label="M-Wanda parts (drop one to ablate it)", choices=PARTS,
                                 metavar="PARTS")
    variance_weight: float = _setting(1.0, "m-wanda: weight of the languages' spread in the "
                                           "score (alpha)", metavar="ALPHA")
    prob_weight: float = _setting(1.0, "m-wanda: weight of the activation probability in the "
                                       "score (gamma)", metavar="GAMMA")
    invert: bool = _setting(False, "prune the highest scores instead (the paper's ablation)",
                            label="Invert (prune the highest scores)")
    protect: str | None = _setting(None, "never prune the input columns of detected "
                                         "large-magnitude dims, found by a rule: top-k:8, "
                                         "ratio:100 or absolute:500",
                                   label="Protect detected features")
    layers: str | None = _setting(None, "layer range to prune, e.g. 0-11",
                                  label="Layers to prune")
    blocks: str | None = _setting(None, "module kinds to prune: attn, mlp or attn,mlp",
                                  label="Modules", choices=BLOCKS)
    mode: str = _setting("sequential", listing(MODE_HELP), label="Calibration mode",
                         choices=MODES)
    shots: int = _setting(4, "demonstrations per calibration prompt",
                          label="Shots per calibration prompt")
    samples: int = _setting(16, "calibration prompts", label="Calibration prompts")
    seed: int = _setting(0, "seed of the demonstration draws and of random pruning",
                        label="Seed")
    protocol: str = _setting("clean", listing({p.name: p.help for p in PROTOCOLS.values()}),
                             label="Protocol", choices=tuple(PROTOCOLS))
    pad_to: int | None = _setting(None, "pad every calibration prompt to N tokens and count "
                                        "the padding, as the authors' code did (a bug; off)",
                                  metavar="N")
    pad_side: str = _setting("tokenizer", "with --pad-to: where the padding goes: tokenizer "
                                          "(its own padding_side, as the authors' code padded: "
                                          "left for BLOOM and Llama), left or right",
                             metavar="SIDE")

    def validate(self) -> PruneSpec:
        """Check every field; returns the spec (one clear sentence for anything wrong)."""
        if self.method not in METHODS:
            raise MlpruneError(f"Unknown method '{self.method}': use {', '.join(METHODS)}.")
        if self.mode not in MODES:
            raise MlpruneError(f"Unknown mode '{self.mode}': use one-shot or sequential.")
        pattern = Pattern.parse(self.pattern)
        if not pattern.structured:
            check_sparsity(self.sparsity)
        self._check_allocation(pattern)
        self._check_ranges()
        parse_pair(self.pair)
        for name in (self.calibration, self.other):
            if is_mix(name):
                mix_components(name)  # the syntax; the languages are checked with the corpus
            elif name not in CALIBRATIONS:
                raise MlpruneError(f"Unknown calibration set '{name}': use "
                                   f"{', '.join(CALIBRATIONS)}, pooled or a mix such as "
                                   "mix:fr-en=1,de-en=1.")
        if self.samples < 1:
            raise MlpruneError("The number of samples must be at least 1.")
        get_protocol(self.protocol)
        if self.pad_to is not None and self.pad_to < 1:
            raise MlpruneError(f"--pad-to must be a positive number of tokens; got {self.pad_to}.")
        if self.pad_side not in PAD_SIDES:
            raise MlpruneError(f"Unknown padding side '{self.pad_side}': use "
                               f"{', '.join(PAD_SIDES)}.")
        return self

    def _check_allocation(self, pattern: Pattern) -> None:
        """The allocation, M-Wanda's parts and the calibration they need, against each other
        and the pattern (a fixed N:M pattern cannot prune layers unevenly)."""
        if self.allocation not in ALLOCATIONS:
            raise MlpruneError(f"Unknown allocation '{self.allocation}': use "
                               f"{', '.join(ALLOCATIONS)}.")
        if self.allocation != "uniform" and pattern.structured:
            raise MlpruneError(f"The {self.allocation} allocation prunes layers unevenly, which "
                               f"the fixed {pattern} pattern cannot: use unstructured sparsity "
                               "or the uniform allocation.")
        mwanda = self.mwanda  # checks the parts and weights
        if self.method == "m-wanda" or self.allocation == "cwl":
            if not is_mix(self.calibration):
                what = "The m-wanda method" if self.method == "m-wanda" else "The cwl allocation"
                raise MlpruneError(f"{what} compares languages: calibrate on a mix, e.g. "
                                   "--calibration pooled.")
        if self.method == "m-wanda" and "cwl" in mwanda and self.allocation == "owl":
            raise MlpruneError("M-Wanda's cwl part sets the per-layer sparsity: drop cwl from "
                               "--mwanda-parts to use the owl allocation.")
        if self.layer_allocation != "uniform" and pattern.structured:
            raise MlpruneError(f"M-Wanda's cwl part prunes layers unevenly, which the fixed "
                               f"{pattern} pattern cannot: use unstructured sparsity or drop cwl "
                               "from --mwanda-parts.")

    def _check_ranges(self) -> None:
        """OWL's lambda and M within their ranges."""
        if not 0 <= self.allocation_range <= 0.5:
            raise MlpruneError("The allocation range must be between 0 and 0.5; got "
                               f"{self.allocation_range}.")
        if self.outlier_threshold <= 0:
            raise MlpruneError(f"The outlier threshold must be above 0; got "
                               f"{self.outlier_threshold}.")

    @property
    def separator(self) -> str:
        """How demonstrations are separated under this spec's protocol."""
        return get_protocol(self.protocol).separator

    @classmethod
    def preset(cls, name: str, **changes) -> PruneSpec:
        """A named starting point (see :data:`PRESETS`) with ``changes`` on top, validated."""
        if name not in PRESETS:
            raise MlpruneError(f"Unknown preset '{name}': use {', '.join(PRESETS)}.")
        return replace(cls(), **{**PRESETS[name], **changes}).validate()

    @property
    def uses_activations(self) -> bool:
        """Whether the method's scores read calibration statistics (Wanda and its variants)."""
        return self.method in ACTIVATION_METHODS

    @property
    def mwanda(self) -> MWanda:
        """M-Wanda's parts and weights under this spec."""
        return MWanda.parse(self.mwanda_parts, self.variance_weight, self.prob_weight)

    @property
    def layer_allocation(self) -> str:
        """How sparsity is shared across layers: M-Wanda's cwl when its cwl part is on, else
        the ``allocation`` field."""
        if self.method == "m-wanda" and "cwl" in self.mwanda:
            return "cwl"
        return self.allocation

    @property
    def needs_calibration(self) -> bool:
        """Whether a run must capture calibration prompts: for the scores, or to detect the
        features that ``protect`` keeps."""
        return self.uses_activations or bool(self.protect)

    @property
    def label(self) -> str:
        """A short name of the method and what sets it apart, e.g. ``wanda-mt-owl``."""
        calib = f"-{self.calibration}" if self.method in ("wanda",) else ""
        alloc = f"-{self.allocation}" if self.allocation != "uniform" else ""
        if self.method == "m-wanda":
            parts = set(self.mwanda.parts)
            alloc = "" if parts == set(PARTS) else f"[{','.join(sorted(parts)) or 'none'}]"
            alloc += f"-{self.allocation}" if self.allocation == "owl" else ""
        return f"{self.method}{calib}{alloc}{'-inv' if self.invert else ''}"


def spec_field(name: str) -> dict[str, Any]:
    """PruneSpec's field ``name``: its ``default`` and its metadata (``help``; ``label`` and
    ``choices`` where the dashboard shows it; argparse extras such as ``metavar``)."""
    found = {f.name: f for f in fields(PruneSpec)}
    if name not in found:
        raise MlpruneError(f"PruneSpec has no field '{name}'.")
    return {"default": found[name].default, **found[name].metadata}


# Named presets: what differs from the field defaults above, written once. The dashboard's
# live pages use ``interactive`` (one-shot statistics: a slider move is then a slice of one
# ranking; 8 prompts keep the first capture short); the command line can ask for any.
PRESETS: dict[str, dict] = {
    "default": {},
    "interactive": {"mode": "one-shot", "samples": 8},
    # the authors' published setup (prune.sh: 100 samples, 4 shots; Wanda's sequential pass)
    "paper": {"protocol": "paper", "samples": 100, "mode": "sequential"},
}
PRESET_HELP = {"default": "the defaults above", "interactive": "one-shot, as the dashboard",
               "paper": "the authors' setup: --protocol paper, 100 samples, sequential"}


# --------------------------------------------------------------------------- sweeps

# A sweep's methods: each the PruneSpec fields it sets on the sweep's base spec.
SWEEP_METHODS = {
    "wanda-mt": dict(method="wanda", calibration="mt"),
    "wanda-mono": dict(method="wanda", calibration="mono"),
    "wanda-code": dict(method="wanda", calibration="code"),
    "ratio": dict(method="ratio", calibration="mt", other="code"),
    "magnitude": dict(method="magnitude"),
    "random": dict(method="random"),
    # beyond the paper: a mix of every X->en direction, OWL's per-layer sparsity, M-Wanda
    # and M-Wanda with each of its parts left out
    "wanda-pooled": dict(method="wanda", calibration="pooled"),
    "wanda-owl": dict(method="wanda", calibration="mt", allocation="owl"),
    "m-wanda": dict(method="m-wanda", calibration="pooled", mwanda_parts=",".join(PARTS)),
    **{f"m-wanda-no-{part}": dict(method="m-wanda", calibration="pooled",
                                  mwanda_parts=",".join(p for p in PARTS if p != part))
       for part in PARTS},
}


@dataclass(frozen=True)
class SweepSpec:
    """A sweep's grid: every method x sparsity x pair. A cell (pair, method) is the base spec
    with the method's :data:`SWEEP_METHODS` settings, unstructured and one-shot (so one
    ranking serves every sparsity). Sequences given are kept as tuples."""

    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    pairs: tuple[str, ...]
    base: PruneSpec = field(default_factory=PruneSpec)

    PATTERN = "unstructured"  # every cell's
    MODE = "one-shot"

    def __post_init__(self) -> None:
        for name in ("methods", "sparsities", "pairs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> SweepSpec:
        """Check the whole grid before any cell runs (one clear sentence for bad input)."""
        if not self.methods or not self.sparsities or not self.pairs:
            raise MlpruneError("Pick at least one method, one sparsity and one direction.")
        unknown = [m for m in self.methods if m not in SWEEP_METHODS]
        if unknown:
            raise MlpruneError(f"Unknown sweep method {', '.join(unknown)}: use "
                               f"{', '.join(SWEEP_METHODS)}.")
        for s in self.sparsities:
            check_sparsity(s)
        for pair in self.pairs:
            parse_pair(pair)
        self.base.validate()
        return self

    @property
    def size(self) -> int:
        """How many rows the grid has."""
        return len(self.methods) * len(self.sparsities) * len(self.pairs)

    def cell(self, pair: str, method: str) -> PruneSpec:
        """The validated spec of the cell (pair, method)."""
        return replace(self.base, pair=pair, mode=self.MODE, pattern=self.PATTERN,
                       **SWEEP_METHODS[method]).validate()

    @staticmethod
    def cell_fields() -> set[str]:
        """The PruneSpec fields a cell sets itself (the rest come from the base spec)."""
        return {"pair", "sparsity", "pattern", "mode",
                *(k for settings in SWEEP_METHODS.values() for k in settings)}
