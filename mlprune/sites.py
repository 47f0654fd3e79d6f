"""The residual-stream sites, named in one place.

A site is where the residual stream is read or edited: ``embed`` (the embedding output, what
decoder layer 0 reads), ``layers.{i}.resid_post`` (decoder layer i's output, what layer i + 1
reads) and ``final_norm`` (the final norm's output, what the head reads). Captures store their
norms under these names, features are detected at them, interventions act on them, and
pruning protects the columns of the linears that read them.
"""

from __future__ import annotations

import re

from mlprune import MlpruneError

EMBED = "embed"
FINAL_NORM = "final_norm"
_LAYER_SITE = re.compile(r"layers\.(\d+)\.resid_post")


def layer_site(layer: int) -> str:
    """The site of decoder layer ``layer``'s output (-1: the embedding output)."""
    return EMBED if layer < 0 else f"layers.{layer}.resid_post"


def layer_sites(n_layers: int) -> list[str]:
    """The output sites of decoder layers 0 .. n_layers - 1."""
    return [layer_site(i) for i in range(n_layers)]


def site_layer(site: str) -> int:
    """-1 for ``embed``, i for ``layers.{i}.resid_post``; one clear sentence for anything else."""
    if site == EMBED:
        return -1
    match = _LAYER_SITE.fullmatch(site)
    if match is None:
        raise MlpruneError(f"'{site}' is not a residual site an intervention can act on: use "
                           "embed or layers.{i}.resid_post.")
    return int(match.group(1))


def residual_input_site(layer: int) -> str:
    """The site decoder layer ``layer`` reads: the embedding output for layer 0, else the
    previous layer's output."""
    return layer_site(layer - 1)
