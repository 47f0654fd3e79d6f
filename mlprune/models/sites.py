"""Names and sites: a model's decoder layers (and the decoder without its head), its hidden
size, and its linear modules under stable readable names.

Linear modules are named ``layers.3.attn.q`` or ``layers.3.mlp.up`` whatever the architecture
calls them (Llama/Gemma/Qwen ``q_proj``, GPT-2 ``c_attn`` Conv1D, BLOOM ``query_key_value``,
XGLM ``fc1``...), so statistics, scores and masks are keyed the same way on every model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mlprune import MlpruneError

# Leaf names of linear modules -> short role names. Roles that read the (normalised)
# residual stream are the ones whose input columns are the hidden feature dimensions.
_ROLE_BY_LEAF = {
    "q_proj": "q", "query": "q", "wq": "q",
    "k_proj": "k", "key": "k", "wk": "k",
    "v_proj": "v", "value": "v", "wv": "v",
    "qkv_proj": "qkv", "query_key_value": "qkv", "c_attn": "qkv", "Wqkv": "qkv",
    "o_proj": "o", "out_proj": "o", "wo": "o", "dense": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up", "w3": "up", "fc_in": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down", "fc2": "down", "dense_4h_to_h": "down", "w2": "down", "fc_out": "down",
}
RESIDUAL_INPUT_ROLES = frozenset({"q", "k", "v", "qkv", "gate", "up", "gate_up"})


@dataclass
class LinearInfo:
    """One prunable linear module: readable name, its path in the model, and how W is laid out."""

    name: str
    path: str
    layer: int
    block: str  # "attn" | "mlp" | "other"
    role: str
    module: nn.Module = field(repr=False)
    transposed: bool  # GPT-2 style Conv1D stores W as (in, out)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out_features, in_features); a view, so writes reach the model.
        An offloaded module holds a meta tensor here except inside :func:`onloaded`."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        """The number of input columns of W (what pruning scores and masks)."""
        return self.weight.shape[1]

    @property
    def reads_residual(self) -> bool:
        """Whether the module's input is the (normalised) residual stream."""
        return self.role in RESIDUAL_INPUT_ROLES


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the longest ModuleList whose items all hold linear modules, among
    those as long as the config's layer count when the config gives one (so that a longer list
    elsewhere, such as a mixture-of-experts expert list, cannot win)."""
    candidates = [mod for _, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) > 0
                  and all(any(_is_linear(m) for m in item.modules()) for item in mod)]
    count = configured_layer_count(model)
    if any(len(mod) == count for mod in candidates):
        candidates = [mod for mod in candidates if len(mod) == count]
    best = max(candidates, key=len, default=None)  # the first of the longest, as before
    if best is None:
        raise MlpruneError(
            f"No decoder layers found in {type(model).__name__}: mlprune looks for a list of "
            "blocks holding Linear or Conv1D modules."
        )
    return list(best)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder without the LM head, so a pass that reads hidden states never computes
    vocabulary logits."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not model else model


def configured_layer_count(model: nn.Module) -> int | None:
    """The number of decoder layers the model's config declares (None if it declares none)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()  # multimodal models: the language model's config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream: from the model's config, else its embeddings."""
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return model.get_input_embeddings().weight.shape[1]


def linear_modules(model: nn.Module) -> dict[str, LinearInfo]:
    """Every Linear/Conv1D inside the decoder layers, keyed by readable name, in forward order."""
    out: dict[str, LinearInfo] = {}
    layer_paths = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    for prefix, layer in model.named_modules():
        if id(layer) not in layer_paths:
            continue
        i = layer_paths[id(layer)]
        for sub, mod in layer.named_modules():
            if not _is_linear(mod):
                continue
            parts = sub.split(".")
            block = _block_of(parts[:-1] or parts)
            role = _ROLE_BY_LEAF.get(parts[-1], parts[-1])
            if parts[-1] in ("dense", "c_proj") and block == "mlp":
                role = "down"
            if parts[-1] == "c_proj" and block == "attn":
                role = "o"
            name = f"layers.{i}.{block}.{role}"
            while name in out:  # two modules mapping to one role: keep both, distinctly
                name += "_"
            out[name] = LinearInfo(
                name=name, path=f"{prefix}.{sub}", layer=i, block=block, role=role,
                module=mod, transposed=_is_conv1d(mod),
            )
    return out


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _block_of(parts: list[str]) -> str:
    joined = ".".join(parts).lower()
    if "attn" in joined or "attention" in joined:
        return "attn"
    if any(k in joined for k in ("mlp", "ffn", "feed_forward", "fc")) or parts == [""]:
        return "mlp"
    return "mlp" if joined.startswith("fc") else "other"
