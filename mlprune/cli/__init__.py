"""The ``mlprune`` command: analyze, prune, eval, compare, sweep, reproduce, verdict, intervene.

:func:`main` is the console script (``mlprune = "mlprune.cli:main"``). The package's parts:
:mod:`~mlprune.cli.parser` builds the flags (a command's PruneSpec fields from the spec's
metadata), :mod:`~mlprune.cli.commands` runs the one-model commands, :mod:`~mlprune.cli.grids`
the grids, and :mod:`~mlprune.cli.common` holds what they share (loading, progress, writing).
"""

from __future__ import annotations

import os
import sys

from mlprune import MlpruneError
from mlprune.cli.commands import (
    cmd_analyze,
    cmd_compare,
    cmd_eval,
    cmd_prune,
    eval_lm_eval,
    eval_tasks,
    eval_translation,
)
from mlprune.cli.common import progress_bar
from mlprune.cli.grids import cmd_intervene, cmd_reproduce, cmd_sweep, cmd_verdict, replace_tasks
from mlprune.cli.parser import (
    CORPUS_HELP,
    PRUNE_FIELDS,
    add_spec_arguments,
    build_parser,
    spec_from_args,
)

_bar = progress_bar  # the name tests and scripts have imported it by

__all__ = ["CORPUS_HELP", "PRUNE_FIELDS", "add_spec_arguments", "build_parser", "cmd_analyze",
           "cmd_compare", "cmd_eval", "cmd_intervene", "cmd_prune", "cmd_reproduce", "cmd_sweep",
           "cmd_verdict", "eval_lm_eval", "eval_tasks", "eval_translation", "main",
           "progress_bar", "replace_tasks", "spec_from_args"]


def _starting_line(argv: list[str]) -> None:
    """The first progress line of a command, at once: building the parser and loading a model
    import torch and transformers' model code first (~2-3 s on 2 cores)."""
    if argv and not argv[0].startswith("-") and not {"-h", "--help"} & set(argv):
        print(f"mlprune {argv[0]}: starting (importing torch and transformers)",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one ``mlprune`` command; returns its exit status (2: a one-sentence error)."""
    # OpenMP's threads spin while they wait by default: on a machine whose cores are shared
    # (a dashboard, a second job) that made each forward pass ~10x slower (bench/scoring.py).
    # Set before torch is imported; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _starting_line(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        args.spec = spec_from_args(args)
        args.func(args)
    except MlpruneError as e:
        print(f"mlprune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlprune: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130
    return 0
