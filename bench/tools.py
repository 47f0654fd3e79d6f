"""Helpers for bench/run.py: timing, the machine, clean-process measurements, the table.

Run as a script, this module is the child process of one measurement that needs a fresh
interpreter (load time, peak RSS): ``python bench/tools.py CASE [STATS_FILE]`` prints one
JSON line.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# A tiny parallel corpus for when the built-in one is not installed: speed does not depend
# on which sentences are translated, only on how many tokens they make.
FALLBACK_PAIRS = [
    ("The cat sleeps on the sofa.", "Le chat dort sur le canapé."),
    ("It is sunny today.", "Il fait beau aujourd'hui."),
    ("I would like a coffee.", "Je voudrais un café."),
    ("Where is the station?", "Où est la gare ?"),
    ("We go to the market tomorrow.", "Nous allons au marché demain."),
    ("My brother works in Paris.", "Mon frère travaille à Paris."),
    ("The soup is too hot.", "La soupe est trop chaude."),
    ("She reads a book every week.", "Elle lit un livre chaque semaine."),
    ("The train leaves at noon.", "Le train part à midi."),
    ("Our garden is full of flowers.", "Notre jardin est plein de fleurs."),
    ("He forgot his umbrella.", "Il a oublié son parapluie."),
    ("The museum opens at nine.", "Le musée ouvre à neuf heures."),
    ("Children play in the park.", "Les enfants jouent au parc."),
    ("The shop is closed on Sunday.", "Le magasin est fermé le dimanche."),
    ("I lost my keys again.", "J'ai encore perdu mes clés."),
    ("The river is very calm.", "La rivière est très calme."),
]


def bench_corpus():
    """The built-in corpus, or the fallback above when this checkout lacks its data file."""
    import pandas as pd

    from mlprune.corpus import ParallelCorpus, builtin_corpus

    try:
        return builtin_corpus()
    except (OSError, FileNotFoundError):
        en, fr = zip(*FALLBACK_PAIRS)
        return ParallelCorpus(pd.DataFrame({"en": en, "fr": fr}), "bench-fallback")


# --------------------------------------------------------------------------- timing


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[..., object], *args, **kwargs) -> tuple[float, object]:
    """Seconds taken by fn(*args, **kwargs), and what it returned."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def repeat(fn: Callable[..., object], n: int, *args, **kwargs) -> list[float]:
    """Seconds of n calls of fn(*args, **kwargs)."""
    return [timed(fn, *args, **kwargs)[0] for _ in range(n)]


def paired(a: Callable[[], object], b: Callable[[], object], n: int) -> tuple[list, list]:
    """n timings of a and of b, alternated (a b b a a b ...) so that a burst of load from
    another process hits both sides alike; ratios are then taken pair by pair."""
    ta, tb = [], []
    for i in range(n):
        first, second = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        first[1].append(timed(first[0])[0])
        second[1].append(timed(second[0])[0])
    return ta, tb


def median_ratio(num: list[float], den: list[float]) -> float:
    return median([x / y for x, y in zip(num, den)])


def hook_free_forward(model, tok, texts: list[str], batch_size: int) -> Callable[[], None]:
    """The batches capture() runs, through the same decoder stack, without its hooks: the
    reference its overhead is measured against."""
    import torch

    from mlprune.capture import base_model, batches, context_length, encode, pad_token_id

    ids = encode(tok, texts, context_length(model))
    decoder = base_model(model)

    def plain() -> None:
        with torch.inference_mode():
            for input_ids, mask in batches(ids, batch_size, pad_token_id(tok)):
                decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
    return plain


def read_bandwidth(device: str = "cpu", gib: int = 1, repeat: int = 6) -> tuple[float, list[float]]:
    """Read bandwidth in bytes/s (the median), and each run's seconds: a sum over a ``gib``
    GiB float32 tensor, every page written before timing (a copy would understate reading)."""
    import torch

    def run() -> None:
        big.sum()
        if device == "cuda":
            torch.cuda.synchronize()

    big = torch.ones(gib << 28, device=device)
    run()
    times = [timed(run)[0] for _ in range(max(5, repeat))]
    return (gib << 30) / median(times), times


def decode_step(model, inputs: dict, *, steps: int = 16, repeat: int = 3,
                pad_token_id: int = 0) -> float:
    """Seconds of one greedy decoding step of ``model.generate(**inputs)``: (time of
    ``steps`` + 1 new tokens - time of 1) / ``steps``, medians of ``repeat`` after a warm-up,
    the device synchronised (what the prompt's pass costs cancels out). Exactly n tokens come
    from a config without an end token, not from ``min_new_tokens``, whose processor scans
    the whole vocabulary (262k for Gemma 3) every step: a cost real generation never pays."""
    import copy

    import torch

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample = None, pad_token_id, False

    def run(n: int) -> None:
        config.max_new_tokens = n
        with torch.inference_mode():
            model.generate(**inputs, generation_config=config)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    run(2)
    longer = median([timed(run, steps + 1)[0] for _ in range(repeat)])
    shorter = median([timed(run, 1)[0] for _ in range(repeat)])
    return (longer - shorter) / steps


def weight_bytes(model) -> int:
    """Bytes a decoding step reads: every parameter once (a tied head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


# --------------------------------------------------------------------------- machine


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The checkout's commit, marked when the working tree has changes (read-only git calls)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + (" + local changes" if dirty else "")) or None


def memory_status() -> dict:
    """Peak and current resident memory of this process, in bytes (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


# --------------------------------------------------------------------------- child processes


def child(case: str, stats_file: str | None = None, env: dict | None = None,
          timeout: float = 900) -> dict:
    """Run one case of this file in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), case] + ([stats_file] if stats_file else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"bench child '{case}' failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


def _child_main(case: str, stats_file: str | None) -> dict:
    """One clean-process measurement. Cases:

    load     time of load_model() (the GGUF is converted if MLPRUNE_CACHE holds no copy yet)
    dense    load, then generate from two prompts (every weight, the LM head included, is
             read): peak RSS of the dense model
    pruned   load, rank saved statistics, apply a 50% unstructured variant (timing the first
             apply after load and a second one), then the same generation: peak RSS with the
             ranking and a pruned variant held
    """
    from mlprune.capture import ActivationStats
    from mlprune.evaluate import generate
    from mlprune.models import load_model
    from mlprune.prune import apply_masks, rank_modules

    start = time.perf_counter()
    loaded = load_model()
    result = {"case": case, "load_s": time.perf_counter() - start, "after_load": memory_status()}
    model = loaded.model
    result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if case == "load":
        return result
    stats = ActivationStats.load(stats_file)
    if case == "pruned":
        ranking = rank_modules(model, stats)
        result["first_apply_s"], applied = timed(apply_masks, model, ranking.masks(0.5))
        result["second_apply_s"], applied = timed(apply_masks, model, ranking.masks(0.6))
        applied = apply_masks(model, ranking.masks(0.5))
        result["saved_values_bytes"] = applied.nbytes()
        result["ranking_bytes"] = sum(o.numel() * o.element_size() for o in ranking.order.values())
    generate(model, loaded.tokenizer, stats.meta["texts"][:2], max_new_tokens=4)
    result["final"] = memory_status()
    return result


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One line of the table. ``ratio`` is always measured in the same run as ``value``."""

    section: str
    figure: str
    value: str
    compared_with: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: ""}[self.met]


COLUMNS = ("figure", "value", "compared with", "ratio", "target", "")


def _cells(r: Row) -> list[str]:
    return [r.figure, r.value, r.compared_with, r.ratio, r.target, r.verdict]


def render_text(rows: list[Row]) -> str:
    widths = [max(len(c), *(len(_cells(r)[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    widths = [min(w, 60) for w in widths]
    lines, section = [], None
    for r in rows:
        if r.section != section:
            section = r.section
            lines.append(f"\n{section}")
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(_cells(r), widths)))
        if r.note:
            lines.append("      " + r.note)
    return "\n".join(lines)


def render_markdown(rows: list[Row], info: dict, notes: list[str]) -> str:
    head = (f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
            f"({info['torch_threads']} threads), transformers {info['transformers']}, "
            f"Python {info['python']}, GPU: {info['cuda'] or 'none'}, mlprune at "
            f"{info['commit'] or 'unknown commit'}.  \n"
            f"Date: {info['date']}. Load average at start: "
            f"{' / '.join(str(x) for x in info['load_average_at_start'])} (1/5/15 min).  \n"
            f"Command: `{info['command']}`; every figure is a median of {info['repeat']} runs "
            "unless it says otherwise.")
    out = ["# mlprune benchmarks", "", head, ""]
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            out += ["", f"### {section}", "",
                    "| figure | value | compared with | ratio | target | |",
                    "|---|---|---|---|---|---|"]
        cells = [c.replace("|", "\\|") for c in _cells(r)]
        if r.note:
            cells[0] += f" <br><sub>{r.note.replace('|', '/')}</sub>"
        out.append("| " + " | ".join(cells) + " |")
    if notes:
        out += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_results(folder: Path, rows: list[Row], info: dict, raw: dict, notes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"machine": info, "rows": [asdict(r) | {"verdict": r.verdict} for r in rows],
            "notes": notes, "raw": raw}
    (folder / "bench.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    (folder / "bench.md").write_text(render_markdown(rows, info, notes))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_child_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)))
