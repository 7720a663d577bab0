"""Units of work: one stage's store entries for one layer pair, built in any process.

A task names a stage, a layer pair, the config (as plain data) and the store folder. It
reads and writes only through the content-keyed store and never touches MLflow, so any
executor (``saeuniv.executors``) can run it, and the entries it writes are the bytes a run
in one process writes. The stages with per-layer-pair work are those whose ``pairs`` is set
in ``saeuniv.stages.STAGES``; each has a ``cell(pipe, la, lb)`` function that builds that
layer pair's entries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import stages
from .config import digest, from_dict
from .tracking import pair_key


@dataclass(frozen=True)
class CellTask:
    """Build ``stage``'s entries of A layer ``la`` and B layer ``lb`` in ``store``; ``force``:
    the store kinds to rebuild (``--force``)."""

    stage: str
    la: int
    lb: int
    config: dict
    store: str
    force: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.stage} {pair_key(self.la, self.lb)}"


def cell_tasks(pipe, stage: str) -> list[CellTask]:
    """One task per layer pair of ``stage`` (none for a stage without per-pair work)."""
    attr = stages.get(stage).pairs
    if not attr:
        return []
    force = tuple(sorted(pipe.store.force & set(stages.get(stage).kinds)))
    config, root = pipe.cfg.to_dict(), str(pipe.store.root)
    return [CellTask(stage, la, lb, config, root, force) for la, lb in getattr(pipe, attr)]


_PIPES: dict = {}  # in a worker: the pipeline of the last (config, store), reused by its tasks


def pipeline(task: CellTask):
    """The pipeline a task runs on, built once per worker process and config."""
    from .pipeline import Pipeline
    from .store import Store

    key = (digest(task.config), task.store, task.force)
    if key not in _PIPES:
        for old in _PIPES.values():
            old.up.release()
        _PIPES.clear()
        store = Store(task.store)
        store.force |= set(task.force)
        _PIPES[key] = Pipeline(from_dict(task.config), store)
    return _PIPES[key]


def run_task(task: CellTask) -> float:
    """Build the task's entries (those already in the store are read, not rebuilt);
    returns its seconds."""
    t0 = time.perf_counter()
    stages.get(task.stage).module.cell(pipeline(task), task.la, task.lb)
    return time.perf_counter() - t0
