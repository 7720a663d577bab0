"""One worker of a sweep: the study, the parent run, the trials and the summary (``_Sweep``),
and ``run_sweep``, which runs one worker start to end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime

from ..config import Config, digest
from ..procs import worker_gone, worker_id
from . import objectives
from .attrs import (
    ARTEFACTS_ATTR,
    FAILURE_ATTR,
    FINGERPRINT_ATTR,
    PARENT_ATTR,
    RETRY_ATTR,
    RUN_ATTR,
    SKIPPED_ATTR,
    SPEC_ATTR,
    WORKER_ATTR,
)
from .objectives import check_objectives
from .spec import SpecError, SweepSpec, check_n_trials
from .storage import StorageError, StorageInfo, open_storage, requeue_trial

log = logging.getLogger(__name__)

ORPHAN_AGE = 300  # a RUNNING trial that no worker ever claimed is dead after this long
PARENT_WAIT = 120  # seconds a worker waits for the study's creator to make the parent run


@dataclass
class SweepResult:
    study: str
    storage: str
    parent_run_id: str
    n_trials: int
    n_complete: int
    finished: bool  # the study holds n_trials COMPLETE trials
    handed_off: bool = False  # this worker stopped because others run the last trials
    stop_reason: str = ""
    best: list = field(default_factory=list)  # best trial (one objective) or Pareto front




class _Sweep:
    """One worker of a sweep: the study, the parent run, the objective and the summary."""

    def __init__(self, spec: SweepSpec, cfg: Config, store, storage: str | StorageInfo | None,
                 study_name: str | None, n_trials: int | None):
        import mlflow

        from .pipeline_api import Pipeline

        self.spec, self.cfg = spec, cfg
        self.study_name = study_name or spec.study
        self.n_trials = check_n_trials(spec, n_trials)
        self.info = storage if isinstance(storage, StorageInfo) else \
            open_storage(storage, mlflow.get_tracking_uri())
        self.pipe = Pipeline(cfg, store)
        self.worker = worker_id()
        self.failures = 0
        self.last_error = ""
        self.stop_reason = ""
        self.handed_off = False
        self.optimizing = False
        self.parent_created = False
        self.parent_status = "RUNNING"
        self.best: list = []
        self.current: int | None = None  # storage id of the trial this worker is running

    # -- study ----------------------------------------------------------------------------
    def open_study(self) -> bool:
        """Create the study or load it; True when this worker created it."""
        import optuna

        try:
            self.study = optuna.create_study(
                storage=self.info.storage, study_name=self.study_name,
                directions=self.spec.directions, load_if_exists=False)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=self.study_name,
                                           storage=self.info.storage)
            created = False
        fingerprint = self.spec.fingerprint(self.cfg)
        if created:
            self.study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
            self.study.set_user_attr(SPEC_ATTR, self.spec.name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names([o.name for o in self.spec.objectives])
        else:
            theirs = self._wait_for_attr(FINGERPRINT_ATTR, 10)
            directions = [d.name.lower() for d in self.study.directions]
            if theirs not in (None, fingerprint) or directions != self.spec.directions:
                raise SpecError(
                    f"study {self.study_name!r} in {self.info.url} was started from a different "
                    "spec or base config (search space, objectives or config differ); rerun "
                    "with the same spec and --set values, or start a new study with "
                    "--study NAME")
            if theirs is None:  # its creator stopped before recording it
                self.study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        # The creator samples with the spec's seed (a fresh one-worker sweep reproduces);
        # a rerun or another worker gets its own stream, so it does not replay the
        # parameters already tried.
        n_before = len(self.study.get_trials(deepcopy=False))
        self.sampler_seed = (self.spec.sampler.seed if created else
                             int(digest([self.spec.sampler.seed, n_before, self.worker])[:8], 16))
        self.study.sampler = self.spec.sampler.make(self.sampler_seed)
        return created

    def _wait_for_attr(self, key: str, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            value = self.study.user_attrs.get(key)
            if value is not None or time.monotonic() >= deadline:
                return value
            time.sleep(0.5)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    # -- recovery ---------------------------------------------------------------------------
    def recover_stale(self) -> list[int]:
        """Fail the RUNNING trials of workers that are gone and queue their parameters."""
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # heartbeat (database storage)
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
            if stale and self._fail_and_retry(t._trial_id, reason):
                failed.append(t.number)
        if failed:
            log.warning("trial(s) %s were left RUNNING by a worker that is gone: marked FAIL "
                        "and their parameters queued again", failed)
        return failed

    def _fail_and_retry(self, trial_id: int, reason: str, failed_ok: bool = False) -> bool:
        """Mark a RUNNING trial FAIL (with ``reason``) and queue its parameters again; with
        ``failed_ok``, a trial already FAIL (an interrupted one) is queued again too."""
        import optuna
        from optuna.trial import TrialState

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

    def fail_orphan_runs(self) -> None:
        """End as FAILED the parent's child runs left RUNNING by a worker that is gone: a
        trial run whose Optuna trial is no longer RUNNING, or a base stage run of a dead
        base worker."""
        import mlflow
        from optuna.trial import TrialState

        from .pipeline_api import STAGES

        client = mlflow.MlflowClient()
        runs = client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'")
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        base_worker = client.get_run(self.parent_id).data.tags.get("saeuniv.sweep.base_worker")
        for run in runs:
            tags = run.data.tags
            stage = tags.get("saeuniv.stage")
            if stage == "trial":
                number = int(tags.get("saeuniv.trial_number", -1))
                if states.get(number) == TrialState.RUNNING:
                    continue  # a live worker's trial
                why = (f"the worker stopped during trial {number}; the trial is "
                       f"{states[number].name if number in states else 'gone'} in Optuna and "
                       "its parameters were queued again")
            elif stage in STAGES and base_worker and worker_gone(base_worker):
                why = f"the worker {base_worker} stopped during the {stage} stage"
            else:
                continue
            client.set_tag(run.info.run_id, "saeuniv.error", why)
            client.set_terminated(run.info.run_id, "FAILED")
            log.warning("MLflow run %s (%s) was left RUNNING: marked FAILED", run.info.run_id,
                        stage)

    # -- the parent run -------------------------------------------------------------------
    def parent_run(self, created: bool):
        """Start (creator) or reopen the sweep's parent run; returns the active run."""
        import mlflow

        from .pipeline_api import lineage_tags

        parent_id = None if created else self._wait_for_attr(PARENT_ATTR, PARENT_WAIT)
        client = mlflow.MlflowClient()
        self.parent_created = parent_id is None
        if parent_id is None:  # this worker made the study (or its maker died before a run)
            run = mlflow.start_run(run_name=f"sweep:{self.study_name}")
            self.study.set_user_attr(PARENT_ATTR, run.info.run_id)
            mlflow.set_tags({"saeuniv.stage": "sweep", "saeuniv.study": self.study_name,
                             "saeuniv.spec": self.spec.name, "saeuniv.storage": self.info.url,
                             **lineage_tags(self.cfg.hash())})
            s = self.spec
            # prefixed: under `mlflow run` this is the project run, which already holds the
            # entry point's own spec, storage and n_trials parameters
            mlflow.log_params({f"sweep.{k}": v for k, v in {
                "spec": s.name, "study": self.study_name, "storage": self.info.kind,
                "n_trials": self.n_trials, "sampler": s.sampler.name, "seed": s.sampler.seed,
                "sampler_options": json.dumps(dict(s.sampler.options)),
                "objectives": ", ".join(f"{o.name} ({o.direction})" for o in s.objectives),
                "params": ", ".join(p.path for p in s.params)}.items()})
            mlflow.log_params({"config_name": self.cfg.name, "config_hash": self.cfg.hash()})
            mlflow.log_dict(s.to_dict(), "sweep.yaml")
            mlflow.log_dict(self.cfg.to_dict(), "config.yaml")
            mlflow.set_tag("mlflow.note.content",
                           f"Sweep {self.study_name!r} ({s.name}): in progress")
        else:
            try:
                parent = client.get_run(parent_id)
            except Exception as err:  # noqa: BLE001 - any lookup failure means the same
                raise StorageError(
                    f"study {self.study_name!r} logs into MLflow run {parent_id}, which this "
                    f"tracking store ({mlflow.get_tracking_uri()}) does not have ({err}); point "
                    "MLFLOW_TRACKING_URI at the sweep's tracking server, or start a new study "
                    "with --study NAME") from None
            project_run = os.environ.pop("MLFLOW_RUN_ID", None)
            if project_run and project_run != parent_id:  # launched by `mlflow run`
                client.set_tag(project_run, "saeuniv.stage", "sweep-worker")
                client.set_tag(project_run, "saeuniv.sweep.parent", parent_id)
            mlflow.set_experiment(experiment_id=parent.info.experiment_id)
            self.parent_status = parent.info.status
            run = mlflow.start_run(run_id=parent_id)
            started = parent.data.params.get("sweep.n_trials", str(self.n_trials))
            if started != str(self.n_trials):
                log.warning("study %r: n_trials is now %d (it was started with %s)",
                            self.study_name, self.n_trials, started)
        mlflow.set_tag("saeuniv.n_trials", self.n_trials)
        self.parent_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        return run

    def base_stages(self) -> None:
        """The expensive stages once, as nested stage runs of the parent; a rerun or another
        worker only resolves them from the store (and computes what its store lacks)."""
        import mlflow

        from .pipeline_api import run_stage

        tags = mlflow.MlflowClient().get_run(self.parent_id).data.tags
        owner = tags.get("saeuniv.sweep.base_worker")
        if tags.get("saeuniv.sweep.base") != "done" and (owner is None or worker_gone(owner)):
            mlflow.set_tag("saeuniv.sweep.base_worker", self.worker)
            for stage in ("models", "saes", "extract"):
                run_stage(stage, self.pipe)
            mlflow.set_tag("saeuniv.sweep.base", "done")
        _ = self.pipe.all_codes
        fingerprint = digest({f"{side}{layer}": {n: f["sha256"] for n, f in
                                                 e.manifest["files"].items()}
                              for side, codes in self.pipe.all_codes.items()
                              for layer, e in codes.items()})
        theirs = self.study.user_attrs.get(ARTEFACTS_ATTR)
        if theirs is None:
            self.study.set_user_attr(ARTEFACTS_ATTR, fingerprint)
        elif theirs != fingerprint:
            raise StorageError(
                f"this worker's SAE codes differ from those study {self.study_name!r} was "
                "started with (another artefact store, or models and SAEs trained again), so "
                "its trials would not be comparable; share the store between workers "
                "(--store or SAEUNIV_HOME on a shared folder), or start a new study with "
                "--study NAME")

    # -- trials ---------------------------------------------------------------------------
    def _enough(self, trial) -> bool:
        """True when finished trials plus the trials started before this one already make
        ``n_trials`` (so concurrent workers never overshoot the count)."""
        from optuna.trial import TrialState

        ahead = 0
        for t in self.study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)):
            if t.number != trial.number and (t.state == TrialState.COMPLETE
                                             or t.number < trial.number):
                ahead += 1
        return ahead >= self.n_trials

    def objective(self, trial):
        import optuna

        trial.set_user_attr(WORKER_ATTR, self.worker)
        if self._enough(trial):
            trial.set_user_attr(SKIPPED_ATTR, "n_trials reached by other workers")
            self.handed_off = True
            self.study.stop()
            raise optuna.TrialPruned(f"not needed: {self.n_trials} trials are complete or "
                                     "running")
        self.current = trial._trial_id
        try:
            values = self._run_trial(trial)
        except Exception as err:
            self.current = None
            self.last_error = f"{type(err).__name__}: {err}"
            raise
        self.current = None
        return values if len(values) > 1 else values[0]

    def _run_trial(self, trial) -> list[float]:
        """The trial's nested MLflow run: its parameters, per-layer-pair metrics and values."""
        import mlflow

        from .pipeline_api import log_scores, pair_key, stage_run

        params = {p.path: p.suggest(trial) for p in self.spec.params}
        tags = {"saeuniv.trial_number": str(trial.number), "saeuniv.study": self.study_name,
                "saeuniv.worker": self.worker, "saeuniv.sampler_seed": str(self.sampler_seed)}
        if RETRY_ATTR in trial.user_attrs:
            tags["saeuniv.retry_of"] = str(trial.user_attrs[RETRY_ATTR])
        with stage_run("trial", run_name=f"trial-{trial.number}", tags=tags) as run:
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            mlflow.log_params({**params, "trial_number": trial.number})
            t0 = time.perf_counter()
            pipe = self.pipe.with_analysis(self.cfg.replace(**params))
            mlflow.set_tag("saeuniv.config_hash", pipe.cfg.hash())
            scored = objectives.score_trial(pipe)  # patchable: tests wrap it
            for (la, lb), r in scored.items():
                key = pair_key(la, lb)
                log_scores(r["scores"], key)
                mlflow.log_metrics({f"{k}/{key}": v for k, v in r["match"].items()
                                    if isinstance(v, (int, float)) and k != "n_pairs"})
            values = [objectives.objective_value(o, pipe, scored) for o in self.spec.objectives]
            mlflow.log_metrics({**{o.name: v for o, v in zip(self.spec.objectives, values)},
                                "trial_seconds": time.perf_counter() - t0})
        return values

    def after_trial(self, study, trial) -> None:
        from optuna.trial import TrialState

        if trial.state == TrialState.FAIL:
            self.failures += 1
            if self.failures >= self.spec.max_failures:
                self.stop_reason = (f"{self.failures} trials in a row failed (max_failures); "
                                    f"the last: {self.last_error}")
                log.error("stopping this worker: %s", self.stop_reason)
                study.stop()
        elif trial.state == TrialState.COMPLETE:
            self.failures = 0

    def optimize(self) -> None:
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        self.optimizing = True
        counts = self.counts()
        done = counts.get("COMPLETE", 0)
        if done >= self.n_trials:
            log.info("study %r already has %d COMPLETE trials (n_trials=%d); nothing to run",
                     self.study_name, done, self.n_trials)
            return
        if done + counts.get("RUNNING", 0) >= self.n_trials:
            log.info("study %r: the remaining trials are running on other workers",
                     self.study_name)
            self.handed_off = True
            return
        log.info("study %r: %d of %d trials complete; running the rest", self.study_name, done,
                 self.n_trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.optimize(
                self.objective, n_trials=None, catch=(Exception,),
                callbacks=[MaxTrialsCallback(self.n_trials, states=(TrialState.COMPLETE,)),
                           self.after_trial])

    def requeue_interrupted(self) -> None:
        """The trial this worker was running when it was interrupted: FAIL, queued again."""
        if self.current is not None:
            with contextlib.suppress(Exception):
                self._fail_and_retry(self.current, f"worker {self.worker} was interrupted",
                                     failed_ok=True)
            self.current = None

    # -- summary --------------------------------------------------------------------------
    def summary(self) -> list:
        """Log trials.csv, best.json, the plots and summary.md on the parent; return the best
        trial (one objective) or the Pareto front as dicts."""
        import mlflow
        from optuna.trial import TrialState

        names = [o.name for o in self.spec.objectives]
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

        def describe(t) -> dict:
            return {"number": t.number, "values": dict(zip(names, t.values)),
                    "params": t.params, "mlflow_run_id": t.user_attrs.get(RUN_ATTR)}

        if not complete:
            best = []
        elif len(names) == 1:
            best = [describe(self.study.best_trial)]
        else:
            best = sorted((describe(t) for t in self.study.best_trials),
                          key=lambda d: d["number"])
        counts = self.counts()
        key = "best_trial" if len(names) == 1 else "pareto_front"
        mlflow.log_dict({"study": self.study_name, "objectives": [asdict(o) for o in
                                                                    self.spec.objectives],
                         "n_complete": len(complete), "states": counts,
                         key: (best[0] if best else None) if len(names) == 1 else best},
                        "best.json")
        mlflow.log_text(self.study.trials_dataframe().to_csv(index=False), "trials.csv")
        mlflow.log_metrics({f"n_{state.lower()}": counts.get(state, 0) for state in
                            ("COMPLETE", "FAIL", "PRUNED", "RUNNING", "WAITING")})
        if len(names) == 1 and best:
            mlflow.log_metrics({f"best_{names[0]}": best[0]["values"][names[0]],
                                "best_trial": best[0]["number"]})
        elif best:
            mlflow.log_metric("pareto_size", len(best))
        self.plots(names, len(complete))
        text = self.summary_text(best, counts)
        mlflow.log_text(text, "summary.md")
        mlflow.set_tag("mlflow.note.content", text)
        return best

    def plots(self, names: list[str], n_complete: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import mlflow
        from optuna.visualization import matplotlib as ovm

        def log_plot(filename: str, make) -> None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = make()
                first = ax.flat[0] if hasattr(ax, "flat") else ax
                fig = first.figure
                mlflow.log_figure(fig, filename)
                plt.close(fig)
            except Exception as err:  # noqa: BLE001 - a plot is never worth the sweep
                note = filename.rsplit(".", 1)[0] + ".txt"
                mlflow.log_text(f"{filename} was not drawn ({n_complete} complete trials): "
                                f"{type(err).__name__}: {err}\n", note)
                plt.close("all")

        single = len(names) == 1
        for i, name in enumerate(names):
            suffix = "" if single else f"_{name}"
            target = None if single else (lambda t, i=i: t.values[i])
            log_plot(f"optimization_history{suffix}.png", lambda: ovm.plot_optimization_history(
                self.study, target=target, target_name=name))
            log_plot(f"param_importances{suffix}.png", lambda: ovm.plot_param_importances(
                self.study, target=target, target_name=name))
            log_plot(f"parallel_coordinate{suffix}.png", lambda: ovm.plot_parallel_coordinate(
                self.study, target=target, target_name=name))
        if not single:
            log_plot("pareto_front.png", lambda: ovm.plot_pareto_front(
                self.study, target_names=names))

    def summary_text(self, best: list, counts: dict) -> str:
        s = self.spec
        lines = [f"# Sweep {self.study_name!r} ({s.name})", "",
                 f"- base config: {self.cfg.name} ({self.pipe.name('a')} vs "
                 f"{self.pipe.name('b')}), {self.cfg.extract.n_tokens:,} extracted tokens",
                 f"- storage: {self.info.url}",
                 f"- sampler: {s.sampler.name}, seed {s.sampler.seed}",
                 "- objectives: " + ", ".join(
                     f"{o.name} ({o.direction}: mean {o.metric}"
                     + ("" if o.metric == "n_pairs" else f" {o.field}")
                     + f" over {o.layers} layer pairs)" for o in s.objectives),
                 "- trials: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                 + f" (target {self.n_trials} COMPLETE)", ""]
        if not best:
            lines.append("No trial completed.")
        else:
            lines += ["## Best trial" if len(best) == 1 else
                      f"## Pareto front ({len(best)} trials)", "",
                      "| trial | " + " | ".join(o.name for o in s.objectives) + " | "
                      + " | ".join(p.path for p in s.params) + " |",
                      "|---" * (1 + len(s.objectives) + len(s.params)) + "|"]
            for b in best:
                vals = [f"{b['values'][o.name]:.4g}" for o in s.objectives]
                pars = [_fmt(b["params"].get(p.path)) for p in s.params]
                lines.append(f"| {b['number']} | " + " | ".join(vals + pars) + " |")
        return "\n".join(lines) + "\n"

    def finish(self, error: BaseException | None) -> bool:
        """End this worker's hold on the parent run. The worker that sees no trial running
        any more writes the summary and ends the parent; otherwise the parent stays RUNNING
        for the workers still at it. Returns whether the summary was written."""
        import mlflow
        from optuna.trial import TrialState

        from .pipeline_api import record_failure

        if error is not None and not (self.parent_created or self.optimizing):
            # this worker stopped before its first trial (e.g. its artefacts differ from the
            # study's): the parent is left as this worker found it
            mlflow.end_run(self.parent_status)
            return False

        def running() -> bool:
            with contextlib.suppress(Exception):
                self.recover_stale()
            return bool(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

        if running():
            mlflow.end_run("RUNNING")
            # Look again after letting go: had the last trial ended between the first look
            # and now, its worker may have closed the parent before this worker marked it
            # RUNNING, and no one else would close it.
            if running():
                return False
            mlflow.start_run(run_id=self.parent_id)
        with contextlib.suppress(Exception):
            self.fail_orphan_runs()
        self.best = self.summary()
        complete = self.counts().get("COMPLETE", 0)
        if error is not None:
            record_failure(error)
            mlflow.end_run("FAILED" if isinstance(error, Exception) else "KILLED")
        elif complete < self.n_trials:
            mlflow.set_tag("saeuniv.error", self.stop_reason or
                           f"only {complete} of {self.n_trials} trials completed")
            mlflow.end_run("FAILED")
        else:
            tags = mlflow.MlflowClient().get_run(self.parent_id).data.tags
            if "saeuniv.error" in tags:  # left by an earlier, interrupted attempt
                mlflow.MlflowClient().delete_tag(self.parent_id, "saeuniv.error")
            mlflow.end_run("FINISHED")
        return True


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_sweep(spec: SweepSpec, cfg: Config, store=None,
              storage: str | StorageInfo | None = None, study_name: str | None = None,
              n_trials: int | None = None) -> SweepResult:
    """Run (or resume, or join) the sweep ``spec`` on the base config ``cfg``.

    ``storage``: an Optuna storage URL or ``.log`` journal path (default: ``optuna.db``
    beside the MLflow SQLite database), or what ``open_storage`` returned. ``study_name``
    defaults to the spec's study; ``n_trials`` (the COMPLETE trials wanted over all
    workers) to the spec's. MLflow must already point at the tracking store and
    experiment (``tracking.setup_tracking``).
    """
    from ..store import Store

    sweep = _Sweep(spec, cfg, store or Store(), storage, study_name, n_trials)
    sweep.pipe.validate()
    check_objectives(sweep.pipe, spec.objectives)
    created = sweep.open_study()
    sweep.parent_run(created)
    try:
        sweep.recover_stale()
        sweep.fail_orphan_runs()
        sweep.base_stages()
        sweep.optimize()
    except BaseException as err:
        sweep.requeue_interrupted()
        try:
            sweep.finish(err)
        except Exception:  # noqa: BLE001 - keep the original error
            log.exception("could not close the sweep's parent run")
        raise
    wrote = sweep.finish(None)
    counts = sweep.counts()
    return SweepResult(
        study=sweep.study_name, storage=sweep.info.url, parent_run_id=sweep.parent_id,
        n_trials=sweep.n_trials, n_complete=counts.get("COMPLETE", 0),
        finished=counts.get("COMPLETE", 0) >= sweep.n_trials, handed_off=sweep.handed_off,
        stop_reason=sweep.stop_reason, best=sweep.best if wrote else [])

