"""The two protocols a run can follow: ``clean`` (mlprune's default) and ``paper`` (the
authors' published setup wherever it was a choice).

Kim, Suzuki, Hirasawa and Komachi's code (hwichan0720/pruning_for_multilinguality) made
choices the paper does not discuss: demonstrations end with the EOS token, 100 calibration
prompts, layer-by-layer (sequential) calibration, layers numbered as
``output_hidden_states`` numbers them, top-20 bars, an overlap of top-x% against bottom-x%,
monolingual prompts of ``shots`` sentences, XNLI and MARC scored on a draw of 1000 items per
language, and prompts padded to 512 tokens (on the tokenizer's side: left for BLOOM and
Llama) with the padding inside the statistics. ``paper`` follows all of them except the
padding, which is a bug: ``pad_to`` (and ``pad_side``) reproduces it on request.
Every difference is listed in :data:`DIFFERENCES`, and its measured effect is in the README.
"""

from __future__ import annotations

# The protocols themselves are choices of a PruneSpec, so they live in the spec (re-exported)
from mlprune.spec import PROTOCOLS, Protocol, get_protocol  # noqa: F401

# Each way ``paper`` differs from ``clean``: (setting, clean, paper, why clean differs).
# The README's protocol table gives the measured effect of each on the embedded model.
DIFFERENCES: list[tuple[str, str, str, str]] = [
    ("demonstration separator", "newline", "EOS token id after every line",
     "a base model continues a newline naturally and generation stops at it"),
    ("calibration prompts", "16", "100",
     "6x less calibration time on a 2-core machine (the README measures what it changes)"),
    ("calibration when pruning", "sequential", "sequential", "the same (Wanda's own choice)"),
    ("layer numbering", "embed, layers.0..L-1 outputs",
     "output_hidden_states: 0 = embedding output, L = last layer after the final norm",
     "names say what a site is; the final norm rescales the last entry"),
    ("top dimensions shown per layer", "5", "20", "5 fit a table; 20 is Figure 2"),
    ("overlap measure", "top-5% in top-5%", "top-40% in bottom-40%",
     "the paper's measure is near zero for any two sets of one model; top-in-top shows sharing"),
    ("padding in statistics", "excluded",
     "excluded (--pad-to 512 reproduces the authors', on the tokenizer's side; --pad-side)",
     "the authors pad every prompt to 512 tokens and count the padding: a bug"),
    ("sentences per monolingual prompt", "2 x shots", "shots",
     "as long as a translation prompt of the same shots, so the two compare token for token"),
    ("XNLI / MARC items per language", "every test item",
     "1000, drawn as the authors' (datasets' shuffle(seed=0), first 1000)",
     "every item gives tighter intervals; the authors scored a 1000-item draw (evaluate.py's "
     "debug mode, the one their xnli.sh and marc2.sh run)"),
    ("demonstration order", "random draws from the dev pool", "random draws from the dev pool",
     "the authors walk FLORES dev in order; the built-in pool has 120 sentences"),
]
