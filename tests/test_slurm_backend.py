"""The saeuniv-slurm project backend and the Slurm state reading, without a cluster: Slurm's
commands are replaced by their recorded outputs; the batch script runs under bash."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import ExecutionException

from saeuniv import slurm
from saeuniv.plugin import slurm_backend
from saeuniv.plugin.slurm_backend import BackendConfig, SlurmSubmittedRun, batch_script

SCONTROL = (  # scontrol show job -o 41 of a 4-task array: task 0 done, 1 running, 2-3 pending
    "JobId=44 ArrayJobId=41 ArrayTaskId=2-3%2 JobName=saeuniv-match JobState=PENDING "
    "Reason=JobArrayTaskLimit Dependency=(null) Restarts=0 ExitCode=0:0\n"
    "JobId=43 ArrayJobId=41 ArrayTaskId=1 JobName=saeuniv-match JobState=RUNNING "
    "Reason=None Restarts=1 ExitCode=0:0\n"
    "JobId=41 ArrayJobId=41 ArrayTaskId=0 JobName=saeuniv-match JobState=TIMEOUT "
    "Reason=TimeLimit Restarts=0 ExitCode=0:15\n")


@pytest.fixture()
def client(tracking):
    return mlflow.MlflowClient(tracking)


def fake_scontrol(monkeypatch, stdout: str, returncode: int = 0, stderr: str = ""):
    calls = []

    def run(args):
        calls.append(args)
        return subprocess.CompletedProcess(args, returncode, stdout, stderr)

    monkeypatch.setattr(slurm, "_run", run)
    return calls


def test_every_slurm_state_maps_to_an_mlflow_status():
    want = {"PENDING": "SCHEDULED", "RUNNING": "RUNNING", "COMPLETED": "FINISHED",
            "FAILED": "FAILED", "TIMEOUT": "FAILED", "CANCELLED": "KILLED",
            "OUT_OF_MEMORY": "FAILED", "NODE_FAIL": "FAILED", "PREEMPTED": "FAILED"}
    for state, status in want.items():
        assert slurm.JobState("7", state).status == status, state
    assert {slurm.JobState("7", s).ended for s in ("PENDING", "RUNNING")} == {False}
    why = slurm.JobState("7", "OUT_OF_MEMORY", "OutOfMemory", "0:9").why()
    assert why == ("Slurm job 7 ended OUT_OF_MEMORY (the job ran out of memory); reason "
                   "OutOfMemory, exit code 0:9")


def test_array_task_states_are_read_from_scontrol_one_per_task(monkeypatch):
    assert slurm.expand("0-3,7%2") == [0, 1, 2, 3, 7]
    fake_scontrol(monkeypatch, SCONTROL)
    got = {s.job_id: (s.state, s.restarts) for s in slurm.states("41")}
    assert got == {"41_0": ("TIMEOUT", 0), "41_1": ("RUNNING", 1), "41_2": ("PENDING", 0),
                   "41_3": ("PENDING", 0)}
    fake_scontrol(monkeypatch, "", 1, "slurm_load_jobs error: Invalid job id specified")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # no accounting either
    assert slurm.states("41") == [] and slurm.state("41") is None


def test_the_backend_config_names_a_bad_key_or_value():
    cfg = BackendConfig.read({"partition": "gpu", "time_min": 30, "gpus_per_task": 1,
                              "sbatch": ["--qos=short"], "ENV_MANAGER": "local"})
    assert cfg.directives() == ["--time=30", "--mem=16384M", "--cpus-per-task=2",
                                "--partition=gpu", "--gpus-per-task=1", "--qos=short"]
    with pytest.raises(ExecutionException, match=r"unknown backend config key\(s\) "
                       r"\['partiton'\]; known keys: \['account', "):
        BackendConfig.read({"partiton": "gpu"})
    with pytest.raises(ExecutionException, match="'time_min' must be int, got '30'"):
        BackendConfig.read({"time_min": "30"})
    with pytest.raises(ExecutionException, match="'cpus_per_task' must be >= 1, got 0"):
        BackendConfig.read({"cpus_per_task": 0})


def test_the_backend_is_an_mlflow_plugin_and_refuses_other_env_managers(tmp_path):
    from mlflow.projects.backend import loader

    backend = loader.load_backend("saeuniv-slurm")
    assert isinstance(backend, slurm_backend.SlurmBackend)
    with pytest.raises(ExecutionException, match="pass --env-manager local"):
        backend.run(str(tmp_path), "main", {}, None, {"ENV_MANAGER": "conda"}, None, "0")


def script_run(client, tmp_path: Path, command: str) -> tuple[str, subprocess.Popen]:
    """Start the batch script of ``command`` under bash, as Slurm would (job id 77)."""
    run_id = client.create_run("0").info.run_id
    script = tmp_path / "job.sbatch"
    script.write_text(batch_script(BackendConfig(), "saeuniv-test", tmp_path,
                                   {"MLFLOW_RUN_ID": run_id}, command, run_id, tmp_path))
    env = {**os.environ, "SLURM_JOB_ID": "77"}
    return run_id, subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_the_batch_script_fails_a_run_its_command_left_open(client, tmp_path):
    run_id, proc = script_run(client, tmp_path, "exit 3")
    assert proc.wait(timeout=120) == 3
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["saeuniv.error"] == ("the command of Slurm job 77 exited 3 without "
                                              "ending its run")


def test_the_batch_script_passes_a_signal_on_and_fails_the_run(client, tmp_path):
    run_id, proc = script_run(client, tmp_path, "sleep 60")
    time.sleep(1.0)  # the script is waiting for its command
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stdout.read().decode()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "killed by signal SIGTERM" in run.data.tags["saeuniv.error"]


def test_a_job_that_times_out_fails_its_run_with_the_reason(client, monkeypatch):
    run_id = client.create_run("0").info.run_id
    states = iter([slurm.JobState("5", "PENDING"), slurm.JobState("5", "RUNNING"),
                   slurm.JobState("5", "TIMEOUT", "TimeLimit", "0:15")])
    monkeypatch.setattr(slurm, "state", lambda job: next(states))
    submitted = SlurmSubmittedRun(run_id, "5", poll_s=0.01)
    assert submitted.get_status() == "SCHEDULED"
    assert submitted.wait() is False
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["saeuniv.slurm_state"] == "TIMEOUT"
    assert "reached its time limit" in run.data.tags["saeuniv.slurm_reason"]


def test_cancel_scancels_the_job_and_its_arrays_and_kills_the_runs(client, monkeypatch):
    parent = client.create_run("0")
    child = client.create_run("0", tags={"mlflow.parentRunId": parent.info.run_id})
    cancelled = []
    monkeypatch.setattr(slurm, "cancel", lambda ids: cancelled.append(list(ids)))
    monkeypatch.setattr(slurm, "children", lambda job: ["9"] if job == "5" else [])
    monkeypatch.setattr(slurm, "state", lambda job: slurm.JobState("5", "CANCELLED"))
    SlurmSubmittedRun(parent.info.run_id, "5").cancel()
    assert cancelled[0] == ["5", "9"]
    for run in (parent, child):
        got = client.get_run(run.info.run_id)
        assert got.info.status == "KILLED"
        assert "scancel of Slurm job 5" in got.data.tags["saeuniv.slurm_reason"]
