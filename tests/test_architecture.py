"""The package's imports point one way, as docs/architecture.md draws them."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANYONE_MAY_USE = {"errors", "_version"}


def documented_order() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```")[1]
    return [m.group(1) for m in re.finditer(r"^([a-z_]+)\s", block, re.M)]


def imports_of(module: Path) -> set[str]:
    """The package modules ``module`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names}
    return found


def test_every_module_imports_only_modules_drawn_above_it():
    order = documented_order()
    modules = {p.stem for p in (ROOT / "initstudy").glob("*.py")} - {"__init__"}
    assert modules - ANYONE_MAY_USE == set(order)  # every module drawn, once
    for name in order:
        imported = imports_of(ROOT / "initstudy" / f"{name}.py") - ANYONE_MAY_USE
        below = {m for m in imported if order.index(m) >= order.index(name)}
        assert not below, f"{name} imports {below}, drawn below it"
