"""One pass of forward hooks over calibration prompts -> ActivationStats.

Collected, with padding excluded from every statistic and the LM head never run:
- per residual-stream site, the magnitude of each dimension: the L2 norm over a prompt's
  tokens, averaged over prompts (the paper's analysis). Sites have readable names:
  ``embed`` (the embedding output, what layer 0 reads), ``layers.{i}.resid_post`` (layer i's
  output) and ``final_norm`` (the last layer's output after the model's final norm);
- per linear module, the running squared L2 norm of each input column (Wanda's ||X_j||^2),
  accumulated in fp32 so that fp16/bf16 activations cannot overflow;
- per MLP output projection (``down``), how many tokens activate each hidden neuron: the gate's
  output above 0 where the MLP is gated (as LAPE counts it), else the neuron's value above 0
  (M-Wanda's activation probability).

A calibration *mix* (several prompt sets, each with a weight) is summarised by
:meth:`ActivationStats.combine`: per token, each statistic is the weighted mean of the sets'
own per-token statistics, so a set's weight, not its token count, decides its share. A pooled
mix prompt set (``PromptSet.parts``) is collected per part in the same pass and combined alike.

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

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.models import (
    LinearInfo,
    decoder_layers,
    hidden_size,
    input_device,
    is_offloaded,
    linear_modules,
)
from mlprune.prompts import PromptSet

NUMBERINGS = ("sites", "hidden_states")


class Cancelled(MlpruneError):
    """The user stopped a long computation; the model is left as it was."""


@dataclass
class ActivationStats:
    """What one prompt set does to a model, per layer and per linear module."""

    hidden_norms: torch.Tensor  # [layers, hidden] fp32: layers.{i}.resid_post
    input_sqnorms: dict[str, torch.Tensor]  # module name -> [in_features] fp32, summed over tokens
    n_tokens: int
    n_prompts: int
    meta: dict = field(default_factory=dict)
    embed_norms: torch.Tensor | None = None  # [hidden]: the embedding output (layer 0's input)
    final_norms: torch.Tensor | None = None  # [hidden]: after the final norm
    # down module name -> [in_features]: tokens on which each MLP neuron was active
    active_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    # a mix's parts, (name, normalised weight, stats), when these stats combine several sets;
    # kept in memory only (each part is cached on its own)
    parts: list[tuple[str, float, ActivationStats]] = field(default_factory=list, repr=False)

    @property
    def n_layers(self) -> int:
        return self.hidden_norms.shape[0]

    def sites(self) -> dict[str, torch.Tensor]:
        """Magnitudes per residual-stream site, by name, in stream order."""
        out = {} if self.embed_norms is None else {"embed": self.embed_norms}
        out.update({f"layers.{i}.resid_post": self.hidden_norms[i] for i in range(self.n_layers)})
        if self.final_norms is not None:
            out["final_norm"] = self.final_norms
        return out

    def layer_view(self, numbering: str = "sites") -> tuple[list[str], torch.Tensor]:
        """Rows of magnitudes and their site names, as a numbering lays them out.

        ``sites``: one row per layer output (row i = ``layers.{i}.resid_post``).
        ``hidden_states``: as ``output_hidden_states`` numbers them, L + 1 rows: 0 is
        ``embed``, i is ``layers.{i-1}.resid_post``, and L, the last, is ``final_norm``.
        """
        if numbering == "sites":
            return [f"layers.{i}.resid_post" for i in range(self.n_layers)], self.hidden_norms
        if numbering != "hidden_states":
            raise MlpruneError(f"Unknown layer numbering '{numbering}': use {' or '.join(NUMBERINGS)}.")
        if self.embed_norms is None or self.final_norms is None:
            raise MlpruneError("These statistics predate the embedding and final-norm sites; "
                               "capture them again.")
        names = ["embed"] + [f"layers.{i}.resid_post" for i in range(self.n_layers - 1)] \
            + ["final_norm"]
        rows = torch.cat([self.embed_norms[None], self.hidden_norms[:-1], self.final_norms[None]])
        return names, rows

    def input_norms(self, name: str) -> torch.Tensor:
        """||X_j|| per input column of a module, per token (RMS) so sets of any size compare."""
        return (self.input_sqnorms[name] / max(self.n_tokens, 1)).sqrt()

    def active_share(self, name: str) -> torch.Tensor:
        """Share of tokens on which each MLP neuron (input column of a down module) was active."""
        if name not in self.active_counts:
            raise MlpruneError(f"These statistics hold no activation counts for {name} (they "
                               "predate them, or it is no MLP output projection); capture again.")
        return self.active_counts[name] / max(self.n_tokens, 1)

    @classmethod
    def combine(cls, stats: list[ActivationStats], weights: list[float],
                names: list[str] | None = None, meta: dict | None = None) -> ActivationStats:
        """The statistics of a calibration mix: per token, the weighted mean of each set's
        statistics (weights normalised to sum to 1).

        Per input column, the mean squared input is ``sum_k w_k * sqnorm_k / n_tokens_k`` (so
        ``input_norms`` is its square root), the active share likewise; per residual site,
        the magnitudes are ``sum_k w_k * magnitude_k``. ``parts`` keeps each set with its
        weight, for methods that compare the sets (M-Wanda).
        """
        if not stats or len(stats) != len(weights):
            raise MlpruneError("A calibration mix needs one weight per prompt set.")
        if any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
            raise MlpruneError("Mix weights must be finite, at least 0, and not all 0.")
        total_w = float(sum(weights))
        w = [float(x) / total_w for x in weights]
        names = names or [s.meta.get("prompts", f"set {i}") for i, s in enumerate(stats)]
        n_tokens = sum(s.n_tokens for s in stats)

        def per_token(tables: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            shared = [k for k in tables[0] if all(k in t for t in tables)]
            return {k: n_tokens * sum(wk * t[k] / max(s.n_tokens, 1)
                                      for wk, t, s in zip(w, tables, stats)) for k in shared}

        def mixed(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            if any(v is None for v in values):
                return None
            return sum(wk * v for wk, v in zip(w, values))

        first = stats[0].meta
        meta = meta if meta is not None else {
            **{k: first[k] for k in ("model", "separator", "shots", "seed", "corpus") if k in first},
            "prompts": "mix", "kind": "mix"}
        meta = {**meta, "components": [
            {"prompts": n, "weight": wk, "n_tokens": s.n_tokens, "n_prompts": s.n_prompts}
            for n, wk, s in zip(names, w, stats)]}
        return cls(hidden_norms=mixed([s.hidden_norms for s in stats]),
                   input_sqnorms=per_token([s.input_sqnorms for s in stats]),
                   n_tokens=n_tokens, n_prompts=sum(s.n_prompts for s in stats), meta=meta,
                   embed_norms=mixed([s.embed_norms for s in stats]),
                   final_norms=mixed([s.final_norms for s in stats]),
                   active_counts=per_token([s.active_counts for s in stats]),
                   parts=list(zip(names, w, stats)))

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON metadata), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"hidden_norms": self.hidden_norms.contiguous()}
        for site, norms in (("embed_norms", self.embed_norms), ("final_norms", self.final_norms)):
            if norms is not None:
                tensors[site] = norms.contiguous()
        tensors.update({f"in.{k}": v.contiguous() for k, v in self.input_sqnorms.items()})
        tensors.update({f"act.{k}": v.contiguous() for k, v in self.active_counts.items()})
        header = {"n_tokens": self.n_tokens, "n_prompts": self.n_prompts, "meta": self.meta}
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={"mlprune": json.dumps(header)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        """Read stats written by :meth:`save` (files from before activation counts read as
        having none)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MlpruneError(f"No statistics file at {path}.")
        try:
            with safe_open(str(path), "pt") as f:
                header = json.loads(f.metadata()["mlprune"])
            tensors = load_file(str(path))
        except Exception as e:
            raise MlpruneError(f"{path} is not an mlprune statistics file ({e}).") from e
        return cls(
            hidden_norms=tensors.pop("hidden_norms"),
            embed_norms=tensors.pop("embed_norms", None),
            final_norms=tensors.pop("final_norms", None),
            input_sqnorms={k[3:]: v for k, v in tensors.items() if k.startswith("in.")},
            active_counts={k[4:]: v for k, v in tensors.items() if k.startswith("act.")},
            n_tokens=header["n_tokens"], n_prompts=header["n_prompts"], meta=header["meta"],
        )


# --------------------------------------------------------------------------- tokenisation


def encode(tokenizer, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids per text. Special tokens typed as text stay text (never become control tokens)."""
    kwargs = {"add_special_tokens": True}
    try:
        ids = tokenizer(texts, split_special_tokens=True, **kwargs)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        ids = tokenizer(texts, **kwargs)["input_ids"]
    if max_length:
        ids = [seq[:max_length] for seq in ids]
    return ids


def prompt_ids(tokenizer, prompts: PromptSet | list[str],
               max_length: int | None = None) -> list[list[int]]:
    """Token ids of every prompt. EOS-separated prompt sets get the tokenizer's EOS id after
    each line (a token id: the text of a line is never parsed for special tokens)."""
    if not isinstance(prompts, PromptSet) or prompts.segments is None:
        return encode(tokenizer, prompts.texts if isinstance(prompts, PromptSet) else list(prompts),
                      max_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MlpruneError("This tokenizer has no EOS token, which EOS-separated prompts need.")
    start = encode(tokenizer, [""])[0]  # what the tokenizer puts before any text (e.g. BOS)
    out = []
    for lines in prompts.segments:
        seq = list(start)
        for line in _plain_ids(tokenizer, lines):
            seq += line + [eos]
        out.append(seq[:max_length] if max_length else seq)
    return out


def _plain_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of texts with no special tokens added and none parsed from the text."""
    try:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        return tokenizer(texts, add_special_tokens=False)["input_ids"]


PAD_SIDES = ("tokenizer", "left", "right")


def padding_side(tokenizer, side: str | None = None) -> str:
    """The side padding goes: ``left`` or ``right`` as given, else (``None`` or
    ``"tokenizer"``) the tokenizer's own ``padding_side`` (right when it has none)."""
    if side in (None, "tokenizer"):
        own = getattr(tokenizer, "padding_side", None)
        return own if own in ("left", "right") else "right"
    if side not in ("left", "right"):
        raise MlpruneError(f"Unknown padding side '{side}': use {', '.join(PAD_SIDES)}.")
    return side


def batches(ids: list[list[int]], batch_size: int, pad_id: int,
            pad_to: int | None = None, side: str = "right"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded (input_ids, attention_mask) batches of similar lengths (less padding), padded on
    ``side`` (right by default); with ``pad_to``, every row is cut (its first ``pad_to``
    tokens kept) or padded to exactly that many tokens."""
    if side not in ("left", "right"):
        raise MlpruneError(f"Unknown padding side '{side}': use left or right.")
    if pad_to is not None:
        ids = [s[:pad_to] for s in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = [ids[i] for i in order[start:start + batch_size]]
        width = pad_to or max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            where = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            input_ids[row, where] = torch.tensor(seq, dtype=torch.long)
            mask[row, where] = 1
        yield input_ids, mask


def context_length(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


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
        self._handles: list = []

    def __enter__(self):
        if self.layers:
            self._handles.append(self.layers[0].register_forward_pre_hook(self._embed_hook,
                                                                          with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(i)))
        for info in self.linears:
            self._handles.append(info.module.register_forward_pre_hook(self._linear_hook(info.name)))
        for name, gate in self.gates.items():
            if gate is not None:
                self._handles.append(gate.register_forward_hook(self._gate_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
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


def base_model(model: nn.Module) -> nn.Module:
    """The decoder without the LM head, so calibration never computes vocabulary logits."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not model else model


def _check_pad_to(pad_to: int | None, model: nn.Module) -> None:
    limit = context_length(model)
    if pad_to is not None and not (0 < pad_to <= (limit or pad_to)):
        raise MlpruneError(f"--pad-to must be between 1 and the model's context ({limit}); "
                           f"got {pad_to}.")


def _forward_batches(ids: list[list[int]], batch_size: int, tokenizer, device, pad_to: int | None,
                     pad_side: str | None = None
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


def capture(model: nn.Module, tokenizer, prompts: PromptSet | list[str], *, batch_size: int = 8,
            modules: list[str] | None = None, progress: Progress = no_progress,
            should_stop: Callable[[], bool] | None = None,
            pad_to: int | None = None, pad_side: str | None = None) -> ActivationStats:
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
        parts = prompts.parts if isinstance(prompts, PromptSet) else None
        if not parts:
            return cls([0] * n, [], [1.0])
        group_of = [g for g, (_, count, _) in enumerate(parts) for _ in range(count)]
        if len(group_of) != n:
            raise MlpruneError("The parts of this mix prompt set do not add up to its prompts.")
        return cls(group_of, [p[0] for p in parts], [p[2] for p in parts])

    @property
    def count(self) -> int:
        return len(self.weights)

    def rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The groups of these prompt rows (None when there is one group)."""
        return None if self.count == 1 else torch.tensor(self.group_of)[rows]

    def prompts(self, g: int) -> int:
        return sum(1 for x in self.group_of if x == g)

    def tokens(self, ids: list[list[int]], pad_to: int | None) -> list[int]:
        """Tokens that count, per group."""
        out = [0] * self.count
        for g, seq in zip(self.group_of, ids):
            out[g] += pad_to if pad_to else len(seq)
        return out


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (else 0)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def _meta(prompts, tokenizer, model) -> dict:
    meta = {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__}
    if isinstance(prompts, PromptSet):
        meta.update({"prompts": prompts.name, "kind": prompts.kind, **prompts.meta,
                     "texts": prompts.texts})
    else:
        meta.update({"prompts": "custom", "kind": "text", "texts": list(prompts)})
    return meta


def check_finite(stats: ActivationStats) -> None:
    """Raise one clear sentence if any statistic is NaN or infinite."""
    if not torch.isfinite(stats.hidden_norms).all():
        bad = (~torch.isfinite(stats.hidden_norms)).any(dim=1).nonzero().flatten().tolist()
        raise MlpruneError(f"Hidden-state magnitudes are NaN or infinite in layers {bad}: "
                           "the model overflows on these prompts (try float32).")
    for name, v in stats.input_sqnorms.items():
        if not torch.isfinite(v).all():
            raise MlpruneError(f"Input norms of {name} are NaN or infinite: the model overflows "
                               "on these prompts (try float32).")


# --------------------------------------------------------------------------- token view


def token_magnitudes(model: nn.Module, tokenizer, text: str) -> tuple[list[str], torch.Tensor]:
    """Tokens of one prompt and |h[layer, token, dim]| of the residual stream (bf16, CPU;
    fp16 would overflow to inf at the ~1e5 magnitudes real models reach)."""
    ids = encode(tokenizer, [text], context_length(model))[0]
    layers = decoder_layers(model)
    out: list[torch.Tensor] = []

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        out.append(h[0].detach().abs().to(torch.bfloat16).cpu())

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.inference_mode():
            device = input_device(model)
            base_model(model)(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
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

    def __init__(self, model: nn.Module, tokenizer, prompts: PromptSet | list[str],
                 batch_size: int = 8, pad_to: int | None = None,
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
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True))
        try:
            with torch.inference_mode():
                for input_ids, attention, counted, rows in _forward_batches(
                        ids, batch_size, tokenizer, device, pad_to, side):
                    self.masks.append(counted)
                    self.rows.append(self.groups.rows(rows))
                    base_model(model)(input_ids=input_ids, attention_mask=attention,
                                      use_cache=False)
        finally:
            for h in handles:
                h.remove()

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
