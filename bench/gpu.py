"""GPU figures on models built from configs (a GPU machine reaches no hub, and the embedded
GGUF does not travel there): random weights, real shapes.

    python bench/gpu.py                    # every section, ~6 min on one H200
    python bench/gpu.py --sections scale   # one section (check, scale, sparse, decode, diagnose)
    python bench/gpu.py --tiny             # the same code on small shapes, on the CPU too

Sections:
- check:  the CUDA paths against the CPU on a tiny Llama (statistics, masks, apply/restore
          bit-exact, streamed generation equal to generate()).
- scale:  a Llama-7B-shaped model (6.7B parameters, bf16) analysed and pruned (capture, one-shot
          Wanda, sequential Wanda at 50%) twice: with the GPU's memory capped below the model's
          size (torch.cuda.set_per_process_memory_fraction; weights wait on the CPU and stream
          one layer at a time), and whole on the GPU. Time, peak GPU memory, masks compared.
- sparse: 2:4 semi-structured sparse (torch.sparse.to_sparse_semi_structured) against dense
          bf16 matmuls at the linear shapes of Gemma 3 270M and Llama 7B, then the 7B-shaped
          model 2:4-pruned end to end: prefill and greedy decoding, sparse kernels vs dense.
- decode: Gemma-3-270M-shaped model (262k-token tied head): capture fp32 vs bf16; one decoding
          step at batch 1 and 8 against the bound (weight bytes read per step / read bandwidth
          measured in the same run); greedy agreement of bf16 with fp32.
- diagnose: why 2:4 kernels lose: a profile of one cuSPARSELt call, and the 2:4 model's logits
          through sparse kernels against dense bf16 and fp32.

Random weights: speeds and memory are those of the real shapes; agreement figures are a
pessimistic stand-in (a random model's logits are flatter than a trained one's, so rounding
flips its argmax more often). Writes --out/gpu.json (strict JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run from a checkout as is; tiny's tokenizer; the bench's own helpers
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import torch  # noqa: E402
from tiny import byte_tokenizer  # noqa: E402
from tools import decode_step, read_bandwidth, weight_bytes  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mlprune.capture import capture  # noqa: E402
from mlprune.corpus import builtin_corpus  # noqa: E402
from mlprune.models import linear_modules, load_model  # noqa: E402
from mlprune.prompts import translation_prompts  # noqa: E402
from mlprune.prune import apply_masks, rank_modules, sequential_stats_and_masks  # noqa: E402
from mlprune.zeroshot.reports import json_safe  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
LLAMA_TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=32000)
GEMMA_270M = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                  sliding_window=512, query_pre_attn_scalar=256, tie_word_embeddings=True)
GEMMA_TINY = dict(GEMMA_270M, num_hidden_layers=2, vocab_size=32768)
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the byte tokenizer's

rows: list[dict] = []
results: dict = {}


def row(section: str, figure: str, value: str, compared: str = "", ratio: str = "",
        note: str = "") -> None:
    rows.append(dict(section=section, figure=figure, value=value, compared=compared,
                     ratio=ratio, note=note))
    print(f"  [{section}] {figure}: {value}" + (f" | {compared}" if compared else "")
          + (f" | {ratio}" if ratio else ""), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() (device work finished), after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def build(shape: dict, arch: str, folder: Path, device: str, dtype=torch.bfloat16) -> Path:
    """A model of this shape with random weights, and the byte tokenizer, as a HF folder."""
    config = AutoConfig.for_model(arch, max_position_embeddings=4096, **TOKEN_IDS, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def random_llama(args, dtype: torch.dtype) -> torch.nn.Module:
    """The Llama-7B-shaped model (tiny with --tiny), random weights, built on the GPU."""
    config = AutoConfig.for_model("llama", max_position_embeddings=4096, **TOKEN_IDS,
                                  **(LLAMA_TINY if args.tiny else LLAMA_7B))
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@torch.no_grad()
def prune_2_4_(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive inputs, in place. (The
    library's magnitude ranking gives the same masks, but ranks every row on the CPU: minutes
    for 7B weights this script only needs pruned.)"""
    groups = weight.view(weight.shape[0], -1, 4)
    groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
    return weight


def calibration(samples: int):
    return translation_prompts(builtin_corpus(), "fr", "en", shots=4, samples=samples)


# --------------------------------------------------------------------------- check


def section_check(args, device: str) -> None:
    """CUDA against CPU on a tiny fp32 Llama: the library's GPU paths compute what the CPU does."""
    from mlprune.evaluate import generate, stream_generate
    from mlprune.prune import pruned

    with tempfile.TemporaryDirectory() as tmp:
        folder = build(LLAMA_TINY, "llama", Path(tmp) / "m", "cpu", torch.float32)
        cpu = load_model(str(folder), dtype="float32")
        gpu = load_model(str(folder), dtype="float32", device=device)
    prompts = calibration(8)
    a = capture(cpu.model, cpu.tokenizer, prompts)
    b = capture(gpu.model, gpu.tokenizer, prompts)
    rel = max(((a.input_sqnorms[k] - b.input_sqnorms[k].cpu()).norm() / a.input_sqnorms[k].norm())
              .item() for k in a.input_sqnorms)
    ma, mb = rank_modules(cpu.model, a).masks(0.5), rank_modules(gpu.model, b).masks(0.5)
    agree = statistics.mean(
        (ma.keep(k) == mb.keep(k)).float().mean().item() for k in ma.modules)
    before = {k: v.clone() for k, v in gpu.model.state_dict().items()}
    mask24 = rank_modules(gpu.model, b).masks(0.5, "2:4")
    applied = apply_masks(gpu.model, mask24)
    zeros = all(((linear_modules(gpu.model)[k].weight == 0).cpu() >= ~mask24.keep(k)).all()
                for k in mask24.modules)
    applied.restore()
    exact = all(torch.equal(v, gpu.model.state_dict()[k]) for k, v in before.items())
    text = prompts.texts[0][-300:]
    with pruned(gpu.model, ma):
        whole = generate(gpu.model, gpu.tokenizer, [text], max_new_tokens=12)[0]
    stream = stream_generate(gpu.model, gpu.tokenizer, text, max_new_tokens=12,
                             hold=lambda: pruned(gpu.model, ma))
    pieces = []
    try:
        while True:
            pieces.append(next(stream))
    except StopIteration as done:
        streamed = done.value
    ok = rel < 1e-4 and agree > 0.999 and zeros and exact and streamed.text == whole.text
    results["check"] = dict(stats_max_rel_diff=rel, wanda50_mask_agreement=agree,
                            nm24_zeroed=zeros, restore_bit_exact=exact,
                            stream_equals_generate=streamed.text == whole.text, ok=ok)
    row("check", f"{device} vs cpu, tiny Llama fp32: statistics, Wanda masks, 2:4 apply/restore, "
        "streamed generation", "pass" if ok else "FAIL",
        note=f"stats rel diff {rel:.1e}; mask agreement {agree:.4%}; restore exact {exact}; "
             f"stream == generate {streamed.text == whole.text}")


# --------------------------------------------------------------------------- scale


def prune_run(folder: Path, prompts, *, device: str, cap: int | None, weights_cap: int | None,
              offload: Path) -> tuple[dict, dict]:
    """Load, capture, one-shot and sequential Wanda 50%: seconds and peak device memory."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total if cap else 1.0)
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"cap_bytes": cap}
    start = time.perf_counter()
    if weights_cap is not None:
        where = {0: weights_cap, "cpu": 200 * 2**30} if cuda else {"cpu": weights_cap}
        loaded = load_model(str(folder), dtype="bfloat16", device_map="auto", max_memory=where,
                            offload_folder=offload)
        out["plan"] = str(loaded.plan)
        out["placement"] = sorted({str(d) for d in loaded.model.hf_device_map.values()})
    else:
        loaded = load_model(str(folder), dtype="bfloat16", device=device)
    sync()
    out["load_s"] = time.perf_counter() - start
    model, tok = loaded.model, loaded.tokenizer
    t = time.perf_counter()
    stats = capture(model, tok, prompts, batch_size=8)
    sync()
    out["capture_s"] = time.perf_counter() - t
    out["tokens"] = int(stats.n_tokens)
    t = time.perf_counter()
    one_shot = rank_modules(model, stats).masks(0.5)
    sync()
    out["one_shot_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, seq = sequential_stats_and_masks(model, tok, prompts, stats, method="wanda",
                                        sparsity=0.5, batch_size=8)
    sync()
    out["sequential_s"] = time.perf_counter() - t
    if cuda:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    masks = {"one_shot": one_shot.pruned_cols, "sequential": seq.pruned_cols}
    del loaded, model, stats
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return out, masks


def same_masks(a: dict, b: dict) -> float:
    """Share of modules whose pruned columns are identical, row by row."""
    return statistics.mean(float(torch.equal(a[k], b[k])) for k in a)


def section_scale(args, device: str) -> None:
    shape = LLAMA_TINY if args.tiny else LLAMA_7B
    prompts = calibration(args.samples)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        t = time.perf_counter()
        folder = build(shape, "llama", Path(tmp) / "llama", device)
        built = time.perf_counter() - t
        file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        # the GPU (or CPU) cap: well below the model, above one layer and the cached inputs
        cap = (min(file_bytes // 3, 6 * 2**30) if device == "cuda" else None)
        streamed, sm = prune_run(folder, prompts, device=device, cap=cap,
                                 weights_cap=(2**30 if device == "cuda" else file_bytes // 3),
                                 offload=Path(tmp) / "offload")
        whole, wm = prune_run(folder, prompts, device=device, cap=None, weights_cap=None,
                              offload=Path(tmp) / "offload2")
    streamed["same_masks_one_shot"] = same_masks(sm["one_shot"], wm["one_shot"])
    streamed["same_masks_sequential"] = same_masks(sm["sequential"], wm["sequential"])
    results["scale"] = dict(shape=shape, weight_bytes=file_bytes, build_s=built,
                            samples=args.samples, streamed=streamed, in_memory=whole)
    name = "Llama-7B-shaped" if not args.tiny else "tiny Llama"
    row("scale", f"{name} bf16 ({gib(file_bytes)} of weights), memory plan", streamed["plan"],
        note=f"placement {streamed['placement']}")
    for key, label in (("load_s", "load"), ("capture_s", f"capture, {args.samples} prompts"),
                       ("one_shot_s", "one-shot Wanda 50% ranking + masks"),
                       ("sequential_s", "sequential Wanda 50%, layer by layer")):
        row("scale", f"{label}: streamed (GPU capped at {gib(cap) if cap else '-'})",
            f"{streamed[key]:.1f} s", f"in memory {whole[key]:.1f} s",
            f"{streamed[key] / whole[key]:.2f}x")
    if "peak_gpu_bytes" in whole:
        row("scale", "peak GPU memory allocated", gib(streamed["peak_gpu_bytes"]),
            f"in memory {gib(whole['peak_gpu_bytes'])}",
            f"{streamed['peak_gpu_bytes'] / whole['peak_gpu_bytes']:.0%}")
    row("scale", "masks identical to the in-memory run (share of modules)",
        f"one-shot {streamed['same_masks_one_shot']:.1%}, "
        f"sequential {streamed['same_masks_sequential']:.1%}")


# --------------------------------------------------------------------------- sparse


def section_sparse(args, device: str) -> None:
    if device != "cuda":
        row("sparse", "2:4 semi-structured", "skipped", note="needs CUDA")
        return
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    results["sparse"] = {"backend": "cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS
                         else "cusparselt"}
    shapes = {"gemma-270m": [(1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048)],
              "llama-7b": [(4096, 4096), (11008, 4096), (4096, 11008)]}
    matmul = {}
    for model_name, pairs in shapes.items():
        for out_f, in_f in pairs:
            w24 = prune_2_4_(torch.randn(out_f, in_f, dtype=torch.bfloat16, device="cuda"))
            sw = to_sparse_semi_structured(w24)
            for tokens in (1, 16, 128, 2048):
                x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device="cuda")
                err = ((torch.nn.functional.linear(x, sw) - x @ w24.T).float().norm()
                       / (x @ w24.T).float().norm()).item()
                td, ts = (seconds(lambda x=x, w=w: torch.nn.functional.linear(x, w), repeat=20,
                                  warmup=3) for w in (w24, sw))
                matmul[f"{model_name} {out_f}x{in_f} tokens={tokens}"] = dict(
                    dense_s=td, sparse_s=ts, speedup=td / ts, rel_err=err)
    results["sparse"]["matmul"] = matmul
    for model_name in shapes:
        for tokens in (1, 16, 128, 2048):
            sel = {k: v for k, v in matmul.items() if k.startswith(model_name)
                   and k.endswith(f"tokens={tokens}")}
            td = sum(v["dense_s"] for v in sel.values())
            ts = sum(v["sparse_s"] for v in sel.values())
            row("sparse", f"2:4 vs dense matmul, {model_name} linear shapes, {tokens} tokens",
                f"{ts * 1e6:.0f} us", f"dense {td * 1e6:.0f} us", f"{td / ts:.2f}x",
                note=f"sum over {len(sel)} shapes; max rel err "
                     f"{max(v['rel_err'] for v in sel.values()):.1e}")
    end_to_end(args)


def end_to_end(args) -> None:
    """The 7B-shaped model, 2:4-pruned (magnitude): dense weights vs semi-structured kernels."""
    from torch.sparse import to_sparse_semi_structured

    model = random_llama(args, torch.bfloat16)
    infos = linear_modules(model)
    for info in infos.values():
        prune_2_4_(info.module.weight)
    gen = torch.Generator(device="cuda").manual_seed(0)
    prompt = {b: torch.randint(3, 32000, (b, 128), device="cuda", generator=gen) for b in (1, 8)}
    prefill = torch.randint(3, 32000, (1, 2048), device="cuda", generator=gen)
    new = 64

    def measure(model) -> dict:
        out = {}
        with torch.inference_mode():
            out["prefill_2048_s"] = seconds(lambda: model(prefill, use_cache=False), repeat=5)
            for b, ids in prompt.items():
                def run(ids=ids, model=model):
                    return model.generate(ids, max_new_tokens=new, min_new_tokens=new,
                                          do_sample=False, pad_token_id=0)
                out[f"generate_b{b}_s"] = seconds(run, repeat=3)
                out[f"tokens_b{b}"] = run()[:, 128:].cpu()
        return out

    dense = measure(model)
    with torch.no_grad():
        for info in infos.values():
            info.module.weight = torch.nn.Parameter(
                to_sparse_semi_structured(info.module.weight.data), requires_grad=False)
    sparse = measure(model)
    e2e = {}
    for key in dense:
        if key.endswith("_s"):
            e2e[key] = dict(dense=dense[key], sparse=sparse[key], speedup=dense[key] / sparse[key])
    for b in (1, 8):
        e2e[f"greedy_agreement_b{b}"] = (dense[f"tokens_b{b}"] == sparse[f"tokens_b{b}"]) \
            .float().mean().item()
    results["sparse"]["end_to_end"] = e2e
    for key, label in (("prefill_2048_s", "prefill of 2048 tokens"),
                       ("generate_b1_s", f"generate {new} tokens, batch 1"),
                       ("generate_b8_s", f"generate {new} tokens, batch 8")):
        r = e2e[key]
        row("sparse", f"7B-shaped 2:4 model bf16, {label}: semi-structured kernels",
            f"{r['sparse'] * 1000:.0f} ms", f"dense {r['dense'] * 1000:.0f} ms",
            f"{r['speedup']:.2f}x")
    row("sparse", "greedy tokens equal to the dense 2:4 model (random weights)",
        f"batch 1 {e2e['greedy_agreement_b1']:.0%}, batch 8 {e2e['greedy_agreement_b8']:.0%}")
    del model
    gc.collect()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- decode


def section_decode(args, device: str) -> None:
    shape = GEMMA_TINY if args.tiny else GEMMA_270M
    bandwidth = read_bandwidth(device, gib=4 if device == "cuda" else 1, repeat=10)[0]
    out: dict = {"read_bandwidth_Bps": bandwidth}
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        folder = build(shape, "gemma3_text", Path(tmp) / "gemma", "cpu", torch.float32)
        models = {d: load_model(str(folder), dtype=d, device=device)
                  for d in ("float32", "bfloat16")}
    prompts = calibration(16)
    tokens = {}
    for dtype, loaded in models.items():
        m = loaded.model
        wb = weight_bytes(m)
        cap = seconds(lambda m=m, t=loaded.tokenizer: capture(m, t, prompts), repeat=3)
        r = {"capture_s": cap, "weight_bytes": wb}
        gen = torch.Generator().manual_seed(0)
        for b in (1, 8):
            ids = torch.randint(3, 250, (b, 64), generator=gen).to(device)
            r[f"step_b{b}_s"] = decode_step(m, {"input_ids": ids}, steps=32, repeat=5)
            with torch.inference_mode():
                tokens[(dtype, b)] = m.generate(ids, max_new_tokens=32, min_new_tokens=32,
                                                do_sample=False, pad_token_id=0)[:, 64:].cpu()
            r[f"step_b{b}_bound_s"] = wb / bandwidth
        out[dtype] = r
    out["bf16_greedy_agreement"] = {
        f"b{b}": (tokens[("float32", b)] == tokens[("bfloat16", b)]).float().mean().item()
        for b in (1, 8)}
    results["decode"] = out
    f32, b16 = out["float32"], out["bfloat16"]
    row("decode", f"read bandwidth ({device}, sum over a large tensor)", f"{bandwidth / 1e9:.0f} GB/s")
    row("decode", "capture(), 16 prompts: bf16", f"{b16['capture_s'] * 1000:.0f} ms",
        f"fp32 {f32['capture_s'] * 1000:.0f} ms", f"{f32['capture_s'] / b16['capture_s']:.2f}x")
    for dtype, r in out.items():
        if dtype not in ("float32", "bfloat16"):
            continue
        for b in (1, 8):
            row("decode", f"Gemma-270M-shaped decode step, batch {b}, {dtype}",
                f"{r[f'step_b{b}_s'] * 1000:.2f} ms",
                f"bound {r[f'step_b{b}_bound_s'] * 1000:.2f} ms ({gib(r['weight_bytes'])} read)",
                f"{r[f'step_b{b}_bound_s'] / r[f'step_b{b}_s']:.0%} of bound")
    row("decode", "bf16 greedy tokens equal to fp32 (32 new tokens, random weights)",
        f"batch 1 {out['bf16_greedy_agreement']['b1']:.0%}, "
        f"batch 8 {out['bf16_greedy_agreement']['b8']:.0%}")
    del models
    gc.collect()


# --------------------------------------------------------------------------- diagnose


def section_diagnose(args, device: str) -> None:
    """Why the 2:4 kernels lost and where a decoding step goes: cuSPARSELt against CUTLASS with
    a profile of one call; logits of the 2:4 model through sparse kernels against dense bf16,
    and dense bf16 against fp32 (how far rounding alone moves a random model).

    Not here: a compiled decoding step. torch.compile(mode="reduce-overhead") with
    transformers' static cache skipped CUDA graphs (the cache mutates its inputs) and the
    process ended without a result on torch 2.11 / transformers 5.17 (H200, 2026-11-26)."""
    if device != "cuda":
        row("diagnose", "2:4 kernels and logits", "skipped", note="needs CUDA")
        return
    from torch.profiler import ProfilerActivity, profile
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    out: dict = {}
    # CUTLASS's 2:4 kernels run on compute capability 8.x only (a Hopper refuses them)
    for backend in ("cusparselt",) if torch.cuda.get_device_capability()[0] != 8 else \
            ("cusparselt", "cutlass"):
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        for out_f, in_f in ((4096, 4096), (11008, 4096)):
            w = torch.randn(out_f, in_f, dtype=torch.bfloat16, device="cuda")
            w = w * (torch.arange(in_f, device="cuda") % 4 < 2)  # 2:4 by position
            sw = to_sparse_semi_structured(w)
            for tokens in (16, 2048):
                x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device="cuda")
                td, ts = (seconds(lambda x=x, v=v: torch.nn.functional.linear(x, v), repeat=20,
                                  warmup=3) for v in (w, sw))
                out[f"{backend} {out_f}x{in_f} tokens={tokens}"] = dict(dense_s=td, sparse_s=ts)
                row("diagnose", f"2:4 {backend} {out_f}x{in_f}, {tokens} tokens",
                    f"{ts * 1e6:.0f} us", f"dense {td * 1e6:.0f} us", f"{td / ts:.2f}x")
            if backend == "cusparselt" and out_f == 4096:
                x = torch.randn(2048, in_f, dtype=torch.bfloat16, device="cuda")
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        torch.nn.functional.linear(x, sw)
                    sync()
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
                out["profile_cusparselt"] = table
                print(table, flush=True)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    results["diagnose"] = out

    model = random_llama(args, torch.float32)
    for info in linear_modules(model).values():
        prune_2_4_(info.module.weight)
    ids = torch.randint(3, 32000, (4, 128), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.inference_mode():
        fp32 = model(ids).logits.float()
        model.to(torch.bfloat16)
        bf16 = model(ids).logits.float()
        for info in linear_modules(model).values():
            info.module.weight = torch.nn.Parameter(
                to_sparse_semi_structured(info.module.weight.data), requires_grad=False)
        sparse = model(ids).logits.float()
    del model

    def compare(a, b):
        return dict(rel_err=((a - b).norm() / b.norm()).item(),
                    top1_agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item())
    logits = {"bf16_vs_fp32": compare(bf16, fp32), "sparse_vs_bf16": compare(sparse, bf16),
              "sparse_vs_fp32": compare(sparse, fp32)}
    out["logits"] = logits
    for key, r in logits.items():
        row("diagnose", f"7B-shaped 2:4 model logits, {key.replace('_', ' ')} (4x128 positions)",
            f"top-1 equal {r['top1_agree']:.1%}", note=f"rel err {r['rel_err']:.1e}")
    gc.collect()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="check,scale,sparse,decode,diagnose")
    p.add_argument("--tiny", action="store_true", help="small shapes (a CPU check of the script)")
    p.add_argument("--samples", type=int, default=16, help="calibration prompts (scale)")
    p.add_argument("--scratch", default=None, help="folder for the built models")
    p.add_argument("--deadline", type=float, default=480, help="skip sections started after this")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    results["machine"] = dict(
        device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"),
        tiny=args.tiny, cpu_threads=torch.get_num_threads())
    print(json.dumps(results["machine"]), flush=True)
    sections = {"check": section_check, "scale": section_scale, "sparse": section_sparse,
                "decode": section_decode, "diagnose": section_diagnose}
    for name in args.sections.split(","):
        if time.perf_counter() - start > args.deadline:
            results.setdefault("skipped", []).append(name)
            continue
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            sections[name](args, device)
        except Exception as e:  # one section's failure must not lose the others' figures
            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0)
        results.setdefault("section_s", {})[name] = time.perf_counter() - t
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out = Path(args.out) / ("gpu-tiny.json" if args.tiny else "gpu.json")
        out.write_text(json.dumps(json_safe({"results": results, "rows": rows}), indent=1,
                                  allow_nan=False))
    print("\n| section | figure | value | compared with | ratio | note |\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(r[k]).replace("|", "/") for k in
                                ("section", "figure", "value", "compared", "ratio", "note")) + " |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; errors: {results.get('errors', {})}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
