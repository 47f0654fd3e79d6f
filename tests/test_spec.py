"""The spec at the bottom: it imports no other mlprune module, every module uses its
vocabularies, the command line's flags say its help, and a sweep's grid is checked by
SweepSpec alone (before any cell runs)."""

from __future__ import annotations

import ast
from dataclasses import fields, replace
from pathlib import Path

import pytest

from mlprune import MlpruneError, allocation, mwanda, pipeline, prompts, protocol, prune, spec
from mlprune.cli import PRUNE_FIELDS, build_parser
from mlprune.spec import PRESET_HELP, PRESETS, SWEEP_METHODS, PruneSpec, SweepSpec, spec_field

SPEC_FILE = Path(spec.__file__)


def test_the_spec_imports_only_the_package_root():
    imported = {node.module for node in ast.walk(ast.parse(SPEC_FILE.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(ast.parse(SPEC_FILE.read_text()))
                 if isinstance(node, ast.Import) for a in node.names}
    assert {m for m in imported if m.startswith("mlprune")} == {"mlprune"}


def test_every_module_uses_the_specs_vocabularies():
    from mlprune import tokens

    assert prune.METHODS is spec.METHODS and prune.MODES is spec.MODES
    assert allocation.ALLOCATIONS is spec.ALLOCATIONS and mwanda.PARTS is spec.PARTS
    assert prompts.CALIBRATIONS is spec.CALIBRATIONS and prompts.parse_pair is spec.parse_pair
    assert protocol.PROTOCOLS is spec.PROTOCOLS and tokens.PAD_SIDES is spec.PAD_SIDES
    assert mwanda.MWanda is spec.MWanda and pipeline.PruneSpec is PruneSpec
    assert set(PRESET_HELP) == set(PRESETS)


def test_each_flag_of_mlprune_prune_is_its_fields_metadata():
    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    actions = {a.dest: a for a in prune_parser._actions}
    assert PRUNE_FIELDS == tuple(f.name for f in fields(PruneSpec))
    for f in fields(PruneSpec):
        action = actions[f.name]
        assert action.help == f"{f.metadata['help']} (default: {f.default})", f.name
        assert action.metavar == f.metadata.get("metavar"), f.name
    assert actions["pad_to"].type is int and actions["protect"].type is str
    assert actions["sparsity"].type is float and actions["invert"].const is True


def test_choices_are_the_vocabularies_with_their_help():
    assert tuple(spec_field("method")["choices"]) == spec.METHODS
    assert all(f"{m}: {h}" in spec_field("method")["help"] for m, h in spec.METHOD_HELP.items())
    assert tuple(spec_field("protocol")["choices"]) == tuple(spec.PROTOCOLS)
    assert spec_field("pattern")["choices"][:-1] == spec.PATTERNS
    with pytest.raises(MlpruneError):
        spec_field("nope")


def test_a_sweep_grid_is_checked_once_and_its_cells_are_the_base_with_each_method():
    base = PruneSpec(samples=3)
    grid = SweepSpec(["wanda-mt", "magnitude"], [0, 0.5], ["fr-en"], base).validate()
    assert grid.methods == ("wanda-mt", "magnitude") and grid.size == 4
    cell = grid.cell("fr-en", "wanda-mt")
    assert cell == replace(base, pair="fr-en", mode="one-shot", pattern="unstructured",
                           **SWEEP_METHODS["wanda-mt"])
    assert grid.cell_fields() == {"pair", "sparsity", "pattern", "mode", "method",
                                  "calibration", "other", "allocation", "mwanda_parts"}
    bad = [((), [0.5], ["fr-en"], "Pick at least one method"),
           (["nope"], [0.5], ["fr-en"], "Unknown sweep method nope"),
           (["magnitude"], [1.5], ["fr-en"], "Sparsity must be in [0, 1)"),
           (["magnitude"], [0.5], ["fr"], "'fr' is not a language pair")]
    for methods, sparsities, pairs, message in bad:
        with pytest.raises(MlpruneError, match=message.replace("[", r"\[").replace(")", r"\)")):
            SweepSpec(methods, sparsities, pairs).validate()
    with pytest.raises(MlpruneError, match="Unknown method"):
        SweepSpec(["magnitude"], [0.5], ["fr-en"], replace(base, method="nope")).validate()


def test_a_sweep_refuses_a_bad_grid_before_measuring(loaded, corpus, tmp_path):
    with pytest.raises(MlpruneError, match="'xx' is not a language pair"):
        pipeline.sweep(loaded, corpus, methods=["magnitude"], sparsities=[0.0],
                       pairs=["fr-en", "xx"], out_csv=tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()  # the fr-en cell did not run first
