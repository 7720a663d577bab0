"""Optuna sweeps over the analysis settings: resumable, distributed, tracked in MLflow.

A sweep spec (``sweeps/*.yaml``) names a base config, a search space of config
paths in the sections a trial varies (``match.*``, ``similarity.*``), one or more
objectives read from the stored similarity scores, a seeded sampler and a trial
count. ``load_spec`` checks all of it before any work (the pure part);
``run_sweep`` runs it (the shell):

* the base pipeline's expensive stages (models, SAEs, extraction at the largest
  token budget) run once, as nested stage runs of the sweep's parent MLflow run.
  A trial then only matches and scores, through the store: a setting seen before
  costs nothing, and a corpus-size trial (``match.n_tokens``) matches on a prefix
  of the one extraction;
* the study lives in persistent Optuna storage: ``optuna.db`` (SQLite) beside the
  MLflow SQLite database by default, a ``.log`` journal file, or any database URL
  such as ``postgresql://user@host/db``, where workers on several machines share
  one study;
* each trial is a nested MLflow run of the sweep's parent run, whose id is kept in
  the study, so every worker and every rerun of the command logs into that parent;
* a rerun resumes: trials left RUNNING by a worker that is gone (on this machine,
  its process has ended; on a database storage, its heartbeat is older than the
  grace period) are failed and their parameters queued again, and ``n_trials``
  counts COMPLETE trials over all workers, exactly.

The modules, pure first:

* ``spec``: the spec and its checks (no MLflow, no Optuna storage, no pipeline);
* ``objectives``: a trial's values, read from the stored scores;
* ``attrs``: the keys a sweep writes into its Optuna study;
* ``storage``: the Optuna storage, and requeueing the trials of dead workers;
* ``study``: the study as one worker sees it (open or join, counts, recovery);
* ``parent``: the parent MLflow run (open, base stages, orphaned runs, closing);
* ``trials``: the objective, each trial's nested run, when to stop;
* ``summary``: best.json, trials.csv, plots and summary.md on the parent;
* ``worker``: ``run_sweep``, one worker start to end;
"""

from __future__ import annotations

from .attrs import (
    ARTEFACTS_ATTR,
    FAILURE_ATTR,
    FINGERPRINT_ATTR,
    PARENT_ATTR,
    RETRIES_ATTR,
    RETRY_ATTR,
    RUN_ATTR,
    WORKER_ATTR,
)
from .objectives import TrialError, objective_value, score_trial, selected_pairs
from .spec import (
    SWEEP_SECTIONS,
    Objective,
    Param,
    SamplerSpec,
    SpecError,
    SweepSpec,
    check_against_config,
    check_n_trials,
    load_spec,
    parse_spec,
)
from .storage import StorageError, StorageInfo, default_storage_url, open_storage
from .worker import SweepResult, run_sweep

__all__ = [
    "ARTEFACTS_ATTR", "FAILURE_ATTR", "FINGERPRINT_ATTR", "PARENT_ATTR",
    "RETRIES_ATTR", "RETRY_ATTR", "RUN_ATTR", "SWEEP_SECTIONS", "WORKER_ATTR",
    "Objective", "Param", "SamplerSpec", "SpecError", "StorageError", "StorageInfo",
    "SweepResult", "SweepSpec", "TrialError", "check_against_config",
    "check_n_trials", "default_storage_url", "load_spec", "objective_value",
    "open_storage", "parse_spec", "run_sweep", "score_trial", "selected_pairs",
]
