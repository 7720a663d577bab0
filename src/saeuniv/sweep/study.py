"""The Optuna study a worker shares with every other worker and rerun of a sweep.

``SweepStudy.open`` creates the study or joins it (refusing one started from another
spec or base config) and seeds this worker's sampler. The study is the sweep's one
source of truth on trials: how many are COMPLETE (``n_trials`` counts those, over all
workers), whether this worker's next trial is still needed, and which RUNNING trials
belong to a worker that is gone (``recover_stale``: failed, their parameters queued
again).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import TrialState

from ..config import Config, digest
from ..procs import worker_gone
from .attrs import (
    ARTEFACTS_ATTR,
    FAILURE_ATTR,
    FINGERPRINT_ATTR,
    SPEC_ATTR,
    WORKER_ATTR,
)
from .spec import SpecError, SweepSpec
from .storage import StorageError, StorageInfo, requeue_trial

# the package's logger, "saeuniv.sweep", for every module: the name log lines carry
log = logging.getLogger(__package__)

ORPHAN_AGE = 300  # a RUNNING trial that no worker ever claimed is dead after this long
FINGERPRINT_WAIT = 10  # seconds a joining worker waits for the creator's fingerprint


@dataclass(frozen=True)
class SweepStudy:
    """One worker's handle on the study: the Optuna study and this worker's place in
    it."""

    study: optuna.Study
    name: str
    storage: StorageInfo
    worker: str  # procs.worker_id of this process
    n_trials: int  # the COMPLETE trials wanted, over all workers
    created: bool  # this worker created the study
    sampler_seed: int

    @classmethod
    def open(cls, spec: SweepSpec, cfg: Config, storage: StorageInfo, name: str,
             n_trials: int, worker: str) -> SweepStudy:
        """Create the study ``name`` or join it, checking it was started from this spec
        and base config; its sampler is then seeded for this worker."""
        try:
            study = optuna.create_study(storage=storage.storage, study_name=name,
                                        directions=spec.directions,
                                        load_if_exists=False)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage.storage)
            created = False
        fingerprint = spec.fingerprint(cfg)
        if created:
            _record_spec(study, spec, fingerprint)
        else:
            _check_spec(study, spec, fingerprint, name, storage.url)
        # The creator samples with the spec's seed (a fresh one-worker sweep
        # reproduces); a rerun or another worker gets its own stream, so it does not
        # replay the parameters already tried.
        n_before = len(study.get_trials(deepcopy=False))
        seed = (spec.sampler.seed if created else
                int(digest([spec.sampler.seed, n_before, worker])[:8], 16))
        study.sampler = spec.sampler.make(seed)
        return cls(study, name, storage, worker, n_trials, created, seed)

    def wait_for_attr(self, key: str, timeout: float):
        """The study's user attribute ``key``, waiting up to ``timeout`` seconds for the
        worker that created the study to set it; None if it never does."""
        return wait_for_attr(self.study, key, timeout)

    def counts(self) -> dict[str, int]:
        """Trials by state name (``COMPLETE``, ``FAIL``, ...), over all workers."""
        out: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    def n_complete(self) -> int:
        return self.counts().get("COMPLETE", 0)

    def any_running(self) -> bool:
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return bool(running)

    def enough(self, trial) -> bool:
        """True when finished trials plus the trials started before this one already
        make ``n_trials`` (so concurrent workers never overshoot the count)."""
        ahead = 0
        for t in self.study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)):
            if t.number != trial.number and (t.state == TrialState.COMPLETE
                                             or t.number < trial.number):
                ahead += 1
        return ahead >= self.n_trials

    def check_artefacts(self, pipe) -> None:
        """The SAE codes this worker scores on are those the study started with (the
        first worker records their digest): trials on other codes would not be
        comparable."""
        fingerprint = digest({f"{side}{layer}": {n: f["sha256"] for n, f in
                                                 e.manifest["files"].items()}
                              for side, codes in ((s.name, s.codes) for s in pipe.sides)
                              for layer, e in codes.items()})
        theirs = self.study.user_attrs.get(ARTEFACTS_ATTR)
        if theirs is None:
            self.study.set_user_attr(ARTEFACTS_ATTR, fingerprint)
        elif theirs != fingerprint:
            raise StorageError(
                f"this worker's SAE codes differ from those study {self.name!r} was "
                "started with (another artefact store, or models and SAEs trained "
                "again), so its trials would not be comparable; share the store "
                "between workers (--store or SAEUNIV_HOME on a shared folder), or "
                "start a new study with --study NAME")

    # -- recovery -------------------------------------------------------------------
    def recover_stale(self) -> list[int]:
        """Fail the RUNNING trials of workers that are gone and queue their
        parameters."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # heartbeat (database)
        failed = []
        now = datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get(WORKER_ATTR)
            if owner == self.worker:
                continue
            if owner is not None:
                stale = worker_gone(owner)
                reason = f"worker {owner} stopped during the trial"
            else:  # asked but never claimed: its worker died within milliseconds
                stale = t.datetime_start is not None and \
                    (now - t.datetime_start).total_seconds() > ORPHAN_AGE
                reason = "no worker claimed the trial"
            if stale and self.fail_and_retry(t._trial_id, reason):
                failed.append(t.number)
        if failed:
            log.warning("trial(s) %s were left RUNNING by a worker that is gone: "
                        "marked FAIL and their parameters queued again", failed)
        return failed

    def fail_and_retry(self, trial_id: int, reason: str,
                       failed_ok: bool = False) -> bool:
        """Mark a RUNNING trial FAIL (with ``reason``) and queue its parameters again;
        with ``failed_ok``, a trial already FAIL (an interrupted one) is queued again
        too. False when another worker finished or failed the trial first."""
        # by storage id, through the storage: the trial may be another worker's
        storage = self.study._storage
        state = storage.get_trial(trial_id).state
        try:
            if state == TrialState.RUNNING:
                storage.set_trial_user_attr(trial_id, FAILURE_ATTR, reason)
                if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    return False
            elif not (failed_ok and state == TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # another worker got there first
        requeue_trial(self.study, storage.get_trial(trial_id))
        return True


def wait_for_attr(study: optuna.Study, key: str, timeout: float):
    """``study.user_attrs[key]``, polled until set or ``timeout`` seconds pass (then
    None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = study.user_attrs.get(key)
        if value is not None or time.monotonic() >= deadline:
            return value
        time.sleep(0.5)


def _record_spec(study: optuna.Study, spec: SweepSpec, fingerprint: str) -> None:
    """What a joining worker checks itself against, and the objectives' names."""
    study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    study.set_user_attr(SPEC_ATTR, spec.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in spec.objectives])


def _check_spec(study: optuna.Study, spec: SweepSpec, fingerprint: str, name: str,
                url: str) -> None:
    """A joined study must come from the same spec and base config (else its trials
    are not comparable with this worker's)."""
    theirs = wait_for_attr(study, FINGERPRINT_ATTR, FINGERPRINT_WAIT)
    directions = [d.name.lower() for d in study.directions]
    if theirs not in (None, fingerprint) or directions != spec.directions:
        raise SpecError(
            f"study {name!r} in {url} was started from a different spec or base config "
            "(search space, objectives or config differ); rerun with the same spec and "
            "--set values, or start a new study with --study NAME")
    if theirs is None:  # its creator stopped before recording it
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
