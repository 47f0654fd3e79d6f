"""Nothing lost, nothing corrupted: whatever a masks file holds is refused with one sentence or
applied and restored bit for bit, on the compiled mask moves and on torch's alike; the compiled
moves check their bounds themselves; dense work sees dense weights; the compiled library's
cache is checked before anything in it is loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny import tiny_model

from mlprune import MlpruneError, kernels
from mlprune import prune as prune_module
from mlprune.models import linear_modules
from mlprune.prune import MaskSet, applied_masks, apply_masks, pruned, rank_modules

COMPILER = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler here: only torch's path runs")


def _bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Each tensor's raw bytes: equal means bit for bit (NaN and -0.0 included)."""
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in state.items()}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _one_sentence(error: BaseException) -> None:
    text = str(error)
    assert text.endswith(".") and "\n" not in text and "Traceback" not in text, text


@contextmanager
def _native(on: bool):
    """The compiled moves on or off for a block (os.environ: hypothesis runs many examples
    inside one test, where monkeypatch would undo only at its end)."""
    old = os.environ.get(kernels.NATIVE_ENV)
    os.environ[kernels.NATIVE_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[kernels.NATIVE_ENV]
        else:
            os.environ[kernels.NATIVE_ENV] = old


def _write_masks(path: Path, tensors: dict[str, torch.Tensor], in_features: dict,
                 target: str = "0.5", pattern: str = "unstructured") -> Path:
    save_file(tensors, str(path), metadata={"in_features": json.dumps(in_features),
                                            "target": target, "pattern": pattern, "meta": "{}"})
    return path


# --------------------------------------------------------------------------- 1. duplicates


NAME = "layers.0.attn.q"  # 32 x 32 in the tiny llama


def _row_with_a_repeat(n_rows: int) -> torch.Tensor:
    cols = torch.arange(4, dtype=torch.int16).repeat(n_rows, 1)  # 0 1 2 3 in every row
    cols[0] = torch.tensor([0, 3, 2, 3], dtype=torch.int16)  # column 3 twice
    return cols


def test_a_masks_file_naming_a_column_twice_is_refused_on_load(tmp_path):
    path = _write_masks(tmp_path / "dup.safetensors", {NAME: _row_with_a_repeat(32)}, {NAME: 32})
    with pytest.raises(MlpruneError, match="twice") as e:
        MaskSet.load(path)
    _one_sentence(e.value)


@pytest.mark.parametrize("native", [True, False])
def test_masks_naming_a_column_twice_are_refused_on_apply_and_leave_the_model_dense(native):
    """Masks made in memory skip the loader: the engine refuses them before any weight moves
    (the compiled path used to save 0.0 the second time and restore it, for good)."""
    model = tiny_model("llama")
    dense = _bits(_state(model))
    masks = MaskSet({NAME: _row_with_a_repeat(32)}, {NAME: 32}, 0.125, "unstructured")
    with _native(native), pytest.raises(MlpruneError, match="twice") as e:
        apply_masks(model, masks)
    _one_sentence(e.value)
    assert applied_masks(model) is None and _bits(_state(model)) == dense


@pytest.mark.parametrize("bad,what", [(32, "column 32"), (-1, "column -1")])
def test_a_masks_file_with_a_column_out_of_range_or_of_floats_is_refused_on_load(tmp_path, bad, what):
    cols = _row_with_a_repeat(32)
    cols[0] = torch.tensor([0, 1, 2, bad], dtype=torch.int16)
    with pytest.raises(MlpruneError, match=what):
        MaskSet.load(_write_masks(tmp_path / "out.safetensors", {NAME: cols}, {NAME: 32}))
    floats = torch.arange(4.0).repeat(32, 1)
    with pytest.raises(MlpruneError, match="column numbers"):
        MaskSet.load(_write_masks(tmp_path / "float.safetensors", {NAME: floats}, {NAME: 32}))


def test_masks_for_a_module_the_model_lacks_or_of_another_width_are_refused():
    model = tiny_model("llama")
    dense = _bits(_state(model))
    cols = torch.arange(4, dtype=torch.int16).repeat(32, 1)
    with pytest.raises(MlpruneError, match="no module") as e:
        apply_masks(model, MaskSet({"layers.9.attn.q": cols}, {"layers.9.attn.q": 32}, 0.1, "unstructured"))
    _one_sentence(e.value)
    with pytest.raises(MlpruneError, match="48 inputs") as e:
        apply_masks(model, MaskSet({NAME: cols}, {NAME: 48}, 0.1, "unstructured"))
    _one_sentence(e.value)
    assert applied_masks(model) is None and _bits(_state(model)) == dense


# --------------------------------------------------------------------------- 2. the kernel's bounds


@needs_compiler
def test_compiled_take_and_put_with_a_repeated_column_restore_exactly():
    """Defence in depth below the validation: take reads a row's values before zeroing any."""
    assert kernels.available()
    weight = torch.arange(1.0, 25.0).view(4, 6)
    before = weight.clone()
    cols = torch.tensor([[0, 3, 2, 3]] * 4, dtype=torch.int16)
    values = torch.empty(4, 4)
    assert kernels.take(weight, cols, values, 0, 4)
    assert torch.equal(values, before.gather(1, cols.long()))
    assert kernels.put(weight, cols, values, 0, 4)
    assert torch.equal(weight, before)


_BOUNDS_SCRIPT = r"""
import torch
from mlprune import MlpruneError, kernels

assert kernels.available(), "no compiled moves"
weight = torch.arange(1.0, 13.0).view(3, 4)
before = weight.clone()
cases = {
    "a column equal to the row length": (torch.tensor([[0, 4]] * 3, dtype=torch.int16), 0, 3),
    "a negative column": (torch.tensor([[-1, 0]] * 3, dtype=torch.int16), 0, 3),
    "a huge int32 column": (torch.tensor([[0, 2**31 - 1]] * 3, dtype=torch.int32), 0, 3),
    "a huge int64 column": (torch.tensor([[1 << 40, 0]] * 3, dtype=torch.int64), 0, 3),
    "rows past the weight": (torch.zeros(1 << 22, 2, dtype=torch.int16), 0, 1 << 22),
}
for case, (cols, r0, r1) in cases.items():
    for op in (kernels.take, kernels.put):
        values = torch.zeros(cols.shape)
        try:
            op(weight, cols, values, r0, r1)
            print("MOVED", case, op.__name__)
        except MlpruneError as e:
            assert str(e).endswith(".") and "\n" not in str(e), str(e)
            print("REFUSED", case, op.__name__)
        assert torch.equal(weight, before), (case, op.__name__)
print("SURVIVED")
"""


@needs_compiler
def test_compiled_take_and_put_check_their_own_bounds():
    """In a subprocess: out-of-bounds moves used to write another row's weight or crash."""
    run = subprocess.run([sys.executable, "-c", _BOUNDS_SCRIPT], capture_output=True, text=True,
                         timeout=120, env=os.environ.copy())
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-2000:])
    assert "SURVIVED" in run.stdout and "MOVED" not in run.stdout, run.stdout
    assert run.stdout.count("REFUSED") == 10


# --------------------------------------------------------------------------- 3. dense is checked


def _magnitude_masks(model, sparsity: float = 0.5) -> MaskSet:
    return rank_modules(model, None, method="magnitude").masks(sparsity)


def test_dense_work_finishes_an_interrupted_restore_first(monkeypatch):
    model = tiny_model("llama")
    dense = _bits(_state(model))
    applied = apply_masks(model, _magnitude_masks(model))
    real, calls = prune_module._put_back_band, []

    def interrupted(weight, band, first):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C (or a stopped dashboard script) mid-restore
        calls.append(1)
        real(weight, band, first)

    monkeypatch.setattr(prune_module, "_put_back_band", interrupted)
    with pytest.raises(KeyboardInterrupt):
        applied.restore()
    monkeypatch.setattr(prune_module, "_put_back_band", real)
    assert _bits(_state(model)) != dense  # the interrupt left pruned weights behind
    with pruned(model, None) as m:
        assert applied_masks(m) is None and _bits(_state(m)) == dense


def test_dense_work_refuses_a_model_with_live_masks(loaded):
    """Masks applied outside a pruned() block (or an outer block of the same thread): dense
    work must not run on them, and must not silently undo someone else's masks either."""
    from mlprune.holding import dense

    model = loaded.model
    masks = _magnitude_masks(model)
    apply_masks(model, masks)
    masked_state = _bits(_state(model))
    with pytest.raises(MlpruneError, match="masks applied") as e, dense(loaded):
        pass
    _one_sentence(e.value)
    assert applied_masks(model) is masks and _bits(_state(model)) == masked_state
    prune_module.restore(model)


# --------------------------------------------------------------------------- 4. the library's cache


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """No compiled library loaded yet in this process, and a cache of this test's own: the
    folder the library is built in."""
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_SAID", set(), raising=False)
    monkeypatch.setenv("MLPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv(kernels.NATIVE_ENV, "1")
    return tmp_path / "cache" / "kernels"


def _again(monkeypatch) -> bool:
    """available() as a new process would answer it (nothing loaded yet)."""
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    monkeypatch.setattr(kernels, "_TRIED", False)
    return kernels.available()


def _built(folder: Path) -> tuple[Path, Path]:
    """Build the library into ``folder`` without loading it: this process loads a path at
    most once (the dynamic loader answers a second load of a path from memory, whatever the
    file now holds). Returns the library and its recorded hash."""
    kernels._build(folder)
    (library,) = folder.glob("mlprune_move-*.so")
    return library, Path(f"{library}.sha256")


def _replace(path: Path, data: bytes) -> None:
    """New contents under ``path`` as a new file (a process that mapped the old one keeps it)."""
    path.with_name(path.name + ".new").write_bytes(data)
    os.replace(path.with_name(path.name + ".new"), path)


def _compile(tmp_path: Path, source: str) -> bytes:
    c, so = tmp_path / "other.c", tmp_path / "other.so"
    c.write_text(source)
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(so), str(c)], check=True)
    return so.read_bytes()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_compiler
def test_the_library_is_written_whole_with_its_hash_in_a_private_folder(fresh_kernels):
    assert kernels.available()
    (library,) = fresh_kernels.glob("mlprune_move-*.so")
    record = Path(f"{library}.sha256")
    assert record.read_text().strip() == _sha256(library)
    assert stat.S_IMODE(fresh_kernels.stat().st_mode) & 0o077 == 0
    assert sorted(fresh_kernels.iterdir()) == sorted([library, record])  # no leftovers


@needs_compiler
def test_a_truncated_library_is_rebuilt_not_loaded(fresh_kernels):
    """In a subprocess: loading a truncated library used to kill the process (SIGBUS)."""
    library, record = _built(fresh_kernels)
    whole = library.read_bytes()
    _replace(library, whole[:len(whole) // 2])
    run = subprocess.run([sys.executable, "-c", "from mlprune import kernels; print(kernels.available())"],
                         capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert run.returncode == 0 and run.stdout.strip() == "True", (run.returncode, run.stdout, run.stderr[-2000:])
    assert _sha256(library) == record.read_text().strip()


@needs_compiler
def test_an_empty_library_is_rebuilt(fresh_kernels, caplog):
    library, record = _built(fresh_kernels)
    _replace(library, b"")
    with caplog.at_level(logging.WARNING, logger="mlprune"):
        assert kernels.available()  # used to turn the fast path off for good, without a word
    assert _sha256(library) == record.read_text().strip()
    assert any("rebuil" in r.getMessage() for r in caplog.records)


@needs_compiler
def test_a_library_without_the_symbol_turns_the_fast_path_off_with_a_reason(fresh_kernels, caplog,
                                                                            tmp_path):
    library, record = _built(fresh_kernels)
    other = _compile(tmp_path, "int something_else(void) { return 0; }\n")
    _replace(library, other)
    record.write_text(hashlib.sha256(other).hexdigest())  # whole, as recorded, but not ours
    with caplog.at_level(logging.WARNING, logger="mlprune"):
        assert not kernels.available()  # used to raise AttributeError out of available()
    assert any("mlprune_move" in r.getMessage() for r in caplog.records)


_PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("MLPRUNE_TEST_MARKER"), "w");
    if (f) fclose(f);
}
int mlprune_move(void) { return 0; }
"""


@needs_compiler
def test_a_library_planted_without_its_hash_is_rebuilt_never_run(fresh_kernels, monkeypatch, tmp_path):
    """The name is predictable: code put there would run in every mlprune process."""
    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("MLPRUNE_TEST_MARKER", str(marker))
    library, record = _built(fresh_kernels)
    _replace(library, _compile(tmp_path, _PLANTED))
    assert kernels.available() and not marker.exists()
    assert _sha256(library) == record.read_text().strip()


@needs_compiler
def test_a_cache_folder_others_can_write_is_refused(fresh_kernels, monkeypatch, caplog, tmp_path):
    """Where others may write, they can plant a library and its hash both: never load from it."""
    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("MLPRUNE_TEST_MARKER", str(marker))
    library, record = _built(fresh_kernels)
    fresh_kernels.chmod(0o777)
    planted = _compile(tmp_path, _PLANTED)
    _replace(library, planted)
    record.write_text(hashlib.sha256(planted).hexdigest())
    with caplog.at_level(logging.WARNING, logger="mlprune"):
        assert not kernels.available()
    assert not marker.exists()
    assert any("writable" in r.getMessage() for r in caplog.records)


@needs_compiler
def test_a_compiler_with_flags_in_cc_builds(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CC", f"{COMPILER} -O2")
    assert kernels.available()  # used to be off, silently


def test_every_reason_the_fast_path_is_off_is_logged(fresh_kernels, monkeypatch, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="mlprune"):
        monkeypatch.setenv(kernels.NATIVE_ENV, "0")
        assert not kernels.available()
        monkeypatch.setenv(kernels.NATIVE_ENV, "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        assert not _again(monkeypatch)
    text = " | ".join(r.getMessage() for r in caplog.records if r.name == "mlprune")
    assert kernels.NATIVE_ENV in text and "no-such-compiler" in text, text


# --------------------------------------------------------------------------- 5. any masks file


@pytest.fixture(scope="module")
def tiny():
    """One tiny llama for every example: its modules' shapes, their dense weights, and its
    whole state's bits."""
    model = tiny_model("llama")
    infos = linear_modules(model)
    shapes = {n: tuple(i.weight.shape) for n, i in infos.items()}
    weights = {n: i.weight.detach().clone() for n, i in infos.items()}
    return model, shapes, weights, _bits(_state(model))


KINDS = ["valid", "valid", "valid", "unsorted", "duplicate", "out of range", "dtype", "shape",
         "in_features", "protected"]


@st.composite
def mask_files(draw, shapes: dict[str, tuple[int, int]]):
    """(tensors, in_features, target, pattern) of a masks file: sound, or wrong in one way."""
    names = draw(st.lists(st.sampled_from(sorted(shapes)), min_size=1, max_size=3, unique=True))
    tensors, in_features = {}, {}
    for name in names:
        out, n_in = shapes[name]
        kind = draw(st.sampled_from(KINDS))
        k = draw(st.integers(0, n_in))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        cols = torch.rand(out, n_in, generator=gen).argsort(1)[:, :k]
        if kind != "unsorted":
            cols = cols.sort(1).values
        cols = cols.to(draw(st.sampled_from([torch.int16, torch.int32, torch.int64])))
        row = draw(st.integers(0, out - 1))
        if kind == "duplicate" and k >= 2:
            cols[row, draw(st.integers(1, k - 1))] = cols[row, 0]
        elif kind == "out of range" and k >= 1:
            big = torch.iinfo(cols.dtype).max
            cols[row, draw(st.integers(0, k - 1))] = draw(st.sampled_from([-1, n_in, n_in + 1, big, -big]))
        elif kind == "dtype":
            cols = cols.to(draw(st.sampled_from([torch.float32, torch.float16, torch.bool, torch.uint8,
                                                 torch.int8, torch.uint16])))
        elif kind == "shape":
            cols = draw(st.sampled_from([cols[0], cols[:-1], cols.unsqueeze(0),
                                         torch.cat([cols, cols[:1]]), torch.cat([cols, cols], 1)]))
        width = n_in
        if kind == "in_features":
            width = draw(st.sampled_from([n_in - 1, n_in + 8, 0, -3, "32", 1.5, None]))
        elif kind == "protected":
            tensors[f"protected/{name}"] = draw(st.sampled_from(
                [torch.zeros(n_in + 1, dtype=torch.bool), torch.zeros(n_in), torch.zeros(2, n_in, dtype=torch.bool),
                 torch.zeros(n_in, dtype=torch.bool)]))
        tensors[name] = cols.contiguous()
        in_features[name] = width
    target = draw(st.sampled_from(["0.5", "0.5", "0.5", "nan", "-1", "abc"]))
    pattern = draw(st.sampled_from(["unstructured", "unstructured", "2:4", "bogus"]))
    return tensors, in_features, target, pattern


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_masks_file_is_refused_in_a_sentence_or_restores_bit_for_bit(tiny, tmp_path_factory, data):
    """Load, apply and restore, compiled moves on and off: a refusal is one sentence and
    changes nothing; anything accepted zeroes exactly its columns, the same on both paths,
    and restores the dense weights bit for bit."""
    model, shapes, weights, dense = tiny
    tensors, in_features, target, pattern = data.draw(mask_files(shapes))
    path = _write_masks(tmp_path_factory.mktemp("masks") / "m.safetensors", tensors, in_features,
                        target, pattern)
    try:
        masks = MaskSet.load(path)
    except MlpruneError as e:
        _one_sentence(e)
        return
    masks.sparsity(), masks.overall_sparsity(), masks.protected_pruned()  # none may crash
    seen = {}
    for native in (True, False):
        with _native(native):
            try:
                applied = apply_masks(model, masks)
            except MlpruneError as e:
                _one_sentence(e)
                assert applied_masks(model) is None and _bits(_state(model)) == dense
                seen[native] = "refused"
                continue
            state = _state(model)
            for name, info in linear_modules(model).items():  # exactly its columns are zero
                keep = masks.keep(name) if name in masks.pruned_cols else torch.ones_like(info.weight, dtype=torch.bool)
                assert (info.weight[~keep] == 0).all(), name
                assert torch.equal(info.weight[keep].view(torch.int32), weights[name][keep].view(torch.int32)), name
            applied.restore()
            assert applied_masks(model) is None and _bits(_state(model)) == dense
            seen[native] = _bits(state)
    assert seen[True] == seen[False]  # the compiled and torch's paths: the same weights
