"""The pipeline on a real Slurm cluster (``.ci/run`` starts one on loopback): job arrays with
a dependency, the saeuniv-slurm project backend, cancel and resubmit, a time limit.

Needs ``slurm_cluster`` (skipped without one, except under ``SAEUNIV_REQUIRE_SLURM=1``)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from saeuniv import cli, slurm
from saeuniv.cells import cell_metrics
from saeuniv.executors import run_arrays
from saeuniv.pipeline import Pipeline
from saeuniv.store import Store
from saeuniv.tasks import Task, run_task

from helpers import TASK_KINDS, files, finished, first_try, runs

REPO = Path(__file__).resolve().parents[1]
CELL_STAGES = ("match", "similarity", "subspaces")
pytestmark = pytest.mark.usefixtures("slurm_cluster")


def job_times(job_id: str) -> tuple[list[str], list[str]]:
    """Start and end times of every task of a job (ISO text, comparable as strings)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, check=True).stdout
    return (re.findall(r"StartTime=(\S+)", out), re.findall(r"EndTime=(\S+)", out))


def queued(job_ids: list[str]) -> list[str]:
    """The jobs of ``job_ids`` (or their tasks) still in the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%F %i %T"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if line.split()[0] in job_ids]


def drop(store: Path, kinds=TASK_KINDS) -> None:
    for kind in kinds:
        shutil.rmtree(store / kind, ignore_errors=True)


def test_the_pipeline_on_slurm_is_one_extraction_array_then_one_cell_array(
        tiny_run, own_store, own_tracking):
    drop(own_store)  # left to the job arrays to rebuild
    assert cli.main(tiny_run["args"] + ["--executor", "slurm"]) == 0
    for kind in TASK_KINDS:
        want, got = files(tiny_run["store"], kind), files(own_store, kind)
        assert want and got.keys() == want.keys(), kind
        assert all(got[name] == want[name] for name in want), kind
    frame = runs(own_tracking)
    ids = {stage: finished(frame, stage).iloc[0]["tags.saeuniv.slurm_job_ids"]
           for stage in ("extract", *CELL_STAGES)}
    extraction, cells = ids["extract"], ids["match"]
    assert "," not in extraction and "," not in cells and extraction != cells
    assert {ids[s] for s in CELL_STAGES} == {cells}  # one array for every layer pair's work
    tasks = finished(frame, "match").iloc[0]["tags.saeuniv.slurm_array_tasks"]
    n_pairs = len(Pipeline(tiny_run["cfg"], Store(own_store)).pairs)
    assert tasks == f"{cells}_[0-{n_pairs - 1}]"  # one array task per layer pair
    scripts = list((own_store / ".slurm").rglob(f"{cells}_submission.sh"))
    assert scripts and f"--dependency=afterok:{extraction}" in scripts[0].read_text()
    _, ended = job_times(extraction)
    started, _ = job_times(cells)
    assert min(started) >= max(ended), (started, ended)  # the cells waited
    got = cell_metrics(finished(frame, "main").iloc[0].run_id)
    reference = finished(runs(tiny_run["uri"]), "main").iloc[0].run_id
    assert got and got == cell_metrics(reference)


def project_args(tiny_run, tmp_path: Path, executor: str, **backend) -> list[str]:
    """``mlflow run`` of the tiny config on the saeuniv-slurm backend."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_run["cfg"].to_dict()))
    backend_file = tmp_path / "slurm.json"
    backend_file.write_text(json.dumps({"time_min": 20, "mem_gb": 2, "cpus_per_task": 1,
                                        "poll_s": 2, "log_dir": str(tmp_path / "logs"),
                                        **backend}))
    return ["-e", "main", "-b", "saeuniv-slurm", "--backend-config", str(backend_file),
            "--env-manager", "local", "-P", f"config={config}", "-P", f"executor={executor}"]


def test_mlflow_run_on_the_slurm_backend_ends_finished_with_its_job_id(
        tiny_run, own_store, own_tracking, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    out = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO),
                          "--experiment-name", "slurm-backend",
                          *project_args(tiny_run, tmp_path, "local")],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    frame = runs(own_tracking)
    top = frame[frame["tags.mlflow.project.backend"] == "saeuniv-slurm"]
    assert len(top) == 1, frame[["tags.mlflow.runName", "status"]]
    run = top.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.saeuniv.slurm_state"] == "COMPLETED"
    job = run["tags.saeuniv.slurm_job_id"]
    assert re.fullmatch(r"\d+", job)
    assert Path(run["tags.saeuniv.slurm_log"]).is_file()
    assert set(frame["status"]) == {"FINISHED"}  # the stage runs under it too
    assert len(finished(frame, "similarity")) == 1


def test_cancel_mid_array_empties_the_queue_and_a_resubmission_reuses_what_was_done(
        tiny_run, own_store, own_tracking, tmp_path):
    from mlflow.projects import run as project_run

    drop(own_store)
    backend = {"time_min": 20, "mem_gb": 2, "cpus_per_task": 1, "poll_s": 1,
               "log_dir": str(tmp_path / "logs"), "wait": False}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_run["cfg"].to_dict()))
    params = {"config": str(config), "executor": "slurm"}
    mlflow.set_experiment("slurm-cancel")

    def submit():
        return project_run(str(REPO), "main", parameters=params, backend="saeuniv-slurm",
                           backend_config=backend, env_manager="local", synchronous=False)

    first = submit()
    deadline = time.time() + 600
    while time.time() < deadline:  # until the first extraction task has written its codes
        if list((own_store / "codes").glob("*/manifest.json")):
            break
        assert first.get_status() in ("SCHEDULED", "RUNNING"), first.get_status()
        time.sleep(1)
    arrays = slurm.children(first.job_id)
    assert arrays, "the job submitted no array"
    done = {p.parent.name: p.stat().st_mtime_ns
            for p in (own_store / "codes").glob("*/manifest.json")}
    first.cancel()
    assert queued([first.job_id, *arrays]) == []
    assert mlflow.MlflowClient().get_run(first.run_id).info.status == "KILLED"
    assert first.get_status() == "KILLED"

    params["executor"] = "local"  # the rest inside the job: reuse is the same either way
    second = submit()
    assert second.wait(), second.get_status()
    kept = {p.parent.name: p.stat().st_mtime_ns
            for p in (own_store / "codes").glob("*/manifest.json")}
    assert all(kept[k] == t for k, t in done.items())  # made once, before the cancel
    for kind in TASK_KINDS:
        want, got = files(tiny_run["store"], kind), files(own_store, kind)
        assert got.keys() == want.keys() and all(got[n] == want[n] for n in want), kind


class SlowFirst:
    """Sleeps past the job's time limit on the first try of each task, then builds it."""

    def __init__(self, marks: Path):
        self.marks = marks

    def __call__(self, task):
        if first_try(self.marks, task):
            time.sleep(600)
        return run_task(task)

    def checkpoint(self, task):
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def test_a_task_past_its_time_limit_is_retried_and_completes(tiny_run, own_store, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs unpickle SlowFirst
    cloudpickle.register_pickle_by_value(sys.modules["helpers"])  # first_try
    drop(own_store, ("matches",))
    cfg = tiny_run["cfg"]
    tasks = [Task(("match",), (la, 0), cfg.to_dict(), str(own_store)) for la in (0, 1)]
    ex = dataclasses.replace(cfg.execution, time_min=1, mem_gb=1, max_retries=2)
    marks = tmp_path / "marks"
    marks.mkdir()
    ids = run_arrays([tasks], ex, tmp_path / "jobs", "match", fn=SlowFirst(marks))[0]
    array = ids[0].split("_")[0]
    restarts = [s.restarts for s in slurm.states(array)]
    # requeued by submitit at the time-limit signal (Restarts), or resubmitted when killed
    assert len(ids) == 2 or min(restarts, default=0) >= 1, (ids, restarts)
    assert len(list(marks.iterdir())) == 2
    built, want = files(own_store, "matches"), files(tiny_run["store"], "matches")
    assert len([n for n in built if n.endswith("pairs.npz")]) == 2
    assert all(built[n] == want[n] for n in built)
