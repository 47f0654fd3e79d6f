"""ActivationStats: what one prompt set does to a model, as :mod:`mlprune.capture` collects it.

Per residual-stream site (:mod:`mlprune.sites`: ``embed``, ``layers.{i}.resid_post``,
``final_norm``), the magnitude of each dimension: the L2 norm over a prompt's tokens,
averaged over prompts (the paper's analysis). Per linear module, the running squared L2 norm
of each input column (Wanda's ||X_j||^2), in fp32. Per MLP output projection (``down``), how
many tokens activate each hidden neuron (LAPE's and M-Wanda's activation counts).

A calibration *mix* (several prompt sets, each with a weight) is summarised by
:meth:`ActivationStats.combine`: per token, each statistic is the weighted mean of the sets'
own per-token statistics, so a set's weight, not its token count, decides its share.
Statistics are saved as one safetensors file (tensors + JSON metadata), written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlprune import MlpruneError
from mlprune.sites import EMBED, FINAL_NORM, layer_site, layer_sites
from mlprune.storage import atomic_save

NUMBERINGS = ("sites", "hidden_states")


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
        """The model's decoder layers (rows of ``hidden_norms``)."""
        return self.hidden_norms.shape[0]

    def sites(self) -> dict[str, torch.Tensor]:
        """Magnitudes per residual-stream site, by name, in stream order."""
        out = {} if self.embed_norms is None else {EMBED: self.embed_norms}
        out.update({layer_site(i): self.hidden_norms[i] for i in range(self.n_layers)})
        if self.final_norms is not None:
            out[FINAL_NORM] = self.final_norms
        return out

    def layer_view(self, numbering: str = "sites") -> tuple[list[str], torch.Tensor]:
        """Rows of magnitudes and their site names, as a numbering lays them out.

        ``sites``: one row per layer output (row i = ``layers.{i}.resid_post``).
        ``hidden_states``: as ``output_hidden_states`` numbers them, L + 1 rows: 0 is
        ``embed``, i is ``layers.{i-1}.resid_post``, and L, the last, is ``final_norm``.
        """
        if numbering == "sites":
            return layer_sites(self.n_layers), self.hidden_norms
        if numbering != "hidden_states":
            raise MlpruneError(f"Unknown layer numbering '{numbering}': use {' or '.join(NUMBERINGS)}.")
        if self.embed_norms is None or self.final_norms is None:
            raise MlpruneError("These statistics predate the embedding and final-norm sites; "
                               "capture them again.")
        names = [EMBED, *layer_sites(self.n_layers - 1), FINAL_NORM]
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
        tensors = {"hidden_norms": self.hidden_norms.contiguous()}
        for site, norms in (("embed_norms", self.embed_norms), ("final_norms", self.final_norms)):
            if norms is not None:
                tensors[site] = norms.contiguous()
        tensors.update({f"in.{k}": v.contiguous() for k, v in self.input_sqnorms.items()})
        tensors.update({f"act.{k}": v.contiguous() for k, v in self.active_counts.items()})
        header = {"n_tokens": self.n_tokens, "n_prompts": self.n_prompts, "meta": self.meta}
        return atomic_save(path, lambda partial: save_file(
            tensors, str(partial), metadata={"mlprune": json.dumps(header)}))

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

