"""How the reference implementations calibrate, re-implemented small for comparison.

Wanda (github.com/locuslab/wanda, lib/prune.py: prepare_calibration_input, prune_wanda and
lib/layerwrapper.py: WrappedGPT.add_batch), as used for the multilingual experiments:

1. every calibration prompt is padded to a fixed length (512 tokens here);
2. a "Catcher" replaces the decoder layers and records, one sample at a time, the hidden
   states entering layer 0 and the arguments each layer receives; nothing past it runs;
3. for each layer in turn: forward hooks on its linear modules run ``add_batch`` on every
   sample, one at a time (batch size 1), over all positions, padding included; then every
   sample goes through the layer a second time to give the next layer's inputs (in Wanda,
   after the layer was pruned; pruning itself is not timed here).

The original Catcher keeps layer 0's arguments for every layer; Gemma 3 gives its sliding
and global layers different masks and rotary tables, so this version records each layer's
own arguments (at no extra cost: the layers are skipped while recording).
"""

from __future__ import annotations

import torch
from torch import nn

from mlprune.models import decoder_layers, linear_modules


class WrappedLinear:
    """Wanda's WrappedGPT: the running mean over samples of squared input-column norms."""

    def __init__(self, module: nn.Module, in_features: int):
        self.scaler_row = torch.zeros(in_features, device=module.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _record_layer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Per sample: the hidden states entering layer 0 and every layer's keyword arguments."""
    layers = decoder_layers(model)
    calls: list[list[dict]] = [[] for _ in layers]
    firsts: list[torch.Tensor] = []

    def catcher(i: int, layer: nn.Module):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                firsts.append(hidden_states)
            calls[i].append(kwargs)
            return hidden_states  # skip the layer: only its arguments are wanted now
        return forward

    for i, layer in enumerate(layers):
        layer.forward = catcher(i, layer)
    try:
        for j in range(input_ids.shape[0]):
            model.base_model(input_ids=input_ids[j:j + 1], attention_mask=attention_mask[j:j + 1],
                             use_cache=False)
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    return firsts, calls


def wanda_calibration(model: nn.Module, tokenizer, texts: list[str], seqlen: int = 512) -> dict:
    """Squared-norm statistics the reference way; returns them with the real-token count."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seqlen,
                    return_tensors="pt")
    device = next(model.parameters()).device
    input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    infos = linear_modules(model)
    layers = decoder_layers(model)
    with torch.no_grad():
        inps, calls = _record_layer_inputs(model, input_ids, attention_mask)
        outs = [None] * len(inps)
        stats = {}
        for i, layer in enumerate(layers):
            subset = {n: info for n, info in infos.items() if info.layer == i}
            wrapped = {n: WrappedLinear(info.module, info.in_features) for n, info in subset.items()}
            handles = [info.module.register_forward_hook(
                lambda _m, inp, _out, w=wrapped[n]: w.add_batch(inp[0].data))
                for n, info in subset.items()]
            for j in range(len(inps)):
                out = layer(inps[j], **calls[i][j])
                outs[j] = out[0] if isinstance(out, tuple) else out
            for h in handles:
                h.remove()
            stats.update({n: w.scaler_row for n, w in wrapped.items()})
            # (Wanda prunes the layer here, then recomputes its outputs for the next layer)
            for j in range(len(inps)):
                out = layer(inps[j], **calls[i][j])
                outs[j] = out[0] if isinstance(out, tuple) else out
            inps, outs = outs, inps
    return {"scaler_row": stats, "real_tokens": int(attention_mask.sum()),
            "computed_tokens": int(attention_mask.numel())}
