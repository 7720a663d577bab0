"""The executors: units of work built in worker processes or job arrays, the same bytes as
in one process."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from saeuniv import cli, stages
from saeuniv.cells import cell_metrics
from saeuniv.config import ConfigError
from saeuniv.executors import ExecutorError, groups_at, run_arrays, run_pool
from saeuniv.tasks import Task, make_tasks, run_task

from helpers import TASK_KINDS, files, finished, first_try, runs


def test_a_pool_of_workers_writes_the_entries_a_single_process_writes(tiny_run, own_store,
                                                                      own_tracking):
    for kind in TASK_KINDS:  # left to the workers to rebuild
        shutil.rmtree(own_store / kind)
    assert cli.main(tiny_run["args"] + ["--executor", "pool", "--workers", "2"]) == 0
    for kind in TASK_KINDS:
        want, got = files(tiny_run["store"], kind), files(own_store, kind)
        assert want and got.keys() == want.keys(), kind
        for name in want:
            assert got[name] == want[name], name
    frame = runs(own_tracking)
    for stage in ("extract", "match", "similarity", "subspaces"):
        run = finished(frame, stage).iloc[0]
        assert run["tags.saeuniv.executor"] == "pool" and run["tags.saeuniv.workers"] == "2"
    main = finished(frame, "main").iloc[0].run_id
    got = cell_metrics(main)
    reference = finished(runs(tiny_run["uri"]), "main").iloc[0].run_id
    assert got and got == cell_metrics(reference)


def test_a_failing_task_stops_the_pool_and_names_its_layer_pair(tiny_run):
    config = tiny_run["cfg"].to_dict()
    tasks = [Task(("match",), (9, 0), config, str(tiny_run["store"]))]
    with pytest.raises(ExecutorError, match="match a9-b0 failed in a worker"):
        run_pool(tasks, 1, "match")


def test_an_unknown_executor_is_refused_before_work(tiny_run, capsys):
    assert cli.main(tiny_run["args"] + ["--executor", "cluster"]) != 0
    err = capsys.readouterr().err
    assert ("execution.executor 'cluster' is unknown; choose one of ('local', 'pool', "
            "'slurm')") in err
    with pytest.raises(ConfigError, match="execution.workers must be >= 0"):
        tiny_run["cfg"].replace(**{"execution.workers": -1})


class FailFirst:
    """A job that fails on its first try for each task, then builds the task."""

    def __init__(self, marks: Path):
        self.marks = marks

    def __call__(self, task):
        if first_try(self.marks, task):
            raise MemoryError("simulated: out of memory on the first try")
        return run_task(task)


def test_job_arrays_resubmit_a_failed_task_and_give_up_after_max_retries(tiny_run, own_store,
                                                                         tmp_path):
    """submitit's local cluster (subprocesses, no Slurm): the retry and resume logic."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs unpickle this class
    cloudpickle.register_pickle_by_value(sys.modules["helpers"])  # first_try
    shutil.rmtree(own_store / "matches")
    cfg = tiny_run["cfg"]
    tasks = [Task(("match",), (la, 0), cfg.to_dict(), str(own_store)) for la in (0, 1)]
    ex = cfg.execution
    marks = tmp_path / "marks"
    marks.mkdir()
    ids = run_arrays([tasks], ex, tmp_path / "jobs", "match", cluster="local",
                     fn=FailFirst(marks))
    assert len(ids[0]) == 2  # the first array, then the resubmission of both failed tasks
    assert sorted(p.name for p in marks.iterdir()) == ["match-a0-b0", "match-a1-b0"]
    built = files(own_store, "matches")
    assert len([n for n in built if n.endswith("pairs.npz")]) == 2
    want = files(tiny_run["store"], "matches")
    assert all(built[n] == want[n] for n in built)
    # no retry left: the error names the task and why
    shutil.rmtree(marks)
    marks.mkdir()
    with pytest.raises(ExecutorError, match=r"1 task\(s\) failed 1 times .*match a0-b0: "
                       "MemoryError: simulated: out of memory on the first try"):
        run_arrays([tasks[:1]], dataclasses.replace(ex, max_retries=0), tmp_path / "jobs2",
                   "match", cluster="local", fn=FailFirst(marks))


def gpu_seen(_task) -> str:
    time.sleep(1.0)  # long enough that every worker takes a task
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_each_pool_worker_sees_one_gpu_of_several():
    seen = run_pool(list(range(4)), 2, "gpus", gpus=["0", "1"], fn=gpu_seen)
    assert sorted(set(seen)) == ["0", "1"]


def test_extraction_runs_in_blocks_then_every_later_stage_per_layer_pair(tiny_pipe):
    assert groups_at("extract", stages.NAMES) == [("extract",),
                                                  ("match", "similarity", "subspaces")]
    assert groups_at("match", ()) == [("match",)]
    assert groups_at("convergence", stages.NAMES) == []
    cfg = tiny_pipe.cfg.replace(**{"extract.layers_per_pass": 2})
    pipe = type(tiny_pipe)(cfg, tiny_pipe.store)
    blocks = [t.unit for t in make_tasks(pipe, ("extract",))]
    layers = {s.name: s.used_layers for s in pipe.sides}
    assert blocks == [(name, *ls[i:i + 2]) for name, ls in layers.items()
                      for i in range(0, len(ls), 2)]
    cells = make_tasks(pipe, ("match", "similarity", "subspaces"))
    assert [t.unit for t in cells] == pipe.pairs  # subspace pairs are among them
    assert cells[0].label() == f"match+similarity+subspaces a{pipe.pairs[0][0]}-b" \
        f"{pipe.pairs[0][1]}"
