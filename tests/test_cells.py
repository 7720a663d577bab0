"""Per-layer-pair numbers: tables by default, metric keys with tracking.per_cell_metrics."""

from __future__ import annotations

import math
import re

import mlflow

from saeuniv import cli, stages
from saeuniv.cells import cell_metrics, log_cells, read_table
from saeuniv.stages.runner import inputs_hash

from helpers import finished, runs

CELL_KEY = re.compile(r"/a\d+-b\d+$")  # a metric key of one layer pair, e.g. svcca/a0-b1


def test_log_cells_writes_a_table_and_keys_only_when_asked(own_tracking, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # another test's database
    mlflow.set_experiment("cells")
    # every digit kept: MLflow's own table writer would round x to ten decimals
    x = 0.12345678901234567
    cells = {(0, 1): {"n": 3, "x": x}, (1, 2): {"n": 4, "x": math.nan, "y": 2e-17}}
    with mlflow.start_run() as off:
        log_cells(cells, "scores", per_cell_metrics=False)
    with mlflow.start_run() as on:
        log_cells(cells, "scores", per_cell_metrics=True)
    client = mlflow.MlflowClient()
    assert client.get_run(off.info.run_id).data.metrics == {}
    keys = client.get_run(on.info.run_id).data.metrics
    # NaN is neither a key nor a table value: JSON has no NaN, and a cell without a number
    # must not look scored
    want = {"n/a0-b1": 3.0, "x/a0-b1": x, "n/a1-b2": 4.0, "y/a1-b2": 2e-17}
    assert keys == want
    for run in (off, on):
        assert cell_metrics(run.info.run_id) == want
        assert read_table(run.info.run_id, "scores") == {(0, 1): {"n": 3.0, "x": x},
                                                          (1, 2): {"n": 4.0, "y": 2e-17}}
    assert read_table(off.info.run_id, "match") == {}


def test_a_default_run_logs_no_key_per_layer_pair(tiny_run):
    frame = runs(tiny_run["uri"])
    client = mlflow.MlflowClient()
    for stage in ("match", "similarity", "convergence", "main"):
        run = client.get_run(finished(frame, stage).iloc[0].run_id)
        per_cell = [k for k in run.data.metrics if CELL_KEY.search(k)]
        assert per_cell == [], (stage, per_cell[:5])
        assert cell_metrics(run.info.run_id), stage  # the numbers are in the tables
    main = client.get_run(finished(frame, "main").iloc[0].run_id)
    # the headline numbers are keys; ceilings and curves have one key per metric, not per layer
    assert {"svcca_cal_middle", "svcca_middle_p", "svcca_index_median",
            "cka_ceiling_a", "cka_ceiling_b", "rsa"} <= set(main.data.metrics)
    assert len(main.data.metrics) < 120, len(main.data.metrics)


def test_per_cell_metrics_logs_every_table_number_as_a_key(tiny_run, own_tracking):
    assert cli.main(tiny_run["args"] + ["--set", "tracking.per_cell_metrics=true"]) == 0
    frame = runs(own_tracking)
    client = mlflow.MlflowClient()
    for stage in ("match", "similarity", "convergence", "main"):
        run = client.get_run(finished(frame, stage).iloc[0].run_id)
        keys = {k: v for k, v in run.data.metrics.items() if CELL_KEY.search(k)}
        assert keys, stage
        assert keys == cell_metrics(run.info.run_id), stage  # the same, to the last bit


def test_per_cell_metrics_is_part_of_the_inputs_of_the_stages_that_log_cells(tiny_run):
    """A finished run without the keys must not be reused for a run that asks for them."""
    cfg = tiny_run["cfg"]
    on = cfg.replace(**{"tracking.per_cell_metrics": True})
    changed = {s for s in stages.NAMES if inputs_hash(cfg, s) != inputs_hash(on, s)}
    assert changed == {"match", "similarity", "convergence", "subspaces"}


def test_per_cell_metrics_must_be_true_or_false(tiny_run, capsys):
    assert cli.main(tiny_run["args"] + ["--set", "tracking.per_cell_metrics=3"]) != 0
    assert "tracking.per_cell_metrics must be bool, got 3" in capsys.readouterr().err
