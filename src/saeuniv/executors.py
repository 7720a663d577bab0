"""Executors: where the units of work (``saeuniv.tasks``) run.

``execution.executor`` picks one: ``local`` runs nothing ahead (each stage builds its units
in this process as it logs them); ``pool`` builds a stage's units first, in
``execution.workers`` processes on this machine, one GPU per worker when there are several;
``slurm`` submits them as Slurm job arrays (through submitit) and waits for them. When the
whole pipeline runs in this process, the ``extract`` stage builds ahead the extraction
blocks and then every layer pair's match, similarity and subspaces entries: on Slurm, two
arrays, the second starting when the first has succeeded. The stages then log what the
workers built, from the store. The entries are the same bytes whichever executor built them,
and only this process talks to MLflow.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import mlflow
from tqdm.auto import tqdm

from . import slurm, stages
from .tasks import Task, make_tasks, run_task

POLL_S = 2.0  # how often the driver looks at a job array's tasks


class ExecutorError(RuntimeError):
    """Tasks could not be run, or failed more often than ``execution.max_retries``."""


def workers(n: int) -> int:
    """Worker processes for ``execution.workers`` = ``n`` (0: one per CPU of this process)."""
    return n or len(os.sched_getaffinity(0))


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every GPU
    torch sees (none on a machine without CUDA)."""
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if seen is not None:
        return [g for g in seen.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _take_gpu(queue) -> None:
    """Pool worker start-up: keep to one GPU of those handed out."""
    os.environ["CUDA_VISIBLE_DEVICES"] = queue.get()


def run_pool(tasks: list[Task], n_workers: int, desc: str, gpus: list[str] | None = None,
             fn=run_task) -> list[float]:
    """Run ``tasks`` in ``n_workers`` fresh processes; their seconds, in task order. With
    two or more ``gpus``, each worker sees one of them (in turn when workers outnumber
    them). The first task that fails stops the rest and is raised, naming the task."""
    ctx = multiprocessing.get_context("spawn")  # no copy of this process's models or locks
    init = {}
    if gpus and len(gpus) > 1:
        queue = ctx.SimpleQueue()
        for i in range(n_workers):
            queue.put(gpus[i % len(gpus)])
        init = {"initializer": _take_gpu, "initargs": (queue,)}
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, **init) as pool:
        futures = {pool.submit(fn, t): t for t in tasks}
        try:
            with tqdm(total=len(tasks), desc=desc, unit="task") as bar:
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

    def __call__(self, task: Task) -> float:
        return run_task(task)

    def checkpoint(self, task: Task):
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def check_slurm() -> None:
    """Refuse ``execution.executor: slurm`` where Slurm cannot be reached, before any work."""
    try:
        slurm.check()
    except slurm.SlurmError as err:
        raise ExecutorError(f"execution.executor is slurm but {err}; or use --executor pool") \
            from None


def submitit_executor(ex, folder: Path, name: str, cluster: str, after: str = ""):
    """A submitit executor for the resources of ``ex`` (``ExecutionConfig``); ``cluster``:
    ``slurm``, or ``local`` (submitit's own subprocesses, no Slurm). ``after``: a job id
    whose tasks must all succeed before these start."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=ex.max_retries)
    params = {"name": name, "timeout_min": ex.time_min, "mem_gb": ex.mem_gb,
              "cpus_per_task": ex.cpus_per_task}
    if cluster == "slurm":
        params.update({f"slurm_{k}": v for k, v in (
            ("partition", ex.partition), ("account", ex.account),
            ("gpus_per_task", ex.gpus_per_task), ("array_parallelism", ex.workers)) if v})
        # the requeue signal comes this long before the time limit (submitit: 90 s)
        params["slurm_signal_delay_s"] = min(90, ex.time_min * 15)
        extra = {"dependency": f"afterok:{after}"} if after else {}
        if os.environ.get("SLURM_JOB_ID"):  # submitted from a job: cancelled with it
            extra["comment"] = slurm.comment_for(os.environ["SLURM_JOB_ID"])
        if extra:
            params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def array_id(jobs: list) -> str:
    """The Slurm job id of a job array (its tasks are ``<id>_<task>``)."""
    return str(jobs[0].job_id).split("_")[0]


def run_arrays(groups: list[list[Task]], ex, folder: Path, desc: str,
               cluster: str = "slurm", fn=None) -> list[list[str]]:
    """Run each group of tasks as a job array of ``fn`` (default ``ResumableTask``), a group
    starting when the one before has succeeded: on Slurm all arrays are submitted at once,
    each with an ``afterok`` dependency on the one before. A task that fails is
    resubmitted (and the arrays after it again), up to ``ex.max_retries`` times. Returns
    the arrays of each group (one per submission), as Slurm writes their tasks
    (``<job id>_[0-<n - 1>]``); raises ``ExecutorError`` naming
    the tasks that still fail. Interrupted, it cancels its arrays."""
    fn = fn or ResumableTask()
    todo, ids, tries = [list(g) for g in groups], [[] for _ in groups], [0] * len(groups)
    submitted: dict[int, list] = {}
    with tqdm(total=sum(map(len, groups)), desc=desc, unit="task") as bar:
        try:
            i = 0
            while i < len(groups):
                if i not in submitted:
                    after = ""
                    for k in range(i, len(groups) if cluster == "slurm" else i + 1):
                        name = f"saeuniv-{todo[k][0].label().split()[0]}"
                        submitted[k] = submitit_executor(ex, folder, name, cluster, after) \
                            .map_array(fn, todo[k])
                        after = array_id(submitted[k])
                        ids[k].append(f"{after}_[0-{len(todo[k]) - 1}]")
                errors = wait_jobs(submitted[i], todo[i], bar, cluster)
                if not errors:
                    i += 1
                    continue
                cancel([submitted.pop(k) for k in sorted(submitted) if k > i], cluster)
                del submitted[i]
                tries[i] += 1
                if tries[i] > ex.max_retries:
                    raise ExecutorError(
                        f"{len(errors)} task(s) failed {tries[i]} times (job arrays "
                        f"{', '.join(x.split('_')[0] for x in ids[i])}; logs in {folder}): "
                        + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:5]))
                todo[i] = [t for t in todo[i] if t.label() in errors]
        except BaseException:
            cancel(list(submitted.values()), cluster)
            raise
    return ids


def cancel(arrays: list[list], cluster: str) -> None:
    """Cancel every task of the job arrays (one ``scancel`` for them all on Slurm)."""
    if cluster == "slurm":
        slurm.cancel([array_id(jobs) for jobs in arrays])
        return
    for jobs in arrays:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)


def wait_jobs(jobs: list, tasks: list[Task], bar, cluster: str = "slurm") -> dict[str, str]:
    """Wait for every job of one array; the label of each task that failed -> why. On
    Slurm a task that ended without a result (killed at its time limit, out of memory,
    cancelled) is read from ``scontrol``: submitit's own check needs accounting."""
    pending, errors = dict(zip(jobs, tasks)), {}
    while pending:
        ended = killed(pending, cluster)
        for job in [j for j in pending if j.done() or j in ended]:
            task = pending.pop(job)
            err = ended[job] if job in ended and not job.done() else job.exception()
            if err is None:
                bar.update(1)
            else:
                errors[task.label()] = err if isinstance(err, str) else reason(err)
        if pending:
            time.sleep(POLL_S)
    return errors


def killed(pending: dict, cluster: str) -> dict:
    """The jobs of ``pending`` that Slurm ended without a result -> why."""
    if cluster != "slurm" or not pending:
        return {}
    by_id = {s.job_id: s for s in slurm.states(array_id(list(pending)))}
    out = {}
    for job in pending:
        s = by_id.get(str(job.job_id))
        if s is None and by_id:
            continue  # not listed while its array is: a pending block not yet split
        if s is None or (s.ended and not job.done()):
            out[job] = s.why() if s else f"Slurm job {job.job_id} left the queue " \
                "without a result"
    return out


def reason(err: Exception) -> str:
    """The line of a failed job's error that says why: the exception raised in the task
    (``FailedJobError``), or the job's Slurm state (``UncompletedJobError``)."""
    text = str(err).split("\n----------------------\nYou can check")[0]
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("---")]
    return lines[-1][:300] if lines else type(err).__name__


def groups_at(stage: str, ahead: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The groups of stages whose units ``stage`` builds ahead, in order: the extraction
    blocks, then every later stage's layer pairs as one task per pair. ``ahead``: the
    stages this process will run (only ``stage`` itself when empty)."""
    if not stages.get(stage).units:
        return []
    later = [n for n in ahead[ahead.index(stage):] if stages.get(n).units] \
        if stage in ahead else [stage]
    blocks = tuple(n for n in later if stages.get(n).units == "extract_blocks")
    pairs = tuple(n for n in later if n not in blocks)
    return [g for g in (blocks, pairs) if g]


def prebuild(stage: str, pipe) -> None:
    """Build the store entries of every unit of ``stage`` with the configured executor
    (nothing for ``local``), and at ``extract`` those of the later stages too; tags the
    active run with the executor, its workers and, on Slurm, the job arrays."""
    ex = pipe.cfg.execution
    if ex.executor == "local" or not stages.get(stage).units:
        return
    if stage not in pipe.prebuilt:
        build(pipe, groups_at(stage, pipe.ahead))
    # built once by the workers: the stage reads them back rather than rebuild again
    pipe.store.force -= set(stages.get(stage).kinds)
    tags = {"saeuniv.executor": ex.executor}
    if ex.executor == "pool":
        tags["saeuniv.workers"] = str(workers(ex.workers))
    arrays = pipe.slurm_jobs.get(stage)
    if arrays:
        tags["saeuniv.slurm_job_ids"] = ",".join(a.split("_")[0] for a in arrays)
        tags["saeuniv.slurm_array_tasks"] = ",".join(arrays)
        tags["saeuniv.slurm_logs"] = str(pipe.store.root / ".slurm")
    mlflow.set_tags(tags)


def build(pipe, groups: list[tuple[str, ...]]) -> None:
    """Run the tasks of each group of stages (``groups_at``) with the configured executor."""
    ex = pipe.cfg.execution
    tasks = [make_tasks(pipe, g) for g in groups]
    if ex.executor == "pool":
        n, gpus = workers(ex.workers), visible_gpus()
        for names, group in zip(groups, tasks):
            run_pool(group, n, f"{'+'.join(names)} ({n} workers)", gpus)
    elif any(tasks):
        check_slurm()
        folder = pipe.store.root / ".slurm" / time.strftime("%Y%m%d-%H%M%S")
        desc = " then ".join("+".join(g) for g in groups)
        ids = run_arrays(tasks, ex, folder, f"{desc} (Slurm)")
        for names, group_ids in zip(groups, ids):
            pipe.slurm_jobs.update(dict.fromkeys(names, group_ids))
    for names in groups:
        pipe.prebuilt |= set(names)
        pipe.store.force -= {k for n in names for k in stages.get(n).kinds}
