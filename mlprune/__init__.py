"""mlprune: see, tune and demo pruning of multilingual LLMs calibrated on translation."""

import os
import re
import sys
import types
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


class _PatchablePackage(types.ModuleType):
    """A package that is one namespace for patching, as it was when it was one file: setting
    a name on it (``monkeypatch.setattr(prune, "scores", ...)``) also sets it in each of its
    modules that holds the same object under that name, so that their functions look up the
    new value (and setting it back restores them)."""

    def __setattr__(self, name: str, value) -> None:
        missing = object()
        old = self.__dict__.get(name, missing)
        if old is not missing:
            for module in self.__dict__.get("_patched_modules", ()):
                if module.__dict__.get(name, missing) is old:
                    setattr(module, name, value)
        super().__setattr__(name, value)


def patchable_package(name: str, modules: tuple[types.ModuleType, ...]) -> None:
    """Make the package ``name`` (already imported) pass names set on it to ``modules``."""
    package = sys.modules[name]
    package.__dict__["_patched_modules"] = modules
    package.__class__ = _PatchablePackage
