"""Thin MLflow Projects entry point: ``python mlflow_project/entry.py COMMAND [options]``.

COMMAND is ``run`` (the ``main`` entry point), one of the stage names, or ``sweep`` (the
``sweep`` entry point: ``sweep SPEC --storage URL --n-trials N``); all the work is in
``saeuniv.cli``. Passing the project folder lets ``main`` launch each stage as
its own project run with the same env manager when it runs under ``mlflow run``.
"""

import sys
from pathlib import Path

from saeuniv.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], project_dir=Path(__file__).resolve().parents[1]))
