"""One pass of forward hooks over calibration prompts -> :class:`~mlprune.stats.ActivationStats`.

Collected, with padding excluded from every statistic and the LM head never run:
- per residual-stream site (:mod:`mlprune.sites`), the magnitude of each dimension: the L2
  norm over a prompt's tokens, averaged over prompts (the paper's analysis). Sites have
  readable names: ``embed`` (the embedding output, what layer 0 reads),
  ``layers.{i}.resid_post`` (layer i's output) and ``final_norm`` (the last layer's output
  after the model's final norm);
- per linear module, the running squared L2 norm of each input column (Wanda's ||X_j||^2),
  accumulated in fp32 so that fp16/bf16 activations cannot overflow;
- per MLP output projection (``down``), how many tokens activate each hidden neuron: the gate's
  output above 0 where the MLP is gated (as LAPE counts it), else the neuron's value above 0
  (M-Wanda's activation probability).

A pooled mix prompt set (``PromptSet.parts``) is collected per part in the same pass and
combined as :meth:`ActivationStats.combine` combines a mix.

``LayerRunner`` replays the decoder one layer at a time from captured inputs, which is what
sequential calibration (layer l's statistics taken with layers < l already pruned) needs.

``pad_to=N`` reproduces the authors' statistics, bug included: every prompt is padded (or cut)
to N tokens, run without a padding mask as their calibration runs it, and every position,
padding too, counts. The padding goes on the tokenizer's own side (``padding_side``), as
their ``tokenizer(..., padding="max_length")`` put it: on the left for BLOOM and Llama, whose
real tokens then follow (and attend to) the padding, on the right for XGLM and mGPT;
``pad_side="left"`` or ``"right"`` chooses it instead. One detail is not reproduced: for BLOOM,
their layer-by-layer pass built ALiBi's positions from the padding mask
(``build_alibi_tensor(attention_mask)``: left padding at position 0, real tokens counted from
0), while here every position counts, padding included, as the model builds it unmasked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.hooks import Hooks
from mlprune.models import (
    LinearInfo,
    base_model,
    decoder_layers,
    hidden_size,
    input_device,
    is_offloaded,
    linear_modules,
)
from mlprune.prompts import PromptSet

# Re-exported: the statistics and the tokenization helpers lived here first, and other
# modules (and scripts) import them from here.
from mlprune.stats import NUMBERINGS, ActivationStats, check_finite  # noqa: F401
from mlprune.tokens import (  # noqa: F401
    PAD_SIDES,
    batches,
    context_length,
    encode,
    pad_token_id,
    padding_side,
    prompt_ids,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Cancelled(MlpruneError):
    """The user stopped a long computation; the model is left as it was."""


# --------------------------------------------------------------------------- hooks


def _positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x > 0, else 0.0 (finite x): as (x > 0).float(), ~4x faster on a CPU, which
    makes bools slowly and converts them more slowly still."""
    return x.clamp_min(0).sign_()


class _Collector:
    """Forward hooks that add one batch's statistics into running sums, padding excluded.

    Sums are kept per *group* (the parts of a pooled mix prompt set; one group otherwise):
    ``group`` gives each row of the batch in flight its group.
    """

    def __init__(self, layers: list[nn.Module], linears: list[LinearInfo], hidden: int,
                 groups: int = 1, gates: dict[str, nn.Module | None] | None = None):
        self.layers, self.linears, self.groups = layers, linears, groups
        self.hidden_sum = torch.zeros(groups, len(layers), hidden, dtype=torch.float32)
        self.embed_sum = torch.zeros(groups, hidden, dtype=torch.float32)
        self.final_sum = torch.zeros(groups, hidden, dtype=torch.float32)
        self.sqnorms = {info.name: torch.zeros(groups, info.in_features, dtype=torch.float32)
                        for info in linears}
        self.gates = gates or {}  # down module -> its layer's gate (None: count its own input)
        self.active = {name: torch.zeros(groups, self.sqnorms[name].shape[1], dtype=torch.float32)
                       for name in self.gates}
        self.mask: torch.Tensor | None = None  # [B, T] bool for the batch in flight
        self.group: torch.Tensor | None = None  # [B] long: each row's group (None: group 0)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows: torch.Tensor | None = None
        self._rows_on: dict[torch.device, torch.Tensor] = {}
        self._hooks = Hooks()

    def __enter__(self):
        try:
            self._register(self._hooks)
        except BaseException:  # never leave half the hooks on the model
            self._hooks.remove()
            raise
        return self

    def _register(self, hooks: Hooks) -> None:
        if self.layers:
            hooks.forward_pre(self.layers[0], self._embed_hook, with_kwargs=True)
        for i, layer in enumerate(self.layers):
            hooks.forward(layer, self._layer_hook(i))
        for info in self.linears:
            hooks.forward_pre(info.module, self._linear_hook(info.name))
        for name, gate in self.gates.items():
            if gate is not None:
                hooks.forward(gate, self._gate_hook(name))

    def __exit__(self, *exc):
        self._hooks.remove()
        self._last = None

    def start_batch(self, mask: torch.Tensor, group: torch.Tensor | None = None) -> None:
        """The positions that count, and each row's group, of the batch about to run."""
        self.mask, self.group, self._last = mask, group, None
        # the real tokens' rows of a flattened [B*T, F] activation, found once per batch
        # rather than by a boolean index in every hook (None: no padding, every row counts)
        self._rows = None if bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
        self._rows_on = {}

    def _masked(self, x: torch.Tensor) -> bool:
        return self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape

    def _mask_on(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's mask on x's device (a model spread over GPUs runs layers on several)."""
        return self.mask.to(x.device)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of x at real (non-pad) token positions, as fp32 [n_tokens, features]."""
        flat = x.reshape(-1, x.shape[-1])
        if self._masked(x) and self._rows is not None:
            rows = self._rows_on.get(x.device)
            if rows is None:
                rows = self._rows_on[x.device] = self._rows.to(x.device)
            flat = flat.index_select(0, rows)
        return flat.float()

    def _column_sums(self, x: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]
                     ) -> torch.Tensor:
        """Per group, the sum over real tokens of each feature of ``op(x)`` (fp32):
        [groups, features]. ``op`` (elementwise) runs on the real tokens' rows only."""
        if self.groups == 1 or self.group is None:
            return op(self._tokens(x)).sum(dim=0, keepdim=True).cpu()
        if not self._masked(x):
            raise MlpruneError("A pooled calibration mix needs batched [batch, tokens, features] "
                               "activations, which this model's modules do not give.")
        rows = (op(x.float()) * self._mask_on(x).unsqueeze(-1)).sum(dim=1)  # [B, features]
        out = torch.zeros(self.groups, x.shape[-1], dtype=torch.float32, device=rows.device)
        return out.index_add_(0, self.group.to(rows.device), rows).cpu()

    def prompt_norms(self, h: torch.Tensor) -> torch.Tensor | None:
        """Per group, the sum over the batch's prompts of each dimension's L2 norm over real
        tokens [groups, hidden]."""
        if not self._masked(h):
            return None
        norms = (h.float().square() * self._mask_on(h).unsqueeze(-1)).sum(dim=1).sqrt()  # [B, hidden]
        if self.groups == 1 or self.group is None:
            return norms.sum(dim=0, keepdim=True).cpu()
        out = torch.zeros(self.groups, h.shape[-1], dtype=torch.float32, device=norms.device)
        return out.index_add_(0, self.group.to(norms.device), norms).cpu()

    def _embed_hook(self, module, args, kwargs):
        norms = self.prompt_norms(args[0] if args else kwargs["hidden_states"])
        if norms is not None:
            self.embed_sum += norms

    def _layer_hook(self, i: int):
        def hook(module, args, output):
            norms = self.prompt_norms(output[0] if isinstance(output, tuple) else output)
            if norms is not None:
                self.hidden_sum[:, i] += norms
        return hook

    def _linear_hook(self, name: str):
        counts_own_input = name in self.gates and self.gates[name] is None

        def hook(module, args):
            x = args[0]
            # q/k/v (and gate/up) read the same tensor: square it once.
            if self._last is not None and self._last[0] is x:
                sq = self._last[1]
            else:
                sq = self._column_sums(x, torch.square)
                self._last = (x, sq)
            self.sqnorms[name] += sq
            if counts_own_input:
                self.active[name] += self._column_sums(x, _positive)
        return hook

    def _gate_hook(self, name: str):
        def hook(module, args, output):
            self.active[name] += self._column_sums(output, _positive)
        return hook


def activation_sources(model: nn.Module, names: list[str]) -> dict[str, nn.Module | None]:
    """For every MLP output projection (``down``) among ``names``: the module whose output
    above 0 marks a neuron active, its layer's gate where the MLP is gated (SiLU/GELU of the
    gate is positive exactly then), else None (the neuron's own value, what ``down`` reads)."""
    infos = linear_modules(model)
    gates = {(i.layer, i.block): i for i in infos.values() if i.role == "gate"}
    out: dict[str, nn.Module | None] = {}
    for name in names:
        info = infos[name]
        if info.role == "down":
            gate = gates.get((info.layer, info.block))
            out[name] = gate.module if gate is not None and not gate.transposed else None
    return out


def _check_pad_to(pad_to: int | None, model: nn.Module) -> None:
    limit = context_length(model)
    if pad_to is not None and not (0 < pad_to <= (limit or pad_to)):
        raise MlpruneError(f"--pad-to must be between 1 and the model's context ({limit}); "
                           f"got {pad_to}.")


def _forward_batches(ids: list[list[int]], batch_size: int, tokenizer: PreTrainedTokenizerBase,
                     device: torch.device, pad_to: int | None, pad_side: str | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask for the model, positions that count, the rows' indices in
    ``ids``) per batch. With ``pad_to`` the model gets no padding mask and every position
    counts, as the authors ran it, the padding on ``pad_side`` (:func:`padding_side`);
    without, batches are padded on the right and the padding is masked out and not counted."""
    lengths = [min(len(s), pad_to) if pad_to else len(s) for s in ids]
    order = sorted(range(len(ids)), key=lambda i: lengths[i])  # as batches() orders them
    side = padding_side(tokenizer, pad_side) if pad_to else "right"
    chunks = batches([ids[i] for i in order], batch_size, pad_token_id(tokenizer), pad_to, side)
    for start, (input_ids, mask) in zip(range(0, len(ids), batch_size), chunks):
        rows = torch.tensor(order[start:start + batch_size])
        if pad_to is None:
            yield input_ids.to(device), mask.to(device), mask.bool().to(device), rows
        else:
            yield (input_ids.to(device), None, torch.ones_like(mask, dtype=torch.bool).to(device),
                   rows)


def capture(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: PromptSet | list[str], *,
            batch_size: int = 8, modules: list[str] | None = None, progress: Progress = no_progress,
            should_stop: Callable[[], bool] | None = None, pad_to: int | None = None,
            pad_side: str | None = None) -> ActivationStats:
    """Run every prompt once through the decoder and collect :class:`ActivationStats`.

    ``modules`` restricts the linear modules collected (default: all in the decoder layers).
    ``should_stop()`` is polled between batches; if it says so, :class:`Cancelled` is raised.
    ``progress`` is told "batch i/n" after each batch.
    ``pad_to`` reproduces the authors' padded statistics, padded on ``pad_side`` (default: the
    tokenizer's ``padding_side``; see the module notes).
    """
    texts = prompts.texts if isinstance(prompts, PromptSet) else list(prompts)
    if not texts:
        raise MlpruneError("There are no prompts to run.")
    _check_pad_to(pad_to, model)
    side = padding_side(tokenizer, pad_side)  # an unknown side fails before any work
    layers = decoder_layers(model)
    infos = linear_modules(model)
    selected = [infos[n] for n in (modules or infos)]
    ids = prompt_ids(tokenizer, prompts, context_length(model))
    device = input_device(model)
    n_batches = -(-len(ids) // batch_size)
    groups = PromptGroups.of(prompts, len(ids))
    base = base_model(model)
    collector = _Collector(layers, selected, hidden_size(model), groups.count,
                           activation_sources(model, [i.name for i in selected]))
    with collector, torch.inference_mode():
        for b, (input_ids, attention, counted, rows) in enumerate(
                _forward_batches(ids, batch_size, tokenizer, device, pad_to, side)):
            if should_stop is not None and should_stop():
                raise Cancelled("Capture cancelled; nothing was changed.")
            collector.start_batch(counted, groups.rows(rows))
            out = base(input_ids=input_ids, attention_mask=attention, use_cache=False)
            last = getattr(out, "last_hidden_state", None)
            collector.final_sum += collector.prompt_norms(out[0] if last is None else last)
            progress(f"batch {b + 1}/{n_batches}", (b + 1) / n_batches)
    meta = _meta(prompts, tokenizer, model)
    if pad_to:
        meta.update(pad_to=pad_to, pad_side=side)
    tokens = groups.tokens(ids, pad_to)
    parts = []
    for g in range(groups.count):
        n_prompts = groups.prompts(g)
        parts.append(ActivationStats(
            hidden_norms=collector.hidden_sum[g] / n_prompts,
            input_sqnorms={k: v[g].clone() for k, v in collector.sqnorms.items()},
            n_tokens=tokens[g], n_prompts=n_prompts,
            meta=meta if groups.count == 1 else {"prompts": groups.names[g]},
            embed_norms=collector.embed_sum[g] / n_prompts,
            final_norms=collector.final_sum[g] / n_prompts,
            active_counts={k: v[g].clone() for k, v in collector.active.items()}))
    stats = parts[0] if groups.count == 1 else \
        ActivationStats.combine(parts, groups.weights, groups.names, meta=meta)
    check_finite(stats)
    return stats


@dataclass
class PromptGroups:
    """Which prompts of a set belong together: the parts of a pooled mix prompt set
    (``PromptSet.parts``: consecutive runs of prompts, each with a name and a weight), or one
    group of every prompt."""

    group_of: list[int]  # each prompt's group
    names: list[str]
    weights: list[float]

    @classmethod
    def of(cls, prompts: PromptSet | list[str], n: int) -> PromptGroups:
        """The groups of ``n`` prompts: a pooled mix set's parts, else one group."""
        parts = prompts.parts if isinstance(prompts, PromptSet) else None
        if not parts:
            return cls([0] * n, [], [1.0])
        group_of = [g for g, (_, count, _) in enumerate(parts) for _ in range(count)]
        if len(group_of) != n:
            raise MlpruneError("The parts of this mix prompt set do not add up to its prompts.")
        return cls(group_of, [p[0] for p in parts], [p[2] for p in parts])

    @property
    def count(self) -> int:
        """How many groups there are."""
        return len(self.weights)

    def rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The groups of these prompt rows (None when there is one group)."""
        return None if self.count == 1 else torch.tensor(self.group_of)[rows]

    def prompts(self, g: int) -> int:
        """How many prompts group ``g`` holds."""
        return sum(1 for x in self.group_of if x == g)

    def tokens(self, ids: list[list[int]], pad_to: int | None) -> list[int]:
        """Tokens that count, per group."""
        out = [0] * self.count
        for g, seq in zip(self.group_of, ids):
            out[g] += pad_to if pad_to else len(seq)
        return out


def _meta(prompts, tokenizer: PreTrainedTokenizerBase, model) -> dict:
    meta = {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__}
    if isinstance(prompts, PromptSet):
        meta.update({"prompts": prompts.name, "kind": prompts.kind, **prompts.meta,
                     "texts": prompts.texts})
    else:
        meta.update({"prompts": "custom", "kind": "text", "texts": list(prompts)})
    return meta


# --------------------------------------------------------------------------- token view


def token_magnitudes(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                     text: str) -> tuple[list[str], torch.Tensor]:
    """Tokens of one prompt and |h[layer, token, dim]| of the residual stream (bf16, CPU;
    fp16 would overflow to inf at the ~1e5 magnitudes real models reach)."""
    ids = encode(tokenizer, [text], context_length(model))[0]
    layers = decoder_layers(model)
    out: list[torch.Tensor] = []

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        out.append(h[0].detach().abs().to(torch.bfloat16).cpu())

    with Hooks() as hooks, torch.inference_mode():
        for layer in layers:
            hooks.forward(layer, hook)
        device = input_device(model)
        base_model(model)(input_ids=torch.tensor([ids], device=device), use_cache=False)
    tokens = [tokenizer.decode([t]) for t in ids]
    return tokens, torch.stack(out)


# --------------------------------------------------------------------------- layer by layer


class LayerRunner:
    """Replays the decoder one layer at a time, for sequential calibration.

    One dense pass records, per batch, the hidden states entering layer 0 and the keyword
    arguments each layer receives (masks, rotary embeddings: they do not depend on the hidden
    states). Then :meth:`collect` gathers layer l's module statistics from the current hidden
    states and :meth:`advance` pushes them through layer l, pruned or not.

    A pooled mix prompt set is collected per part (``groups``), so that each part's
    statistics can be weighted as the mix says (:meth:`ActivationStats.combine`).

    The cached hidden states live on ``cache_device``: by default where the embeddings put
    them, or on the CPU for an offloaded model (streamed through a GPU one layer at a time, the
    cache of every prompt would crowd out the layer); each batch goes to the model's input
    device as it runs, and accelerate's hook on a layer moves it on to that layer's device.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 prompts: PromptSet | list[str], batch_size: int = 8, pad_to: int | None = None,
                 cache_device: str | torch.device | None = None, pad_side: str | None = None):
        self.model, self.layers = model, decoder_layers(model)
        self.infos = linear_modules(model)
        _check_pad_to(pad_to, model)
        side = padding_side(tokenizer, pad_side)
        ids = prompt_ids(tokenizer, prompts, context_length(model))
        self.n_tokens = len(ids) * pad_to if pad_to else sum(len(s) for s in ids)
        self.groups = PromptGroups.of(prompts, len(ids))
        self.group_tokens = self.groups.tokens(ids, pad_to)
        self.device = device = input_device(model)
        self.cache_device = torch.device(cache_device) if cache_device is not None else \
            torch.device("cpu") if is_offloaded(model) else None
        self.masks: list[torch.Tensor] = []
        self.rows: list[torch.Tensor | None] = []  # each batch's rows' groups
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in self.layers]
        with Hooks() as hooks, torch.inference_mode():
            for i, layer in enumerate(self.layers):
                hooks.forward_pre(layer, self._recorder(i), with_kwargs=True)
            for input_ids, attention, counted, rows in _forward_batches(
                    ids, batch_size, tokenizer, device, pad_to, side):
                self.masks.append(counted)
                self.rows.append(self.groups.rows(rows))
                base_model(model)(input_ids=input_ids, attention_mask=attention, use_cache=False)

    def _recorder(self, i: int):
        def hook(module, args, kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                self.hidden.append(self._cached(hidden.detach()))
            self.calls[i].append((rest, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hook

    def _cached(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.cache_device is None else h.to(self.cache_device)

    def _run(self, i: int) -> list[torch.Tensor]:
        outs = []
        for h, (rest, kwargs) in zip(self.hidden, self.calls[i]):
            o = self.layers[i](h.to(self.device), *rest, **kwargs)
            outs.append(self._cached(o[0] if isinstance(o, tuple) else o))
        return outs

    def collect(self, i: int, names: list[str]) -> tuple[dict[str, torch.Tensor],
                                                          dict[str, torch.Tensor]]:
        """Squared input-column norms of layer i's modules and the activation counts of its
        MLP neurons, from the current hidden states: per module a [groups, in] tensor (one
        row unless the prompts are a pooled mix)."""
        collector = _Collector([], [self.infos[n] for n in names], 1, self.groups.count,
                               activation_sources(self.model, names))
        with collector, torch.inference_mode():
            for b, mask in enumerate(self.masks):
                collector.start_batch(mask, self.rows[b])
                h = self.hidden[b].to(self.device)
                rest, kwargs = self.calls[i][b]
                self.layers[i](h, *rest, **kwargs)
        return collector.sqnorms, collector.active

    def advance(self, i: int) -> None:
        """Replace the hidden states by layer i's output (with its current, maybe pruned, weights)."""
        with torch.inference_mode():
            self.hidden = self._run(i)
