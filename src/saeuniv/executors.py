"""Executors: where a stage's per-layer-pair tasks (``saeuniv.tasks``) run.

``execution.executor`` picks one: ``local`` runs nothing ahead (the stage builds each layer
pair in this process as it logs it); ``pool`` builds every layer pair of the stage first,
in ``execution.workers`` processes on this machine, then the stage logs them from the store.
Either way the entries are the same bytes, and only this process talks to MLflow.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

import mlflow
from tqdm.auto import tqdm

from . import stages
from .tasks import CellTask, cell_tasks, run_task


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
                            raise RuntimeError(f"{futures[f].label()} failed in a worker: "
                                               f"{f.exception()}") from f.exception()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [f.result() for f in futures]


def prebuild(stage: str, pipe) -> None:
    """Build the store entries of every layer pair of ``stage`` with the configured executor
    (nothing for ``local``); tags the active run with the executor and worker count."""
    ex = pipe.cfg.execution
    tasks = cell_tasks(pipe, stage)
    if ex.executor == "local" or not tasks:
        return
    n = workers(ex.workers)
    mlflow.set_tags({"saeuniv.executor": ex.executor, "saeuniv.workers": str(n)})
    run_pool(tasks, n, f"{stage} ({n} workers)")
    # rebuilt once by the workers: the stage reads them back rather than rebuild again
    pipe.store.force -= set(stages.get(stage).kinds)
