"""Interventions on residual-stream dimensions: forward hooks that change chosen dims at chosen
sites while the model generates or scores, and are removed as cleanly as masks are restored.

Sites have the names :mod:`mlprune.sites` gives them: ``embed`` (the embedding output, what
layer 0 reads) and ``layers.{i}.resid_post`` (decoder layer i's output, what layer i + 1
reads). An :class:`Intervention` acts on every token position of its sites, prompt and
generated tokens alike (with a KV cache each step's new positions pass through the same
hooks, and the cached ones were edited when they were computed). Its kinds:

- ``zero``: the chosen dims become 0;
- ``mean``: they become their mean over a calibration set (:func:`residual_means`). Sun et al.
  (2024, "Massive activations in LLMs") set massive activations, which sit on the first token
  and a few delimiters, to their mean at those positions; here a dim is set to its mean at
  the first token on each sequence's first token, and to its mean over the other tokens
  elsewhere, so a dim that is large only on the first token keeps a typical first-token value;
- ``scale``: they are multiplied by ``factor`` (below 1 weakens, above 1 amplifies);
- ``add``: a vector is added (LRP2's language vectors, :func:`lrp2_intervention`).

:func:`random_control` draws as many ordinary dims per site (none of the detected ones) for
the control run.

LRP2 (Xu et al., 2023, language representation projection; the paper's other baseline), as
the authors' code computes it (hwichan0720/pruning_for_multilinguality: src/get_lang_vector.py,
src/models/*_lrp2.py, src/evaluate_lrp2.py, experiments/lrp2/search.sh):

- a language's vector at each layer is the mean hidden state of its sentences: each
  sentence's hidden states averaged over all its tokens (BOS included), then averaged over
  100 FLORES dev sentences, shuffled with seed 0 (the same rows in every language, since
  FLORES is parallel). Raw sentences, no prompt template; layers as ``output_hidden_states``
  numbers them (0 = embedding output, L = after the final norm);
- two layers are chosen, a < b. Entering decoder layer a the hidden states get
  ``+ v_en[a] - v_X[a]`` (LIRP: towards English), entering layer b ``+ v_X[b] - v_en[b]``
  (LSRP: back to language X); with b = L, after the final norm;
- they add the vectors only at the tokens of the task's text in language X (XNLI premise and
  hypothesis), not at the template's words, and pick (a, b) by searching every pair on 500
  XNLI validation items (with a = 0 only the projection back happens: their code tests
  ``if lirp_layer:``).

Here (:func:`language_vectors`): the same per-sentence means and the same mean over
sentences, padding excluded, over up to 100 sentences of the parallel corpus's
demonstration pool (never its held-out test slice), the same rows in both languages. The
vectors are added at every position (a translation prompt mixes both languages, and the
generated tokens have no language tag), at the sites named here: entering layer a is site
``layers.{a-1}.resid_post`` (``embed`` for a = 0, which does project); the site after the
final norm is not offered. The pair (a, b) is given, not searched.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from mlprune import MlpruneError, Progress, no_progress
from mlprune.corpus import ParallelCorpus
from mlprune.hooks import Hooks
from mlprune.models import base_model, decoder_layers, hidden_size, input_device
from mlprune.prompts import PromptSet, split_rows

# Re-exported: the site names lived here first, and other modules import them from here.
from mlprune.sites import EMBED, layer_site, layer_sites, site_layer  # noqa: F401
from mlprune.tokens import batches, context_length, pad_token_id, prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KINDS = ("zero", "mean", "scale", "add")
LRP2_SAMPLES = 100  # the authors' sentences per language vector


def parse_layers(text: str | None, n_layers: int) -> list[str]:
    """Sites from a layer list: ``all`` (or None), ``0-11``, ``3,9``, ``embed,0-3``.

    Layer i is decoder layer i's output; ``embed`` is the embedding output."""
    if text is None or text.strip() in ("", "all"):
        return layer_sites(n_layers)
    sites: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == EMBED:
            layers = [-1]
        else:
            lo, dash, hi = part.partition("-")
            try:
                layers = list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
            except ValueError as e:
                raise MlpruneError(f"'{part}' is not a layer or a layer range; write 0-11, "
                                   "3,9 or embed,0-3.") from e
            if not layers:
                raise MlpruneError(f"The layer range '{part}' is empty; write it low-high.")
        for layer in layers:
            if not -1 <= layer < n_layers:
                raise MlpruneError(f"Layer {layer} is outside this model's layers 0-{n_layers - 1}.")
            if layer_site(layer) not in sites:
                sites.append(layer_site(layer))
    if not sites:
        raise MlpruneError("Name at least one layer, e.g. 0-11 or 3,9.")
    return sites


def parse_dims(text: str) -> list[int]:
    """'1,5,9' or '4-7' -> dims, with one clear sentence for anything else."""
    dims: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            dims += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError as e:
            raise MlpruneError(f"'{part}' is not a dimension or a range of them; write "
                               "1,5,9 or 4-7.") from e
    if not dims:
        raise MlpruneError("Name at least one dimension, e.g. --dims 1,5,9.")
    return list(dict.fromkeys(dims))


# --------------------------------------------------------------------------- the object


@dataclass(frozen=True)
class Intervention:
    """What to change, where: plain values except the vectors of ``mean`` and ``add``.

    ``dims`` maps each site to the dims acted on (``None``: every dim of the site).
    ``vectors`` (``mean``: [2, hidden] per site, the mean at the first token and over the
    other tokens; ``add``: [hidden] per site) stay out of :meth:`to_dict`, which is JSON.
    """

    kind: str
    dims: dict[str, tuple[int, ...] | None]
    factor: float | None = None
    vectors: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    label: str = ""

    @property
    def sites(self) -> list[str]:
        """The sites acted on, in the order given."""
        return list(self.dims)

    def n_dims(self, hidden: int) -> int:
        """How many (site, dim) entries the intervention changes."""
        return sum(hidden if d is None else len(d) for d in self.dims.values())

    def to_dict(self) -> dict:
        """JSON-ready: kind, factor, label, dims per site, and each vector's L2 norm."""
        out = {"kind": self.kind, "label": self.label, "factor": self.factor,
               "dims": {s: None if d is None else list(d) for s, d in self.dims.items()}}
        if self.vectors is not None:
            out["vector_norms"] = {s: float(v.float().norm()) for s, v in self.vectors.items()}
        return out

    def check(self, model: nn.Module) -> None:
        """Raise one clear sentence if this intervention cannot act on ``model``."""
        if self.kind not in KINDS:
            raise MlpruneError(f"Unknown intervention '{self.kind}': use zero, mean, scale or "
                               "add (lrp2 builds an add).")
        if self.kind == "scale" and (self.factor is None or not math.isfinite(self.factor)):
            raise MlpruneError("Scaling needs a finite factor (--factor), e.g. 0.5 to weaken the "
                               "dimensions or 2 to amplify them.")
        if not self.dims:
            raise MlpruneError("The intervention names no site to act on.")
        n_layers, hidden = len(decoder_layers(model)), hidden_size(model)
        for site, dims in self.dims.items():
            layer = site_layer(site)
            if layer >= n_layers:
                raise MlpruneError(f"Layer {layer} is outside this model's layers 0-{n_layers - 1}.")
            for d in dims or ():
                if not 0 <= d < hidden:
                    raise MlpruneError(f"Dimension {d} is outside this model's hidden size "
                                       f"(dims 0-{hidden - 1}).")
            if self.kind in ("mean", "add"):
                shape = (2, hidden) if self.kind == "mean" else (hidden,)
                vec = (self.vectors or {}).get(site)
                if vec is None or tuple(vec.shape) != shape:
                    raise MlpruneError(f"The {self.kind} intervention has no vector of shape "
                                       f"{list(shape)} for {site}.")
        if all(d is not None and not d for d in self.dims.values()):
            raise MlpruneError("The intervention names no dimension at any of its sites.")


def make_intervention(kind: str, dims: dict[str, list[int] | None], *, factor: float | None = None,
                      means: dict[str, torch.Tensor] | None = None, label: str = "") -> Intervention:
    """A zero / mean / scale intervention on ``dims`` per site (``means`` from
    :func:`residual_means` for ``mean``). Sites with no dims are left out."""
    kept = {s: None if d is None else tuple(int(x) for x in d) for s, d in dims.items()
            if d is None or len(d)}
    vectors = {s: means[s] for s in kept if s in means} if kind == "mean" and means else None
    return Intervention(kind, kept, factor=None if factor is None else float(factor),
                        vectors=vectors, label=label or kind)


def lrp2_intervention(vectors: dict[str, torch.Tensor], project_at: str,
                      restore_at: str | None = None, label: str = "lrp2") -> Intervention:
    """LRP2 from :func:`language_vectors`' ``v_en - v_X``: add it at ``project_at`` (towards
    English) and subtract it at ``restore_at`` (back to language X), every dim."""
    if restore_at is not None and site_layer(restore_at) <= site_layer(project_at):
        raise MlpruneError(f"LRP2 projects back to the language after projecting to English: the "
                           f"second layer ({restore_at}) must come after the first ({project_at}).")
    missing = [s for s in (project_at, restore_at) if s is not None and s not in vectors]
    if missing:
        raise MlpruneError(f"There is no language vector at {missing[0]}.")
    adds = {project_at: vectors[project_at]}
    if restore_at is not None:
        adds[restore_at] = -vectors[restore_at]
    return Intervention("add", {s: None for s in adds}, vectors=adds, label=label)


# --------------------------------------------------------------------------- hooks


def _first_token_positions(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """[B, T] True where the current forward holds each sequence's first real token: from the
    2-D attention mask (which covers cached positions too), else position 0 of an empty cache."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        return None
    b, t = ids.shape[0], ids.shape[1]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b:
        local = mask.long().argmax(dim=1) - (mask.shape[1] - t)  # first 1 of each row
    else:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        local = torch.full((b,), -past, device=ids.device)
    out = torch.zeros((b, t), dtype=torch.bool, device=ids.device)
    rows = ((local >= 0) & (local < t)).nonzero().flatten()
    out[rows, local[rows]] = True
    return out


class _Edits:
    """What the hooks of one intervention do; edits clone the hidden state, never write into
    a tensor the model may hold elsewhere."""

    def __init__(self, model: nn.Module, iv: Intervention):
        self.model, self.iv = model, iv
        self.first: torch.Tensor | None = None
        p = next(model.parameters())
        self.index = {s: None if d is None else torch.tensor(d, dtype=torch.long, device=p.device)
                      for s, d in iv.dims.items()}
        self.vectors = {s: v.to(p.device) for s, v in (iv.vectors or {}).items()}

    def register(self, hooks: Hooks) -> None:
        """Hook the model at every site of the intervention (and, for ``mean``, where each
        forward's first tokens are told)."""
        layers = decoder_layers(self.model)
        if self.iv.kind == "mean":
            hooks.forward_pre(base_model(self.model), self._track_first, with_kwargs=True)
        for site in self.iv.dims:
            layer = site_layer(site)
            if layer < 0:
                hooks.forward_pre(layers[0], self._embed_hook, with_kwargs=True)
            else:
                hooks.forward(layers[layer], self._layer_hook(site))

    def _track_first(self, module, args, kwargs):
        self.first = _first_token_positions(args, kwargs)

    def edit(self, site: str, h: torch.Tensor) -> torch.Tensor:
        """h with the site's dims changed (a new tensor)."""
        idx = self.index[site]
        cols = slice(None) if idx is None else idx
        out = h.clone()
        kind = self.iv.kind
        if kind == "zero":
            out[..., cols] = 0
        elif kind == "scale":
            out[..., cols] = h[..., cols] * self.iv.factor
        elif kind == "add":
            out[..., cols] = h[..., cols] + self.vectors[site][cols].to(h.dtype)
        else:  # mean: the first-token mean on first tokens, the other tokens' mean elsewhere
            first_mean, rest_mean = (v[cols].to(h.dtype) for v in self.vectors[site])
            first = self.first
            if first is not None and h.dim() == 3 and tuple(first.shape) == tuple(h.shape[:2]):
                out[..., cols] = torch.where(first.unsqueeze(-1), first_mean, rest_mean)
            else:
                out[..., cols] = rest_mean
        return out

    def _embed_hook(self, module, args, kwargs):
        if args:
            return (self.edit(EMBED, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.edit(EMBED, kwargs["hidden_states"])}

    def _layer_hook(self, site: str):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self.edit(site, output[0]), *output[1:])
            return self.edit(site, output)
        return hook


@contextmanager
def intervened(model: nn.Module, intervention: Intervention | None) -> Iterator[nn.Module]:
    """Run the block with the intervention's hooks on the model; they are removed however the
    block ends, leaving the model computing exactly as before. ``None``: no change.

    The hooks hold no lock: whoever shares the model (the dashboard) enters this inside
    ``prune.model_lock(model)``, as it does for masks."""
    if intervention is None:
        yield model
        return
    intervention.check(model)
    edits = _Edits(model, intervention)
    with Hooks() as hooks:
        edits.register(hooks)
        yield model


# --------------------------------------------------------------------------- statistics


class _SiteMeans:
    """Per site, running sums for the means: at each sequence's first token, over its other
    tokens, and of each sequence's own token mean (padding excluded throughout)."""

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        hidden = hidden_size(model)
        self.sites = [EMBED, *layer_sites(len(self.layers))]
        self.first = {s: torch.zeros(hidden, dtype=torch.float64) for s in self.sites}
        self.rest = {s: torch.zeros(hidden, dtype=torch.float64) for s in self.sites}
        self.per_seq = {s: torch.zeros(hidden, dtype=torch.float64) for s in self.sites}
        self.n_first = self.n_rest = self.n_seq = 0
        self.mask: torch.Tensor | None = None  # [B, T] real tokens of the batch in flight

    def add(self, site: str, h: torch.Tensor) -> None:
        m = self.mask.to(h.device)
        hf = h.double() * m.unsqueeze(-1)
        starts = m.long().argmax(dim=1)  # first real token (right padding: column 0)
        rows = torch.arange(h.shape[0], device=h.device)
        first = hf[rows, starts]
        self.first[site] += first.sum(0).cpu()
        self.rest[site] += (hf.sum(dim=(0, 1)) - first.sum(0)).cpu()
        counts = m.sum(dim=1, keepdim=True).clamp_min(1)
        self.per_seq[site] += (hf.sum(dim=1) / counts).sum(0).cpu()

    def run(self, model: nn.Module, ids: list[list[int]], tokenizer: PreTrainedTokenizerBase,
            batch_size: int, progress: Progress) -> None:
        def embed_hook(module, args, kwargs):
            self.add(EMBED, args[0] if args else kwargs["hidden_states"])

        def layer_hook(i: int):
            def hook(module, args, output):
                self.add(layer_site(i), output[0] if isinstance(output, tuple) else output)
            return hook

        device = input_device(model)
        n_batches = -(-len(ids) // batch_size)
        try:
            with Hooks() as hooks, torch.inference_mode():
                hooks.forward_pre(self.layers[0], embed_hook, with_kwargs=True)
                for i, layer in enumerate(self.layers):
                    hooks.forward(layer, layer_hook(i))
                for b, (input_ids, mask) in enumerate(batches(ids, batch_size, pad_token_id(tokenizer))):
                    self.mask = mask.bool()
                    base_model(model)(input_ids=input_ids.to(device),
                                      attention_mask=mask.to(device), use_cache=False)
                    n_real = int(mask.sum())
                    self.n_first += mask.shape[0]
                    self.n_rest += n_real - mask.shape[0]
                    self.n_seq += mask.shape[0]
                    progress(f"batch {b + 1}/{n_batches}", (b + 1) / n_batches)
        finally:
            self.mask = None


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str] | PromptSet,
         model: nn.Module) -> list[list[int]]:
    ids = prompt_ids(tokenizer, texts, context_length(model))
    if not ids or not all(ids):
        raise MlpruneError("There are no tokens to average: give at least one non-empty text.")
    return ids


def residual_means(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   prompts: PromptSet | list[str], *, batch_size: int = 8,
                   progress: Progress = no_progress) -> dict[str, torch.Tensor]:
    """Signed mean of every residual dim per site over the prompts' tokens, padding excluded:
    [2, hidden] fp32 per site, row 0 the mean at each prompt's first token, row 1 the mean over
    all other tokens (what the ``mean`` intervention writes; see the module notes)."""
    acc = _SiteMeans(model)
    acc.run(model, _ids(tokenizer, prompts, model), tokenizer, batch_size, progress)
    n_rest = max(acc.n_rest, 1)
    return {s: torch.stack([acc.first[s] / acc.n_first, acc.rest[s] / n_rest]).float()
            for s in acc.sites}


def sentence_means(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *,
                   batch_size: int = 8, progress: Progress = no_progress
                   ) -> dict[str, torch.Tensor]:
    """Per site, the mean over texts of each text's mean hidden state over its tokens (BOS
    included, padding excluded): a language's vector as the LRP2 authors compute it [hidden]."""
    acc = _SiteMeans(model)
    acc.run(model, _ids(tokenizer, list(texts), model), tokenizer, batch_size, progress)
    return {s: (acc.per_seq[s] / acc.n_seq).float() for s in acc.sites}


def lrp2_sentences(corpus: ParallelCorpus, lang: str, samples: int = LRP2_SAMPLES,
                   seed: int = 0) -> list[str]:
    """Up to ``samples`` sentences of one language from the demonstration pool (never the
    held-out slice), in a seeded order that is the same for every language of the corpus."""
    corpus.require(lang)
    pool, _ = split_rows(corpus)
    rows = list(pool)
    random.Random(seed).shuffle(rows)
    col = corpus.table[lang]
    return [col.iat[r] for r in rows[:samples]]


def language_vectors(model: nn.Module, tokenizer: PreTrainedTokenizerBase, corpus: ParallelCorpus,
                     lang: str, reference: str = "en", *, samples: int = LRP2_SAMPLES,
                     seed: int = 0, batch_size: int = 8,
                     progress: Progress = no_progress) -> dict[str, torch.Tensor]:
    """LRP2's ``v_reference - v_lang`` per site (English minus language X by default), from
    the same rows of the corpus in both languages (:func:`sentence_means`)."""
    if lang == reference:
        raise MlpruneError(f"A language vector compares two languages; both are '{lang}'.")
    if samples < 1:
        raise MlpruneError("A language vector needs at least one sentence.")
    means = {}
    for i, code in enumerate((reference, lang)):
        means[code] = sentence_means(
            model, tokenizer, lrp2_sentences(corpus, code, samples, seed), batch_size=batch_size,
            progress=lambda s, f, i=i, code=code: progress(f"language vector ({code}), {s}",
                                                           (i + f) / 2))
    return {s: means[reference][s] - means[lang][s] for s in means[lang]}


# --------------------------------------------------------------------------- controls


def random_control(dims_by_site: dict[str, list[int] | tuple[int, ...]], hidden: int, seed: int = 0,
                   exclude: set[int] | None = None) -> dict[str, list[int]]:
    """As many random ordinary dims per site as ``dims_by_site`` names, seeded per site.

    Ordinary: not in ``exclude`` (default: every dim ``dims_by_site`` names at any site, so a
    dim large at one layer is never another layer's control)."""
    banned = set(exclude) if exclude is not None else {d for ds in dims_by_site.values() for d in ds}
    pool = [d for d in range(hidden) if d not in banned]
    out = {}
    for site, dims in dims_by_site.items():
        if len(dims) > len(pool):
            raise MlpruneError(f"{site} needs {len(dims)} random control dims but only "
                               f"{len(pool)} ordinary ones are left.")
        out[site] = sorted(random.Random(f"{seed}:{site}").sample(pool, len(dims)))
    return out


def random_like(vectors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random direction of the same L2 norm per site (the control of an ``add``)."""
    out = {}
    for site, v in vectors.items():
        g = torch.Generator().manual_seed(random.Random(f"{seed}:{site}").getrandbits(63))
        r = torch.randn(v.shape, generator=g, dtype=torch.float32)
        out[site] = (r / r.norm().clamp_min(1e-12) * v.float().norm()).to(v.dtype)
    return out
