"""mlprune: see, tune and demo pruning of multilingual LLMs calibrated on translation."""

import os
import re
from collections.abc import Callable
from pathlib import Path

__version__ = "0.1.0"

# The one progress protocol of the library: ``progress(stage, fraction)`` with a short stage
# name ("calibration (mt:fr-en)", "ranking") and the fraction of that stage done, in [0, 1].
Progress = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """The default :data:`Progress`: report nothing."""


class MlpruneError(Exception):
    """An error a user can act on; its message is one readable sentence (no traceback shown)."""


CACHE_ENV = "MLPRUNE_CACHE"


def cache_dir() -> Path:
    """Where mlprune keeps what it builds once (converted models, compiled kernels, statistics);
    override with the MLPRUNE_CACHE environment variable."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlprune"
    return Path(root)


def cache_name(text: str, limit: int = 48) -> str:
    """``text`` (a prompt set's, a model's name: user text) as one harmless file-name part:
    letters, digits, ``_`` and ``-`` only, so no separator or ``..`` can lead a cache path
    out of its folder. Not unique: callers add a hash of what the entry holds."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:limit].strip("_") or "x"
