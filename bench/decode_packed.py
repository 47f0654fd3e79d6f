"""Decoding with oneDNN-packed linears: an experiment for the decoding issue, not a feature.

Every decoder linear of the embedded model (the head left as it is) runs through
``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once for the batch, instead of
``nn.Linear``'s MKL GEMV/GEMM. Prints, in one run, the greedy decoding step at batch 1 and 8,
eager and packed, against the weight-read bound measured in the same run, and whether the
greedy tokens agree (the summation order changes, so fp32 outputs may differ in the last bits).

The packed copies are taken after masks are applied; the mask engine changes weights in
place, so a real decoding path would re-pack after every apply/restore (cost printed).

    .venv/bin/python bench/decode_packed.py        # ~2 min on 2 cores, machine quiet
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tools import decode_step, fmt_s, median, read_bandwidth, weight_bytes  # noqa: E402

from mlprune.corpus import builtin_corpus  # noqa: E402
from mlprune.models import load_model  # noqa: E402
from mlprune.prompts import eval_items  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Packed:
    """Swap each decoder linear's forward for oneDNN's on a packed copy; undo on exit."""

    def __init__(self, model: torch.nn.Module, batch: int):
        self.model, self.batch, self.saved = model, batch, []

    def __enter__(self) -> Packed:
        head = self.model.get_output_embeddings()
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), self.batch)
                bias = None if module.bias is None else module.bias.detach()

                def forward(x, packed=packed, bias=bias):
                    flat = x.reshape(-1, x.shape[-1])
                    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
                    return out.reshape(*x.shape[:-1], out.shape[-1])

                self.saved.append((module, module.forward))
                module.forward = forward
        return self

    def round_trip(self) -> None:
        """Pack and unpack (what a re-pack after each mask apply would cost)."""
        with self:
            pass

    def __exit__(self, *exc) -> None:
        for module, forward in self.saved:
            module.forward = forward


def greedy(model, inputs: dict, pad: int, n: int = 24) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def main() -> None:
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    prompts = [i.prompt for i in eval_items(builtin_corpus(), "fr", "en", shots=4, limit=8)]
    bandwidth, _ = read_bandwidth()
    bound = weight_bytes(model) / bandwidth
    print(f"{torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"weights {weight_bytes(model) / 1e9:.2f} GB -> bound {fmt_s(bound)} a step")
    for batch in (1, 8):
        enc = dict(tok(prompts[:batch], return_tensors="pt", padding=True, padding_side="left"))
        eager = decode_step(model, enc, pad_token_id=tok.pad_token_id)
        tokens = greedy(model, enc, tok.pad_token_id)
        pack_s = median([_timed(Packed(model, batch).round_trip) for _ in range(3)])
        with Packed(model, batch):
            packed = decode_step(model, enc, pad_token_id=tok.pad_token_id)
            same = greedy(model, enc, tok.pad_token_id) == tokens
        print(f"batch {batch}: eager {fmt_s(eager)} ({bound / eager:.0%} of the bound), "
              f"packed {fmt_s(packed)} ({bound / packed:.0%}); {eager / packed:.2f}x; "
              f"greedy tokens identical: {same}; packing costs {fmt_s(pack_s)}")


if __name__ == "__main__":
    main()
