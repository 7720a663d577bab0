"""``saeuniv compare RUN_ID RUN_ID ...``: line up two or more ``main`` runs.

Each run's ``grids.json`` and params are read back from MLflow. The comparison logs, into
a new run tagged ``saeuniv.stage=compare`` and ``saeuniv.compared`` (the run ids):

- ``compare_depth_curves.png``: per metric, each run's per-layer score against the
  relative depth of the A layer, (layer + 1) / n_layers, each A layer scored against the B
  layer at the nearest relative depth (the curves of the runs' ``<metric>`` metrics);
- ``diff_heatmap_<metric>.png``: second run minus first run, layer pair by layer pair
  (the two runs must share one layer grid);
- ``params_diff.csv``: the params whose values differ between the runs (also printed).

The curves and heatmaps cover every metric all the runs scored, in the registry's order.
"""

from __future__ import annotations

import csv
import io
import re

import mlflow
import numpy as np

from .core.depth import nearest_layer, relative_depth
from .core.metrics import METRICS


class CompareError(ValueError):
    """Runs that cannot be compared (unknown, not ``main``, different layer grids)."""


def parse_run_ids(values: list[str]) -> list[str]:
    """Run ids from arguments that may each hold several, separated by spaces or commas."""
    ids = [v for value in values for v in re.split(r"[\s,]+", value) if v]
    if len(ids) < 2:
        raise CompareError(f"compare needs at least two run ids, got {ids}")
    if len(set(ids)) != len(ids):
        raise CompareError(f"a run id is given twice: {ids}")
    return ids


def _n_layers(client, run, side: str, grids: dict) -> int:
    """The side's layer count: the ``n_layers_<side>`` metric of the run's ``models`` child,
    else one more than the deepest layer in ``grids.json``."""
    children = client.search_runs(
        [run.info.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.saeuniv.stage = 'models'"))
    for child in children:
        if f"n_layers_{side}" in child.data.metrics:
            return int(child.data.metrics[f"n_layers_{side}"])
    return max(grids[f"layers_{side}"]) + 1


def load_run(client, run_id: str) -> dict:
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise CompareError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()}: "
                           f"{err.message}; check the run id and MLFLOW_TRACKING_URI") from None
    stage = run.data.tags.get("saeuniv.stage")
    if stage != "main":
        raise CompareError(f"run {run_id} is a {stage or 'non-saeuniv'} run; compare takes "
                           "main runs (tag saeuniv.stage=main)")
    try:
        grids = mlflow.artifacts.load_dict(f"runs:/{run_id}/grids.json")
    except Exception as err:  # noqa: BLE001 - any fetch failure means the same to the user
        raise CompareError(f"run {run_id} has no readable grids.json ({err}); was it "
                           "finished?") from None
    n = {side: _n_layers(client, run, side, grids) for side in "ab"}
    return {"id": run_id, "name": run.info.run_name, "params": run.data.params,
            "grids": grids, "n_layers": n}


def depth_curve(r: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(relative depth of each A layer, score against the B layer nearest in depth)."""
    g, n = r["grids"], r["n_layers"]
    obs = np.asarray(g["metrics"][metric]["observed"], dtype=float)  # None -> nan
    xs, ys = [], []
    for i, la in enumerate(g["layers_a"]):
        x = relative_depth(la, n["a"])
        xs.append(x)
        ys.append(obs[i, g["layers_b"].index(nearest_layer(x, g["layers_b"], n["b"]))])
    return np.asarray(xs), np.asarray(ys)


def shared_metrics(runs: list[dict]) -> list[str]:
    """The metrics every run scored, in the registry's order."""
    return [m for m in METRICS if all(m in r["grids"]["metrics"] for r in runs)]


def params_diff(runs: list[dict]) -> list[dict]:
    """One row per param whose value differs between the runs (absent: empty)."""
    keys = sorted(set().union(*(r["params"] for r in runs)))
    rows = []
    for k in keys:
        values = [r["params"].get(k, "") for r in runs]
        if len(set(values)) > 1:
            rows.append({"param": k, **{r["id"]: v for r, v in zip(runs, values)}})
    return rows


def diff_grid(first: dict, second: dict, metric: str) -> np.ndarray:
    g1, g2 = first["grids"], second["grids"]
    for side in "ab":
        if g1[f"layers_{side}"] != g2[f"layers_{side}"]:
            raise CompareError(
                f"the difference heatmap needs one layer grid: run {first['id']} has "
                f"layers_{side}={g1[f'layers_{side}']}, run {second['id']} has "
                f"{g2[f'layers_{side}']}")
    if metric not in g1["metrics"] or metric not in g2["metrics"]:
        raise CompareError(f"metric {metric!r} is not scored in both runs")
    return (np.asarray(g2["metrics"][metric]["observed"], dtype=float)
            - np.asarray(g1["metrics"][metric]["observed"], dtype=float))


def table(rows: list[dict], ids: list[str]) -> str:
    header = ["param"] + [i[:12] for i in ids]
    body = [[row["param"]] + [row[i] for i in ids] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    def fmt(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def _label(r: dict) -> str:
    return f"{r['name']} ({r['id'][:8]})"


def curves_figure(runs: list[dict], names: list[str]):
    """One panel per metric: every run's per-layer curve against relative depth."""
    from .plots import plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5))
    for ax, metric in zip(np.atleast_1d(axes), names):
        for r in runs:
            x, y = depth_curve(r, metric)
            ax.plot(x, y, marker="o", label=_label(r))
        ax.set_xlabel("relative depth of A layer")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}, B layer at nearest relative depth", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def params_csv(rows: list[dict], run_ids: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["param"] + run_ids)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def compare(run_ids: list[str]) -> tuple[str, str]:
    """Compare the main runs ``run_ids`` in a new ``compare`` run; (its id, the params table).

    The curves and difference heatmaps cover every metric all the runs scored, in the
    order of the metric registry."""
    from .plots import heatmap, plt
    from .tracking import lineage_tags, stage_run

    client = mlflow.MlflowClient()
    runs = [load_run(client, i) for i in run_ids]
    names = shared_metrics(runs)
    if not names:
        raise CompareError(f"the runs {run_ids} share no scored metric")
    diffs = {m: diff_grid(runs[0], runs[1], m) for m in names}  # fail before logging
    rows = params_diff(runs)
    text = table(rows, run_ids) if rows else "no param differs between the runs"
    with stage_run("compare", run_name="compare:" + ",".join(i[:8] for i in run_ids),
                   tags={"saeuniv.compared": ",".join(run_ids), **lineage_tags()}) as run:
        fig = curves_figure(runs, names)
        mlflow.log_figure(fig, "compare_depth_curves.png")
        plt.close(fig)
        g = runs[0]["grids"]
        for metric, grid in diffs.items():
            fig = heatmap(grid, g["layers_a"], g["layers_b"],
                          f"{metric}: {_label(runs[1])} minus {_label(runs[0])}", "A", "B")
            mlflow.log_figure(fig, f"diff_heatmap_{metric}.png")
            plt.close(fig)
        mlflow.log_text(params_csv(rows, run_ids), "params_diff.csv")
        mlflow.log_metric("n_params_differ", len(rows))
        return run.info.run_id, text
