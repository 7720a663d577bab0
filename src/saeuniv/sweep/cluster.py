"""A sweep's workers as one Slurm job array: ``saeuniv sweep SPEC --executor slurm --workers
N --storage postgresql://...``.

Each array task is an ordinary sweep worker (``saeuniv sweep SPEC ...``) on the shared
Optuna storage, so the study's exact trial count and its recovery of dead workers' trials
hold as for workers started by hand. The storage must be a database server: SQLite on a
filesystem that nodes share loses writes (its locks are not reliable there), so it is
refused before anything is submitted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SERVERS = ("postgresql", "mysql")  # the storage kinds that workers on several nodes share


def check_storage(url: str | None) -> None:
    """Refuse a ``--storage`` that array tasks on several nodes cannot share (before it is
    opened)."""
    kind = ("the default SQLite file" if not url or url == "default" else
            url.split("://", 1)[0].split("+")[0] if "://" in url else "a journal file")
    if kind not in SERVERS:
        raise ValueError(
            f"--executor slurm needs an Optuna storage on a database server, got {kind} "
            f"({url or 'no --storage'}): SQLite, or any file on a filesystem the nodes "
            "share, loses trials when workers on several nodes write at once; pass "
            "--storage postgresql://user@host/db")


@dataclass(frozen=True)
class SweepWorker:
    """One array task: the sweep command ``argv`` in the environment ``env``."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    index: int

    def label(self) -> str:
        return f"sweep-worker {self.index}"


class RunWorker:
    """Runs a ``SweepWorker`` in a job; requeued at a time limit or preemption (the study
    queues the interrupted trial again)."""

    def __call__(self, worker: SweepWorker) -> int:
        from ..cli import main

        os.environ.update(dict(worker.env))
        code = main(list(worker.argv))
        if code != 0:
            raise RuntimeError(f"{worker.label()} exited {code}")
        return code

    def checkpoint(self, worker: SweepWorker):
        import submitit

        return submitit.helpers.DelayedSubmission(self, worker)


def worker_argv(args, storage_url: str) -> tuple[str, ...]:
    """The command of each worker: this sweep's, with the storage and store spelt out."""
    argv = ["sweep", str(Path(args.spec).resolve()), "--storage", storage_url]
    for item in args.set:
        argv += ["--set", item]
    for flag, value in (("--study", args.study), ("--n-trials", args.n_trials),
                        ("--store", args.store), ("--experiment", args.experiment)):
        if value is not None:
            argv += [flag, str(value)]
    return tuple(argv)


def run_workers(args, storage_url: str, execution, store_root: Path) -> list[str]:
    """Submit ``args.workers`` sweep workers as one job array (at most that many at once,
    each with the resources of the base config's ``execution`` section) and wait for
    them; returns the array ids. Raises ``ExecutorError`` when a worker still fails after
    ``execution.max_retries`` resubmissions."""
    import dataclasses
    import time

    from ..executors import check_slurm, run_arrays

    check_slurm()
    keep = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "SAEUNIV_HOME")
    env = tuple((k, os.environ[k]) for k in keep if k in os.environ)
    argv = worker_argv(args, storage_url)
    workers = [SweepWorker(argv, env, i) for i in range(args.workers)]
    ex = dataclasses.replace(execution, workers=args.workers)
    folder = store_root / ".slurm" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_arrays([workers], ex, folder, f"sweep ({args.workers} workers, Slurm)",
                      fn=RunWorker())[0]
