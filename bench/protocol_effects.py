"""What each difference between the clean and the paper protocol changes, on one model.

For every difference alone, prune at 50% unstructured and report:
- mask agreement with the clean protocol: the share of the clean run's pruned weights that
  this run prunes too (1.0 = the same masks);
- chrF and BLEU of fr->en few-shot translation on the held-out slice, with sacrebleu's paired
  bootstrap p-value against the clean run's outputs on the same sentences.
And whether the "not translation-specific" finding (the large dimensions are the same while
translating and while reading) survives EOS separators: top-5% overlaps, translating vs reading.

    python bench/protocol_effects.py [--limit 40] [--out bench/results/protocol_effects.json]
                                     [--paper-masks reproduce/masks/wanda-mt_50_.safetensors]
                                     [--only left]

The authors' padding is measured on both sides: on the right (as XGLM's and mGPT's tokenizers
pad) and on the left (as BLOOM's and Llama's do, and the embedded Gemma's), where every real
token follows 400-odd padding tokens it attends to, with no mask. ``--only TEXT`` measures
only the runs whose label holds TEXT (and the clean run they are compared with), and skips the
overlap section; ``--limit 4 --only left --out /tmp/check.json`` is a quick check that a run
works. A saved row measured on another number of sentences is measured again.

Each run's row (with its outputs) is saved as soon as it is measured, and its masks under
MLPRUNE_CACHE/protocol_effects, so an interrupted run resumes; a row saved without outputs (by
an older version) is evaluated again from its masks. The paper protocol's own masks (EOS, 100 prompts, sequential) come
from a `mlprune reproduce` run (`--paper-masks`), which calibrates on the same pair. Prints a
Markdown table (the README's) and writes strict JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlprune.capture import capture
from mlprune.corpus import builtin_corpus
from mlprune.evaluate import evaluate_translation, paired_translation_test
from mlprune.export import atomic_write_text
from mlprune.features import overlap_matrix, top_dims
from mlprune.models import cache_dir, load_model
from mlprune.pipeline import PruneSpec, cached_masks
from mlprune.prompts import monolingual_prompts, translation_prompts
from mlprune.prune import MaskSet, pruned

RUNS = {
    "clean (newline, 16 prompts, sequential)": PruneSpec(),
    "EOS-separated demonstrations": PruneSpec(protocol="paper"),
    "one-shot instead of sequential": PruneSpec(mode="one-shot"),
    "prompts padded to 512 on the right, padding counted": PruneSpec(pad_to=512,
                                                                    pad_side="right"),
    "100 calibration prompts": PruneSpec(samples=100),
    # appended, so the runs above keep their cached masks' file numbers
    "prompts padded to 512 on the left, padding counted": PruneSpec(pad_to=512, pad_side="left"),
}
# rows saved under an earlier label (every --pad-to run was right-padded then)
RENAMED = {"prompts padded to 512, padding counted":
           "prompts padded to 512 on the right, padding counted"}


def agreement(a, b) -> float:
    """Share of a's pruned weights that b prunes too."""
    common = total = 0
    for name in a.pruned_cols:
        pa, pb = ~a.keep(name), ~b.keep(name)
        common += int((pa & pb).sum())
        total += int(pa.sum())
    return common / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=40, help="held-out sentences (40 = all)")
    ap.add_argument("--out", default="bench/results/protocol_effects.json")
    ap.add_argument("--paper-masks", default=None,
                    help="masks of the paper protocol's wanda-mt 50%% (from mlprune reproduce)")
    ap.add_argument("--only", default=None, metavar="TEXT",
                    help="measure only the runs whose label holds TEXT (e.g. left), beside the "
                         "clean run, and skip the overlap section")
    args = ap.parse_args()
    loaded = load_model(None)
    corpus = builtin_corpus()
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    rows = {RENAMED.get(r["run"], r["run"]): {**r, "run": RENAMED.get(r["run"], r["run"])}
            for r in saved.get("runs", [])}
    folder = cache_dir() / "protocol_effects"
    folder.mkdir(parents=True, exist_ok=True)
    runs = {label: (spec, None) for label, spec in RUNS.items()}
    if args.paper_masks:
        runs["paper (EOS, 100 prompts, sequential)"] = (PruneSpec.preset("paper"),
                                                         MaskSet.load(args.paper_masks))
    clean_path = folder / "0.safetensors"
    clean_label = next(iter(runs))
    for i, (label, (spec, given)) in enumerate(runs.items()):
        done = rows.get(label, {})
        if "outputs" in done and done.get("limit", 40) == args.limit and clean_path.is_file():
            continue
        if args.only and i > 0 and args.only not in label:
            continue
        t = time.perf_counter()
        masks_path = clean_path if i == 0 else folder / f"{i}.safetensors"
        masks = given if given is not None else cached_masks(loaded, corpus, spec, masks_path)
        with pruned(loaded.model, masks):
            ev = evaluate_translation(loaded.model, loaded.tokenizer, corpus, "fr", "en",
                                      limit=args.limit)
        outputs = [o["output"] for o in ev["outputs"]]
        row = {"run": label, "spec": dict(vars(spec)), "limit": args.limit,
               "mask_agreement": agreement(MaskSet.load(clean_path), masks),
               "chrf": ev["chrf"], "bleu": ev["bleu"], "n": ev["n"],
               "target_language_rate": ev["target_language_rate"],
               "seconds": rows.get(label, {}).get("seconds") or round(time.perf_counter() - t, 1),
               "references": [o["reference"] for o in ev["outputs"]], "outputs": outputs}
        if label != clean_label:  # sacrebleu's paired bootstrap against the clean run's outputs
            clean = rows[clean_label]
            test = paired_translation_test(clean["references"], clean["outputs"], outputs)
            row.update(chrf_p_vs_clean=test["chrf"]["p_value"],
                       bleu_p_vs_clean=test["bleu"]["p_value"])
        rows[label] = row
        save(out, loaded, list(rows.values()), saved.get("translation_specific"))
        print(f"{label}: agreement {row['mask_agreement']:.3f}, chrF {ev['chrf']:.1f}, "
              f"{row['seconds']} s", file=sys.stderr, flush=True)
    rows = list(rows.values())
    if args.only:
        print_table(loaded, rows, saved.get("translation_specific") or {})
        return

    specific = {}
    for sep in ("newline", "eos"):
        kw = dict(shots=4, samples=16, seed=0, separator=sep)
        sets = {"mt:fr-en": translation_prompts(corpus, "fr", "en", **kw),
                "mono:fr": monolingual_prompts(corpus, "fr", **kw),
                "mono:en": monolingual_prompts(corpus, "en", **kw)}
        stats = {k: capture(loaded.model, loaded.tokenizer, v) for k, v in sets.items()}
        m = overlap_matrix(stats, 0.05, "top_in_top", numbering="hidden_states")
        tops = {k: [(layer["layer"], layer["top"][0]["dim"], round(layer["top"][0]["ratio_to_median"]))
                    for layer in top_dims(s, 1, "hidden_states")["layers"]] for k, s in stats.items()}
        specific[sep] = {"top5_overlap_mt_vs_mono_fr": float(m.loc["mt:fr-en", "mono:fr"]),
                         "top5_overlap_mt_vs_mono_en": float(m.loc["mt:fr-en", "mono:en"]),
                         "largest_dim_per_layer": tops}

    print_table(loaded, rows, specific)
    save(out, loaded, rows, specific)


def print_table(loaded, rows: list[dict], specific: dict) -> None:
    """The README's table of runs, and the overlaps of each separator."""
    print(f"\n{loaded.name}" + (f" (weights de-quantized from {loaded.dequantized_from})"
                                if loaded.dequantized_from else ""))
    print("\n| run | mask agreement with clean | chrF fr→en | p vs clean | BLEU | p vs clean | n |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['mask_agreement']:.1%} | {r['chrf']:.1f} | "
              f"{_p(r.get('chrf_p_vs_clean'))} | {r['bleu']:.1f} | {_p(r.get('bleu_p_vs_clean'))} "
              f"| {r['n']} |")
    for sep, s in specific.items():
        print(f"\n{sep}: top-5% overlap translating fr→en vs reading fr "
              f"{s['top5_overlap_mt_vs_mono_fr']:.0%}, vs reading en {s['top5_overlap_mt_vs_mono_en']:.0%}")


def _p(p: float | None) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def save(out: Path, loaded, rows: list[dict], specific: dict | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"model": loaded.name,
                                       "dequantized_from": loaded.dequantized_from,
                                       "runs": rows, "translation_specific": specific},
                                      indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
