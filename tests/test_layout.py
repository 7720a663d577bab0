"""The habits that keep the code easy to read, checked: short modules and functions, no
module reaching into another's private names, a pure core, and an MLproject that agrees with
the stage registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "saeuniv"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# the libraries the pure core may import: no I/O, tracking or model code
CORE_IMPORTS = {"__future__", "abc", "collections", "dataclasses", "enum", "functools",
                "itertools", "math", "numbers", "re", "types", "typing", "numpy", "scipy",
                "torch", "ot"}


def modules(folder: Path = PACKAGE) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_short(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {n} lines"


def code_lines(node: ast.FunctionDef) -> int:
    """Lines of a function without its docstring (numpydoc docstrings run long)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                             ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return (node.end_lineno - body[0].lineno + 1 if body else 0) + (
        node.body[0].lineno - node.lineno)  # the signature


def test_functions_are_short():
    long = []
    for path in modules():
        for node in ast.walk(tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines (docstring left out):\n" + "\n".join(long)


def _imported_modules(node: ast.Module, here: str) -> dict[str, str]:
    """Local names bound to saeuniv modules by the imports of a module."""
    out = {}
    for imp in ast.walk(node):
        if isinstance(imp, ast.Import):
            out.update({a.asname or a.name: a.name for a in imp.names
                        if a.name.startswith("saeuniv")})
        elif isinstance(imp, ast.ImportFrom) and imp.level:
            base = ".".join(here.split(".")[:len(here.split(".")) - imp.level + 1])
            if imp.module:
                base += "." + imp.module
            out.update({a.asname or a.name: f"{base}.{a.name}" for a in imp.names})
    return out


def private_uses(path: Path) -> list[str]:
    """``from x import _y`` and ``x._y`` on an imported saeuniv module, in one module."""
    here = module_name(path) + (".__init__" if path.name == "__init__.py" else "")
    node = tree(path)
    bad = []
    for imp in ast.walk(node):
        if isinstance(imp, ast.ImportFrom) and (imp.level or (imp.module or "").startswith(
                "saeuniv")):
            bad += [f"from {'.' * imp.level}{imp.module or ''} import {a.name}"
                    for a in imp.names if a.name.startswith("_") and not a.name.startswith("__")]
    mods = _imported_modules(node, here)
    for attr in ast.walk(node):
        if isinstance(attr, ast.Attribute) and isinstance(attr.value, ast.Name) \
                and attr.value.id in mods and attr.attr.startswith("_") \
                and not attr.attr.startswith("__"):
            bad.append(f"{attr.value.id}.{attr.attr} (line {attr.lineno})")
    return bad


def test_no_module_uses_another_modules_private_names():
    bad = {str(p.relative_to(ROOT)): private_uses(p) for p in modules()}
    assert not {k: v for k, v in bad.items() if v}


def test_the_core_is_pure():
    """The core imports only numpy, scipy (torch for top-k and POT for transport, inside a
    function), the standard
    library's pure parts and itself: no store, tracking, models or configs."""
    bad = []
    for path in modules(PACKAGE / "core"):
        for imp in ast.walk(tree(path)):
            if isinstance(imp, ast.ImportFrom) and imp.level:
                depth = len(path.relative_to(PACKAGE / "core").parts) - 1
                if imp.level > depth + 1:
                    bad.append(f"{path.name}: from {'.' * imp.level}{imp.module}")
            elif isinstance(imp, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in imp.names] if isinstance(imp, ast.Import) \
                    else [imp.module]
                bad += [f"{path.name}: {n}" for n in names
                        if n.split(".")[0] not in CORE_IMPORTS]
    assert not bad


def test_mlproject_is_generated_from_the_stage_registry():
    from saeuniv.project import render

    assert (ROOT / "MLproject").read_text() == render(), (
        "MLproject is out of date: python -m saeuniv.project > MLproject")


def test_every_stage_is_an_entry_point_and_a_subcommand():
    import yaml

    from saeuniv import stages
    from saeuniv.cli import build_parser

    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert set(entry_points) == {"main", "sweep", "ladder", "compare", *stages.NAMES}
    assert build_parser().parse_args(["ladder", "x.yaml"]).command == "ladder"
    parser = build_parser()
    for name in stages.NAMES:
        assert parser.parse_args([name]).command == name
