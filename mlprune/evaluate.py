"""Evaluation: greedy generation (dense and pruned), chrF/BLEU, output language, perplexity.

Generation is greedy and stops at the end of the line or at EOS, so no token is generated
past the answer of a few-shot prompt. Every function runs on whatever weights the model has
now: wrap calls in ``prune.pruned(model, masks)`` to evaluate a pruned variant.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache

import sacrebleu
import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation import BaseStreamer

from mlprune import MlpruneError, Progress, no_progress
from mlprune.corpus import ParallelCorpus
from mlprune.models import input_device
from mlprune.prompts import eval_items, split_rows
from mlprune.prune import MaskSet, pruned
from mlprune.tokens import batches, context_length, encode


@dataclass
class Generation:
    """One greedy continuation: its text, its tokens and each token's probability."""

    text: str
    tokens: list[str]
    probs: list[float]


class _EndOfLine(StoppingCriteria):
    """Stop each sequence once its newest token holds a newline (batched: per row)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        return torch.tensor(["\n" in self.tokenizer.decode([t]) for t in last], device=input_ids.device)


class _RecordProbs(LogitsProcessor):
    """Records the probability of the greedy choice at each step (without keeping logits)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.float().softmax(-1).max(-1).values.cpu())
        return scores


class _Asked(StoppingCriteria):
    """Stops every row once ``should_stop()`` says so (a stream's reader has gone)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.should_stop(), device=input_ids.device)


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
             max_new_tokens: int = 48, batch_size: int = 8, progress: Progress = no_progress,
             streamer: BaseStreamer | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[Generation]:
    """Greedy continuations of each prompt up to the end of the line (or EOS); ``progress``
    is told "prompt i/n" after each batch. ``streamer`` (one prompt only) is handed each new
    token as ``model.generate`` makes it; ``should_stop()`` ends generation early."""
    if streamer is not None and len(prompts) != 1:
        raise MlpruneError("A streamed generation takes one prompt.")
    ids = encode(tokenizer, prompts, _room(model, max_new_tokens))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)
    results: dict[int, Generation] = {}
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        # left padding, so every continuation starts at the same column
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        recorder = _RecordProbs()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None,
                temperature=None, pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList(
                    [_EndOfLine(tokenizer, width)] + ([_Asked(should_stop)] if should_stop else [])),
                logits_processor=LogitsProcessorList([recorder]), streamer=streamer,
            )
        new = out[:, width:].cpu()
        for row, i in enumerate(chunk):
            results[i] = _trim(tokenizer, new[row].tolist(), [s[row].item() for s in recorder.steps])
        done += len(chunk)
        progress(f"prompt {done}/{len(ids)}", done / len(ids))
    return [results[i] for i in range(len(ids))]


class _TokenQueue(BaseStreamer):
    """What ``model.generate`` streams, as items of a queue: each new token id, then None
    (the prompt it is handed first is skipped)."""

    def __init__(self):
        self.items: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.items.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.items.put(None)


def stream_generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, *,
                    max_new_tokens: int = 48,
                    hold: Callable[[], AbstractContextManager] = nullcontext
                    ) -> Generator[str, None, Generation]:
    """The greedy continuation of one prompt as text pieces, each yielded as soon as its
    token is made; returns the :class:`Generation` that :func:`generate` gives (it runs
    :func:`generate` itself, so the two always agree).

    Generation runs in a helper thread inside ``hold()`` (e.g. the model's lock with masks
    applied), entered and left by that thread: the caller must not hold that lock. Closing
    the generator early stops generation at the next token and waits until ``hold()`` has
    exited (the masks restored), so nothing runs on after it is closed.
    """
    tokens, stop = _TokenQueue(), threading.Event()
    done: dict = {}

    def run() -> None:
        try:
            with hold():
                done["result"] = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                          streamer=tokens, should_stop=stop.is_set)[0]
        except BaseException as e:  # handed to the reader, raised there
            done["error"] = e
        finally:
            tokens.end()  # a second None when generate ended normally: harmless

    worker = threading.Thread(target=run, daemon=True, name="mlprune-stream")
    worker.start()
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    try:
        cut = False  # the answer ended (EOS or newline): later tokens are not shown, as _trim
        while (token := tokens.items.get()) is not None:
            if cut or token in eos:
                cut = True
                stop.set()  # what follows is cut off the result too: no need to make it
                continue
            piece = tokenizer.decode([token])
            if "\n" in piece:
                piece, cut = piece.split("\n")[0], True
                stop.set()
            if piece:
                yield piece
    finally:
        stop.set()
        worker.join()
    if "error" in done:
        raise done["error"]
    return done["result"]


def _room(model: nn.Module, max_new_tokens: int) -> int | None:
    ctx = context_length(model)
    return ctx - max_new_tokens if ctx else None


def _trim(tokenizer: PreTrainedTokenizerBase, token_ids: list[int],
          probs: list[float]) -> Generation:
    """Cut a continuation at its first newline or EOS."""
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    tokens, kept = [], []
    for t, p in zip(token_ids, probs):
        if t in eos:
            break
        piece = tokenizer.decode([t])
        if "\n" in piece:
            head = piece.split("\n")[0]
            if head:
                tokens.append(head)
                kept.append(p)
            break
        tokens.append(piece)
        kept.append(p)
    return Generation("".join(tokens).strip(), tokens, kept)


def generate_dense_and_pruned(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                              prompts: list[str], masks: MaskSet | None,
                              **kw) -> tuple[list[Generation], list[Generation]]:
    """Dense and pruned generations of the same prompts (the model is left dense)."""
    dense = generate(model, tokenizer, prompts, **kw)
    with pruned(model, masks):
        sparse = generate(model, tokenizer, prompts, **kw)
    return dense, sparse


# --------------------------------------------------------------------------- metrics


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu), 0-100."""
    return sacrebleu.corpus_chrf(hypotheses, [references]).score


def _bleu_tokenizer(lang: str) -> str:
    """sacrebleu's BLEU tokenizer suited to a target language (characters where words are not
    space-separated)."""
    return {"zh": "zh", "ja": "char", "th": "char", "ko": "char"}.get(lang, "13a")


def bleu(hypotheses: list[str], references: list[str], lang: str = "en") -> float:
    """Corpus BLEU (sacrebleu) with the tokenizer suited to the target language."""
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize=_bleu_tokenizer(lang)).score


@lru_cache(maxsize=8)
def _identifier(languages: tuple[str, ...]):
    import py3langid.langid as langid

    ident = langid.LanguageIdentifier.from_modelpath(langid.MODEL_DIR / langid.MODEL_FILE,
                                                    norm_probs=True)
    known = [lang for lang in languages if lang in ident.nb_classes]
    if len(known) >= 2:
        ident.set_languages(known)
    return ident


def language_of(text: str, candidates: tuple[str, ...] | None = None) -> str | None:
    """Most likely language code of a text (py3langid), among candidates if given."""
    if not text.strip():
        return None
    return _identifier(tuple(sorted(candidates or ()))).classify(text)[0]


def target_language_rate(outputs: list[str], lang: str, candidates: tuple[str, ...] = ()) -> float:
    """Share of outputs identified as written in ``lang``."""
    if not outputs:
        return float("nan")
    cands = tuple(sorted(set(candidates) | {lang})) if candidates else ()
    return sum(language_of(o, cands) == lang for o in outputs) / len(outputs)


def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *,
               batch_size: int = 8) -> float:
    """exp(mean token negative log-likelihood) over texts, padding excluded."""
    ids = encode(tokenizer, texts, context_length(model))
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for input_ids, mask in batches(ids, batch_size, pad):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                           use_cache=False).logits.float()
            target = input_ids[:, 1:].to(device)
            m = mask[:, 1:].to(device).bool()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            total_nll -= float(logp[m].sum())
            total_tokens += int(m.sum())
    if total_tokens == 0:
        raise MlpruneError("The texts are too short to measure perplexity (one token or less).")
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------- translation eval


def evaluate_translation(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                         corpus: ParallelCorpus, src: str, tgt: str, *, shots: int = 4,
                         limit: int | None = None, seed: int = 0, max_new_tokens: int = 64,
                         batch_size: int = 8, progress: Progress = no_progress) -> dict:
    """Few-shot translation on the held-out slice: chrF, BLEU, target-language rate, and the
    perplexity of the target language's held-out sentences."""
    items = eval_items(corpus, src, tgt, shots=shots, limit=limit, seed=seed)
    outputs = generate(model, tokenizer, [it.prompt for it in items],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    hyps = [g.text for g in outputs]
    refs = [it.reference for it in items]
    _, test_rows = split_rows(corpus)
    held_out = [corpus.table[tgt].iat[r] for r in test_rows][: limit or None]
    return {
        "pair": f"{src}-{tgt}",
        "n": len(items),
        "chrf": chrf(hyps, refs),
        "bleu": bleu(hyps, refs, tgt),
        "target_language_rate": target_language_rate(hyps, tgt, tuple(corpus.languages)),
        "perplexity": perplexity(model, tokenizer, held_out, batch_size=batch_size),
        "outputs": [{"source": it.source, "reference": it.reference, "output": h}
                    for it, h in zip(items, hyps)],
    }


# --------------------------------------------------------------------------- significance

PAIRED_TESTS = ("bs", "ar")
SACREBLEU_DEFAULT_SEED = 12345


def paired_translation_test(references: list[str], hyps_a: list[str], hyps_b: list[str], *,
                            metrics: tuple[str, ...] = ("chrf", "bleu"), method: str = "bs",
                            seed: int = SACREBLEU_DEFAULT_SEED, n_samples: int = 0,
                            lang: str = "en") -> dict:
    """System b against system a on the same sentences, with sacrebleu's own paired test.

    ``method`` is ``bs`` (paired bootstrap resampling, as Moses' script; 1000 resamples by
    default) or ``ar`` (paired approximate randomization; 10000 trials by default, plus 1000
    bootstrap resamples for the intervals). Returns per metric (``chrf``, ``bleu``): the
    scores a and b, the difference b - a, sacrebleu's p-value, and each system's bootstrap
    mean and 95% interval half-width. BLEU tokenizes as :func:`bleu` does for ``lang``.

    sacrebleu reads its seed from the SACREBLEU_SEED environment variable, and treats 0 as
    "unseeded"; it is set here for the duration of the call, so ``seed`` must be at least 1.

    Outputs identical sentence for sentence get p = 1: every resampled difference is then 0,
    and sacrebleu, which counts a zero difference as no chance result, would report its
    smallest p-value (1 / (resamples + 1)) for two systems that never differ.
    """
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    if method not in PAIRED_TESTS:
        raise MlpruneError(f"Unknown paired test '{method}': use bs (bootstrap) or ar "
                           "(approximate randomization).")
    if seed < 1:
        raise MlpruneError("The seed of sacrebleu's paired test must be at least 1 (it treats 0 "
                           "as unseeded).")
    if not references or not len(references) == len(hyps_a) == len(hyps_b):
        raise MlpruneError("The paired test needs one output of each system per reference "
                           f"(got {len(references)} references, {len(hyps_a)} and "
                           f"{len(hyps_b)} outputs).")
    makers = {"chrf": CHRF, "bleu": lambda: BLEU(tokenize=_bleu_tokenizer(lang))}
    unknown = [m for m in metrics if m not in makers]
    if unknown or not metrics:
        raise MlpruneError(f"Unknown metric {', '.join(unknown) or '(none)'}: use chrf and/or bleu.")
    previous = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        test = PairedTest([("a", list(hyps_a)), ("b", list(hyps_b))],
                          {m: makers[m]() for m in metrics}, references=[list(references)],
                          test_type=method, n_samples=n_samples,
                          n_ar_confidence=0 if method == "ar" else -1)
        _, scores = test()
    finally:
        if previous is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = previous
    def num(x) -> float | None:  # sacrebleu gives numpy float32 for the bootstrap figures
        return None if x is None else float(x)

    out = {}
    for key, name in zip(metrics, [k for k in scores if k != "System"]):
        a, b = scores[name]
        out[key] = {"metric": name, "a": num(a.score), "b": num(b.score),
                    "difference": num(b.score - a.score), "p_value": num(b.p_value),
                    "a_mean": num(a.mean), "a_ci": num(a.ci), "b_mean": num(b.mean),
                    "b_ci": num(b.ci), "method": method, "n": len(references),
                    "n_samples": test.n_samples, "seed": seed}
        if list(hyps_a) == list(hyps_b):
            out[key]["p_value"] = 1.0
    return out
