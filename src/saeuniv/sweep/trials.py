"""This worker's trials: the objective Optuna calls, each trial's nested MLflow run,
and when to stop (the count reached, here or by other workers, or too many failures in
a row).

``WorkerState`` is what changes while a worker runs; the rest of a worker is fixed
once its study and parent run are open.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import mlflow
import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from ..cells import log_cells
from ..config import Config
from ..tracking import stage_run
from . import objectives
from .attrs import RETRY_ATTR, RUN_ATTR, SKIPPED_ATTR, WORKER_ATTR
from .spec import SweepSpec
from .study import SweepStudy

# the package's logger, "saeuniv.sweep", for every module: the name log lines carry
log = logging.getLogger(__package__)


@dataclass
class WorkerState:
    """What changes while this worker runs its trials."""

    failures: int = 0  # trials in a row that failed (max_failures stops the worker)
    last_error: str = ""  # the last failed trial's error, quoted in the stop reason
    stop_reason: str = ""  # why this worker stopped short; "" when it did not
    handed_off: bool = False  # stopped because other workers run the last trials
    # got as far as its trials: a failure then closes the parent, which a worker that
    # stopped earlier leaves as it found it
    optimizing: bool = False
    current: int | None = None  # storage id of the trial this worker is running


@dataclass(frozen=True)
class TrialRunner:
    """Runs trials of ``study`` on ``pipe`` (the base pipeline) until the study holds
    its ``n_trials`` COMPLETE trials or this worker must stop."""

    spec: SweepSpec
    cfg: Config
    pipe: Any  # the base Pipeline: a trial reuses its resolved artefacts
    study: SweepStudy
    state: WorkerState = field(default_factory=WorkerState)

    def optimize(self) -> None:
        """Run trials until ``n_trials`` are COMPLETE over all workers; nothing when
        they already are, or when the trials still missing run on other workers."""
        self.state.optimizing = True
        counts, n, name = self.study.counts(), self.study.n_trials, self.study.name
        done = counts.get("COMPLETE", 0)
        if done >= n:
            log.info("study %r already has %d COMPLETE trials (n_trials=%d); nothing "
                     "to run", name, done, n)
            return
        if done + counts.get("RUNNING", 0) >= n:
            log.info("study %r: the remaining trials are running on other workers",
                     name)
            self.state.handed_off = True
            return
        log.info("study %r: %d of %d trials complete; running the rest", name, done, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.study.optimize(
                self.objective, n_trials=None, catch=(Exception,),
                callbacks=[MaxTrialsCallback(n, states=(TrialState.COMPLETE,)),
                           self.after_trial])

    def objective(self, trial):
        """Optuna's objective: the trial's values, or PRUNED when other workers already
        run the last trials this study needs (so the count is never overshot)."""
        trial.set_user_attr(WORKER_ATTR, self.study.worker)
        if self.study.enough(trial):
            trial.set_user_attr(SKIPPED_ATTR, "n_trials reached by other workers")
            self.state.handed_off = True
            self.study.study.stop()
            raise optuna.TrialPruned(f"not needed: {self.study.n_trials} trials are "
                                     "complete or running")
        self.state.current = trial._trial_id
        try:
            values = self.run_trial(trial)
        except Exception as err:
            self.state.current = None
            self.state.last_error = f"{type(err).__name__}: {err}"
            raise
        self.state.current = None
        return values if len(values) > 1 else values[0]

    def run_trial(self, trial) -> list[float]:
        """The trial's nested MLflow run: its parameters, values and per-layer-pair tables
        (``saeuniv.cells``)."""
        from ..stages.match import numbers
        from ..stages.similarity import log_scores

        params = {p.path: p.suggest(trial) for p in self.spec.params}
        with stage_run("trial", run_name=f"trial-{trial.number}",
                       tags=self._tags(trial)) as run:
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            mlflow.log_params({**params, "trial_number": trial.number})
            t0 = time.perf_counter()
            pipe = self.pipe.with_analysis(self.cfg.replace(**params))
            mlflow.set_tag("saeuniv.config_hash", pipe.cfg.hash())
            # looked up on the module at each trial, so a test can wrap it
            scored = objectives.score_trial(pipe)
            per_cell = pipe.cfg.tracking.per_cell_metrics
            log_scores({pair: r["scores"] for pair, r in scored.items()}, per_cell)
            log_cells({pair: numbers(r["match"]) for pair, r in scored.items()}, "match",
                      per_cell)
            values = [objectives.objective_value(o, pipe, scored)
                      for o in self.spec.objectives]
            named = {o.name: v for o, v in zip(self.spec.objectives, values)}
            mlflow.log_metrics({**named, "trial_seconds": time.perf_counter() - t0})
        return values

    def _tags(self, trial) -> dict[str, str]:
        """The trial run's tags: the trial, study and worker, and the sampler's seed."""
        tags = {"saeuniv.trial_number": str(trial.number),
                "saeuniv.study": self.study.name, "saeuniv.worker": self.study.worker,
                "saeuniv.sampler_seed": str(self.study.sampler_seed)}
        if RETRY_ATTR in trial.user_attrs:
            tags["saeuniv.retry_of"] = str(trial.user_attrs[RETRY_ATTR])
        return tags

    def after_trial(self, study, trial) -> None:
        """Optuna callback: count failures in a row; ``max_failures`` of them stop this
        worker (a COMPLETE trial resets the count)."""
        if trial.state == TrialState.FAIL:
            self.state.failures += 1
            if self.state.failures >= self.spec.max_failures:
                self.state.stop_reason = (
                    f"{self.state.failures} trials in a row failed (max_failures); "
                    f"the last: {self.state.last_error}")
                log.error("stopping this worker: %s", self.state.stop_reason)
                study.stop()
        elif trial.state == TrialState.COMPLETE:
            self.state.failures = 0

    def requeue_interrupted(self) -> None:
        """The trial this worker was running when it was interrupted: FAIL, queued
        again."""
        if self.state.current is not None:
            with contextlib.suppress(Exception):
                self.study.fail_and_retry(self.state.current,
                                          f"worker {self.study.worker} was interrupted",
                                          failed_ok=True)
            self.state.current = None
