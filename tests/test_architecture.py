"""The layering drawn in docs/architecture.md holds for the files: every module is listed,
and none imports a module of its own row or a row below it (no cycle, one way down)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlprune"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith("mlprune.data"):
            out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """mlprune modules imported at module level (function-level imports included: a lazy
    import is still an arrow)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlprune"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlprune")}
    return {m for m in found if m in modules}


def _rows() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (\d+) \| (.+?) \|", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                rows["mlprune" if name == "mlprune" else f"mlprune.{name}"] = int(m.group(1))
    return rows


def test_every_module_has_a_row_and_imports_only_rows_below_it():
    modules, rows = _modules(), _rows()
    assert set(modules) - set(rows) == set(), "modules missing from docs/architecture.md"
    assert set(rows) - set(modules) == set(), "docs/architecture.md lists modules that are gone"
    wrong = [(m, d) for m, path in modules.items() for d in _imports(path, modules)
             if d != m and d != "mlprune" and not m.startswith(d + ".")
             and rows[d] >= rows[m]]
    assert wrong == []
