"""The few-row decoding kernel (kernels.few_rows, FewRowLinear): its products, the mask
engine's contract (weights change in place between generations), its fallback, its helper
threads across threads and forks."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from mlprune import kernels
from mlprune.capture import capture
from mlprune.prune import apply_masks, rank_modules, restore

TEXTS = ["French: Le chat dort.\nEnglish: The cat sleeps.\n", "Hello there, general.",
         "German: Der Hund bellt.\nEnglish: The dog barks.\n"]


def _exact(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (7, 5), (64, 33), (259, 640)])
def test_few_rows_is_the_matrix_product(rows, out_features, in_features):
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(rows, in_features)
    got = kernels.few_rows(x, weight)
    assert got is not None and got.shape == (rows, out_features)
    # fp32 sums in another order: within a few ulps of the exact product's scale
    torch.testing.assert_close(got, _exact(x, weight), rtol=1e-5, atol=1e-5 * in_features ** 0.5)


def test_few_rows_reads_strided_weights_and_keeps_leading_dimensions():
    base = torch.randn(40, 100)
    weight = base[3:35, 10:90]  # rows 100 apart, a view into a larger tensor
    x = torch.randn(2, 3, 80)
    got = kernels.few_rows(x, weight)
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, _exact(x, weight), rtol=1e-5, atol=1e-4)


def test_few_rows_declines_what_it_does_not_compute():
    weight = torch.randn(8, 16)
    assert kernels.few_rows(torch.randn(17, 16), weight) is None  # a prompt's pass
    assert kernels.few_rows(torch.randn(2, 16).bfloat16(), weight.bfloat16()) is None
    assert kernels.few_rows(torch.randn(2, 16), weight.T.contiguous().T) is None  # column-major
    trained = weight.clone().requires_grad_()
    assert kernels.few_rows(torch.randn(2, 16), trained) is None  # autograd: torch's path
    with torch.no_grad():
        assert kernels.few_rows(torch.randn(2, 16), trained) is not None


def _greedy(model, enc, n: int = 12) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def _as(model, cls) -> None:
    for module in model.modules():
        if type(module) in (torch.nn.Linear, kernels.FewRowLinear):
            module.__class__ = cls


def test_decoding_sees_masks_applied_and_restored_in_place():
    model, tok = tiny_model("llama"), byte_tokenizer()
    for p in model.parameters():  # logits far apart: the greedy choice is no coin toss
        p.data.mul_(4)
    stats = capture(model, tok, TEXTS)
    assert kernels.speed_up_decoding(model) > 0
    enc = dict(tok(["French: Le chat.\nEnglish:", "Hi"], return_tensors="pt", padding=True,
                   padding_side="left"))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        fast = _greedy(model, enc)
        _as(model, torch.nn.Linear)
        plain = _greedy(model, enc)
        _as(model, kernels.FewRowLinear)
        return fast, plain

    dense_fast, dense_plain = both()
    assert torch.equal(dense_fast, dense_plain)
    apply_masks(model, rank_modules(model, stats).masks(0.6))
    pruned_fast, pruned_plain = both()
    assert torch.equal(pruned_fast, pruned_plain)
    assert not torch.equal(pruned_fast, dense_fast)  # the kernel saw the zeroed weights
    restore(model)
    assert torch.equal(both()[0], dense_fast)  # ...and the restored ones


def test_without_the_compiled_kernel_decoding_is_torchs_and_says_so_once(monkeypatch, caplog,
                                                                           tmp_path):
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_SAID", set())
    monkeypatch.setenv("MLPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler")
    linear = torch.nn.Linear(16, 8)
    plain = torch.nn.Linear(16, 8)
    plain.load_state_dict(linear.state_dict())
    linear.__class__ = kernels.FewRowLinear
    x = torch.randn(2, 16)
    with caplog.at_level(logging.WARNING, logger="mlprune"), torch.no_grad():
        assert torch.equal(linear(x), plain(x))  # torch's own path: the same bits
        assert torch.equal(linear(x), plain(x))
    said = [r.getMessage() for r in caplog.records if "are off" in r.getMessage()]
    assert len(said) == 1 and "no-such-compiler" in said[0], said


def test_callers_in_threads_and_in_a_forked_child_all_get_the_product():
    torch.manual_seed(1)
    weight = torch.randn(515, 96)
    xs = [torch.randn(r, 96) for r in (1, 4, 7, 16)] * 4
    want = [_exact(x, weight) for x in xs]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(2, threads_before))  # so that the kernel has helper threads
    try:
        _threads_and_a_fork(weight, xs, want)
    finally:
        torch.set_num_threads(threads_before)


def _threads_and_a_fork(weight, xs, want) -> None:
    assert kernels.few_rows(xs[0], weight) is not None  # helpers started in this process
    got: list = [None] * len(xs)

    def call(i: int) -> None:
        for _ in range(20):
            got[i] = kernels.few_rows(xs[i], weight)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)

    pid = os.fork()
    if pid == 0:  # the child: its parent's helpers are gone; it must make its own, not hang
        signal.alarm(30)
        ok = all(torch.allclose(kernels.few_rows(x, weight), w, rtol=1e-5, atol=1e-4)
                 for x, w in zip(xs, want))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
