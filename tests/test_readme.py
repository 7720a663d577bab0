"""The README's two commands stay true: CI runs the README's test command word for word."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return [b.split("```", 1)[0].strip() for b in text.split("```bash")[1:]]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_readme_main_command_runs_the_main_entry_point():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_cmd = next(b for b in blocks if "-e main" in b)
    assert "pip install" in main_cmd and "constraints.txt" in main_cmd
    assert "--env-manager local" in main_cmd
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert "main" in entry_points


def test_every_number_in_the_readme_table_names_a_function_that_exists():
    """The "Where each number comes from" table: each `path.py:name` is a function or class
    defined (at any depth) in that module of src/saeuniv."""
    import ast
    import re

    text = (ROOT / "README.md").read_text()
    table = text.split("### Where each number comes from")[1].split("\n### ")[0]
    refs = re.findall(r"`([\w/]+\.py):(\w+)`", table)
    assert len(refs) >= 20
    for path, name in refs:
        module = ROOT / "src" / "saeuniv" / path
        assert module.is_file(), path
        defined = {n.name for n in ast.walk(ast.parse(module.read_text()))
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined, f"{path}:{name}"
