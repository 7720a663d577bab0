"""One worker of a sweep, start to end: ``run_sweep``.

A worker opens the study and the parent run, fails what dead workers left RUNNING,
makes sure the base stages ran, then runs trials until the study holds ``n_trials``
COMPLETE ones (or it must stop); the last worker out writes the summary and closes the
parent. Whatever stops a worker, its interrupted trial is queued again and the parent
is closed or handed on, never left half-done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import mlflow

from ..config import Config
from ..procs import worker_id
from ..store import Store
from .objectives import check_objectives
from .parent import ParentRun
from .spec import SweepSpec, check_n_trials
from .storage import StorageInfo, open_storage
from .study import SweepStudy
from .summary import Summary
from .trials import TrialRunner

# the package's logger, "saeuniv.sweep", for every module: the name log lines carry
log = logging.getLogger(__package__)


@dataclass
class SweepResult:
    """What one worker's ``run_sweep`` leaves: the study's count and, from the worker
    that wrote the summary, the best trials."""

    study: str
    storage: str
    parent_run_id: str
    n_trials: int
    n_complete: int
    finished: bool  # the study holds n_trials COMPLETE trials
    handed_off: bool = False  # this worker stopped because others run the last trials
    stop_reason: str = ""
    # the best trial (one objective) or the Pareto front
    best: list = field(default_factory=list)


def run_sweep(spec: SweepSpec, cfg: Config, store=None,
              storage: str | StorageInfo | None = None, study_name: str | None = None,
              n_trials: int | None = None) -> SweepResult:
    """Run (or resume, or join) the sweep ``spec`` on the base config ``cfg``.

    ``storage``: an Optuna storage URL or ``.log`` journal path (default:
    ``optuna.db`` beside the MLflow SQLite database), or what ``open_storage``
    returned. ``study_name`` defaults to the spec's study; ``n_trials`` (the COMPLETE
    trials wanted over all workers) to the spec's. MLflow must already point at the
    tracking store and experiment (``tracking.setup_tracking``).
    """
    from ..pipeline import Pipeline  # torch and the models: not at start-up

    store = store or Store()
    n_trials = check_n_trials(spec, n_trials)
    info = storage if isinstance(storage, StorageInfo) else \
        open_storage(storage, mlflow.get_tracking_uri())
    pipe = Pipeline(cfg, store)
    worker = worker_id()
    pipe.validate()
    check_objectives(pipe, spec.objectives)
    study = SweepStudy.open(spec, cfg, info, study_name or spec.study, n_trials, worker)
    parent = ParentRun.open(spec, cfg, study)
    runner = TrialRunner(spec, cfg, pipe, study)

    def close(error: BaseException | None) -> list | None:
        return parent.close(study, Summary(spec, cfg, pipe, study).write, error,
                            stop_reason=runner.state.stop_reason,
                            reached_trials=runner.state.optimizing)

    try:
        study.recover_stale()
        parent.fail_orphan_runs(study)
        parent.run_base_stages(pipe, worker)
        study.check_artefacts(pipe)
        runner.optimize()
    except BaseException as err:
        runner.requeue_interrupted()
        try:
            close(err)
        except Exception:  # keep the original error: it is what stopped the worker
            log.exception("could not close the sweep's parent run")
        raise
    best = close(None)
    complete = study.n_complete()
    return SweepResult(
        study=study.name, storage=info.url, parent_run_id=parent.run_id,
        n_trials=n_trials, n_complete=complete, finished=complete >= n_trials,
        handed_off=runner.state.handed_off, stop_reason=runner.state.stop_reason,
        best=best or [])
