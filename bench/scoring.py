"""Zero-shot scoring speed: the shared-prefix path of ``score_items`` against the plain path,
on the embedded model (Gemma 3 270M, de-quantized) and the built-in tasks.

    python bench/scoring.py                                   # wordorder + completion, en fr
    OMP_WAIT_POLICY=PASSIVE python bench/scoring.py --threads 1,2 --limit 20 --rounds 2

For each task the two paths run alternately in one process (plain, shared, shared, plain...)
on the same items, so a burst of load from another process hits both alike. Reported per path:

- items/s, and scored tokens/s: the tokens whose log-probability is summed (every choice's
  tokens; a whole sequence's tokens after BOS), the same count for both paths;
- the work each path did: real tokens through the decoder (padding not counted) and positions
  through the vocabulary head (see ``Counter``), as FLOPs =
  2 x non-embedding parameters x decoder tokens + 2 x vocabulary x hidden x head positions
  (attention scores, norms and the log-softmax left out: a few % here, so the figure is a
  slight under-count);
- that work's FLOP/s against the matmul peak measured in the same run, between the timed runs:
  an fp32 ``F.linear`` of [512, hidden] by the MLP's [intermediate, hidden] weight, the shape
  the decoder's largest matmuls have;
- agreement: the largest |difference| of a choice's log-probability, and whether every item's
  predicted choice is the same under each normalisation.

Prints a Markdown table and writes it to bench/results/scoring.md with the date, the CPU, the
load and the command. Timings are figures to read, never assertions: on a shared machine the
absolute numbers move, compare the ratios of one run. ``--threads 1,2`` measures everything
(both paths and the peak) once per intra-op thread count. On cores that other processes also
load, libgomp's default wait policy makes every parallel region wait for a descheduled
thread: with 2 threads a small model's forward took ~10x longer than with 1 here. Run with
``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts) to measure 2 threads fairly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

import torch  # noqa: E402
from tools import machine  # noqa: E402

from mlprune.capture import base_model  # noqa: E402
from mlprune.export import atomic_write_text  # noqa: E402
from mlprune.models import load_model  # noqa: E402
from mlprune.zeroshot import NORMS, load_task, score_items, scoring  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "scoring.md"


class Counter:
    """Real tokens through the decoder (a hook on it) and positions through the head: a hook
    on the head for the plain path, the rows handed to the shared path's head function for
    that path (a hook on the head would make it call the head as a module, not in blocks)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.tokens, self.positions = model, 0, 0
        self.handle = base_model(model).register_forward_pre_hook(self._decoder, with_kwargs=True)
        self._head_logprobs = scoring._head_logprobs

    def _decoder(self, module, args, kwargs) -> None:
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        self.tokens += ids.numel() if mask is None else int(mask[:, -ids.shape[1]:].sum())

    def _head(self, module, args) -> None:
        self.positions += args[0].shape[:-1].numel()

    def _shared_head(self, head, cap, hidden, *rest) -> None:
        self.positions += hidden.shape[0]
        self._head_logprobs(head, cap, hidden, *rest)

    @contextmanager
    def counting(self, shared: bool) -> Iterator[None]:
        self.tokens = self.positions = 0
        if shared:
            scoring._head_logprobs = self._shared_head
        else:
            handle = self.model.get_output_embeddings().register_forward_pre_hook(self._head)
        try:
            yield
        finally:
            if shared:
                scoring._head_logprobs = self._head_logprobs
            else:
                handle.remove()

    def remove(self) -> None:
        self.handle.remove()


def matmul_peak(hidden: int, inner: int, n: int = 512, repeat: int = 8) -> float:
    """FLOP/s of an fp32 [n, hidden] x [hidden, inner] product (nn.Linear's layout), the best
    of ``repeat`` after a warm-up: what this machine gives a large matmul right now."""
    x, w = torch.randn(n, hidden), torch.randn(inner, hidden)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * n * hidden * inner / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="wordorder,completion")
    ap.add_argument("--langs", default="en,fr")
    ap.add_argument("--limit", type=int, default=20, help="item ids per task (in each language)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs per task, alternated")
    ap.add_argument("--threads", default=str(torch.get_num_threads()),
                    help="torch intra-op threads, or several to measure each (e.g. 1,2)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    info = machine()
    lm = load_model(None)
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    hidden, vocab = cfg.hidden_size, model.get_output_embeddings().weight.shape[0]
    inner = getattr(cfg, "intermediate_size", 4 * hidden)
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    embed = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    non_embedding = sum(n for k, n in params.items() if k not in embed)
    counter = Counter(model)
    paths = {"plain": False, "shared": True}
    tasks = {name: load_task(name).subset(args.limit, args.langs.split(",")).items
             for name in args.tasks.split(",")}
    rows, notes, peak_notes = [], [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        peaks: list[float] = []
        measured = []
        for name, items in tasks.items():
            times: dict[str, list[float]] = {p: [] for p in paths}
            work: dict[str, tuple[int, int]] = {}
            scored: dict[str, list] = {}
            for shared in paths.values():  # warm-up
                score_items(model, tok, items[:2], batch_size=args.batch_size,
                            share_prefix=shared)
            for r in range(args.rounds):
                for path in (paths if r % 2 == 0 else reversed(list(paths))):
                    peaks.append(matmul_peak(hidden, inner))
                    with counter.counting(paths[path]):
                        start = time.perf_counter()
                        scored[path] = score_items(model, tok, items, batch_size=args.batch_size,
                                                   share_prefix=paths[path])
                        times[path].append(time.perf_counter() - start)
                    work[path] = counter.tokens, counter.positions
            measured.append((name, items, times, work, scored))
        peaks.append(matmul_peak(hidden, inner))
        peak = statistics.median(peaks)
        peak_notes.append(f"{threads} thread(s): {peak / 1e9:.1f} GFLOP/s (median of "
                          f"{len(peaks)}, taken between the timed runs)")
        for name, items, times, work, scored in measured:
            n_scored = sum(sum(s.n_tokens) for s in scored["plain"])
            for path in paths:
                t = statistics.median(times[path])
                tokens, positions = work[path]
                flops = 2 * non_embedding * tokens + 2 * vocab * hidden * positions
                rows.append((name, threads, path, len(items) / t, n_scored / t, tokens, positions,
                             flops / 1e9, flops / t / 1e9, 100 * flops / t / peak, t))
            pairs = list(zip(scored["plain"], scored["shared"]))
            diff = max(abs(a - b) for x, y in pairs for a, b in zip(x.logprob, y.logprob))
            same = {norm: sum(x.predicted(norm) == y.predicted(norm) for x, y in pairs)
                    for norm in NORMS}
            ratios = [p / s for p, s in zip(times["plain"], times["shared"])]
            notes.append(
                f"- {name}, {threads} thread(s): {len(items)} items, {n_scored} scored tokens; "
                f"shared path {statistics.median(ratios):.2f}x as fast as plain (median of "
                f"{len(ratios)} alternated pairs: {', '.join(f'{x:.2f}' for x in ratios)}); "
                f"max |Δ logprob| {diff:.1e}; same predicted choice: "
                + ", ".join(f"{norm} {same[norm]}/{len(items)}" for norm in NORMS))
    counter.remove()
    table = ["| task | threads | path | items/s | scored tokens/s | decoder tokens "
             "| head positions | GFLOP | GFLOP/s | % of matmul peak | s (median) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {t} | {th} | {p} | {ips:.2f} | {tps:.1f} | {tok_} | {pos} | {gf:.0f} "
              f"| {gfs:.1f} | {pct:.0f}% | {s:.1f} |"
              for t, th, p, ips, tps, tok_, pos, gf, gfs, pct, s in rows]
    lines = [f"matmul peak, fp32 [512, {hidden}] x [{hidden}, {inner}]: "
             + "; ".join(peak_notes) + f". Non-embedding parameters {non_embedding / 1e6:.1f}M, "
             f"head {vocab} x {hidden}; batch size {args.batch_size}; OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}.", "", *table, "", *notes]
    text = "\n".join(lines)
    print(text)
    command = "python bench/scoring.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("OMP_WAIT_POLICY"):
        command = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} {command}"
    header = [
        "# Zero-shot scoring: shared-prefix path vs plain path", "",
        f"- date: {info['date']}", f"- CPU: {info['cpu']} ({info['cores']} cores, shared; load "
        f"average at start {info['load_average_at_start']}, at end "
        f"{[round(x, 2) for x in os.getloadavg()]})",
        f"- torch {info['torch']}, transformers {info['transformers']}, commit {info['commit']}",
        f"- command: `{command.strip()}`", "",
        "FLOPs count the work each path did (see bench/scoring.py's docstring); items and "
        "scored tokens are the same for both paths, so their ratios are the speed-up.", ""]
    atomic_write_text(args.out, "\n".join(header) + text + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
