"""Scoring multiple-choice items: each choice's log-likelihood under the model.

Each choice is scored as XGLM and lm-evaluation-harness do, in one of two forms:

- prompt + continuation: the score is log P(choice | prompt). As in lm-eval, the prompt's
  trailing whitespace moves to the front of the choice, and prompt and choice are tokenized
  separately and concatenated, so a token merge across the boundary cannot make the choice's
  tokens ambiguous.
- whole sequence: a prompt holding the slot ``{choice}`` is scored as one sequence per choice,
  the slot filled in, over all its tokens after BOS (the paper's XNLI and MARC protocol).

Scores are available raw (``norm="none"``: summed log-probability), per token (``"token"``,
the paper's mean token log-probability) and per byte (``"byte"``, lm-eval's acc_norm idea).
The paper's code (src/evaluate.py) divides the summed log-probability of the n tokens after
BOS by n + 1 (its attention-mask sum counts BOS); ``"token"`` divides by n. The two rank the
choices of an item alike when they have equal token counts, as Yes/Also/No and
negative/positive do in the paper's templates under Gemma 3's tokenizer.

Only the logits that are needed are computed: the model's head runs on the scored positions
alone (``logits_to_keep`` with left padding), choices that share a token prefix share its
log-probabilities, identical inputs run once, and batches are sized so that the logits held
at once stay under a memory budget (Gemma's vocabulary has 262k entries).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.capture import context_length, encode
from mlprune.models import input_device
from mlprune.zeroshot.tasks import TaskItem

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


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text without special tokens (typed special tokens stay text)."""
    try:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
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
    return ctx, _plain_ids(tokenizer, continuation)


def _requests(tokenizer, items: Sequence[TaskItem], max_len: int | None) -> list[list[_Request]]:
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


def score_items(model: nn.Module, tokenizer, items: Sequence[TaskItem], *, batch_size: int = 8,
                max_logits_mb: int = 256, progress: Progress = no_progress) -> list[ItemScores]:
    """Log-likelihood of every choice of every item, in item order.

    Sequences are left-padded so that the positions to score end each row, and the model's
    head runs on those last positions only (``logits_to_keep``); padding is masked and
    position ids skip it. A batch holds at most ``batch_size`` distinct inputs, and no more
    than ``max_logits_mb`` of fp32 logits unless one input alone needs more. ``progress``
    hears ("scoring", fraction of batches done).
    """
    if batch_size < 1:
        raise MlpruneError("The batch size must be at least 1.")
    per_item = _requests(tokenizer, items, context_length(model))
    flat = [r for reqs in per_item for r in reqs]
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
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

