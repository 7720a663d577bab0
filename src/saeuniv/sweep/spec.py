"""The sweep spec: what a ``sweeps/*.yaml`` file may say, checked before any work.

A spec names a base config (and ``base.set`` overrides), a search space of config
paths in the sections a trial varies, one or more objectives read from the stored
scores, a seeded sampler and a trial count. ``load_spec`` reads and checks all of it,
the search space against the base config too, so a bad spec is refused in one line
before a study, a run or a model exists.

Pure: YAML and config in, frozen values out. No MLflow, no Optuna storage, no pipeline
(only ``SamplerSpec.make`` touches Optuna, to build the sampler the spec names).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .. import stages
from ..config import (
    CONFIG_DIR,
    METRICS,
    Config,
    ConfigError,
    digest,
    load_config,
    safe_yaml,
)

# The sections a trial varies, with their dataclasses: those of the stages a trial runs
# (stages.TRIAL). The others decide the models, SAEs and codes that all trials share, or
# stages a trial does not run (subspaces).
SWEEP_SECTIONS = {name: type(getattr(Config(), name)) for name in stages.sweep_sections()}
PARAM_TYPES = ("float", "int", "categorical", "bool")
OBJECTIVE_METRICS = METRICS + ("n_pairs",)
FIELDS = ("observed", "z", "calibrated")  # stored per metric by the similarity stage
LAYER_SETS = ("all", "middle")
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "nsga2": "NSGAIISampler",
            "nsga3": "NSGAIIISampler", "qmc": "QMCSampler"}
SPEC_KEYS = ("study", "description", "base", "n_trials", "sampler", "objectives",
             "params", "max_failures")
# which parameter types may set a config field of each type
_FIELD_PARAM_TYPES = {"float": ("float", "int", "categorical"),
                      "int": ("int", "categorical"), "bool": ("bool", "categorical"),
                      "str": ("categorical",)}


class SpecError(ConfigError):
    """A sweep spec is malformed: an unknown key or parameter, a bad range or
    objective."""


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
        """This dimension's value for an Optuna ``trial``, named by the config path."""
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
    """An Optuna sampler by name, its seed and its keyword options."""

    name: str = "tpe"
    seed: int = 0
    options: tuple = ()  # (key, value) pairs passed to the sampler class

    def make(self, seed: int | None = None):
        """The sampler, seeded with ``seed`` (default: the spec's)."""
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
            settings = {**dict(self.base_set), **(overrides or {})}
            cfg = load_config(self.base_config, settings)
            check_against_config(self, cfg)
        except ConfigError as err:
            raise SpecError(f"{self.source or self.name}: {err}") from None
        return cfg

    def to_dict(self) -> dict:
        """The spec as YAML-ready data (logged as the parent run's ``sweep.yaml``)."""
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
        config (its corpus given by content elsewhere, so the path may differ by
        machine)."""
        base = cfg.to_dict()
        base["corpus"] = {k: v for k, v in base["corpus"].items() if k != "source"}
        return digest({"params": [asdict(p) for p in self.params],
                       "objectives": [asdict(o) for o in self.objectives],
                       "base": base})


# -- reading the YAML mapping ------------------------------------------------------

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
    if not ok or isinstance(value, bool) or (isinstance(value, float)
                                             and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        _fail(where, f"must be {kind}, got {value!r}")
    return value


def _range_param(path: str, kind: str, raw: dict, where: str) -> Param:
    """A ``float`` or ``int`` dimension: low < high, a log scale above 0, or a step."""
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


def _categorical_param(path: str, raw: dict, where: str) -> Param:
    """A ``categorical`` dimension: distinct plain values (JSON-comparable)."""
    raw = _mapping(raw, where, ("type", "choices"))
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        _fail(where, "type categorical needs a non-empty list of choices, got "
              f"{choices!r}")
    bad = [c for c in choices
           if not (c is None or isinstance(c, (bool, int, float, str)))]
    if bad:
        _fail(where, f"choices must be numbers, strings, booleans or null, got {bad}")
    if len({json.dumps(c) for c in choices}) != len(choices):
        _fail(where, f"choices repeat a value: {choices}")
    return Param(path, "categorical", choices=tuple(choices))


def _param(path: str, raw: Any) -> Param:
    where = f"params[{path!r}]"
    if not isinstance(raw, dict) or "type" not in raw:
        _fail(where, f"needs a mapping with type: one of {PARAM_TYPES}, got {raw!r}")
    kind = raw["type"]
    if kind not in PARAM_TYPES:
        _fail(where, f"unknown type {kind!r}; choose one of {PARAM_TYPES}")
    if kind in ("float", "int"):
        return _range_param(path, kind, raw, where)
    if kind == "bool":
        _mapping(raw, where, ("type",))
        return Param(path, kind)
    return _categorical_param(path, raw, where)


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
        _fail(where, f"unknown direction {direction!r}; choose one of "
              f"{list(DIRECTIONS)}")
    default = (f"{metric}_{layers}" if metric == "n_pairs" else
               f"{metric}_{fld}_{layers}")
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
        spec.make()  # the sampler class is the judge of its own options
    except (TypeError, ValueError) as err:
        _fail("sampler.options", f"{SAMPLERS[name]} refuses them: {err}")
    return spec


def _base(raw: Any, folder: Path | None) -> tuple[str, dict]:
    """The base config's name or path, and its ``set`` overrides."""
    base = raw or {}
    if isinstance(base, str):
        base = {"config": base}
    base = _mapping(base, "base", ("config", "set"))
    base_config = str(base.get("config", "default"))
    if folder is not None and not (CONFIG_DIR / f"{base_config}.yaml").exists() \
            and not Path(base_config).exists() and (folder / base_config).exists():
        base_config = str((folder / base_config).resolve())  # a path beside the spec
    base_set = base.get("set") or {}
    if not isinstance(base_set, dict):
        _fail("base.set", "must be a mapping of config paths to values, got "
              f"{base_set!r}")
    return base_config, base_set


def _count(value: Any, where: str) -> int:
    """A count that must be a positive integer (``n_trials``, ``max_failures``)."""
    n = _number(value, where, integer=True)
    if n < 1:
        _fail(where, f"must be >= 1, got {n}")
    return n


def _objectives(raw: Any) -> tuple[Objective, ...]:
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        _fail("objectives", "needs a non-empty list, e.g. [{metric: rsa, field: z, "
              "layers: middle, direction: maximize}]")
    objectives = tuple(_objective(i, o) for i, o in enumerate(raw))
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        _fail("objectives", f"names must be unique, got {names}; set name: on each")
    return objectives


def _params(raw: Any) -> tuple[Param, ...]:
    if not isinstance(raw, dict) or not raw:
        _fail("params", "needs a mapping of config paths to ranges, e.g. "
              "{match.threshold: {type: float, low: 0.0, high: 0.5}}")
    return tuple(_param(str(path), value) for path, value in raw.items())


def parse_spec(data: Any, name: str = "sweep", source: str = "",
               folder: Path | None = None) -> SweepSpec:
    """A ``SweepSpec`` from the YAML mapping ``data``; raises SpecError naming the
    problem.

    Only the spec's own structure is checked here; ``SweepSpec.config`` checks the
    search space against the base config. The parts are read in a fixed order (base,
    counts, study, objectives, params, sampler), so a spec with several problems always
    reports the same one first.
    """
    data = _mapping(data, "spec", SPEC_KEYS)
    base_config, base_set = _base(data.get("base", {}), folder)
    n_trials = _count(data.get("n_trials"), "n_trials")
    max_failures = _count(data.get("max_failures", 10), "max_failures")
    study = data.get("study", name)
    if not isinstance(study, str) or not study.strip():
        _fail("study", f"must be a non-empty name, got {study!r}")
    objectives = _objectives(data.get("objectives"))
    params = _params(data.get("params"))
    description = data.get("description", "")
    return SweepSpec(name=name, study=study.strip(), base_config=base_config,
                     base_set=tuple(base_set.items()), n_trials=n_trials,
                     sampler=_sampler(data.get("sampler", "tpe")),
                     objectives=objectives, params=params,
                     description=str(description), max_failures=max_failures,
                     source=source)


# -- the search space against the base config ---------------------------------------

def _check_param(p: Param, cfg: Config) -> None:
    """``p`` names a field of a section a trial varies, its type can set that field, and
    the config accepts its extremes."""
    where = f"params[{p.path!r}]"
    section, _, key = p.path.partition(".")
    if section not in {f.name for f in fields(Config)}:
        _fail(where, f"unknown config path {p.path!r}; sweepable sections: "
              f"{sorted(SWEEP_SECTIONS)}")
    if section not in SWEEP_SECTIONS:
        sections = ", ".join(SWEEP_SECTIONS)
        _fail(where, f"sweeps vary analysis settings only ({sections} sections): "
              f"{section!r} settings change the models, SAEs or extraction, which "
              "every trial shares; set them in base.set instead")
    known = {f.name: f for f in fields(SWEEP_SECTIONS[section])}
    if key not in known:
        _fail(where, f"unknown config path {p.path!r}; known keys in {section}: "
              f"{sorted(known)}")
    ftype = known[key].type
    if not isinstance(ftype, str):  # a real type, not a postponed annotation
        ftype = ftype.__name__
    allowed = _FIELD_PARAM_TYPES.get(ftype, ("categorical",))
    if p.type not in allowed:
        _fail(where, f"type {p.type} cannot set {p.path}, which is {ftype}; use type: "
              f"{' or '.join(allowed)}")
    for value in p.extremes():
        try:
            cfg.replace(**{p.path: value})
        except ConfigError as err:
            _fail(where, f"{value!r} is out of range for the base config: {err}")


def check_against_config(spec: SweepSpec, cfg: Config) -> None:
    """Every parameter is a known analysis setting whose range the config accepts, and
    every objective's metric is one the config computes."""
    for p in spec.params:
        _check_param(p, cfg)
    swept = {p.path for p in spec.params}
    # when the metric list is swept, each trial's decides (a TrialError without it)
    if "similarity.metrics" not in swept:
        computed = list(cfg.similarity.metrics)
        for o in spec.objectives:
            if o.metric != "n_pairs" and o.metric not in computed:
                _fail(f"objective {o.name!r}", f"metric {o.metric!r} is not computed "
                      f"by the base config (similarity.metrics = {computed}); add it "
                      "in base.set")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec, including its search space against its base
    config."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"cannot read sweep spec {p}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"sweep spec {p} is not UTF-8 text (byte {err.start}); save "
                        "it as UTF-8") from None
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


def check_n_trials(spec: SweepSpec, n_trials: int | None) -> int:
    """The COMPLETE trials wanted: ``n_trials`` (``--n-trials``), or the spec's when
    None."""
    n = spec.n_trials if n_trials is None else int(n_trials)
    if n < 1:
        raise SpecError(f"--n-trials must be >= 1, got {n}; give a positive count, or "
                        "leave it out for the spec's n_trials")
    return n
