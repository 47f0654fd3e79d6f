"""Text -> token ids -> padded batches, the same way for every pass over a model.

Capture, interventions, evaluation and zero-shot scoring all tokenize here, so that a prompt
becomes the same ids wherever it is run: special tokens typed as text stay text (never
control tokens), EOS-separated prompt sets get the tokenizer's EOS id between lines, and
prompts are cut to the model's context. :func:`batches` pads them into (input_ids,
attention_mask) batches of similar lengths, on the side :func:`padding_side` names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from mlprune import MlpruneError
from mlprune.prompts import PromptSet
from mlprune.spec import PAD_SIDES  # the spec's vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str],
           max_length: int | None = None) -> list[list[int]]:
    """Token ids per text. Special tokens typed as text stay text (never become control tokens)."""
    kwargs = {"add_special_tokens": True}
    try:
        ids = tokenizer(texts, split_special_tokens=True, **kwargs)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        ids = tokenizer(texts, **kwargs)["input_ids"]
    if max_length:
        ids = [seq[:max_length] for seq in ids]
    return ids


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: PromptSet | list[str],
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
        for line in plain_ids(tokenizer, lines):
            seq += line + [eos]
        out.append(seq[:max_length] if max_length else seq)
    return out


def plain_ids(tokenizer: PreTrainedTokenizerBase,
              texts: str | list[str]) -> list[int] | list[list[int]]:
    """Token ids of a text (or of each of a list of texts) with no special tokens added and
    none parsed from the text."""
    try:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        return tokenizer(texts, add_special_tokens=False)["input_ids"]


def padding_side(tokenizer: PreTrainedTokenizerBase, side: str | None = None) -> str:
    """The side padding goes: ``left`` or ``right`` as given, else (``None`` or
    ``"tokenizer"``) the tokenizer's own ``padding_side`` (right when it has none)."""
    if side in (None, "tokenizer"):
        own = getattr(tokenizer, "padding_side", None)
        return own if own in ("left", "right") else "right"
    if side not in ("left", "right"):
        raise MlpruneError(f"Unknown padding side '{side}': use {', '.join(PAD_SIDES)}.")
    return side


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (else 0)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


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
    """The most tokens the model reads at once, from its config (None when it does not say)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None
