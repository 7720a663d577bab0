"""The README's two commands stay true: CI runs the README's test command word for word."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return [b.split("```", 1)[0].strip() for b in text.split("```bash")[1:]]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci_lines = [layer.strip() for layer in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_readme_main_command_runs_the_main_entry_point():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_cmd = next(b for b in blocks if "-e main" in b)
    assert "pip install" in main_cmd and "constraints.txt" in main_cmd
    assert "--env-manager local" in main_cmd
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert "main" in entry_points
