"""The sweep's parent MLflow run: every worker and every rerun logs its trials into it.

The worker that creates the study starts the parent (its parameters, ``sweep.yaml`` and
``config.yaml``) and records its id in the study; the others reopen it. The base stages
run once, as nested runs of the parent. Child runs left RUNNING by a worker that is
gone are ended FAILED. The last worker out writes the summary and ends the parent,
FINISHED when the study holds its trials; any other worker leaves it RUNNING for those
still at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
from optuna.trial import TrialState

from .. import stages
from ..config import Config
from ..procs import worker_gone
from ..tracking import lineage_tags, record_failure
from .attrs import PARENT_ATTR
from .spec import SweepSpec
from .storage import StorageError
from .study import SweepStudy

# the package's logger, "saeuniv.sweep", for every module: the name log lines carry
log = logging.getLogger(__package__)

PARENT_WAIT = 120  # seconds a worker waits for the study's creator to make the parent
BASE_WORKER_TAG = "saeuniv.sweep.base_worker"  # the worker that runs the base stages
BASE_DONE_TAG = "saeuniv.sweep.base"  # "done" once they ran


@dataclass(frozen=True)
class ParentRun:
    """The parent run as this worker holds it (it is the active MLflow run)."""

    run_id: str
    experiment_id: str
    created: bool  # this worker started it
    found_status: str  # its status when this worker reopened it; RUNNING if created

    @classmethod
    def open(cls, spec: SweepSpec, cfg: Config, study: SweepStudy) -> ParentRun:
        """Start the parent (when this worker created the study, or its creator died
        before making one) or reopen the study's; either way it is the active run."""
        parent_id = (None if study.created else
                     study.wait_for_attr(PARENT_ATTR, PARENT_WAIT))
        if parent_id is None:
            run, status = _create(spec, cfg, study), "RUNNING"
        else:
            run, status = _reopen(parent_id, study)
        mlflow.set_tag("saeuniv.n_trials", study.n_trials)
        return cls(run.info.run_id, run.info.experiment_id, parent_id is None, status)

    def tags(self) -> dict[str, str]:
        return mlflow.MlflowClient().get_run(self.run_id).data.tags

    def run_base_stages(self, pipe, worker: str) -> None:
        """The expensive stages once, as nested stage runs of the parent; a rerun or
        another worker only resolves them from the store (and computes what its store
        lacks)."""
        from ..stages.runner import run_stage  # the stages import torch: not at start-up

        tags = self.tags()
        owner = tags.get(BASE_WORKER_TAG)
        if tags.get(BASE_DONE_TAG) != "done" and (owner is None or worker_gone(owner)):
            mlflow.set_tag(BASE_WORKER_TAG, worker)
            for stage in stages.BASE:
                run_stage(stage, pipe)
            mlflow.set_tag(BASE_DONE_TAG, "done")

    def fail_orphan_runs(self, study: SweepStudy) -> None:
        """End as FAILED the parent's child runs left RUNNING by a worker that is gone:
        a trial run whose Optuna trial is no longer RUNNING, or a base stage run of a
        dead base worker."""
        client = mlflow.MlflowClient()
        runs = client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}' and "
            "attributes.status = 'RUNNING'")
        states = {t.number: t.state for t in study.study.get_trials(deepcopy=False)}
        base_worker = self.tags().get(BASE_WORKER_TAG)
        for run in runs:
            stage = run.data.tags.get("saeuniv.stage")
            why = _orphan_reason(run.data.tags, states, base_worker)
            if why is None:
                continue
            client.set_tag(run.info.run_id, "saeuniv.error", why)
            client.set_terminated(run.info.run_id, "FAILED")
            log.warning("MLflow run %s (%s) was left RUNNING: marked FAILED",
                        run.info.run_id, stage)

    def close(self, study: SweepStudy, write_summary: Callable[[], list],
              error: BaseException | None = None, stop_reason: str = "",
              reached_trials: bool = True) -> list | None:
        """End this worker's hold on the parent run. The worker that sees no trial
        running any more writes the summary and ends the parent; otherwise the parent
        stays RUNNING for the workers still at it. Returns what ``write_summary``
        returned (the best trials), or None when this worker did not write it.

        ``error``: what stopped this worker, if anything; ``stop_reason``: why it
        stopped short without one; ``reached_trials``: whether it got as far as its
        trials (``WorkerState.optimizing``)."""
        if error is not None and not (self.created or reached_trials):
            # this worker stopped before its first trial (e.g. its artefacts differ
            # from the study's): the parent is left as this worker found it
            mlflow.end_run(self.found_status)
            return None
        if not self._last_out(study):
            return None
        with contextlib.suppress(Exception):
            self.fail_orphan_runs(study)
        best = write_summary()
        self._end(study, error, stop_reason)
        return best

    def _last_out(self, study: SweepStudy) -> bool:
        """Whether no trial is running any more (stale ones failed first), so this
        worker closes the parent; else it lets go of the parent, left RUNNING."""
        def running() -> bool:
            with contextlib.suppress(Exception):
                study.recover_stale()
            return study.any_running()

        if not running():
            return True
        mlflow.end_run("RUNNING")
        # Look again after letting go: had the last trial ended between the first look
        # and now, its worker may have closed the parent before this worker marked it
        # RUNNING, and no one else would close it.
        if running():
            return False
        mlflow.start_run(run_id=self.run_id)
        return True

    def _end(self, study: SweepStudy, error: BaseException | None,
             stop_reason: str) -> None:
        """End the parent: FAILED or KILLED by ``error``, FAILED short of ``n_trials``
        (tagged with why), else FINISHED (an earlier attempt's error tag removed)."""
        complete = study.n_complete()
        if error is not None:
            record_failure(error)
            mlflow.end_run("FAILED" if isinstance(error, Exception) else "KILLED")
        elif complete < study.n_trials:
            mlflow.set_tag("saeuniv.error", stop_reason or
                           f"only {complete} of {study.n_trials} trials completed")
            mlflow.end_run("FAILED")
        else:
            # an error tag left by an earlier, interrupted attempt no longer holds
            if "saeuniv.error" in self.tags():
                mlflow.MlflowClient().delete_tag(self.run_id, "saeuniv.error")
            mlflow.end_run("FINISHED")


def _orphan_reason(tags: dict, states: dict, base_worker: str | None) -> str | None:
    """Why a RUNNING child run of the parent is dead (its ``tags``; ``states``: trial
    number -> Optuna state), or None when it may still be alive."""
    stage = tags.get("saeuniv.stage")
    if stage == "trial":
        number = int(tags.get("saeuniv.trial_number", -1))
        if states.get(number) == TrialState.RUNNING:
            return None  # a live worker's trial
        state = states[number].name if number in states else "gone"
        return (f"the worker stopped during trial {number}; the trial is {state} in "
                "Optuna and its parameters were queued again")
    if stage in stages.NAMES and base_worker and worker_gone(base_worker):
        return f"the worker {base_worker} stopped during the {stage} stage"
    return None


def _create(spec: SweepSpec, cfg: Config, study: SweepStudy):
    """Start the parent run and record it in the study: tags, the sweep's parameters,
    the spec and the base config."""
    run = mlflow.start_run(run_name=f"sweep:{study.name}")
    study.study.set_user_attr(PARENT_ATTR, run.info.run_id)
    mlflow.set_tags({"saeuniv.stage": "sweep", "saeuniv.study": study.name,
                     "saeuniv.spec": spec.name, "saeuniv.storage": study.storage.url,
                     **lineage_tags(cfg.hash())})
    # prefixed: under `mlflow run` this is the project run, which already holds the
    # entry point's own spec, storage and n_trials parameters
    mlflow.log_params({f"sweep.{k}": v for k, v in {
        "spec": spec.name, "study": study.name, "storage": study.storage.kind,
        "n_trials": study.n_trials, "sampler": spec.sampler.name,
        "seed": spec.sampler.seed,
        "sampler_options": json.dumps(dict(spec.sampler.options)),
        "objectives": ", ".join(f"{o.name} ({o.direction})" for o in spec.objectives),
        "params": ", ".join(p.path for p in spec.params)}.items()})
    mlflow.log_params({"config_name": cfg.name, "config_hash": cfg.hash()})
    mlflow.log_dict(spec.to_dict(), "sweep.yaml")
    mlflow.log_dict(cfg.to_dict(), "config.yaml")
    mlflow.set_tag("mlflow.note.content",
                   f"Sweep {study.name!r} ({spec.name}): in progress")
    return run


def _reopen(parent_id: str, study: SweepStudy):
    """Reopen the study's parent run in its experiment; returns it and the status it
    had."""
    client = mlflow.MlflowClient()
    try:
        parent = client.get_run(parent_id)
    except Exception as err:  # noqa: BLE001 - any lookup failure means the same
        raise StorageError(
            f"study {study.name!r} logs into MLflow run {parent_id}, which this "
            f"tracking store ({mlflow.get_tracking_uri()}) does not have ({err}); "
            "point MLFLOW_TRACKING_URI at the sweep's tracking server, or start a new "
            "study with --study NAME") from None
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    if project_run and project_run != parent_id:  # launched by `mlflow run`
        client.set_tag(project_run, "saeuniv.stage", "sweep-worker")
        client.set_tag(project_run, "saeuniv.sweep.parent", parent_id)
    mlflow.set_experiment(experiment_id=parent.info.experiment_id)
    run = mlflow.start_run(run_id=parent_id)
    started = parent.data.params.get("sweep.n_trials", str(study.n_trials))
    if started != str(study.n_trials):
        log.warning("study %r: n_trials is now %d (it was started with %s)",
                    study.name, study.n_trials, started)
    return run, parent.info.status
