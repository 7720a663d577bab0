"""Reading a run configuration: safe YAML, built-in configs, ``key.path=value`` overrides,
typed fields and unknown keys refused, and the checks run before any work starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .checks import validate
from .sections import (
    Config,
    ConfigError,
    CorpusConfig,
    ExecutionConfig,
    ExtractConfig,
    FamilyConfig,
    MatchConfig,
    MemberConfig,
    ModelRef,
    SAEConfig,
    SAERef,
    SimilarityConfig,
    SubspacesConfig,
    TokenizerConfig,
    TrackingConfig,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "builtin_configs"


def safe_yaml(text: str, where: str) -> Any:
    """Parse YAML text with the safe loader (``yaml.safe_load``: mappings, lists, strings,
    numbers, booleans and null only). Any other tag, such as ``!!python/object``, and any
    syntax error raise ConfigError naming ``where``, the line and the fix."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        tag = re.search(r"tag '([^']*)'", str(err.problem))
        mark = err.problem_mark
        raise ConfigError(
            f"{where}: the YAML tag {tag.group(1) if tag else err.problem!r} "
            + (f"(line {mark.line + 1}, column {mark.column + 1}) " if mark else "")
            + "is not allowed: configs and sweep specs are read with the safe YAML loader "
            "(mappings, lists, strings, numbers, booleans); remove the tag") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{where} is not valid YAML: {problem}"
            + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
            + "; fix the syntax") from None


def set_path(data: dict, path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config section {part!r} in override {path!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(
            f"unknown config key {path!r}; known keys here: {sorted(node)}"
        )
    node[parts[-1]] = value


def _build(cls, data: Any, where: str):
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or 'config'}; allowed: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(cls, known[name], value, f"{where}.{name}".lstrip("."))
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {err}") from None


_SECTIONS = {
    "model_a": ModelRef, "model_b": ModelRef, "sae_a": SAERef, "sae_b": SAERef,
    "corpus": CorpusConfig,
    "tokenizer": TokenizerConfig, "family": FamilyConfig, "sae": SAEConfig,
    "extract": ExtractConfig, "match": MatchConfig, "similarity": SimilarityConfig,
    "subspaces": SubspacesConfig, "tracking": TrackingConfig, "execution": ExecutionConfig,
}


def _coerce(cls, f, value, where):
    if cls is Config and f.name in _SECTIONS:
        return _build(_SECTIONS[f.name], value, where)
    if cls is FamilyConfig and f.name == "members":
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where} must be a non-empty list of models")
        return tuple(_build(MemberConfig, m, f"{where}[{i}]") for i, m in enumerate(value))
    if f.name == "metrics":
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if f.name == "band":
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in value)):
            raise ConfigError(f"{where} must be [lo, hi], two relative depths, got {value!r}")
        return tuple(float(v) for v in value)
    if f.name == "caveats":
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{where} must be a list of sentences (strings), got {value!r}")
        return value
    scalars = {"int": int, "float": float, "bool": bool, "str": str}  # annotations as text
    expected = f.type if f.type in scalars.values() else scalars.get(f.type)
    if expected in (int, float) and isinstance(value, bool):  # YAML true is not a number
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    if expected is float and isinstance(value, int):
        return float(value)
    if expected is not None and not isinstance(value, expected):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def read_config(path: str | Path | None = None, what: str = "config") -> Any:
    """The mapping in a YAML config file, or in the built-in config of that name
    (``default``, ``tiny``), read with the safe loader; not yet merged or validated."""
    name = str(path) if path else "default"
    p = Path(name)
    if not p.exists():
        builtin = CONFIG_DIR / f"{name}.yaml"
        if not builtin.exists():
            choices = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(
                f"{what} {name!r} is neither a file nor a built-in config; built-ins: {choices}")
        p = builtin
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} file {p} is not UTF-8 text (byte {err.start}); "
                          "save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} file {p}: {err.strerror or err}") from None
    return safe_yaml(text, f"{what} file {p}") or {}


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load a YAML config (or the built-in ``default``) and apply overrides.

    ``path`` may be a file path or the name of a built-in config
    (``default``, ``tiny``). Overrides map dotted keys to values.
    """
    merged = _merge(Config().to_dict(), read_config(path), "")
    for key, value in (overrides or {}).items():
        set_path(merged, key, value)
    return from_dict(merged)


def merge_config(base: Config, data: dict, where: str = "") -> Config:
    """``base`` with the sections and keys of ``data`` (nested, as in a config file)
    replacing its own, validated; unknown keys are refused, named from ``where``."""
    return from_dict(_merge(base.to_dict(), data, where))


def _merge(base: dict, data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    out = dict(base)
    for key, value in data.items():
        if key not in base:
            raise ConfigError(
                f"unknown key {(where + '.' + key).lstrip('.')!r}; allowed: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out
