"""The ``mlprune`` command's parser: one builder per sub-command, and PruneSpec's fields as
flags.

A command's spec flags are built from :class:`~mlprune.spec.PruneSpec`'s field metadata
(help, metavar, type; the help ends with the spec's default), so a setting's help is written
once, in :mod:`mlprune.spec`. Such flags default to None ("not given"): :func:`spec_from_args`
lays what was given over a preset.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import get_args, get_type_hints

from mlprune.cli.commands import cmd_analyze, cmd_compare, cmd_eval, cmd_prune
from mlprune.cli.grids import cmd_intervene, cmd_reproduce, cmd_sweep, cmd_verdict
from mlprune.spec import PRESET_HELP, PruneSpec, listing

DESCRIPTION = "The ``mlprune`` command: analyze, prune, eval, compare, sweep, reproduce, intervene."
CORPUS_HELP = "corpus file (.tsv/.csv/.jsonl), 'builtin' (default) or 'flores:dev'"
# Every PruneSpec field is a flag of `mlprune prune`; the other commands take the few they use.
PRUNE_FIELDS = tuple(f.name for f in fields(PruneSpec))


def _flag_type(name: str) -> type:
    """The type a PruneSpec field's flag converts to: the field's, None left out."""
    hint = get_type_hints(PruneSpec)[name]
    return next((a for a in get_args(hint) if a is not type(None)), hint)


def add_spec_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """One flag per named PruneSpec field, its type, help and default read from the spec.

    Flags default to None ("not given"), so :func:`spec_from_args` can lay what was given
    over a preset; the help shows the spec's own default."""
    spec_fields = {f.name: f for f in fields(PruneSpec)}
    for name in names:
        f = spec_fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.default is False:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(name), default=None, help=help_text,
                                metavar=f.metadata.get("metavar"))
    parser.add_argument("--preset", default=None,
                        help=f"start from a named preset: {listing(PRESET_HELP)}; flags given "
                             "override it")
    parser.set_defaults(spec_fields=names)


def spec_from_args(args: argparse.Namespace) -> PruneSpec:
    """The run's PruneSpec: the preset (``--protocol paper`` implies the paper preset), with
    every flag the user gave on top. Fills the namespace with the spec's values."""
    names = getattr(args, "spec_fields", ())
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    preset = getattr(args, "preset", None) or ("paper" if given.get("protocol") == "paper"
                                               else "default")
    spec = PruneSpec.preset(preset, **given)
    for name in names:
        setattr(args, name, getattr(spec, name))
    return spec


def build_parser() -> argparse.ArgumentParser:
    """The ``mlprune`` parser, its sub-commands in the order ``mlprune --help`` lists them."""
    p = argparse.ArgumentParser(prog="mlprune", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_analyze_parser, _prune_parser, _eval_parser, _compare_parser, _sweep_parser,
                _reproduce_parser, _verdict_parser, _intervene_parser):
        add(sub)
    return p


def _common_arguments(sp: argparse.ArgumentParser, corpus: bool = True, spec: bool = True) -> None:
    """The model's flags (and the corpus's, and the calibration prompts' spec fields) that most
    commands take."""
    sp.add_argument("--model", default=None,
                    help="hub id, model folder, .gguf file; default: embedded Gemma 3 270M")
    sp.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as saved)")
    sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    sp.add_argument("--device-map", default=None, metavar="MAP",
                    help="place a model larger than one device with accelerate: auto, "
                         "balanced, sequential, or a JSON {module: device}; weights that do "
                         "not fit go to the CPU, then disk, and run one layer at a time")
    sp.add_argument("--max-memory", default=None, metavar="CAPS",
                    help="with --device-map: memory each device may take, e.g. "
                         "0=20GiB,cpu=60GiB or cpu=200MB")
    sp.add_argument("--offload-folder", default=None, metavar="DIR",
                    help="with --device-map: where weights offloaded to disk go")
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="run code shipped with a hub model (off unless you ask)")
    sp.add_argument("--allow-pickle", action="store_true",
                    help="also read pickle weights (.bin/.pt) when a model has no "
                         "safetensors; pickle can run code: only for files you trust")
    sp.add_argument("--batch-size", type=int, default=8)
    if corpus:
        sp.add_argument("--corpus", default="builtin", help=CORPUS_HELP)
    if spec:
        add_spec_arguments(sp, ("shots", "samples", "seed", "protocol", "pad_to", "pad_side")
                           if corpus else ("seed",))


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune analyze``: large-magnitude features while the model translates."""
    a = sub.add_parser("analyze", help="find large-magnitude features while the model translates")
    _common_arguments(a)
    a.add_argument("--pair", action="append", default=[], help="src-tgt, repeatable")
    a.add_argument("--mono", action="append", default=[], help="monolingual language, repeatable")
    a.add_argument("--rule", default="ratio:100", help="top-k:8, ratio:100 or absolute:500")
    a.add_argument("--top", type=int, default=None,
                   help="dimensions shown per layer (default: 5; 20 under --protocol paper)")
    a.add_argument("--overlap-fraction", type=float, default=None, metavar="X",
                   help="overlaps compare the top X of dimensions (in (0, 0.5]; default 0.05; "
                        "0.4 under --protocol paper, as the authors' code)")
    a.add_argument("--json", help="write the per-layer analysis here")
    a.add_argument("--figure", help="write the per-layer top-dimension figure (.html or .png)")
    a.set_defaults(func=cmd_analyze)


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune prune``: every PruneSpec field a flag, and where the export goes."""
    from mlprune.export import FORMATS

    pr = sub.add_parser("prune", help="prune and export a model")
    _common_arguments(pr, spec=False)
    add_spec_arguments(pr, PRUNE_FIELDS)
    pr.add_argument("--eval", type=int, default=0, metavar="N",
                    help="also evaluate on N held-out sentences and store it in the report")
    pr.add_argument("--out", required=True)
    pr.add_argument("--format", choices=FORMATS, default="hf",
                    help="hf: dense safetensors any from_pretrained reads (default); "
                         "compressed-tensors: llm-compressor's sparse format (2:4 bitmask for "
                         "2:4), needs pip install 'mlprune[deploy]'")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace --out if it holds an earlier mlprune export (any other "
                         "non-empty folder is refused and left as it is)")
    pr.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                    help="save each finished layer here (the sequential pass's statistics "
                         "and masks; every ranking's row orders, in DIR/ranking) and resume "
                         "from what is there (a run stopped at layer 40 of 80 goes on at 41)")
    pr.set_defaults(func=cmd_prune)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune eval``: translation, zero-shot tasks or lm-eval benchmarks."""
    e = sub.add_parser(
        "eval", help="few-shot translation (chrF, BLEU, language, perplexity) or zero-shot tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Few-shot translation by default (with --pruned: both models on the same "
                    "held-out sentences and sacrebleu's paired test of chrF and BLEU). With "
                    "--task: zero-shot multiple choice (accuracy per language, RankC consistency "
                    "with English, the smallest difference detectable at that size; with "
                    "--pruned, dense vs pruned with a paired bootstrap). With --lm-eval: run "
                    "lm-evaluation-harness on a model folder (needs 'pip install lm-eval' and "
                    "a reachable Hugging Face hub, which serves the benchmarks' data). "
                    "Under --protocol paper, XNLI and MARC are cut to the authors' draw of "
                    "1000 items per language (datasets' shuffle(seed=0), first 1000), then "
                    "to --limit.",
        epilog="task sources (--task, repeatable):\n"
               "  nli, sentiment        the built-in tasks\n"
               "  FILE.jsonl            items {id, lang, prompt, choices, label}\n"
               "  xnli:PATH             XNLI with the paper's template: XNLI-1.0's xnli.test.tsv,\n"
               "                        or rows {premise, hypothesis, label, lang} (.jsonl, .json,\n"
               "                        .csv, .parquet; a folder of fr.jsonl, de.jsonl ... works)\n"
               "  marc:PATH             MARC with the paper's template: amazon_reviews_multi JSON\n"
               "                        lines {review_id, stars, review_body, language}, or rows\n"
               "                        {id, lang, review, label 0/1 or stars}\n"
               "  xnli, marc            the same from the hub via 'datasets' (test split)\n"
               "  FILE --template T     records of FILE rendered with template xnli or marc\n"
               "\n"
               "examples:\n"
               "  mlprune eval --task nli --task sentiment --limit 40\n"
               "  mlprune eval --task xnli:XNLI-1.0/xnli.test.tsv --langs en,fr,sw --limit 200\n"
               "  mlprune eval --task reviews.jsonl --template marc --pruned runs/wanda-mt-50\n"
               "  mlprune eval --pair fr-en --limit 40 --pruned runs/wanda-mt-50\n"
               "  mlprune eval --lm-eval xnli,xcopa --langs fr,sw --pruned runs/wanda-mt-50\n"
               "  mlprune eval --lm-eval pawsx --pruned runs/wanda-mt-50 --dry-run")
    _common_arguments(e)
    e.add_argument("--pair", default="fr-en")
    e.add_argument("--limit", type=int, default=None,
                   help="held-out sentences; with --task items per language (at least 1); "
                        "with --lm-eval examples per lm-eval task")
    e.add_argument("--json", help="write the metrics here (strict JSON: undefined values null)")
    e.add_argument("--task", action="append", default=[],
                   help="zero-shot task source (repeatable; see below)")
    e.add_argument("--template", default=None, choices=("xnli", "marc"),
                   help="render each --task FILE's records with the paper's XNLI or MARC "
                        "template")
    e.add_argument("--pruned", "--compare-to", dest="pruned", default=None, metavar="DIR",
                   help="also evaluate this model (e.g. an mlprune export) and test the "
                        "difference; with --lm-eval: the model to evaluate")
    e.add_argument("--langs", default=None, help="languages to keep, e.g. en,fr,sw")
    e.add_argument("--norm", default="token", choices=("token", "byte", "none"),
                   help="score of a choice: log-likelihood per token (default), per byte, or "
                        "summed (none)")
    e.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (--task)")
    e.add_argument("--paired-test", default="bs", choices=("bs", "ar"),
                   help="translation with --pruned: sacrebleu's paired bootstrap (bs, default) "
                        "or approximate randomization (ar); seed 12345 + --seed")
    e.add_argument("--lm-eval", default=None, metavar="BENCHMARKS",
                   help="xnli, xstorycloze, xcopa and/or pawsx (comma-separated), zero-shot "
                        "through lm-evaluation-harness")
    e.add_argument("--lm-eval-out", default="lm_eval_results",
                   help="folder where lm-eval writes its results")
    e.add_argument("--dry-run", action="store_true",
                   help="with --lm-eval: print the lm_eval command instead of running it")
    e.set_defaults(func=cmd_eval)


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune compare``: dense and pruned generations side by side."""
    c = sub.add_parser("compare", help="dense and pruned generations side by side")
    _common_arguments(c)
    c.add_argument("--pruned", required=True, help="folder written by mlprune prune")
    c.add_argument("--prompt", default=None)
    c.add_argument("--pair", default="fr-en")
    c.add_argument("--limit", type=int, default=5)
    c.set_defaults(func=cmd_compare)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune sweep``: the grid, where its rows go and where its cells run."""
    s = sub.add_parser("sweep", help="methods x sparsities x pairs -> CSV and figure")
    _common_arguments(s)
    s.add_argument("--methods", default="wanda-mt,wanda-mono,magnitude,random")
    s.add_argument("--sparsities", default="0,0.1,0.2,0.3,0.4,0.5")
    s.add_argument("--pair", action="append", default=[])
    s.add_argument("--limit", type=int, default=16, help="held-out sentences per point")
    s.add_argument("--csv", default=None,
                   help="results CSV, appended row by row (resumable; default sweep.csv); "
                        "with --store, a CSV export written at the end")
    s.add_argument("--store", default=None, metavar="PATH",
                   help="results store (.sqlite or .db): one transaction per measured row, "
                        "resumable, safe for many workers at once; the dashboard's Sweep page "
                        "opens it")
    s.add_argument("--runner", default="local", choices=("local", "process", "ray"),
                   help="where the cells run: local (this process, the default), process (a "
                        "worker process with its own copy of the model) or ray (one Ray task "
                        "per method and pair, a GPU each where the cluster has GPUs; "
                        "RAY_ADDRESS names a cluster, else Ray starts here; pip install "
                        "'mlprune[ray]'). Without --store, the non-local runners commit to "
                        "sweep.sqlite beside the CSV")
    s.add_argument("--figure", default=None, help="chrF against sparsity (.html or .png)")
    s.add_argument("--task", action="append", default=[],
                   help="also score a zero-shot task per row: nli, sentiment or a JSONL file "
                        "(repeatable); adds accuracy per language, the non-English mean, "
                        "RankC with English and the difference from dense with its p-value")
    s.add_argument("--task-limit", type=int, default=None, help="items per language per task")
    s.add_argument("--norm", default="token", choices=("token", "byte", "none"),
                   help="zero-shot choice score: per token (default), per byte, or summed")
    s.set_defaults(func=cmd_sweep)


def _reproduce_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune reproduce``: the paper's grid and what to change in it."""
    r = sub.add_parser(
        "reproduce", help="the paper's experiment grid on a model -> report (Markdown, HTML, JSON)",
        description="Runs the paper's grid under the paper protocol: Figure 2 (top dimensions "
                    "per layer), Figures 1 and 3 (overlaps), Table 1 (translation at 50%% and 2:4 "
                    "with significance against wanda-mono), zero-shot accuracy per language with "
                    "paired bootstraps, RankC, the inverted ablation and a claims table. Each "
                    "measured cell is kept in OUT/cells: run it again to resume.")
    _common_arguments(r, spec=False)
    r.add_argument("--out", default="reproduce", help="report folder (resumes what is there)")
    r.add_argument("--quick", action="store_true",
                   help="a small grid (under 20 min on 2 cores for the embedded model)")
    r.add_argument("--pair", default=None, help="calibration and translation pair (default fr-en)")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--task", action="append", default=[],
                   help="add a zero-shot task to the grid and the claims (JSONL file, built-in "
                        "name, xnli:PATH or marc:PATH); repeatable. For seeds, sparsities and "
                        "languages with statistics: mlprune verdict --task FILE")
    r.add_argument("--translation-limit", type=int, default=None, metavar="N",
                   help="held-out sentences translated per variant")
    r.add_argument("--task-limit", type=int, default=None, metavar="N",
                   help="zero-shot items per language (0: all; default 40, quick 20)")
    r.add_argument("--samples", type=int, default=None, metavar="N",
                   help="calibration prompts per pruned variant (default 16, quick 8; the "
                        "paper's: 100)")
    r.add_argument("--patterns", default=None, metavar="LIST",
                   help="sparsity patterns of the pruned variants, e.g. 0.5,2:4 (the default)")
    r.add_argument("--analysis-samples", type=int, default=None, metavar="N",
                   help="prompts per analysis set (default 16, quick 8)")
    r.add_argument("--beyond", default=None, metavar="LIST",
                   help="also measure variants beyond the paper at 50%% unstructured, each "
                        "tested against wanda-mt too: wanda-pooled (every X-en direction), "
                        "wanda-owl (OWL's per-layer sparsity), m-wanda, m-wanda-no-variance, "
                        "m-wanda-no-cwl, m-wanda-no-prob, or all (default: none)")
    r.set_defaults(func=cmd_reproduce)


def _verdict_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune verdict``: the verdict grid and what to change in it."""
    vd = sub.add_parser(
        "verdict", help="the paper's headline claim with seeds and power: pruned vs dense and "
                        "wanda-mt vs wanda-mono across sparsities and languages -> report",
        description="Runs the verdict grid (see mlprune/verdict.py): the sparsity curve of "
                    "wanda-mt and wanda-mono per calibration language and seed, evaluated in "
                    "that language on every task item; variants at 50%% in every language; "
                    "the paper's protocol; translation. Each cell is kept in OUT/cells: run it "
                    "again to resume. The claims table tests each claim with a bootstrap over "
                    "seeds and items.")
    _common_arguments(vd, spec=False)
    vd.set_defaults(batch_size=16)
    vd.add_argument("--out", default=None,
                    help="cells and report folder (default: bench/results/verdict)")
    vd.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    vd.add_argument("--langs", default=None, metavar="LIST", help="e.g. fr,zh,ru,sw")
    vd.add_argument("--seeds", default=None, metavar="LIST", help="e.g. 0,1,2")
    vd.add_argument("--sparsities", default=None, metavar="LIST", help="e.g. 0.1,0.2,0.3,0.5")
    vd.add_argument("--task", action="append", default=[],
                    help="add a zero-shot task (JSONL file or built-in name); repeatable")
    vd.add_argument("--task-limit", type=int, default=None, metavar="N",
                    help="items per language (0 or default: all)")
    vd.add_argument("--phases", default=None, metavar="LIST",
                    help="only these phases: dense,curve,wide,paper,translation")
    vd.add_argument("--status", action="store_true", help="print what the folder holds; no run")
    vd.add_argument("--report-only", action="store_true",
                    help="rebuild the report from the cells; no model")
    vd.set_defaults(func=cmd_verdict)


def _intervene_parser(sub: argparse._SubParsersAction) -> None:
    """``mlprune intervene``: which dims, where, how, and the controls."""
    iv = sub.add_parser(
        "intervene", help="zero, mean-set, scale or LRP2-shift residual dims while translating; "
                          "against a random-dims control, with significance",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Act on chosen residual dimensions at chosen layers while the model "
                    "translates the held-out slice (and scores zero-shot tasks): set them to "
                    "zero, to their calibration mean, scale them, or add LRP2's language vector. "
                    "Runs dense, intervened and the same intervention on as many random "
                    "ordinary dims (and wanda-mt with --compare-prune); reports chrF/BLEU with "
                    "sacrebleu's paired test and accuracy per language with a paired bootstrap.",
        epilog="examples:\n"
               "  mlprune intervene --kind zero --detect top-k:4 --limit 40\n"
               "  mlprune intervene --kind scale --factor 0.5 --layers 0-5 --dims 12,301\n"
               "  mlprune intervene --kind mean --task wordorder --task completion --task-limit 20\n"
               "  mlprune intervene --kind lrp2 --layers 3,12 --compare-prune 0.5 --out runs/lrp2")
    _common_arguments(iv, spec=False)
    add_spec_arguments(iv, ("shots", "samples", "seed"))
    iv.add_argument("--pair", default="fr-en", help="held-out direction and calibration prompts")
    iv.add_argument("--kind", default="zero", choices=("zero", "mean", "scale", "lrp2"),
                    help="what to do to the dims (default zero)")
    iv.add_argument("--factor", type=float, default=None,
                    help="--kind scale: multiply by this (below 1 weakens, above 1 amplifies)")
    iv.add_argument("--layers", default=None, metavar="LIST",
                    help="layer outputs to act on: 0-11, 3,9 or embed,0-3 (default: all; lrp2: "
                         "one layer to project to English, or two: project, then back; "
                         "default a quarter and three quarters of the depth)")
    iv.add_argument("--dims", default=None, metavar="LIST",
                    help="these dims at every chosen layer, e.g. 12,301 (default: detect)")
    iv.add_argument("--detect", default="top-k:4", metavar="RULE",
                    help="pick each layer's dims by this rule on the calibration statistics: "
                         "top-k:4 (default), ratio:100, absolute:500; with --dims, the dims the "
                         "control never draws")
    iv.add_argument("--control", default="random", choices=("random", "none"),
                    help="also run the same intervention on random ordinary dims (default)")
    iv.add_argument("--limit", type=int, default=16, help="held-out sentences (default 16)")
    iv.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                    help="tokens per translation at most (it stops at the end of the line)")
    iv.add_argument("--task", action="append", default=[],
                    help="zero-shot task: wordorder, completion, nli, sentiment or a JSONL "
                         "file (repeatable)")
    iv.add_argument("--task-limit", type=int, default=20, metavar="N",
                    help="items per language per task (0: all; default 20)")
    iv.add_argument("--compare-prune", type=float, default=None, metavar="SPARSITY",
                    help="also prune wanda-mt (translation calibration) at this sparsity")
    iv.add_argument("--lrp2-samples", type=int, default=100, metavar="N",
                    help="sentences per LRP2 language vector (the authors': 100)")
    iv.add_argument("--resamples", type=int, default=2000, help="zero-shot bootstrap resamples")
    iv.add_argument("--out", default=None,
                    help="a folder (report.json, report.md, and cells.json to resume from) or "
                         "a .json file")
    iv.set_defaults(func=cmd_intervene)
