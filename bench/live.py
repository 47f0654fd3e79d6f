"""Issue 14, "live means live": how fast the Prune page answers a slider move, on the
embedded model (Gemma 3 270M, de-quantized) and this machine.

    python bench/live.py                       # every section (~2-4 min on 2 busy cores)
    python bench/live.py --sections apply      # one or more of: bandwidth apply capture preview

Prints one table and writes bench/results/live.json (strict JSON). Every figure is compared
with a limit or a "before" taken in the same run, as a ratio, because other work on a shared
machine moves absolute numbers around; timings are figures to read, never assertions.

- Memory bandwidth: the time to read (sum) a 1 GiB float32 tensor, median of several. A copy
  would understate what reading alone reaches.
- Bytes an apply must move, the count the bandwidth bound divides: per pruned weight, its
  value read (4 B), saved (4 B) and zeroed (4 B), and its column number read (2 B): 14 B.
  A restore: the saved value read, written back, its column read: 10 B. A new N:M pattern
  also reads the row order once (2 B per weight) and writes its columns (2 B per pruned
  weight). Counted at cache-line granularity, a 50% mask touches every line of the weights,
  so the physical traffic is larger (reported beside it); the bound here is the stricter one.
- "Before" is mlprune's apply until this change, kept below as a reference (per module, a
  gather and a scatter_ through an int64 copy of the columns, a fresh value buffer each time,
  a replaced set restored whole first), run alternately with the new one in the same process.
- Capture hooks: a plain forward of the decoder stack against ``capture()`` over the same
  batches, the median of alternated pairs.
- Decoding: one greedy step at batch 1 (the live preview) and batch 8 (evaluation), as
  (time of 17 new tokens - time of 1) / 16 with ``model.generate`` on real few-shot prompts,
  against the bound: every weight read once per step (the tied 262k-token head included, the
  embedding lookup not) over the read bandwidth. A profile of one batch-8 generation says
  where the step goes (the head's share, and the bandwidth its matmul reaches), and the head's
  matmul is timed in both of its forms (x @ W.T as nn.Linear computes it, and (W @ x.T).T).
  bf16 (a second copy of the model) is timed the same way against its own bound, and its
  greedy translations are compared with fp32's on held-out sentences (agreement, chrF and
  sacrebleu's paired test).
- Warm start (the GGUF already converted): in fresh processes, the CLI's first progress line
  and first model line on stderr, and the embedded model's load split into its parts
  (importing torch, importing transformers, the tokenizer, the model code and weights).
- The preview: from the streaming generator (no browser), the time to the first pruned token
  and to the full answer (masks applied and restored included), against the non-streamed
  path before this change (reference apply, ``generate``, reference restore), which showed
  nothing until all of it was done.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

import torch  # noqa: E402
from tools import (  # noqa: E402
    Row,
    bench_corpus,
    decode_step,
    fmt_s,
    hook_free_forward,
    machine,
    median,
    paired,
    read_bandwidth,
    render_markdown,
    render_text,
    timed,
    weight_bytes,
)

from mlprune import service  # noqa: E402
from mlprune.capture import capture, context_length, encode  # noqa: E402
from mlprune.evaluate import generate  # noqa: E402
from mlprune.kernels import FewRowLinear, WeightMajorHead  # noqa: E402
from mlprune.models import linear_modules, load_model  # noqa: E402
from mlprune.pipeline import PruneSpec  # noqa: E402
from mlprune.prompts import eval_items, translation_prompts  # noqa: E402
from mlprune.prune import REGISTRY, Ranking, apply_masks, rank_modules, restore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LIMIT_APPLY_S = 0.25  # the target for new masks applied
LIMIT_FIRST_TOKEN_S = 1.0  # slider to first pruned token (the browser test measures it too)
LIMIT_HOOKS = 0.05  # capture hooks over a hook-free forward
LIMIT_START_S = 3.0  # process start to usable (the dashboard) / to the first progress line
LIMIT_DECODE_B1 = 0.85  # share of the bandwidth bound a batch-1 decoding step should reach
LIMIT_DECODE_B8 = 0.50  # ... and a batch-8 step (evaluation, sweeps)
SECTIONS = ("bandwidth", "apply", "capture", "preview", "decode", "start")


def say(text: str) -> None:
    """Progress on stderr, so a slow run shows where it is."""
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- before: the reference


def reference_apply(model, masks) -> dict:
    """mlprune's apply before issue 14 (it restored an applied set first): per module, gather
    the pruned values through an int64 copy of the columns into a fresh buffer, then
    scatter_ zeros. Returns what reference_restore needs."""
    infos = linear_modules(model)
    items = list(masks.pruned_cols.items())
    flat = torch.empty(sum(c.numel() for _, c in items), dtype=infos[items[0][0]].weight.dtype)
    saved = {}
    with torch.no_grad():
        for (name, cols), values in zip(items, flat.split([c.numel() for _, c in items])):
            w = infos[name].weight
            idx = cols.to(w.device, torch.long)
            values = values.view(cols.shape)
            torch.gather(w, 1, idx, out=values)
            saved[name] = (cols, values)
            w.scatter_(1, idx, torch.zeros_like(values))
    return saved


def reference_restore(model, saved: dict) -> None:
    infos = linear_modules(model)
    with torch.no_grad():
        for name, (cols, values) in saved.items():
            w = infos[name].weight
            w.scatter_(1, cols.to(w.device, torch.long), values)


def reference_nm(order: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M selection before issue 14: the whole module at once, an int64 copy of the
    order for the rank scatter, int32 keys."""
    out, n_in = order.shape
    groups = n_in // m
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order.long(), torch.arange(n_in, dtype=order.dtype).expand_as(order))
    shift = (m - 1).bit_length()
    keys = torch.empty(m, out, groups, dtype=torch.int32)
    keys.copy_(ranks.view(out, groups, m).permute(2, 0, 1))
    keys.bitwise_left_shift_(shift).bitwise_or_(torch.arange(m, dtype=torch.int32).view(m, 1, 1))
    planes, spare = list(keys.unbind(0)), torch.empty(out, groups, dtype=torch.int32)
    for r in range(n):
        for j in range(r + 1, m):
            torch.minimum(planes[r], planes[j], out=spare)
            torch.maximum(planes[r], planes[j], out=planes[j])
            planes[r], spare = spare, planes[r]
    cols = torch.empty(out, groups, n, dtype=order.dtype)
    offsets = torch.arange(0, n_in, m, dtype=torch.int32)
    for r in range(n):
        cols[..., r] = planes[r].bitwise_and_((1 << shift) - 1).add_(offsets)
    return cols.view(out, -1)


# --------------------------------------------------------------------------- bandwidth


def bench_bandwidth(args, raw: dict) -> tuple[list[Row], float]:
    """Read bandwidth: sum over a 1 GiB float32 tensor (bytes/s)."""
    rate, times = read_bandwidth(repeat=args.repeat)
    gc.collect()
    raw["bandwidth"] = {"sum_1gib_s": times, "bytes_per_s": rate}
    return [Row("1. Memory bandwidth", "read: sum over a 1 GiB float32 tensor",
                f"{rate / 1e9:.1f} GB/s", note=f"median of {len(times)}; "
                f"{torch.get_num_threads()} torch threads")], rate


# --------------------------------------------------------------------------- apply


def weight_lines(pruned_cols: dict[str, torch.Tensor], element_size: int = 4) -> int:
    """Bytes in the 64-byte lines of the weights that hold at least one of these columns
    (rows start on a line: Gemma 3 270M's widths are multiples of 16 floats)."""
    per_line, total = 64 // element_size, 0
    for cols in pruned_cols.values():
        if cols.shape[1]:
            line = (cols.long() // per_line).sort(dim=1).values
            total += cols.shape[0] + int((line[:, 1:] != line[:, :-1]).sum())
    return 64 * total


def bench_apply(loaded, args, raw: dict, bandwidth: float) -> list[Row]:
    model = loaded.model
    t, ranking = timed(rank_modules, model, method="magnitude")  # apply cost: same for any method
    say(f"ranked in {t:.1f} s")
    weights = sum(o.numel() for o in ranking.order.values())
    pruned_at = {s: sum(c.numel() for c in ranking.masks(s).pruned_cols.values())
                 for s in (0.5, 0.6)}
    # Bytes each case must move. Memory moves whole 64-byte lines: a weight line holding any
    # pruned weight is read and written back (a 50% mask touches every line; so does a 10%
    # slider step, mostly), then the saved values are written (4 B) and the int16 columns read.
    at = {s: ranking.masks(s).pruned_cols for s in (0.5, 0.6)}
    lines = {s: weight_lines(cols) for s, cols in at.items()}
    step_cols = {n: c[:, at[0.5][n].shape[1]:] for n, c in at[0.6].items()}  # the 10% added
    apply_b = {s: 2 * lines[s] + 6 * p for s, p in pruned_at.items()}
    nm_b = 2 * weights + weights + apply_b[0.5]  # + the order read and the N:M columns written
    restore_b = 2 * lines[0.5] + 6 * pruned_at[0.5]
    move_b = 2 * weight_lines(step_cols) + 6 * (pruned_at[0.6] - pruned_at[0.5])
    spare = REGISTRY.entry(model).spare
    cases: dict[str, tuple[list, list]] = {}

    def new_apply(sparsity, pattern="unstructured", source=None, fresh_buffer=False):
        def run():
            if fresh_buffer:
                spare.clear()
            masks = (source() if source else ranking).masks(sparsity, pattern)
            start = time.perf_counter()
            applied = apply_masks(model, masks)
            took = time.perf_counter() - start
            applied.restore()
            return took
        return run

    def old_apply(sparsity, pattern="unstructured", nm=False):
        def run():
            start = time.perf_counter()
            if nm:
                n, m = (int(x) for x in pattern.split(":"))
                cols = {k: reference_nm(o, n, m) for k, o in ranking.order.items()}
                masks = ranking.masks(0.5)
                masks.pruned_cols = cols
            else:
                masks = ranking.masks(sparsity, pattern)
            saved = reference_apply(model, masks)
            took = time.perf_counter() - start
            reference_restore(model, saved)
            return took
        return run

    # warm-up: every weight page written once (the first write after load faults each page)
    apply_masks(model, ranking.masks(0.6)).restore()
    reference_restore(model, reference_apply(model, ranking.masks(0.6)))

    def alternated(name, new, old):
        """Inner times (the apply only, its restore untimed), alternated new/old."""
        new_t, old_t = [], []
        for i in range(args.repeat):
            for f, out in ((new, new_t), (old, old_t)) if i % 2 == 0 else ((old, old_t), (new, new_t)):
                out.append(f())
        cases[name] = (new_t, old_t)
        assert REGISTRY.applied(model) is None
        say(f"{name}: {[round(x, 3) for x in new_t]} before {[round(x, 3) for x in old_t]}")

    alternated("unstructured 50%, buffer reused", new_apply(0.5), old_apply(0.5))
    alternated("unstructured 50%, fresh buffer", new_apply(0.5, fresh_buffer=True), old_apply(0.5))
    alternated("unstructured 60%, model dense (Prune page)", new_apply(0.6), old_apply(0.6))

    def fresh_ranking():  # the same order, no N:M columns cached yet: a pattern asked first
        return Ranking(ranking.order, ranking.protected, ranking.meta)

    alternated("2:4, first time asked", new_apply(0, "2:4", fresh_ranking),
               old_apply(0, "2:4", nm=True))
    ranking.masks(0, "2:4")  # now cached
    alternated("2:4, asked before", new_apply(0, "2:4"), old_apply(0, "2:4"))

    # a slider move with masks kept applied: 50% -> 60% replaces by touching only the difference
    def new_move():
        applied = apply_masks(model, ranking.masks(0.5))
        masks = ranking.masks(0.6)
        start = time.perf_counter()
        applied = apply_masks(model, masks)
        took = time.perf_counter() - start
        applied.restore()
        return took

    def old_move():
        saved = reference_apply(model, ranking.masks(0.5))
        masks = ranking.masks(0.6)
        start = time.perf_counter()
        reference_restore(model, saved)  # the old code restored the applied set first
        saved = reference_apply(model, masks)
        took = time.perf_counter() - start
        reference_restore(model, saved)
        return took

    alternated("slider 50% -> 60%, masks kept applied", new_move, old_move)

    def new_restore():
        applied = apply_masks(model, ranking.masks(0.5))
        return timed(applied.restore)[0]

    def old_restore():
        saved = reference_apply(model, ranking.masks(0.5))
        return timed(reference_restore, model, saved)[0]

    alternated("restore of 50%", new_restore, old_restore)
    restore(model)

    bytes_of = {"unstructured 50%, buffer reused": apply_b[0.5],
                "unstructured 50%, fresh buffer": apply_b[0.5],
                "unstructured 60%, model dense (Prune page)": apply_b[0.6],
                "2:4, first time asked": nm_b, "2:4, asked before": apply_b[0.5],
                "slider 50% -> 60%, masks kept applied": move_b, "restore of 50%": restore_b}
    rows = []
    for name, (new_t, old_t) in cases.items():
        now, before = median(new_t), median(old_t)
        bound = bytes_of[name] / bandwidth
        is_restore = name.startswith("restore")
        rows.append(Row(
            "2. New masks applied" if not is_restore else "3. Restore",
            name, fmt_s(now), f"limit {fmt_s(LIMIT_APPLY_S)}; before {fmt_s(before)}",
            f"{now / LIMIT_APPLY_S:.2f}x the limit; {before / now:.1f}x faster; "
            f"{bound / now:.0%} of the bandwidth bound",
            f"< {fmt_s(LIMIT_APPLY_S)}, >= 50% of bound" if not is_restore else "",
            (now < LIMIT_APPLY_S and bound / now >= 0.5) if not is_restore else None,
            note=f"moves {bytes_of[name] / 1e6:.0f} MB -> bound {fmt_s(bound)} at the read "
                 f"bandwidth; median of {len(new_t)} (before: of {len(old_t)}), alternated"))
    rows[0].note += ("; bytes count whole 64-byte lines: a line holding a pruned weight is read "
                     "and written, then the values are written and the int16 columns read")
    raw["apply"] = {"ranking_s": t, "weights": weights, "pruned": pruned_at,
                    "bytes": bytes_of, "weight_line_bytes": lines,
                    "cases": {k: {"new_s": a, "before_s": b} for k, (a, b) in cases.items()}}
    return rows


# --------------------------------------------------------------------------- capture hooks


def bench_capture(loaded, corpus, args, raw: dict) -> list[Row]:
    model, tok = loaded.model, loaded.tokenizer
    prompts = translation_prompts(corpus, "fr", "en", samples=args.samples)
    ids = encode(tok, prompts.texts, context_length(model))
    plain = hook_free_forward(model, tok, prompts.texts, args.batch_size)

    def hooked():
        capture(model, tok, prompts, batch_size=args.batch_size)

    hooked()
    plain()
    t_cap, t_plain = paired(hooked, plain, args.repeat)
    pairs = [c / p - 1 for c, p in zip(t_cap, t_plain)]
    over = median(pairs)
    raw["capture"] = {"capture_s": t_cap, "plain_s": t_plain, "tokens": sum(map(len, ids))}
    return [Row("4. Capture hooks", f"capture(): {len(ids)} translation prompts, "
                f"{sum(map(len, ids))} tokens, batch {args.batch_size}",
                f"{fmt_s(median(t_cap))}", f"plain forward {fmt_s(median(t_plain))}",
                f"hooks cost {over:+.1%}", f"< +{LIMIT_HOOKS:.0%}", over < LIMIT_HOOKS,
                note=f"median of {len(pairs)} alternated pairs (each pair's ratio)")]


# --------------------------------------------------------------------------- the preview


def bench_preview(loaded, corpus, args, raw: dict) -> list[Row]:
    model, tok = loaded.model, loaded.tokenizer
    spec = PruneSpec.preset("interactive", method="magnitude")
    ranked = service.CalibratedRanking(rank_modules(model, method="magnitude"), None, spec, 0.0)
    prompt = eval_items(corpus, "fr", "en", shots=spec.shots, limit=1)[0].prompt
    key = service.model_key(loaded)
    first, full, before, tokens = [], [], [], 0

    def streamed(sparsity):
        masks = ranked.masks(sparsity, "unstructured")
        state = service.SessionPruning(key, spec, masks, 1, ranked)  # nothing cached: a new move
        start = time.perf_counter()
        stream = state.stream(loaded, prompt, service.PREVIEW_TOKENS)
        next(stream)
        first.append(time.perf_counter() - start)
        for _ in stream:
            pass
        full.append(time.perf_counter() - start)
        return len(state.generated(prompt, service.PREVIEW_TOKENS).tokens)

    def non_streamed(sparsity):  # before: nothing showed until the whole answer was there
        masks = ranked.masks(sparsity, "unstructured")
        start = time.perf_counter()
        saved = reference_apply(model, masks)
        generate(model, tok, [prompt], max_new_tokens=service.PREVIEW_TOKENS)
        reference_restore(model, saved)
        before.append(time.perf_counter() - start)

    streamed(0.5)  # warm-up
    first.clear()
    full.clear()
    levels = [0.55, 0.6, 0.65, 0.7, 0.75]
    for i in range(args.repeat):
        s = levels[i % len(levels)]
        if i % 2 == 0:
            tokens = streamed(s)
            non_streamed(s)
        else:
            non_streamed(s)
            tokens = streamed(s)
    raw["preview"] = {"first_token_s": first, "full_s": full, "before_full_s": before,
                      "prompt_tokens": len(tok(prompt)["input_ids"]), "answer_tokens": tokens}
    return [
        Row("5. Preview (no browser)", "streaming: masks applied + prompt + first pruned token",
            fmt_s(median(first)), f"limit {fmt_s(LIMIT_FIRST_TOKEN_S)} (slider to first token, "
            "browser included); before: nothing until the full answer, "
            f"{fmt_s(median(before))}", f"{median(first) / LIMIT_FIRST_TOKEN_S:.2f}x the limit; "
            f"first text {median(before) / median(first):.1f}x sooner",
            f"< {fmt_s(LIMIT_FIRST_TOKEN_S)}", median(first) < LIMIT_FIRST_TOKEN_S,
            note=f"{raw['preview']['prompt_tokens']}-token few-shot prompt, up to "
                 f"{service.PREVIEW_TOKENS} new tokens; sparsities {levels}; median of "
                 f"{len(first)}, alternated with the non-streamed path"),
        Row("5. Preview (no browser)", "streaming: the full answer, masks restored",
            fmt_s(median(full)), f"before (non-streamed): {fmt_s(median(before))}",
            f"{median(before) / median(full):.2f}x",
            note=f"last answer {tokens} tokens"),
    ]


# --------------------------------------------------------------------------- decoding


def decode_steps(model, tok, prompts: list[str], batch: int, repeat: int) -> float:
    """Seconds of one greedy decoding step at this batch: (17 new tokens - 1) / 16."""
    enc = tok(prompts[:batch], return_tensors="pt", padding=True, padding_side="left")
    return decode_step(model, dict(enc), repeat=repeat, pad_token_id=tok.pad_token_id)


def head_profile(model, tok, prompts: list[str]) -> dict:
    """Where a batch-8 generation's time goes: the head's matmul against the rest."""
    from torch.profiler import ProfilerActivity, profile

    enc = tok(prompts[:8], return_tensors="pt", padding=True, padding_side="left")
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU],
                                         record_shapes=True) as prof:
        model.generate(**enc, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    total = head = mm = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total
        if e.key == "aten::mm":
            mm += e.self_cpu_time_total
            if any(vocab in (shape or []) for shape in e.input_shapes):
                head += e.self_cpu_time_total
    # one head matmul per new token (the prompt's pass computes only its last position)
    return {"head_share": head / total, "matmul_share": mm / total,
            "head_per_token_s": head / 9 / 1e6}


def bench_decode(loaded, corpus, args, raw: dict, bandwidth: float) -> list[Row]:
    from mlprune.evaluate import paired_translation_test

    section = "6. Decoding"
    model, tok = loaded.model, loaded.tokenizer
    items = eval_items(corpus, "fr", "en", shots=4, limit=args.decode_sentences)
    prompts = [i.prompt for i in items]
    rows, out = [], {}
    half = load_model(None, dtype="bfloat16")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in flags]
    head = model.get_output_embeddings()
    assert type(head) is WeightMajorHead, "load_model gives CPU models the fast head"

    def plain_head(on: bool) -> None:
        """Every linear as torch's nn.Linear (on), or as load_model makes them: the decoder's
        as FewRowLinear, the head as WeightMajorHead (both kernels.few_rows in a step)."""
        for module in model.modules():
            if module is head:
                module.__class__ = torch.nn.Linear if on else WeightMajorHead
            elif type(module) in (torch.nn.Linear, FewRowLinear):
                module.__class__ = torch.nn.Linear if on else FewRowLinear

    runs = max(3, args.repeat // 2)
    for name, m in (("fp32", model), ("bf16", half.model)):
        wb = weight_bytes(m)
        bound = wb / bandwidth
        for batch, limit in ((1, LIMIT_DECODE_B1), (8, LIMIT_DECODE_B8)):
            before = None
            if name == "fp32":  # the kernel against nn.Linear's, alternated step by step
                steps, before_steps = [], []
                for i in range(runs):
                    for plain in ((False, True) if i % 2 == 0 else (True, False)):
                        plain_head(plain)
                        (before_steps if plain else steps).append(
                            decode_steps(m, tok, prompts, batch, 1))
                plain_head(False)
                step, before = median(steps), median(before_steps)
            else:
                step = decode_steps(m, tok, prompts, batch, runs)
            out[f"{name}_b{batch}"] = {"step_s": step, "bound_s": bound, "weight_bytes": wb,
                                       "nn_linear_head_step_s": before}
            rows.append(Row(section, f"greedy step, batch {batch}, {name}", fmt_s(step),
                            f"bound {fmt_s(bound)} ({wb / 1e9:.2f} GB read at "
                            f"{bandwidth / 1e9:.1f} GB/s)"
                            + (f"; torch's nn.Linear {fmt_s(before)}" if before else ""),
                            f"{bound / step:.0%} of the bound"
                            + (f"; {before / step:.2f}x faster" if before else ""),
                            f">= {limit:.0%}", bound / step >= limit,
                            note="(17 new tokens - 1) / 16, model.generate, few-shot fr->en "
                                 f"prompts; median of {runs}"
                                 + ("; every linear through kernels.few_rows, alternated with "
                                    "nn.Linear's forward" if name == "fp32" else "")
                                 + (f"; CPU bf16: {', '.join(native) or 'none'}"
                                    if name == "bf16" else "")))
    prof = head_profile(model, tok, prompts)
    head_w = head.weight
    head_bound = head_w.numel() * head_w.element_size() / bandwidth
    for r in (1, 8):
        x = torch.randn(r, head_w.shape[1])
        with torch.inference_mode():
            t_linear, t_fast = paired(lambda x=x: torch.nn.functional.linear(x, head_w),
                                      lambda x=x: head(x), args.repeat)
        out[f"head_b{r}"] = {"linear_s": t_linear, "fast_s": t_fast, "bound_s": head_bound}
        form = "kernels.few_rows"
        rows.append(Row(section, f"the head's matmul alone, {r} row(s): fast head ({form})",
                        fmt_s(median(t_fast)), f"nn.Linear (x @ W.T): {fmt_s(median(t_linear))}; "
                        f"bound {fmt_s(head_bound)}",
                        f"{head_bound / median(t_fast):.0%} / "
                        f"{head_bound / median(t_linear):.0%} of the bound",
                        note=f"W {tuple(head_w.shape)} fp32; alternated, median of "
                             f"{args.repeat}" + (
                                 "; profiled inside a batch-8 generation: the head's matmul "
                                 f"takes {fmt_s(prof['head_per_token_s'])} of each "
                                 f"{fmt_s(out['fp32_b8']['step_s'])} step; all matmuls are "
                                 f"{prof['matmul_share']:.0%} of the generation's time"
                                 if r == 8 else "")))
    plain_head(True)
    plain_outputs = [g.text for g in generate(model, tok, prompts, max_new_tokens=48)]
    plain_head(False)
    outputs = {}
    for name, m in (("fp32", model), ("bf16", half.model)):
        outputs[name] = [g.text for g in generate(m, tok, prompts, max_new_tokens=48)]
    same = sum(a == b for a, b in zip(outputs["fp32"], outputs["bf16"])) / len(prompts)
    test = paired_translation_test([i.reference for i in items], outputs["fp32"],
                                   outputs["bf16"], metrics=("chrf",))["chrf"]
    out["bf16_vs_fp32"] = {"identical_outputs": same, "chrf": test, "n": len(prompts),
                           "outputs": outputs}
    head_same = sum(a == b for a, b in zip(outputs["fp32"], plain_outputs)) / len(prompts)
    out["fast_head_vs_nn_linear"] = {"identical_outputs": head_same, "n": len(prompts)}
    out["profile"] = prof
    raw["decode"] = out
    rows.append(Row(section, f"bf16 translations against fp32 ({len(prompts)} held-out fr->en "
                    "sentences, greedy)", f"{same:.0%} identical",
                    f"chrF fp32 {test['a']:.1f}, bf16 {test['b']:.1f}",
                    f"{test['difference']:+.1f} chrF (p = {test['p_value']:.2f})",
                    note="sacrebleu paired bootstrap"))
    rows.append(Row(section, f"fp32 translations, kernels.few_rows against nn.Linear's ({len(prompts)} "
                    "sentences, greedy, batch 8)", f"{head_same:.0%} identical", "", ""))
    del half
    gc.collect()
    return rows


# --------------------------------------------------------------------------- warm start

LOAD_PARTS = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
t2 = time.perf_counter()
from mlprune.models import _converted_tokenizer, _embedded_folder
folder = _embedded_folder()
tok = _converted_tokenizer(folder)
t3 = time.perf_counter()
import transformers.models.gemma3.modeling_gemma3
t4 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True)
t5 = time.perf_counter()
AutoTokenizer.from_pretrained(folder)
t6 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "transformers": t2 - t1, "tokenizer": t3 - t2,
                  "model_code": t4 - t3, "weights": t5 - t4, "total": t5 - t0,
                  "autotokenizer": t6 - t5}))
"""


def stderr_lines(cmd: list[str], wanted: int, timeout: float = 120) -> list[tuple[float, str]]:
    """(seconds since start, text) of a command's first ``wanted`` stderr lines."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines, buf = [], ""
    try:
        while len(lines) < wanted and time.perf_counter() - start < timeout:
            ch = proc.stderr.read(1)
            if not ch:
                break
            if ch in "\r\n":
                if buf.strip():
                    lines.append((time.perf_counter() - start, buf.strip()))
                buf = ""
            else:
                buf += ch
    finally:
        proc.kill()
        proc.wait()
    return lines


def bench_start(args, raw: dict) -> list[Row]:
    import subprocess

    section = "7. Warm start"
    exe = str(Path(sys.executable).with_name("mlprune"))
    first, model_line = [], []
    for _ in range(3):
        lines = stderr_lines([exe, "analyze", "--pair", "fr-en", "--samples", "2"], 40)
        first.append(lines[0][0])
        model_line.append(next(t for t, text in lines if text.startswith("model: ")))
    parts = [json.loads(subprocess.run([sys.executable, "-c", LOAD_PARTS], capture_output=True,
                                       text=True, check=True).stdout.splitlines()[-1])
             for _ in range(3)]
    part = {k: median([p[k] for p in parts]) for k in parts[0]}
    raw["start"] = {"cli_first_line_s": first, "cli_model_ready_s": model_line, "load": parts}
    return [
        Row(section, "CLI start to its first progress line (mlprune analyze)",
            fmt_s(median(first)), f"limit {fmt_s(LIMIT_START_S)}",
            f"{median(first) / LIMIT_START_S:.2f}x the limit", f"< {fmt_s(LIMIT_START_S)}",
            median(first) < LIMIT_START_S, note="fresh processes, median of 3"),
        Row(section, "CLI start to the model loaded (its 'model:' line)",
            fmt_s(median(model_line)), f"limit {fmt_s(LIMIT_START_S)}",
            f"{median(model_line) / LIMIT_START_S:.2f}x the limit", f"< {fmt_s(LIMIT_START_S)}",
            median(model_line) < LIMIT_START_S,
            note="what the dashboard also waits for after a restart (it loads in a thread "
                 "while the page draws)"),
        Row(section, "the load's parts in a fresh process",
            fmt_s(part["total"]), "", "",
            note=f"import torch {fmt_s(part['torch'])}, transformers {fmt_s(part['transformers'])}, "
                 f"tokenizer from its file {fmt_s(part['tokenizer'])} (AutoTokenizer: "
                 f"{fmt_s(part['autotokenizer'])}), Gemma 3's model code (imports torch's "
                 f"dynamo and distributed tensor) {fmt_s(part['model_code'])}, weights "
                 f"{fmt_s(part['weights'])}; median of 3"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--repeat", type=int, default=6, help="runs per figure (alternated pairs)")
    ap.add_argument("--samples", type=int, default=8, help="capture prompts")
    ap.add_argument("--decode-sentences", type=int, default=24,
                    help="held-out sentences for bf16 against fp32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "live.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    info["command"] = "python bench/live.py " + " ".join(sys.argv[1:])
    info["nice"] = os.nice(0)
    raw: dict = {}
    rows, bandwidth = bench_bandwidth(args, raw)
    say(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    loaded = load_model(None) if set(args.sections) - {"bandwidth", "start"} else None
    corpus = bench_corpus()
    if "apply" in args.sections:
        rows += bench_apply(loaded, args, raw, bandwidth)
    if "capture" in args.sections:
        rows += bench_capture(loaded, corpus, args, raw)
    if "preview" in args.sections:
        rows += bench_preview(loaded, corpus, args, raw)
    if "decode" in args.sections:
        rows += bench_decode(loaded, corpus, args, raw, bandwidth)
    if "start" in args.sections:
        rows += bench_start(args, raw)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
          f"nice {info['nice']}; load average at start {info['load_average_at_start']}, "
          f"at end {info['load_average_at_end']}")
    print(render_text(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": info, "rows": [r.__dict__ | {"verdict": r.verdict} for r in rows],
            "raw": raw}
    args.out.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    info["repeat"] = args.repeat
    args.out.with_suffix(".md").write_text(render_markdown(rows, info, []))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
