"""The live preview's pieces: the pruned answer streamed token by token (the same answer as
the plain generation, the model locked and masked only while it streams), and a browser-free
check of the Prune page's streaming path."""

from __future__ import annotations

import threading

import pytest
import torch

from mlprune import service
from mlprune.evaluate import Generation, generate, stream_generate
from mlprune.pipeline import PruneSpec
from mlprune.prompts import eval_items
from mlprune.prune import applied_masks, model_lock, pruned

ONE_SHOT = PruneSpec(mode="one-shot", samples=2)


def drain(stream) -> tuple[list[str], Generation]:
    """Every piece of a stream, and what it returned."""
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as end:
            return pieces, end.value


@pytest.fixture
def session(loaded, corpus) -> tuple[service.SessionPruning, list[str]]:
    """A session pruned at 70% and a few held-out prompts."""
    ranked = service.Shared().make_ranking(loaded, corpus, ONE_SHOT)
    state = service.next_pruning(None, loaded, ranked, ONE_SHOT, ranked.masks(0.7, "unstructured"))
    prompts = [item.prompt for item in eval_items(corpus, "fr", "en", shots=2, limit=3)]
    return state, prompts


def test_a_streamed_answer_is_the_plain_one(loaded, session):
    state, prompts = session
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    for prompt in prompts:
        with pruned(loaded.model, state.masks):
            expected = generate(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=24)[0]
        pieces, got = drain(state.stream(loaded, prompt, 24))
        assert got == expected and state.generated(prompt, 24) == expected
        assert "".join(pieces).strip() == expected.text and pieces == expected.tokens
        # made once per masks: a second stream replays it, generations() reads it back
        assert drain(state.stream(loaded, prompt, 24)) == (pieces, expected)
        assert state.generations(loaded, [prompt], 24)[0] == [expected]
    # dense again, and unlocked, once the stream is done
    assert applied_masks(loaded.model) is None
    assert all(torch.equal(v, dense[k]) for k, v in loaded.model.state_dict().items())


def locked_elsewhere(model) -> bool:
    """Whether another thread holds the model's lock now."""
    lock, answer = model_lock(model), []

    def probe():
        got = lock.acquire(timeout=0)
        answer.append(not got)
        if got:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return answer[0]


@pytest.fixture
def slow_tokens(monkeypatch):
    """Each new token takes 50 ms more, so a test looks while generation is still going on."""
    import time

    import mlprune.evaluate as evaluate

    real = evaluate._TokenQueue.put

    def put(self, value):
        real(self, value)
        time.sleep(0.05)

    monkeypatch.setattr(evaluate._TokenQueue, "put", put)


def test_the_lock_is_held_only_while_generating_and_dense_streams_match(loaded, session,
                                                                        slow_tokens):
    state, prompts = session
    stream = state.stream(loaded, prompts[1], 48)
    next(stream)
    assert locked_elsewhere(loaded.model)  # by the helper thread, masks applied
    drain(stream)
    assert not locked_elsewhere(loaded.model) and applied_masks(loaded.model) is None
    # with no masks (hold: the lock only), the stream is the dense generation
    expected = generate(loaded.model, loaded.tokenizer, [prompts[1]], max_new_tokens=16)[0]
    stream = stream_generate(loaded.model, loaded.tokenizer, prompts[1], max_new_tokens=16,
                             hold=lambda: pruned(loaded.model, None))
    assert drain(stream)[1] == expected


def test_closing_a_stream_early_stops_it_and_leaves_the_model_dense(loaded, session,
                                                                    slow_tokens):
    state, prompts = session
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    stream = state.stream(loaded, prompts[0], 48)
    first = next(stream)
    assert first and applied_masks(loaded.model) is not None  # masked while it streams
    stream.close()  # as a page rerun does
    assert applied_masks(loaded.model) is None
    assert all(torch.equal(v, dense[k]) for k, v in loaded.model.state_dict().items())
    assert state.generated(prompts[0], 48) is None  # an unfinished answer is not kept
    assert not locked_elsewhere(loaded.model)


def test_an_error_while_generating_reaches_the_reader(loaded, session, monkeypatch):
    import mlprune.evaluate as evaluate

    state, prompts = session

    def broken(*a, **k):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(evaluate, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        drain(state.stream(loaded, prompts[0], 8))
    assert applied_masks(loaded.model) is None
