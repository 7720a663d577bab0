"""The MLflow project as a user starts it: the README's ``mlflow run . -e main --env-manager
local`` from the repository root, on the tiny config, each stage launched as its own project
run; what it logs must be what the same config logs when run in one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from saeuniv import stages
from saeuniv.cells import cell_metrics

from helpers import finished, runs

ROOT = Path(__file__).resolve().parents[1]


def test_mlflow_run_main_launches_every_stage_and_logs_the_in_process_scores(
        tiny_run, own_tracking, own_store, tmp_path):
    """On a copy of the tiny run's store (models and SAEs already trained, so the test times
    the launcher, not the training; about 60-90 s, seven Python processes): exit 0, a FINISHED
    main run with one FINISHED nested run per stage, each launched by ``mlflow run`` with the
    config file, and the same SVCCA and RSA grid as the in-process run of that config."""
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) \
        or shutil.which("mlflow")
    assert mlflow_cli, "the mlflow command is installed with the package"
    runs(own_tracking)  # the database is created here, so the default experiment's artefacts
    # go under tmp_path, not into the repository's mlruns/
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_run["cfg"].to_dict()))
    # a user's shell: no run or experiment of this process (mlflow.set_experiment in earlier
    # in-process runs exports MLFLOW_EXPERIMENT_ID, an id of another database)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_URI=own_tracking, SAEUNIV_HOME=str(own_store),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.time()
    proc = subprocess.run([mlflow_cli, "run", ".", "-e", "main", "--env-manager", "local",
                           "-P", f"config={config}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"mlflow run . -e main: {seconds:.0f} s")

    frame = runs(own_tracking)
    [main] = [row for _, row in finished(frame, "main").iterrows()]
    assert main["tags.mlflow.project.entryPoint"] == "main"
    assert main["tags.mlflow.project.backend"] == "local"
    assert main.artifact_uri.startswith(tmp_path.as_uri()) or str(tmp_path) in main.artifact_uri
    children = frame[frame["tags.mlflow.parentRunId"] == main.run_id]
    assert sorted(children["tags.saeuniv.stage"]) == sorted(stages.NAMES)
    assert set(children["status"]) == {"FINISHED"} and set(frame["status"]) == {"FINISHED"}
    # each stage a project run of its own entry point, not a run opened inside main's process
    assert list(children["tags.mlflow.project.entryPoint"].sort_values()) == sorted(stages.NAMES)
    assert set(children["tags.mlflow.source.type"]) == {main["tags.mlflow.source.type"]} \
        == {"PROJECT"}
    assert set(children["tags.saeuniv.config_hash"]) == {tiny_run["cfg"].hash()}

    got = cell_metrics(main.run_id)
    reference = finished(runs(tiny_run["uri"]), "main").iloc[0]
    want = cell_metrics(reference.run_id)
    grid = [k for k in want if k.startswith(("svcca/a", "rsa/a"))]
    assert len([k for k in grid if k.startswith("svcca/")]) == _n_pairs(tiny_run)
    assert {k for k in got if k.startswith(("svcca/a", "rsa/a"))} == set(grid)
    for key in grid:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def _n_pairs(tiny_run) -> int:
    members = {m.name: m.n_layers for m in tiny_run["cfg"].family.members}
    return members[tiny_run["cfg"].model_a.name] * members[tiny_run["cfg"].model_b.name]
