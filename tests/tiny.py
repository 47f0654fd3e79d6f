"""Tiny random models of every supported architecture, with a byte-level tokenizer (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = ("gemma3_text", "llama", "qwen2", "xglm", "bloom", "gpt2")
SPECIALS = ["<pad>", "<bos>", "<eos>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens + <pad> <bos> <eos>, any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                            special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def tiny_config(arch: str, hidden: int = 32, layers: int = 2, heads: int = 4):
    common = dict(vocab_size=259, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=4,
                                    n_positions=512, **common)
    if arch == "bloom":
        return AutoConfig.for_model("bloom", hidden_size=hidden, n_layer=layers, n_head=4, **common)
    if arch == "xglm":
        return AutoConfig.for_model("xglm", d_model=hidden, num_layers=layers, attention_heads=4,
                                    ffn_dim=2 * hidden, max_position_embeddings=512, **common)
    extra = {"head_dim": 8} if arch == "gemma3_text" else {}
    return AutoConfig.for_model(arch, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=2,
                                intermediate_size=2 * hidden, max_position_embeddings=512,
                                **extra, **common)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    """A randomly initialised causal LM of this architecture, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    return model.eval()


def save_tiny(folder: Path, arch: str = "llama", seed: int = 0, **kw) -> Path:
    """Write a tiny model (``kw``: its hidden size, layers...) and its tokenizer as a Hugging
    Face folder."""
    tiny_model(arch, seed, **kw).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
