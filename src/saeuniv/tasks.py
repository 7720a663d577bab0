"""Units of work: store entries of one unit (a block of one model's layers, or a layer
pair), built in any process.

A task names the stages it builds, one unit, the config (as plain data) and the store
folder. It reads and writes only through the content-keyed store and never touches MLflow,
so any executor (``saeuniv.executors``) can run it, and the entries it writes are the bytes
a run in one process writes. The stages with units are those whose ``units`` is set in
``saeuniv.stages.STAGES``; each has a ``cell(pipe, *unit)`` function that builds one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import stages
from .config import digest, from_dict
from .tracking import pair_key

DRIVER_KINDS = {"windows"}  # resolved by the driver before any task (Pipeline.validate)


@dataclass(frozen=True)
class Task:
    """Build the entries of ``unit`` for each of ``stages`` (in order) in ``store``;
    ``force``: the store kinds to rebuild (``--force``)."""

    stages: tuple[str, ...]
    unit: tuple
    config: dict
    store: str
    force: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{'+'.join(self.stages)} {unit_label(self.unit)}"


def unit_label(unit: tuple) -> str:
    """``a9-b0`` for a layer pair, ``a[0, 1, 2]`` for a block of side A's layers."""
    if isinstance(unit[0], str):
        return f"{unit[0]}{list(unit[1:])}"
    return pair_key(*unit)


def units(pipe, stage: str) -> list[tuple]:
    """The units of ``stage`` (none for a stage that works as a whole)."""
    attr = stages.get(stage).units
    return [tuple(u) for u in getattr(pipe, attr)] if attr else []


def make_tasks(pipe, names: tuple[str, ...] | list[str]) -> list[Task]:
    """One task per unit of any of the stages ``names``, each building that unit for every
    stage that lists it (the stages share a kind of unit: blocks, or layer pairs)."""
    todo: dict[tuple, None] = {}
    for name in names:
        todo.update(dict.fromkeys(units(pipe, name)))
    kinds = {kind for name in names for kind in stages.get(name).kinds}
    force = tuple(sorted(pipe.store.force & (kinds - DRIVER_KINDS)))
    config, root = pipe.cfg.to_dict(), str(pipe.store.root)
    return [Task(tuple(names), unit, config, root, force) for unit in todo]


_PIPES: dict = {}  # in a worker: the pipeline of the last (config, store), reused by its tasks


def pipeline(task: Task):
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


def run_task(task: Task) -> float:
    """Build the task's entries (those already in the store are read, not rebuilt);
    returns its seconds."""
    t0 = time.perf_counter()
    pipe = pipeline(task)
    # a unit is built by each stage that lists it (the subspaces stage may skip a pair)
    names = [name for name in task.stages if task.unit in units(pipe, name)]
    if not names:
        raise ValueError(f"{unit_label(task.unit)} is not a unit of {'+'.join(task.stages)} "
                         "in this config")
    for name in names:
        stages.get(name).module.cell(pipe, *task.unit)
    return time.perf_counter() - t0
