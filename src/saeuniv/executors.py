"""Executors: where a stage's per-layer-pair tasks (``saeuniv.tasks``) run.

``execution.executor`` picks one: ``local`` runs nothing ahead (the stage builds each layer
pair in this process as it logs it); ``pool`` builds every layer pair of the stage first, in
``execution.workers`` processes on this machine; ``slurm`` submits them as one Slurm job
array (through submitit) and waits for it. The stage then logs them from the store. The
entries are the same bytes whichever executor built them, and only this process talks to
MLflow.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import mlflow
from tqdm.auto import tqdm

from . import stages
from .tasks import CellTask, cell_tasks, run_task

POLL_S = 2.0  # how often the driver looks at a job array's tasks


class ExecutorError(RuntimeError):
    """Tasks could not be run, or failed more often than ``execution.max_retries``."""


def workers(n: int) -> int:
    """Worker processes for ``execution.workers`` = ``n`` (0: one per CPU of this process)."""
    return n or len(os.sched_getaffinity(0))


def run_pool(tasks: list[CellTask], n_workers: int, desc: str) -> list[float]:
    """Run ``tasks`` in ``n_workers`` fresh processes; their seconds, in task order. The
    first task that fails stops the rest and is raised, naming the task."""
    ctx = multiprocessing.get_context("spawn")  # no copy of this process's models or locks
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_task, t): t for t in tasks}
        try:
            with tqdm(total=len(tasks), desc=desc, unit="layer pair") as bar:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    bar.update(len(done))
                    for f in done:
                        if f.exception() is not None:
                            raise ExecutorError(f"{futures[f].label()} failed in a worker: "
                                                f"{f.exception()}") from f.exception()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [f.result() for f in futures]


class ResumableTask:
    """A task as a submitit job: on a time limit or preemption submitit requeues it (its
    ``checkpoint``), and the rerun finds the finished entries in the store."""

    def __call__(self, task: CellTask) -> float:
        return run_task(task)

    def checkpoint(self, task: CellTask):
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def check_slurm() -> None:
    """Refuse ``execution.executor: slurm`` where Slurm cannot be reached, before any work."""
    if shutil.which("sbatch") is None:
        raise ExecutorError("execution.executor is slurm but Slurm's sbatch is not on PATH; "
                            "run on a cluster login node, or use --executor pool")


def submitit_executor(ex, folder: Path, name: str, cluster: str):
    """A submitit executor for the resources of ``ex`` (``ExecutionConfig``); ``cluster``:
    ``slurm``, or ``local`` (submitit's own subprocesses, no Slurm)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=ex.max_retries)
    params = {"name": name, "timeout_min": ex.time_min, "mem_gb": ex.mem_gb,
              "cpus_per_task": ex.cpus_per_task}
    if cluster == "slurm":
        params.update({f"slurm_{k}": v for k, v in (
            ("partition", ex.partition), ("account", ex.account),
            ("gpus_per_task", ex.gpus_per_task), ("array_parallelism", ex.workers)) if v})
    executor.update_parameters(**params)
    return executor


def run_array(tasks: list[CellTask], ex, folder: Path, desc: str, cluster: str = "slurm",
              fn=None) -> list[str]:
    """Run ``tasks`` as job arrays of ``fn`` (default ``ResumableTask``); a task that fails is
    resubmitted, up to ``ex.max_retries`` times. Returns the array job ids (one per
    submission); raises ``ExecutorError`` naming the tasks that still fail. Interrupted, it
    cancels its jobs."""
    executor = submitit_executor(ex, folder, f"saeuniv-{desc.split()[0]}", cluster)
    todo, job_ids, errors = list(tasks), [], {}
    with tqdm(total=len(tasks), desc=desc, unit="layer pair") as bar:
        for _ in range(1 + ex.max_retries):
            jobs = executor.map_array(fn or ResumableTask(), todo)
            job_ids.append(str(jobs[0].job_id).split("_")[0])
            errors = wait_jobs(jobs, todo, bar)
            todo = [t for t in todo if t.label() in errors]
            if not todo:
                return job_ids
    raise ExecutorError(f"{len(todo)} task(s) failed {1 + ex.max_retries} times (job arrays "
                        f"{', '.join(job_ids)}; logs in {folder}): "
                        + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:5]))


def wait_jobs(jobs: list, tasks: list[CellTask], bar) -> dict[str, str]:
    """Wait for every job; the label of each task that failed -> why."""
    pending, errors = dict(zip(jobs, tasks)), {}
    try:
        while pending:
            for job in [j for j in pending if j.done()]:
                task = pending.pop(job)
                err = job.exception()
                if err is None:
                    bar.update(1)
                else:
                    errors[task.label()] = reason(err)
            if pending:
                time.sleep(POLL_S)
    except BaseException:
        for job in pending:
            job.cancel(check=False)
        raise
    return errors


def reason(err: Exception) -> str:
    """The line of a failed job's error that says why: the exception raised in the task
    (``FailedJobError``), or the job's Slurm state (``UncompletedJobError``)."""
    text = str(err).split("\n----------------------\nYou can check")[0]
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("---")]
    return lines[-1][:300] if lines else type(err).__name__


def prebuild(stage: str, pipe) -> None:
    """Build the store entries of every layer pair of ``stage`` with the configured executor
    (nothing for ``local``); tags the active run with the executor, its workers and, on
    Slurm, the job arrays."""
    ex = pipe.cfg.execution
    tasks = cell_tasks(pipe, stage)
    if ex.executor == "local" or not tasks:
        return
    if ex.executor == "pool":
        n = workers(ex.workers)
        mlflow.set_tags({"saeuniv.executor": "pool", "saeuniv.workers": str(n)})
        run_pool(tasks, n, f"{stage} ({n} workers)")
    else:
        check_slurm()
        folder = pipe.store.root / ".slurm" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        mlflow.set_tags({"saeuniv.executor": "slurm", "saeuniv.slurm_logs": str(folder)})
        ids = run_array(tasks, ex, folder, f"{stage} (Slurm)")
        mlflow.set_tag("saeuniv.slurm_job_ids", ",".join(ids))
    # rebuilt once by the workers: the stage reads them back rather than rebuild again
    pipe.store.force -= set(stages.get(stage).kinds)
