"""The numbers of each layer pair in MLflow: one table per stage, metric keys on request.

A layer grid of the paper's size (26 x 42 layer pairs) with a few dozen numbers per pair
would give a run tens of thousands of metric keys: a runs table and a metrics page nobody
can read. So each stage logs its per-layer-pair numbers as one MLflow table
(``<stage>_cells.json``, shown by the UI's artefact viewer): a row per layer pair, a column
per number. With ``tracking.per_cell_metrics`` it also logs each number as the metric
``<name>/aI-bJ`` (``saeuniv.tracking.pair_key``), for sorting and filtering runs by one
cell. ``cell_metrics`` reads the tables back in that form, whichever way they were logged.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import mlflow

from .tracking import pair_key

SUFFIX = "_cells.json"
KEYS = ("cell", "layer_a", "layer_b")  # the columns that name a row's layer pair


def table_name(stage: str) -> str:
    """The artefact of a stage's per-layer-pair table, e.g. ``scores_cells.json``."""
    return f"{stage}{SUFFIX}"


def number(v) -> float | None:
    """``v`` as a float, None when it is missing or not finite (JSON has no NaN)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def text(v) -> str | None:
    """A table value: the shortest text that reads back as the same float (``repr``), or
    None. MLflow writes a table's float columns with ten decimals, which would lose the
    digits of small p-values and break comparisons of results bit for bit."""
    v = number(v)
    return None if v is None else repr(v)


def log_cells(cells: dict[tuple[int, int], dict[str, float]], stage: str,
              per_cell_metrics: bool) -> None:
    """Log the numbers of each layer pair on the active run.

    Parameters
    ----------
    cells : dict
        ``(layer_a, layer_b)`` -> name -> number, e.g. ``{(1, 2): {"svcca": 0.41}}``.
    stage : str
        Names the table, ``<stage>_cells.json``: columns ``cell`` (``aI-bJ``), ``layer_a``,
        ``layer_b`` and one per name, in order of first appearance, each number written as
        its exact text (``text``); None where a layer pair has no such number or it is not
        finite.
    per_cell_metrics : bool
        Also log each finite number as the metric ``<name>/aI-bJ``.
    """
    if not cells:
        return
    names = list(dict.fromkeys(k for row in cells.values() for k in row))
    pairs = list(cells)
    table = {"cell": [pair_key(la, lb) for la, lb in pairs],
             "layer_a": [la for la, _ in pairs], "layer_b": [lb for _, lb in pairs],
             **{n: [text(cells[p].get(n)) for p in pairs] for n in names}}
    mlflow.log_table(table, table_name(stage))
    if per_cell_metrics:
        mlflow.log_metrics({f"{n}/{pair_key(la, lb)}": v for (la, lb), row in cells.items()
                            for n, v in row.items() if number(v) is not None})


def read_table(run_id: str, stage: str) -> dict[tuple[int, int], dict[str, float]]:
    """A stage's per-layer-pair table of run ``run_id``, as ``log_cells`` took it (numbers
    that were None left out); empty when the run has none."""
    client = mlflow.MlflowClient()
    name = table_name(stage)
    if name not in {a.path for a in client.list_artifacts(run_id)}:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())
    cols = data["columns"]
    out = {}
    for values in data["data"]:
        row = dict(zip(cols, values))
        out[row["layer_a"], row["layer_b"]] = {k: float(v) for k, v in row.items()
                                                if k not in KEYS and v is not None}
    return out


def stages_logged(run_id: str) -> list[str]:
    """The stages whose per-layer-pair tables run ``run_id`` holds."""
    client = mlflow.MlflowClient()
    return [a.path[:-len(SUFFIX)] for a in client.list_artifacts(run_id)
            if a.path.endswith(SUFFIX)]


def cell_metrics(run_id: str) -> dict[str, float]:
    """Every per-layer-pair number of run ``run_id`` as ``<name>/aI-bJ`` -> value: the keys
    ``tracking.per_cell_metrics`` logs, read from the run's tables."""
    return {f"{n}/{pair_key(la, lb)}": v for stage in stages_logged(run_id)
            for (la, lb), row in read_table(run_id, stage).items() for n, v in row.items()}
