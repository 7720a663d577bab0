"""The ``saeuniv-slurm`` MLflow project backend: ``mlflow run . -e main -b saeuniv-slurm
--backend-config slurm.json --env-manager local`` runs the entry point as one Slurm batch
job.

The backend creates the MLflow run, writes a batch script that runs the entry point's
command in the job with that run's id, submits it with ``sbatch`` and tags the run with the
job id (``saeuniv.slurm_job_id``) and its log (``saeuniv.slurm_log``). With
``-P executor=slurm`` the pipeline inside the job submits its own job arrays; ``cancel()``
cancels them with the job. Every Slurm state maps to an MLflow run status
(``saeuniv.slurm.MLFLOW_STATUS``); a job that ends another way than COMPLETED leaves its
state and reason in ``saeuniv.slurm_state`` and ``saeuniv.slurm_reason``, and its run is
never left RUNNING.

Backend config keys (``KEYS``): resources of the job (``partition``, ``account``,
``time_min``, ``mem_gb``, ``cpus_per_task``, ``gpus_per_task``), ``sbatch`` (more sbatch
options), ``setup`` (shell lines run before the command, e.g. ``module load``),
``log_dir``, ``poll_s`` and ``wait`` (block until the run ends: ``mlflow run`` waits only
for its built-in backends).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import ExecutionException
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG,
    PROJECT_BUILD_IMAGE,
    PROJECT_DOCKER_ARGS,
    PROJECT_DOCKER_AUTH,
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    PROJECT_SYNCHRONOUS,
    fetch_and_validate_project,
    get_entry_point_command,
    get_or_create_run,
    get_run_env_vars,
    load_project,
)

from .. import slurm

log = logging.getLogger(__name__)
MLFLOW_KEYS = {MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG, PROJECT_BUILD_IMAGE, PROJECT_DOCKER_ARGS,
               PROJECT_DOCKER_AUTH, PROJECT_ENV_MANAGER, PROJECT_STORAGE_DIR,
               PROJECT_SYNCHRONOUS}  # what MLflow adds to every backend config
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 9: "SIGKILL", 10: "SIGUSR1", 12: "SIGUSR2",
           15: "SIGTERM"}


@dataclass(frozen=True)
class BackendConfig:
    """The ``--backend-config`` of ``saeuniv-slurm`` (a JSON file or dict).

    Resources of the batch job: ``partition`` and ``account`` (empty: the cluster's
    default), ``time_min`` minutes, ``mem_gb``, ``cpus_per_task``, ``gpus_per_task``;
    ``sbatch``: more options, e.g. ``["--qos=short"]``; ``setup``: shell lines run in the
    job before the command (e.g. ``["module load cuda", "source .venv/bin/activate"]``);
    ``log_dir``: where the job's output goes (default ``<project>/.slurm``; on a filesystem
    the nodes share); ``poll_s``: seconds between state checks; ``wait``: block until the
    run ends.
    """

    partition: str = ""
    account: str = ""
    time_min: int = 1440
    mem_gb: float = 16.0
    cpus_per_task: int = 2
    gpus_per_task: int = 0
    sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    log_dir: str = ""
    poll_s: float = 10.0
    wait: bool = True

    @classmethod
    def read(cls, raw: dict) -> BackendConfig:
        """The config from MLflow's backend config dict; a clear error for an unknown key
        or a value of the wrong type."""
        ours = {k: v for k, v in (raw or {}).items() if k not in MLFLOW_KEYS}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(ours) - set(known))
        if unknown:
            raise ExecutionException(f"saeuniv-slurm: unknown backend config key(s) "
                                     f"{unknown}; known keys: {sorted(known)}")
        for key, value in ours.items():
            want = {"str": str, "int": int, "float": (int, float), "bool": bool,
                    "list[str]": list}[known[key].type]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ExecutionException(f"saeuniv-slurm: backend config {key!r} must be "
                                         f"{known[key].type}, got {value!r}")
        cfg = cls(**ours)
        for key in ("time_min", "cpus_per_task"):
            if getattr(cfg, key) < 1:
                raise ExecutionException(f"saeuniv-slurm: backend config {key!r} must be >= 1, "
                                         f"got {getattr(cfg, key)}")
        return cfg

    def directives(self) -> list[str]:
        """The ``#SBATCH`` options of these resources."""
        opts = [f"--time={self.time_min}", f"--mem={int(self.mem_gb * 1024)}M",
                f"--cpus-per-task={self.cpus_per_task}"]
        opts += [f"--{k}={v}" for k, v in (("partition", self.partition),
                                           ("account", self.account)) if v]
        if self.gpus_per_task:
            opts.append(f"--gpus-per-task={self.gpus_per_task}")
        return opts + list(self.sbatch)


class SlurmBackend(AbstractBackend):
    """Runs an MLflow project entry point as a Slurm batch job."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
            experiment_id):
        cfg = BackendConfig.read(backend_config)
        env_manager = (backend_config or {}).get(PROJECT_ENV_MANAGER)
        if env_manager not in (None, "local"):
            raise ExecutionException(
                f"saeuniv-slurm runs the entry point in the job's own Python environment, not "
                f"with --env-manager {env_manager}: pass --env-manager local (and activate the "
                "environment on the nodes with the backend config key 'setup')")
        slurm.check()
        work_dir = Path(fetch_and_validate_project(project_uri, version, entry_point, params))
        project = load_project(str(work_dir))
        run = get_or_create_run(None, project_uri, experiment_id, str(work_dir), version,
                                entry_point, params)
        run_id = run.info.run_id
        command = " ".join(get_entry_point_command(
            project, entry_point, params, (backend_config or {}).get(PROJECT_STORAGE_DIR)))
        log_dir = Path(cfg.log_dir or work_dir / ".slurm").resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**get_run_env_vars(run_id, experiment_id),
               "MLFLOW_TRACKING_URI": tracking_uri or mlflow.get_tracking_uri()}
        script = log_dir / f"{run_id}.sbatch"
        script.write_text(batch_script(cfg, f"saeuniv-{entry_point}", work_dir, env, command,
                                       run_id, log_dir))
        client = mlflow.MlflowClient()
        try:
            job_id = submit(script)
        except BaseException as err:
            client.set_tag(run_id, "saeuniv.error", f"sbatch failed: {err}")
            client.set_terminated(run_id, "FAILED")
            raise
        # MLflow tags the backend only once run() returns, which `wait` delays
        client.set_tag(run_id, "mlflow.project.backend", "saeuniv-slurm")
        client.set_tag(run_id, "mlflow.project.env", "local")
        client.set_tag(run_id, "saeuniv.slurm_job_id", job_id)
        client.set_tag(run_id, "saeuniv.slurm_log", str(log_dir / f"{job_id}.out"))
        log.info("=== run %s submitted as Slurm job %s (log %s) ===", run_id, job_id,
                 log_dir / f"{job_id}.out")
        submitted = SlurmSubmittedRun(run_id, job_id, cfg.poll_s)
        if cfg.wait and not submitted.wait():
            raise ExecutionException(f"run {run_id} (Slurm job {job_id}) ended "
                                     f"{submitted.get_status()}; see its log "
                                     f"{log_dir / f'{job_id}.out'}")
        return submitted


def batch_script(cfg: BackendConfig, name: str, work_dir: Path, env: dict, command: str,
                 run_id: str, log_dir: Path) -> str:
    """The batch script: the command runs in the background so that a signal Slurm sends
    the script (scancel, time limit) reaches it, then ``close`` ends a run the command left
    open."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}",
             f"#SBATCH --output={log_dir}/%j.out"]
    lines += [f"#SBATCH {opt}" for opt in cfg.directives()]
    lines += [f"cd {shlex.quote(str(work_dir))}",
              f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    lines += list(cfg.setup)
    lines += [f"{command} &", "child=$!",
              "trap 'kill -TERM $child 2>/dev/null' TERM INT USR1 USR2",
              "wait $child; rc=$?",
              "while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done",
              f"{shlex.quote(sys.executable)} -m saeuniv.plugin.slurm_backend close {run_id} "
              "\"$SLURM_JOB_ID\" $rc",
              "exit $rc", ""]
    return "\n".join(lines)


def submit(script: Path) -> str:
    """``sbatch`` the script; its job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise ExecutionException(f"sbatch {script} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


class SlurmSubmittedRun(SubmittedRun):
    """A run submitted as Slurm job ``job_id``."""

    def __init__(self, run_id: str, job_id: str, poll_s: float = 10.0):
        self._run_id, self.job_id, self.poll_s = run_id, job_id, poll_s
        self.client = mlflow.MlflowClient()

    @property
    def run_id(self) -> str:
        return self._run_id

    def wait(self) -> bool:
        """Block until the job ends; True when the run FINISHED."""
        last = None
        while (status := self.get_status()) not in ("FINISHED", "FAILED", "KILLED"):
            if status != last:
                log.info("Slurm job %s: %s", self.job_id, status)
                last = status
            time.sleep(self.poll_s)
        return status == "FINISHED"

    def get_status(self) -> str:
        """The MLflow status of the run: from the job's Slurm state while Slurm knows it
        (an ended job's run is closed with that status and its reason tagged), else the
        run's own."""
        state = slurm.state(self.job_id)
        run = self.client.get_run(self.run_id)
        if state is None:
            return run.info.status
        if not state.ended:
            return state.status
        status = state.status
        if state.state == "COMPLETED" and run.info.status in ("FAILED", "KILLED"):
            status = run.info.status
        self._close(run, status, state)
        return status

    def _close(self, run, status: str, state: slurm.JobState) -> None:
        tags = run.data.tags
        if tags.get("saeuniv.slurm_state") != state.state:
            self.client.set_tag(self.run_id, "saeuniv.slurm_state", state.state)
            if state.state != "COMPLETED":
                self.client.set_tag(self.run_id, "saeuniv.slurm_reason", state.why())
        if run.info.status != status:
            self.client.set_terminated(self.run_id, status)

    def cancel(self) -> None:
        """``scancel`` the job and every job array it submitted; wait until Slurm has ended
        the job, then mark the run and its open child runs KILLED."""
        for _ in range(60):
            slurm.cancel([self.job_id, *slurm.children(self.job_id)])
            state = slurm.state(self.job_id)
            if state is None or state.ended:
                break
            time.sleep(2)
        slurm.cancel(slurm.children(self.job_id))  # submitted while it was being killed
        why = f"cancelled: scancel of Slurm job {self.job_id} and its job arrays"
        for run_id in [self.run_id, *descendants(self.client, self.run_id)]:
            if self.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED",
                                                             "FAILED"):
                self.client.set_tag(run_id, "saeuniv.slurm_reason", why)
                self.client.set_terminated(run_id, "KILLED")
        self.client.set_tag(self.run_id, "saeuniv.slurm_state", "CANCELLED")


def descendants(client, run_id: str) -> list[str]:
    """The ids of every run nested under ``run_id``, at any depth."""
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    return [x for c in children for x in (c.info.run_id, *descendants(client, c.info.run_id))]


def close(run_id: str, job_id: str, rc: int) -> str:
    """End run ``run_id`` after job ``job_id``'s command exited ``rc``, when the command
    left it open: FINISHED for 0 (as ``mlflow run`` does), else FAILED with the reason in
    ``saeuniv.error``. Returns the run's status."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
        return run.info.status
    if rc == 0:
        client.set_terminated(run_id, "FINISHED")
        return "FINISHED"
    how = (f"killed by signal {SIGNALS.get(rc - 128, rc - 128)}" if rc > 128
           else f"exited {rc}")
    client.set_tag(run_id, "saeuniv.error", f"the command of Slurm job {job_id} {how} "
                   "without ending its run")
    client.set_terminated(run_id, "FAILED")
    return "FAILED"


if __name__ == "__main__":  # the batch script's last step: close RUN_ID JOB_ID RC
    if len(sys.argv) != 5 or sys.argv[1] != "close":
        sys.exit("usage: python -m saeuniv.plugin.slurm_backend close RUN_ID JOB_ID RC")
    print(f"saeuniv: run {sys.argv[2]}: "
          f"{close(sys.argv[2], sys.argv[3], int(sys.argv[4]))}")
