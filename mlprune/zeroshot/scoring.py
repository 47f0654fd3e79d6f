"""Scoring multiple-choice items: each choice's log-likelihood under the model.

Each choice is scored as XGLM and lm-evaluation-harness do, in one of two forms:

- prompt + continuation: the score is log P(choice | prompt). As in lm-eval, the prompt's
  trailing whitespace moves to the front of the choice, and prompt and choice are tokenized
  separately and concatenated, so a token merge across the boundary cannot make the choice's
  tokens ambiguous.
- whole sequence: a prompt holding the slot ``{choice}`` is scored as one sequence per choice,
  the slot filled in, over all its tokens after BOS (the paper's XNLI and MARC protocol).

A sequence always starts from a token that is not scored. For tokenizers that put no BOS in
front of a text (BLOOM, mGPT), :func:`split_tokens` starts an empty context (a whole
sequence, or a prompt that is only whitespace) with the BOS token, or EOS where there is no
BOS, so the sequence's first real token is scored too. The authors' code does not: it
tokenizes with the tokenizer's own special tokens and scores what follows the first token,
taking that for BOS, so for these models it leaves each sequence's first word unscored and
its whole-sequence scores differ from these by that token's log-probability.

Scores are available raw (``norm="none"``: summed log-probability), per token (``"token"``,
the paper's mean token log-probability) and per byte (``"byte"``, lm-eval's acc_norm idea).
The paper's code (src/evaluate.py) divides the summed log-probability of the n tokens after
BOS by n + 1 (its attention-mask sum counts BOS); ``"token"`` divides by n. The two rank the
choices of an item alike when they have equal token counts, as Yes/Also/No and
negative/positive do in the paper's templates under Gemma 3's tokenizer.

Only what is needed is computed. By default (``share_prefix``) an item's choices share one
forward pass over their common token prefix (the prompt, or a whole sequence's words before
the choices differ): it runs once with the KV cache on, and each choice's remaining tokens run
on a copy of that cache. Items are batched by length to limit padding. The vocabulary head
runs on exactly the scored positions (a prompt's positions in a continuation task never reach
it; each position once, however many choices read it), gathered over batches into passes of
a few hundred. A bare linear head is read in blocks of vocabulary rows whose logits are
log-sum-exp'ed while still in cache, so the fp32 logits held at once stay far under the
memory budget (Gemma's vocabulary has 262k entries); a hooked or other head is called as a
module on the full vocabulary, in chunks of positions that fit the budget.

Cache reuse applies to decoder models whose logits are their head applied to the decoder's
output (Gemma 3, Llama, Qwen2, XGLM, BLOOM, GPT-2). Other models, items longer than a sliding
attention window, and items whose choices share no token take the plain path: each choice's
whole sequence, left-padded, the head on the last positions (``logits_to_keep``), choices that
share a token prefix sharing its log-probabilities and identical inputs running once. Both
give the same log-probabilities up to floating-point rounding (tests/test_scoring_fast.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.kernels import FewRowLinear, WeightMajorHead
from mlprune.models import base_model, input_device
from mlprune.tokens import context_length, encode, pad_token_id, plain_ids
from mlprune.zeroshot.tasks import TaskItem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.cache_utils import Cache

NORMS = ("token", "byte", "none")


@dataclass(frozen=True)
class ItemScores:
    """Log-likelihood of each choice of one item."""

    item: TaskItem
    logprob: tuple[float, ...]  # summed log-probability of the scored tokens
    n_tokens: tuple[int, ...]
    n_bytes: tuple[int, ...]

    def scores(self, norm: str = "token") -> list[float]:
        """Each choice's score: summed (``none``), per token (``token``) or per byte (``byte``)."""
        if norm == "none":
            return list(self.logprob)
        if norm == "token":
            return [lp / max(n, 1) for lp, n in zip(self.logprob, self.n_tokens)]
        if norm == "byte":
            return [lp / max(n, 1) for lp, n in zip(self.logprob, self.n_bytes)]
        raise MlpruneError(f"Unknown normalisation '{norm}': use {', '.join(NORMS)}.")

    def predicted(self, norm: str = "token") -> int:
        """The highest-scoring choice (the first of equals)."""
        s = self.scores(norm)
        return max(range(len(s)), key=lambda i: (s[i], -i))

    def correct(self, norm: str = "token") -> bool:
        """Whether the choice predicted under ``norm`` is the item's answer."""
        return self.predicted(norm) == self.item.label


@dataclass
class _Request:
    """One choice: its tokens, and which of its targets this run computes.

    Targets ``tokens[start:]`` are scored; those before ``compute_from`` lie in a token prefix
    shared with the item's first choice (``owner``), so their log-probabilities are read from it.
    """

    tokens: list[int]
    start: int
    compute_from: int
    owner: int | None
    n_bytes: int
    logps: list[float] = field(default_factory=list)


def split_tokens(tokenizer: PreTrainedTokenizerBase, context: str,
                 continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids the lm-eval way.

    The context's trailing whitespace moves to the continuation, both are tokenized separately
    (the context with the tokenizer's special prefix, e.g. BOS) and concatenated. An empty
    context becomes the BOS token, or EOS for tokenizers without one, so the first token of a
    whole sequence is scored too.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = encode(tokenizer, [context])[0] if context else encode(tokenizer, [""])[0]
    if not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise MlpruneError("This tokenizer has neither a BOS nor an EOS token to start "
                               "a sequence with, so an empty prompt cannot be scored.")
        ctx = [prefix]
    return ctx, plain_ids(tokenizer, continuation)


def _requests(tokenizer: PreTrainedTokenizerBase, items: Sequence[TaskItem],
              max_len: int | None) -> list[list[_Request]]:
    out = []
    for item in items:
        reqs = []
        for context, text in item.pairs():
            ctx, cont = split_tokens(tokenizer, context, text)
            if not cont:
                raise MlpruneError(f"Choice '{text}' of item {item.id} ({item.lang}) has no tokens.")
            tokens = ctx + cont
            start = len(ctx)
            if max_len and len(tokens) > max_len + 1:  # keep the end, as lm-eval does
                cut = len(tokens) - (max_len + 1)
                tokens, start = tokens[cut:], max(start - cut, 1)
            n_bytes = len((context[len(context.rstrip()):] + text).encode("utf-8"))
            reqs.append(_Request(tokens, start, start, None, n_bytes))
        # Targets inside the longest token prefix common to all choices are predicted from
        # identical inputs: compute them once (for choice 0) and share them.
        if len(reqs) > 1 and len({r.start for r in reqs}) == 1:
            common = _common_prefix([r.tokens for r in reqs])
            for r in reqs[1:]:
                r.compute_from, r.owner = max(r.start, min(common, len(r.tokens))), 0
        out.append(reqs)
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _forward_options(model: nn.Module) -> tuple[bool, bool]:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params, "logits_to_keep" in params


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def score_items(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[TaskItem], *,
                batch_size: int = 8, max_logits_mb: int = 256, progress: Progress = no_progress,
                share_prefix: bool = True) -> list[ItemScores]:
    """Log-likelihood of every choice of every item, in item order.

    With ``share_prefix`` (where the model allows it, see the module docstring) a batch runs
    the common token prefixes of up to ``batch_size`` items once, then all their choices'
    remaining tokens on the cached prefixes. Without it, or where it does not apply, sequences
    are left-padded so that the positions to score end each row, and the head runs on those
    last positions only (``logits_to_keep``); a batch then holds at most ``batch_size``
    distinct inputs. Either way padding is masked, position ids skip it, and no more than
    ``max_logits_mb`` of fp32 logits are held at once unless one position (plain path: one
    input) alone needs more. ``progress`` hears ("scoring", fraction of batches done).
    """
    if batch_size < 1:
        raise MlpruneError("The batch size must be at least 1.")
    per_item = _requests(tokenizer, items, context_length(model))
    units: list[_Unit] = []
    plain: list[_Request] = []
    window = _sliding_window(model) if share_prefix and _shares_prefix(model) else 0
    for reqs in per_item:
        unit = _unit(reqs, window) if window else None
        if unit is None:
            plain += reqs
        else:
            units.append(unit)
    n = max(len(plain) + sum(len(u.reqs) for u in units), 1)
    done = len(plain) / n
    if plain:
        _score_plain(model, tokenizer, plain, batch_size, max_logits_mb,
                     lambda stage, f: progress(stage, f * done))
    if units:
        _score_shared(model, tokenizer, units, batch_size, max_logits_mb, window,
                      lambda stage, f: progress(stage, done + f * (1 - done)))
    results = []
    for item, reqs in zip(items, per_item):
        logprob = []
        for r in reqs:
            shared = 0.0
            if r.owner is not None:
                owner = reqs[r.owner]
                shared = sum(owner.logps[t - owner.compute_from] for t in range(r.start, r.compute_from))
            logprob.append(shared + sum(r.logps))
        results.append(ItemScores(item, tuple(logprob), tuple(len(r.tokens) - r.start for r in reqs),
                                  tuple(r.n_bytes for r in reqs)))
    return results


def _score_plain(model: nn.Module, tokenizer: PreTrainedTokenizerBase, flat: list[_Request],
                 batch_size: int, max_logits_mb: int, progress: Progress) -> None:
    """Each request's log-probabilities from its whole sequence (the plain path)."""
    # Inputs are tokens[:-1]; identical inputs (e.g. single-token choices after one prompt)
    # run once, each request reading its own targets.
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(flat):
        if r.compute_from < len(r.tokens):
            rows.setdefault(tuple(r.tokens[:-1]), []).append(i)
    need = {key: max(len(flat[i].tokens) - flat[i].compute_from for i in members)
            for key, members in rows.items()}
    order = sorted(rows, key=lambda key: (need[key], len(key)), reverse=True)
    per_position = _vocab_size(model) * 4
    budget = max_logits_mb * 2**20
    groups: list[list[tuple[int, ...]]] = []
    for key in order:  # need[] is non-increasing along `order`: the first row sets the width
        if groups and len(groups[-1]) < batch_size and \
                (len(groups[-1]) + 1) * need[groups[-1][0]] * per_position <= budget:
            groups[-1].append(key)
        else:
            groups.append([key])
    with_pos, with_keep = _forward_options(model)
    device = input_device(model)
    pad = pad_token_id(tokenizer)
    with torch.inference_mode():
        for b, group in enumerate(groups):
            keep = need[group[0]]
            width = max(len(key) for key in group)
            input_ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, key in enumerate(group):
                input_ids[row, width - len(key):] = torch.tensor(key)
                mask[row, width - len(key):] = 1
            kwargs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                      "use_cache": False}
            if with_pos:  # left padding: real tokens still start at position 0
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(device)
            if with_keep:
                kwargs["logits_to_keep"] = keep
            logits = model(**kwargs).logits[:, -keep:].float()
            lse = logits.logsumexp(-1)
            for row, key in enumerate(group):
                for i in rows[key]:
                    r = flat[i]
                    k = len(r.tokens) - r.compute_from
                    target = torch.tensor(r.tokens[r.compute_from:], device=logits.device)
                    picked = logits[row, keep - k:].gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    r.logps = (picked - lse[row, keep - k:]).tolist()
            del logits, lse
            progress("scoring", (b + 1) / len(groups))


# --------------------------------------------------------------------------- shared prefixes

# Model types whose causal-LM logits are exactly the output embeddings applied to the base
# model's last hidden state (Gemma's optional soft-capping aside), and whose base model takes
# a cache and explicit positions or an attention mask for them (BLOOM's ALiBi): the shared
# path calls the two itself, so a type is listed only once it is proven equal to the plain
# path (tests/test_scoring_fast.py).
_SHARED_TYPES = frozenset({"gemma3_text", "llama", "qwen2", "xglm", "bloom", "gpt2"})


@dataclass
class _Unit:
    """One item's work on the shared path: the token prefix common to all its choices' inputs
    (run once) and the distinct continuations of it (``rows``; one that begins another is
    covered by that one, causal attention giving its positions the same states)."""

    reqs: list[_Request]
    prefix: list[int]
    rows: list[tuple[int, ...]]
    row_of: list[int | None]  # per request: the row holding its input's tail (None: no tail)

    @property
    def width(self) -> int:
        return max((len(row) for row in self.rows), default=0)


def _shares_prefix(model: nn.Module) -> bool:
    """Whether the shared-prefix path applies: a listed architecture, its base model taking
    a cache, on one device (device maps and offloading take the plain path)."""
    if getattr(model.config, "model_type", None) not in _SHARED_TYPES:
        return False
    if getattr(model, "hf_device_map", None) is not None:
        return False
    base = base_model(model)
    if base is model or not hasattr(model, "get_output_embeddings") or \
            model.get_output_embeddings() is None:
        return False
    params = inspect.signature(base.forward).parameters
    return "cache" in params or "past_key_values" in params


def _sliding_window(model: nn.Module) -> int:
    """Tokens a cached item may span: under the sliding window, where there is one, so the
    window never binds and a cache holds every prefix token; otherwise the context."""
    window = getattr(model.config, "sliding_window", None)
    limit = context_length(model) or 2**31
    return min(window, limit) if isinstance(window, int) and window > 0 else limit


def _unit(reqs: list[_Request], window: int) -> _Unit | None:
    """The shared-path work of one item's choices, or None for the plain path (no common
    token, or too long for the sliding window)."""
    inputs = [tuple(r.tokens[:-1]) for r in reqs]
    n = _common_prefix([list(x) for x in inputs])
    if n == 0:
        return None
    tails = sorted({x[n:] for x in inputs if len(x) > n}, key=len, reverse=True)
    rows: list[tuple[int, ...]] = []
    for tail in tails:  # longest first, so a tail that begins another finds it listed
        if not any(row[:len(tail)] == tail for row in rows):
            rows.append(tail)
    row_of = [next(k for k, row in enumerate(rows) if row[:len(x) - n] == x[n:])
              if len(x) > n else None for x in inputs]
    unit = _Unit(reqs, list(inputs[0][:n]), rows, row_of)
    if n + unit.width >= window:
        return None
    for r in reqs:  # every target is computed here: no reading from the first choice
        r.compute_from, r.owner = r.start, None
        r.logps = [0.0] * (len(r.tokens) - r.start)
    return unit


def _unit_groups(units: list[_Unit], batch_size: int, window: int) -> list[list[_Unit]]:
    """Batches of up to ``batch_size`` items of similar prefix and continuation lengths (less
    padding), each spanning fewer tokens than the sliding window once padded."""
    groups: list[list[_Unit]] = []
    prefix = width = 0
    for u in sorted(units, key=lambda u: (u.width, len(u.prefix))):
        if groups and len(groups[-1]) < batch_size and \
                max(prefix, len(u.prefix)) + max(width, u.width) < window:
            groups[-1].append(u)
            prefix, width = max(prefix, len(u.prefix)), max(width, u.width)
        else:
            groups.append([u])
            prefix, width = len(u.prefix), u.width
    return groups


def _cache_of(out) -> Cache:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _score_shared(model: nn.Module, tokenizer: PreTrainedTokenizerBase, units: list[_Unit],
                  batch_size: int, max_logits_mb: int, window: int, progress: Progress) -> None:
    """Each request's log-probabilities, its item's common prefix run once per item."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    groups = _unit_groups(units, batch_size, window)
    states: list[torch.Tensor] = []
    targets: list[tuple[int, int, _Request, int]] = []
    held = 0  # hidden states waiting for the head
    with torch.inference_mode():
        for b, group in enumerate(groups):
            hidden, wanted = _group_states(model, pad_token_id(tokenizer), group)
            targets += [(held + at, *rest) for at, *rest in wanted]
            states.append(hidden)
            held += hidden.shape[0]
            # The head's weight is read once per pass: give it a few hundred positions at once
            if held >= _HEAD_ROWS or b == len(groups) - 1:
                _head_logprobs(head, cap, torch.cat(states), targets, max_logits_mb)
                states, targets, held = [], [], 0
            progress("scoring", (b + 1) / len(groups))


def _group_states(model: nn.Module, pad: int, group: list[_Unit]
                  ) -> tuple[torch.Tensor, list[tuple[int, int, _Request, int]]]:
    """The last hidden states that a batch of items' targets are predicted from, each once,
    and per target: (row of those states, target token, its request, index in its logps)."""
    from transformers.cache_utils import DynamicCache  # lazily, as mlprune.models does

    base = base_model(model)
    params = inspect.signature(base.forward).parameters
    with_pos = "position_ids" in params
    device = input_device(model)
    # 1. The prefixes, left-padded so that each ends where its continuations begin.
    lens = torch.tensor([len(u.prefix) for u in group])
    width = int(lens.max())
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for i, u in enumerate(group):
        ids[i, width - len(u.prefix):] = torch.tensor(u.prefix)
        mask[i, width - len(u.prefix):] = 1
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": True}
    if with_pos:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(device)
    out = base(**kwargs)
    states = [out.last_hidden_state.flatten(0, 1)]
    # 2. Every item's continuations at once, right-padded, each on a copy of its item's
    # cached prefix (the cache's batch rows picked per continuation).
    tails = [(i, k, row) for i, u in enumerate(group) for k, row in enumerate(u.rows)]
    span = max((len(row) for _, _, row in tails), default=0)
    if tails:
        pick = torch.tensor([i for i, _, _ in tails])
        ids = torch.full((len(tails), span), pad, dtype=torch.long)
        tail_mask = torch.zeros((len(tails), span), dtype=torch.long)
        for j, (_, _, row) in enumerate(tails):
            ids[j, :len(row)] = torch.tensor(row)
            tail_mask[j, :len(row)] = 1
        cache = _cache_of(out)
        cached = DynamicCache([(layer.keys[pick.to(layer.keys.device)],
                                layer.values[pick.to(layer.values.device)])
                               for layer in cache.layers], config=base.config)
        kwargs = {"input_ids": ids.to(device), "use_cache": True,
                  "cache" if "cache" in params else "past_key_values": cached,
                  "attention_mask": torch.cat([mask[pick], tail_mask], 1).to(device)}
        if with_pos:
            kwargs["position_ids"] = (lens[pick, None] + torch.arange(span)).to(device)
        states.append(base(**kwargs).last_hidden_state.flatten(0, 1))
    del out
    # 3. Which state each target reads: position p predicts token p + 1.
    row_index = {(i, k): j for j, (i, k, _) in enumerate(tails)}
    offset = len(group) * width  # the continuations' states follow the prefixes'
    gather: list[int] = []  # rows of the concatenated states, each once
    slots: dict[int, int] = {}  # row of the concatenated states -> index in gather
    targets: list[tuple[int, int, _Request, int]] = []
    for i, u in enumerate(group):
        n = len(u.prefix)
        for r, k in zip(u.reqs, u.row_of):
            for p in range(r.start - 1, len(r.tokens) - 1):
                at = i * width + width - n + p if p < n else \
                    offset + row_index[(i, k)] * span + p - n
                if at not in slots:
                    slots[at] = len(gather)
                    gather.append(at)
                targets.append((slots[at], r.tokens[p + 1], r, p - r.start + 1))
    hidden = torch.cat(states)[torch.tensor(gather, device=states[0].device)]
    return hidden, targets


# Rows of the head per matmul on the blocked path: each block's logits are small (16 KiB a
# position) and read again by the log-sum-exp while still in cache, instead of a 1 MiB row
# of Gemma's 262k logits per position written out to memory and read back. On 1-2 CPU
# threads 2048-4096 rows ran the head and its log-sum-exp fastest (bench/scoring.py).
_VOCAB_BLOCK = 4096
# Positions gathered (across batches) before the head runs: a matmul with the head reaches
# ~85% of the machine's matmul peak from ~500 rows, ~70% at 100 (Gemma 3 270M, one thread).
_HEAD_ROWS = 512


def _plain_linear(head: nn.Module) -> bool:
    """Whether the head is a bare ``nn.Linear`` (or mlprune's :class:`WeightMajorHead` or
    :class:`FewRowLinear`, the same product in faster forms) that nothing hooks, so that reading its weight in blocks
    computes what calling it would (a hook may watch or change the call)."""
    from torch.nn.modules import module as torch_module

    return (type(head) in (nn.Linear, WeightMajorHead, FewRowLinear) and head.weight.device.type != "meta"
            and not head._forward_hooks and not head._forward_pre_hooks
            and not torch_module._global_forward_hooks
            and not torch_module._global_forward_pre_hooks)


def _head_logprobs(head: nn.Module, cap: float | None, hidden: torch.Tensor,
                   targets: list[tuple[int, int, _Request, int]], max_logits_mb: int) -> None:
    """Run the head on ``hidden`` and write each target's log-probability into its request,
    holding at most ``max_logits_mb`` of logits at once (at least one position's block)."""
    targets = sorted(targets, key=lambda t: t[0])
    budget = max_logits_mb * 2**20
    blocked = _plain_linear(head)
    vocab = int(head.weight.shape[0]) if blocked else 0
    block = min(vocab, _VOCAB_BLOCK) if blocked else 0
    per_pass = max(1, budget // (4 * (block or _head_width(head))))
    at = torch.tensor([t[0] for t in targets], device=hidden.device)
    tok = torch.tensor([t[1] for t in targets], device=hidden.device)
    t0 = 0
    for c0 in range(0, hidden.shape[0], per_pass):
        t1 = t0
        while t1 < len(targets) and targets[t1][0] < c0 + per_pass:
            t1 += 1
        rows, cols = at[t0:t1] - c0, tok[t0:t1]
        h = hidden[c0:c0 + per_pass]
        if blocked:
            picked = torch.empty(t1 - t0, device=hidden.device)
            parts = []
            for v0 in range(0, vocab, block):
                bias = None if head.bias is None else head.bias[v0:v0 + block]
                logits = _capped(nn.functional.linear(h, head.weight[v0:v0 + block], bias), cap)
                parts.append(logits.logsumexp(-1))
                inside = (cols >= v0) & (cols < v0 + block)
                picked[inside] = logits[rows[inside], cols[inside] - v0]
                del logits
            lse = torch.stack(parts, -1).logsumexp(-1)
        else:  # the module itself, on the full vocabulary
            logits = _capped(head(h[None])[0], cap)
            picked, lse = logits[rows, cols], logits.logsumexp(-1)
            del logits
        for (_, _, r, s), v in zip(targets[t0:t1], (picked - lse[rows]).tolist()):
            r.logps[s] = v
        t0 = t1


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """fp32 logits, soft-capped first where the model does (Gemma's causal LMs with a
    ``final_logit_softcapping``, after the head and in its dtype)."""
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _head_width(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else 1
