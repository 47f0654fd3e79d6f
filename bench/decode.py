"""Greedy decoding steps on CPU against the weight-read bound: mlprune's few-row kernel
(``kernels.FewRowLinear`` for the decoder linears, ``WeightMajorHead`` for the head) against
torch's own ``nn.Linear`` (the head in MKL's fast forms, as before), fp32 at batch 1, 8 and
16 (bf16 is torch's alone: the kernel declines it), alternated in one run, with the bound measured in the same run. Reports whether
greedy tokens agree with torch's on held-out fr->en prompts (the kernel sums in its own
order, so bits may differ).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/decode.py   # ~3 min on 2 quiet cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tools import decode_step, fmt_s, machine, read_bandwidth, weight_bytes  # noqa: E402

from mlprune import kernels  # noqa: E402
from mlprune.corpus import builtin_corpus  # noqa: E402
from mlprune.models import load_model  # noqa: E402
from mlprune.prompts import eval_items  # noqa: E402

FEW_ROWS = kernels.few_rows


def set_kernel(model: torch.nn.Module, on: bool) -> None:
    """Decoder linears as FewRowLinear (on) or nn.Linear (off); the head stays a
    WeightMajorHead, whose few-row path is the kernel (on) or MKL's forms (off)."""
    kernels.few_rows = FEW_ROWS if on else (lambda x, weight: None)
    for module in model.modules():
        if type(module) in (torch.nn.Linear, kernels.FewRowLinear):
            module.__class__ = kernels.FewRowLinear if on else torch.nn.Linear


def greedy(model, inputs: dict, pad: int, n: int = 24) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def main() -> None:
    info = machine()
    print(f"{info.get('cpu')}; {torch.get_num_threads()} threads; kernels available: "
          f"{kernels.available()}")
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    prompts = [i.prompt for i in eval_items(builtin_corpus(), "fr", "en", shots=4, limit=16)]
    bandwidth, _ = read_bandwidth()
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        bound = weight_bytes(model) / bandwidth
        print(f"{dtype}: read bandwidth {bandwidth / 1e9:.1f} GB/s; weights "
              f"{weight_bytes(model) / 1e9:.2f} GB -> bound {fmt_s(bound)} a step")
        for batch in (1, 8, 16):
            enc = dict(tok(prompts[:batch], return_tensors="pt", padding=True, padding_side="left"))
            if dtype != torch.float32:  # the kernel declines bf16: torch's GEMM was faster
                t = decode_step(model, enc, pad_token_id=tok.pad_token_id, repeat=2)
                print(f"  batch {batch:2d}: torch {fmt_s(t)} ({bound / t:.0%} of the bound)")
                continue
            times, tokens = {}, {}
            for on in (False, True, True, False):  # alternated: a burst of load hits both
                set_kernel(model, on)
                t = decode_step(model, enc, pad_token_id=tok.pad_token_id, repeat=2)
                times[on] = min(times.get(on, t), t)
                tokens[on] = greedy(model, enc, tok.pad_token_id)
            same = sum(a == b for a, b in zip(tokens[True], tokens[False]))
            print(f"  batch {batch:2d}: torch {fmt_s(times[False])} ({bound / times[False]:.0%} "
                  f"of the bound), kernel {fmt_s(times[True])} ({bound / times[True]:.0%}); "
                  f"{times[False] / times[True]:.2f}x; greedy outputs identical {same}/{batch}")
    model.to(torch.float32)


if __name__ == "__main__":
    main()
