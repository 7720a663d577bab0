"""Optuna sweeps over the analysis settings: resumable, distributed, tracked in MLflow.

A sweep spec (``sweeps/*.yaml``) names a base config, a search space of config
paths in the analysis sections (``match.*``, ``similarity.*``), one or more
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
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import (CONFIG_DIR, METRICS, Config, ConfigError, MatchConfig, SimilarityConfig,
                     digest, load_config, safe_yaml)
from .procs import worker_gone, worker_id

log = logging.getLogger(__name__)

# -- the spec (pure) ------------------------------------------------------------------------

ANALYSIS_SECTIONS = {"match": MatchConfig, "similarity": SimilarityConfig}
PARAM_TYPES = ("float", "int", "categorical", "bool")
OBJECTIVE_METRICS = METRICS + ("n_pairs",)
FIELDS = ("observed", "z")
LAYER_SETS = ("all", "middle")
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "nsga2": "NSGAIISampler",
            "nsga3": "NSGAIIISampler", "qmc": "QMCSampler"}
MIDDLE = (1 / 3, 2 / 3)  # relative depth of the A layer for ``layers: middle``
SPEC_KEYS = ("study", "description", "base", "n_trials", "sampler", "objectives", "params",
             "max_failures")
# which parameter types may set a config field of each type
_FIELD_PARAM_TYPES = {"float": ("float", "int", "categorical"), "int": ("int", "categorical"),
                      "bool": ("bool", "categorical"), "str": ("categorical",)}


class SpecError(ConfigError):
    """A sweep spec is malformed: an unknown key or parameter, a bad range or objective."""


@dataclass(frozen=True)
class Param:
    """One search-space dimension: a config path and how to sample it."""

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.path, self.low, self.high, log=self.log,
                                       step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.path, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        if self.type == "bool":
            return trial.suggest_categorical(self.path, [False, True])
        return trial.suggest_categorical(self.path, list(self.choices))

    def extremes(self) -> list:
        """The values to check against the config: the bounds, or every choice."""
        if self.type in ("float", "int"):
            return [self.low, self.high]
        return [False, True] if self.type == "bool" else list(self.choices)


@dataclass(frozen=True)
class Objective:
    """A value read from the stored scores of a trial: the mean over the selected layer
    pairs of ``metric``'s ``field`` (``n_pairs``: the pairs kept)."""

    name: str
    metric: str
    field: str = "observed"
    layers: str = "all"
    direction: str = "maximize"


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    seed: int = 0
    options: tuple = ()  # (key, value) pairs passed to the sampler class

    def make(self, seed: int | None = None):
        import optuna

        cls = getattr(optuna.samplers, SAMPLERS[self.name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(seed=self.seed if seed is None else seed, **dict(self.options))


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec. ``config()`` gives the base config with overrides."""

    name: str
    study: str
    base_config: str
    base_set: tuple  # (config path, value) pairs applied to the base config
    n_trials: int
    sampler: SamplerSpec
    objectives: tuple[Objective, ...]
    params: tuple[Param, ...]
    description: str = ""
    max_failures: int = 10
    source: str = ""

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def config(self, overrides: dict | None = None) -> Config:
        """The base config, the spec's ``base.set`` and then ``overrides`` applied; the
        search space is checked against the result."""
        try:
            cfg = load_config(self.base_config, {**dict(self.base_set), **(overrides or {})})
            check_against_config(self, cfg)
        except ConfigError as err:
            raise SpecError(f"{self.source or self.name}: {err}") from None
        return cfg

    def to_dict(self) -> dict:
        return {"study": self.study, "description": self.description,
                "base": {"config": self.base_config, "set": dict(self.base_set)},
                "n_trials": self.n_trials, "max_failures": self.max_failures,
                "sampler": {"name": self.sampler.name, "seed": self.sampler.seed,
                            "options": dict(self.sampler.options)},
                "objectives": [asdict(o) for o in self.objectives],
                "params": {p.path: {k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in asdict(p).items() if k != "path"}
                           for p in self.params}}

    def fingerprint(self, cfg: Config) -> str:
        """What makes trials comparable: the search space, the objectives and the base
        config (its corpus given by content elsewhere, so the path may differ by machine)."""
        base = cfg.to_dict()
        base["corpus"] = {k: v for k, v in base["corpus"].items() if k != "source"}
        return digest({"params": [asdict(p) for p in self.params],
                       "objectives": [asdict(o) for o in self.objectives], "base": base})


def _fail(where: str, msg: str):
    raise SpecError(f"{where}: {msg}")


def _mapping(value, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return value


def _number(value, where: str, integer: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        _fail(where, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _param(path: str, raw: Any) -> Param:
    where = f"params[{path!r}]"
    if not isinstance(raw, dict) or "type" not in raw:
        _fail(where, f"needs a mapping with type: one of {PARAM_TYPES}, got {raw!r}")
    kind = raw["type"]
    if kind not in PARAM_TYPES:
        _fail(where, f"unknown type {kind!r}; choose one of {PARAM_TYPES}")
    if kind in ("float", "int"):
        raw = _mapping(raw, where, ("type", "low", "high", "log", "step"))
        for key in ("low", "high"):
            if key not in raw:
                _fail(where, f"type {kind} needs low and high")
            _number(raw[key], f"{where}.{key}", integer=kind == "int")
        low, high, log_scale = raw["low"], raw["high"], raw.get("log", False)
        if not isinstance(log_scale, bool):
            _fail(f"{where}.log", f"must be true or false, got {log_scale!r}")
        if not low < high:
            _fail(where, f"low must be < high, got low={low}, high={high}")
        if log_scale and low <= 0:
            _fail(where, f"log: true needs low > 0, got low={low}")
        step = raw.get("step")
        if step is not None:
            _number(step, f"{where}.step", integer=kind == "int")
            if step <= 0:
                _fail(where, f"step must be > 0, got {step}")
            if log_scale:
                _fail(where, "step and log: true cannot be combined")
        if kind == "int":
            return Param(path, kind, int(low), int(high), log_scale, step)
        return Param(path, kind, float(low), float(high), log_scale,
                     None if step is None else float(step))
    if kind == "bool":
        _mapping(raw, where, ("type",))
        return Param(path, kind)
    raw = _mapping(raw, where, ("type", "choices"))
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        _fail(where, f"type categorical needs a non-empty list of choices, got {choices!r}")
    bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
    if bad:
        _fail(where, f"choices must be numbers, strings, booleans or null, got {bad}")
    if len({json.dumps(c) for c in choices}) != len(choices):
        _fail(where, f"choices repeat a value: {choices}")
    return Param(path, kind, choices=tuple(choices))


def _objective(i: int, raw: Any) -> Objective:
    where = f"objectives[{i}]"
    raw = _mapping(raw, where, ("name", "metric", "field", "layers", "direction"))
    metric = raw.get("metric")
    if metric not in OBJECTIVE_METRICS:
        _fail(where, f"unknown objective metric {metric!r}; choose one of "
              f"{list(OBJECTIVE_METRICS)}")
    fld = raw.get("field", "observed")
    if fld not in FIELDS:
        _fail(where, f"unknown field {fld!r}; choose one of {list(FIELDS)}")
    if metric == "n_pairs" and fld != "observed":
        _fail(where, "metric n_pairs has no null; leave out field")
    layers = raw.get("layers", "all")
    if layers not in LAYER_SETS:
        _fail(where, f"unknown layers {layers!r}; choose one of {list(LAYER_SETS)}")
    direction = raw.get("direction", "maximize")
    if direction not in DIRECTIONS:
        _fail(where, f"unknown direction {direction!r}; choose one of {list(DIRECTIONS)}")
    default = f"{metric}_{layers}" if metric == "n_pairs" else f"{metric}_{fld}_{layers}"
    name = raw.get("name", default)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        _fail(where, f"name must be letters, digits, '_', '.' or '-', got {name!r}")
    return Objective(name, metric, fld, layers, direction)


def _sampler(raw: Any) -> SamplerSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    raw = _mapping(raw, "sampler", ("name", "seed", "options"))
    name = raw.get("name", "tpe")
    if name not in SAMPLERS:
        _fail("sampler", f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    seed = _number(raw.get("seed", 0), "sampler.seed", integer=True)
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        _fail("sampler.options", f"must be a mapping, got {options!r}")
    if "seed" in options:
        _fail("sampler.options", "give the seed as sampler.seed")
    spec = SamplerSpec(name, seed, tuple(sorted(options.items())))
    try:
        spec.make()
    except (TypeError, ValueError) as err:
        _fail("sampler.options", f"{SAMPLERS[name]} refuses them: {err}")
    return spec


def parse_spec(data: Any, name: str = "sweep", source: str = "",
               folder: Path | None = None) -> SweepSpec:
    """A ``SweepSpec`` from the YAML mapping ``data``; raises SpecError naming the problem.

    Only the spec's own structure is checked here; ``SweepSpec.config`` checks the search
    space against the base config.
    """
    data = _mapping(data, "spec", SPEC_KEYS)
    base = data.get("base", {}) or {}
    if isinstance(base, str):
        base = {"config": base}
    base = _mapping(base, "base", ("config", "set"))
    base_config = str(base.get("config", "default"))
    if folder is not None and not (CONFIG_DIR / f"{base_config}.yaml").exists() \
            and not Path(base_config).exists() and (folder / base_config).exists():
        base_config = str((folder / base_config).resolve())  # a path beside the spec
    base_set = base.get("set") or {}
    if not isinstance(base_set, dict):
        _fail("base.set", f"must be a mapping of config paths to values, got {base_set!r}")
    n_trials = _number(data.get("n_trials"), "n_trials", integer=True)
    if n_trials < 1:
        _fail("n_trials", f"must be >= 1, got {n_trials}")
    max_failures = _number(data.get("max_failures", 10), "max_failures", integer=True)
    if max_failures < 1:
        _fail("max_failures", f"must be >= 1, got {max_failures}")
    study = data.get("study", name)
    if not isinstance(study, str) or not study.strip():
        _fail("study", f"must be a non-empty name, got {study!r}")
    raw_objectives = data.get("objectives")
    if isinstance(raw_objectives, dict):
        raw_objectives = [raw_objectives]
    if not isinstance(raw_objectives, list) or not raw_objectives:
        _fail("objectives", "needs a non-empty list, e.g. [{metric: rsa, field: z, layers: "
              "middle, direction: maximize}]")
    objectives = tuple(_objective(i, o) for i, o in enumerate(raw_objectives))
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        _fail("objectives", f"names must be unique, got {names}; set name: on each")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        _fail("params", "needs a mapping of config paths to ranges, e.g. "
              "{match.threshold: {type: float, low: 0.0, high: 0.5}}")
    params = tuple(_param(str(path), raw) for path, raw in raw_params.items())
    description = data.get("description", "")
    return SweepSpec(name=name, study=study.strip(), base_config=base_config,
                     base_set=tuple(base_set.items()), n_trials=n_trials,
                     sampler=_sampler(data.get("sampler", "tpe")), objectives=objectives,
                     params=params, description=str(description), max_failures=max_failures,
                     source=source)


def check_against_config(spec: SweepSpec, cfg: Config) -> None:
    """Every parameter is a known analysis setting whose range the config accepts, and
    every objective's metric is one the config computes."""
    sections = {f.name: f for f in fields(Config)}
    for p in spec.params:
        where = f"params[{p.path!r}]"
        section, _, key = p.path.partition(".")
        if section not in sections:
            _fail(where, f"unknown config path {p.path!r}; sweepable sections: "
                  f"{sorted(ANALYSIS_SECTIONS)}")
        if section not in ANALYSIS_SECTIONS:
            _fail(where, f"sweeps vary analysis settings only ({', '.join(ANALYSIS_SECTIONS)}"
                  f" sections): {section!r} settings change the models, SAEs or extraction, "
                  "which every trial shares; set them in base.set instead")
        known = {f.name: f for f in fields(ANALYSIS_SECTIONS[section])}
        if key not in known:
            _fail(where, f"unknown config path {p.path!r}; known keys in {section}: "
                  f"{sorted(known)}")
        ftype = known[key].type if isinstance(known[key].type, str) else known[key].type.__name__
        allowed = _FIELD_PARAM_TYPES.get(ftype, ("categorical",))
        if p.type not in allowed:
            _fail(where, f"type {p.type} cannot set {p.path}, which is {ftype}; use type: "
                  f"{' or '.join(allowed)}")
        for value in p.extremes():
            try:
                cfg.replace(**{p.path: value})
            except ConfigError as err:
                _fail(where, f"{value!r} is out of range for the base config: {err}")
    swept = {p.path for p in spec.params}
    if "similarity.metrics" not in swept:
        for o in spec.objectives:
            if o.metric != "n_pairs" and o.metric not in cfg.similarity.metrics:
                _fail(f"objective {o.name!r}", f"metric {o.metric!r} is not computed by the "
                      f"base config (similarity.metrics = {list(cfg.similarity.metrics)}); "
                      "add it in base.set")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec, including its search space against its base config."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"cannot read sweep spec {p}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"sweep spec {p} is not UTF-8 text (byte {err.start}); save it as "
                        "UTF-8") from None
    try:
        data = safe_yaml(text, f"sweep spec {p}")
    except ConfigError as err:
        raise SpecError(str(err)) from None
    try:
        spec = parse_spec(data, name=p.stem, source=str(p), folder=p.resolve().parent)
    except ConfigError as err:
        raise SpecError(f"{p}: {err}") from None
    spec.config()
    return spec


# -- objectives over stored scores ----------------------------------------------------------

class TrialError(ValueError):
    """A trial cannot give a value (e.g. no selected layer pair was scored)."""


def selected_pairs(pipe, objective: Objective) -> list[tuple[int, int]]:
    """The layer pairs an objective averages over: all, or those whose A layer's relative
    depth is in [1/3, 2/3]."""
    pairs = pipe.pairs()
    if objective.layers == "all":
        return pairs
    lo, hi = MIDDLE
    return [(la, lb) for la, lb in pairs
            if lo - 1e-9 <= pipe.relative_depth("a", la) <= hi + 1e-9]


def score_trial(pipe) -> dict[tuple[int, int], dict]:
    """Match and score every layer pair of ``pipe`` through the store (a setting seen
    before is read back, not recomputed): pair -> {"match": counts, "scores": scores}."""
    from .pipeline import load_scores

    return {(la, lb): {"match": pipe.matches(la, lb).meta,
                       "scores": load_scores(pipe.scores(la, lb))}
            for la, lb in pipe.pairs()}


def objective_value(objective: Objective, pipe, scored: dict) -> float:
    """Mean of the objective's score over its layer pairs, skipping pairs with no score;
    raises TrialError when none has one."""
    values, why = [], []
    for pair in selected_pairs(pipe, objective):
        s = scored[pair]["scores"]
        if objective.metric == "n_pairs":
            values.append(float(s["n_pairs"]))
            continue
        r = s["metrics"].get(objective.metric, {})
        v = r.get(objective.field)
        if v is not None and math.isfinite(v):
            values.append(float(v))
        else:
            why.append(r.get("error") or (s["status"] if s["status"] != "ok"
                                          else f"{objective.field} undefined"))
    if not values:
        raise TrialError(
            f"objective {objective.name!r}: no {objective.layers} layer pair has a "
            f"{objective.metric} {objective.field} score at these settings ("
            f"{why[0] if why else 'no layer pair selected'}); the trial fails rather than "
            "return NaN")
    return float(sum(values) / len(values))


# -- storage, workers, recovery (shell) -----------------------------------------------------

WORKER_ATTR = "saeuniv.worker"
RUN_ATTR = "saeuniv.mlflow_run_id"
RETRY_ATTR = "saeuniv.retry_of"
RETRIES_ATTR = "saeuniv.retries"
FAILURE_ATTR = "saeuniv.failure"
PARENT_ATTR = "saeuniv.mlflow_parent_run_id"
FINGERPRINT_ATTR = "saeuniv.spec_fingerprint"
ARTEFACTS_ATTR = "saeuniv.artefacts"
HEARTBEAT_INTERVAL = 15  # seconds between heartbeats of a running trial (database storage)
GRACE_PERIOD = 60  # a trial with no heartbeat for this long belongs to a dead worker
ORPHAN_AGE = 300  # a RUNNING trial that no worker ever claimed is dead after this long
MAX_RETRY = 3  # times the parameters of a trial whose worker died are queued again
PARENT_WAIT = 120  # seconds a worker waits for the study's creator to make the parent run


class StorageError(ValueError):
    """The Optuna storage cannot be opened or clashes with the MLflow store."""


@dataclass
class StorageInfo:
    storage: Any
    url: str  # for display: the password hidden
    kind: str  # sqlite, postgresql, mysql, journal


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()


def default_storage_url(tracking_uri: str) -> str:
    """``sqlite:///<dir>/optuna.db``: beside the MLflow SQLite database, or in the working
    directory when MLflow tracks elsewhere. Never the MLflow file itself."""
    mlflow_db = _sqlite_path(tracking_uri)
    folder = mlflow_db.parent if mlflow_db is not None else Path.cwd().resolve()
    return f"sqlite:///{folder / 'optuna.db'}"


def _retry(study, trial) -> None:
    """Queue the parameters of a trial whose worker died (at most MAX_RETRY times)."""
    retries = int(trial.user_attrs.get(RETRIES_ATTR, 0))
    if retries >= MAX_RETRY:
        log.warning("trial %d: its worker died %d times with these parameters; not retried",
                    trial.number, retries + 1)
        return
    study.enqueue_trial(trial.params, user_attrs={
        RETRY_ATTR: int(trial.user_attrs.get(RETRY_ATTR, trial.number)),
        RETRIES_ATTR: retries + 1})
    log.info("trial %d failed with its worker; its parameters are queued again", trial.number)


def open_storage(url: str | None, tracking_uri: str) -> StorageInfo:
    """An Optuna storage for ``url``: ``None``/``default`` (SQLite beside MLflow's), a
    database URL, or a path ending in ``.log`` (a journal file)."""
    import optuna

    if not url or url == "default":
        url = default_storage_url(tracking_uri)
    if "://" not in url:
        if not url.endswith(".log"):
            raise StorageError(f"--storage {url!r} is neither a database URL (sqlite:///..., "
                               "postgresql://...) nor a journal file ending in .log")
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return StorageInfo(JournalStorage(JournalFileBackend(str(path))), str(path), "journal")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import (ArgumentError, IntegrityError, ProgrammingError,
                                SQLAlchemyError)

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise StorageError(f"--storage {url!r} is not a database URL: {err}") from None
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg"):
        # psycopg 3 (a dependency), whichever driver this SQLAlchemy defaults to
        parsed = parsed.set(drivername="postgresql+psycopg")
        url = parsed.render_as_string(hide_password=False)
    shown = parsed.render_as_string(hide_password=True)
    kind = parsed.get_backend_name()
    engine_kwargs: dict = {"pool_pre_ping": True}
    if kind == "sqlite":
        path = _sqlite_path(url)
        if path is not None:
            if path == _sqlite_path(tracking_uri):
                raise StorageError(
                    f"--storage {shown} is the MLflow tracking database; Optuna and MLflow "
                    "need separate SQLite files (e.g. sqlite:///optuna.db)")
            path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD, heartbeat_stale_trial_callback=_retry)
            return StorageInfo(storage, shown, kind)
        except (IntegrityError, ProgrammingError):
            # workers started together on a new database race to create its tables: the
            # loser waits and opens what the winner made
            if attempt == 5:
                raise
            time.sleep(1 + attempt)
        except (SQLAlchemyError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StorageError(f"cannot open the Optuna storage {shown}: {first}") from None
    raise AssertionError("unreachable")


# -- the sweep (shell) ----------------------------------------------------------------------

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


def check_n_trials(spec: SweepSpec, n_trials: int | None) -> int:
    """The COMPLETE trials wanted: ``n_trials`` (``--n-trials``), or the spec's when None."""
    n = spec.n_trials if n_trials is None else int(n_trials)
    if n < 1:
        raise SpecError(f"--n-trials must be >= 1, got {n}; give a positive count, or leave it "
                        "out for the spec's n_trials")
    return n


class _Sweep:
    """One worker of a sweep: the study, the parent run, the objective and the summary."""

    def __init__(self, spec: SweepSpec, cfg: Config, store, storage: str | StorageInfo | None,
                 study_name: str | None, n_trials: int | None):
        import mlflow

        from .pipeline import Pipeline

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
            self.study.set_user_attr("saeuniv.spec", self.spec.name)
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
        _retry(self.study, storage.get_trial(trial_id))
        return True

    def fail_orphan_runs(self) -> None:
        """End as FAILED the parent's child runs left RUNNING by a worker that is gone: a
        trial run whose Optuna trial is no longer RUNNING, or a base stage run of a dead
        base worker."""
        import mlflow
        from optuna.trial import TrialState

        from .pipeline import STAGES

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

        from .tracking import lineage_tags

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

        from .pipeline import run_stage

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
            trial.set_user_attr("saeuniv.skipped", "n_trials reached by other workers")
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

        from .pipeline import log_scores, pair_key
        from .tracking import stage_run

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
            scored = score_trial(pipe)
            for (la, lb), r in scored.items():
                key = pair_key(la, lb)
                log_scores(r["scores"], key)
                mlflow.log_metrics({f"{k}/{key}": v for k, v in r["match"].items()
                                    if isinstance(v, (int, float)) and k != "n_pairs"})
            values = [objective_value(o, pipe, scored) for o in self.spec.objectives]
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

        from .tracking import record_failure

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
    from .store import Store

    sweep = _Sweep(spec, cfg, store or Store(), storage, study_name, n_trials)
    sweep.pipe.validate()
    for o in spec.objectives:
        if not selected_pairs(sweep.pipe, o):
            depths = {la: round(sweep.pipe.relative_depth("a", la), 3)
                      for la in sweep.pipe.layers("a")}
            raise SpecError(f"objective {o.name!r}: no layer pair has an A layer at relative "
                            f"depth in [1/3, 2/3] (A layers and depths: {depths}); use "
                            "layers: all")
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

