"""A ladder: N >= 3 models of one family, from smallest to largest, compared pair by pair.

A ladder file is a main config whose two models are replaced by a list::

    name: ladder-tiny
    base: default              # the config every pair starts from (file or built-in name)
    ladder:
      pairs: all               # all | adjacent (neighbours, and every model vs the largest)
      models:                  # smallest first
        - {model: {source: family, name: tiny-s}}
        - {model: {source: family, name: tiny-m}, layers: all}
        - model: {source: gguf, name: big, path: /models/big.gguf}
          sae: {source: folder, path: "/saes/big/layer_{layer}"}
          params: 1500000000   # parameter count for the trend axes (family: counted)
    extract: {n_tokens: 8000}  # any other section: shared by every pair

Each model entry takes ``model`` (a model source, as ``model_a``), ``sae`` (an SAE source,
as ``sae_a``; default: trained here), ``layers`` (as ``layers_a``; default ``all``) and
``params``. Each pair is a main config with the smaller model as A.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config, merge_config, plain, read_config

PAIRINGS = ("all", "adjacent")
MODEL_KEYS = ("model", "sae", "layers", "params")
SIDE_KEYS = ("model_a", "model_b", "sae_a", "sae_b", "layers_a", "layers_b")  # set per pair


@dataclass(frozen=True)
class Rung:
    """One model of the ladder: as ``model_a``, ``sae_a`` and ``layers_a`` of a config."""

    label: str
    model: dict
    sae: dict
    layers: Any
    params: int | None


@dataclass(frozen=True)
class Ladder:
    """The models, smallest first, the pairing rule and the config shared by every pair."""

    name: str
    rungs: tuple[Rung, ...]
    pairing: str
    base: Config

    def pairs(self) -> list[tuple[int, int]]:
        """Indices (i, j), i < j, of the compared models: every pair, or neighbours plus
        every model against the largest (``adjacent``)."""
        n = len(self.rungs)
        if self.pairing == "all":
            return [(i, j) for i in range(n) for j in range(i + 1, n)]
        return sorted({(i, i + 1) for i in range(n - 1)} | {(i, n - 1) for i in range(n - 1)})

    def to_dict(self) -> dict:
        """The ladder as its file would say it, resolved: models, pairing, shared config."""
        return {"name": self.name, "pairs": self.pairing,
                "models": [{"model": r.model, "sae": r.sae, "layers": r.layers,
                            "params": r.params} for r in self.rungs],
                "shared": {k: v for k, v in self.base.to_dict().items()
                           if k not in SIDE_KEYS}}

    def config(self, i: int, j: int) -> Config:
        """The main config comparing model ``i`` (A) with model ``j`` (B)."""
        a, b = self.rungs[i], self.rungs[j]
        return merge_config(self.base, {
            "name": f"{self.name}:{a.label}-vs-{b.label}", "model_a": a.model,
            "model_b": b.model, "sae_a": a.sae, "sae_b": b.sae, "layers_a": a.layers,
            "layers_b": b.layers})


def _rung(i: int, entry: Any, base: Config) -> Rung:
    where = f"ladder.models[{i}]"
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where} must be a mapping with a 'model' source, e.g. "
                          "{model: {source: family, name: tiny-s}}")
    unknown = sorted(set(entry) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {list(MODEL_KEYS)}")
    params = entry.get("params")
    if params is not None and (isinstance(params, bool) or not isinstance(params, int)
                               or params <= 0):
        raise ConfigError(f"{where}.params must be a positive parameter count, got {params!r}")
    try:  # the entry's values checked as model A of a config
        cfg = merge_config(base, {"model_a": entry["model"], "sae_a": entry.get("sae", {}),
                                  "layers_a": entry.get("layers", "all")})
    except ConfigError as err:
        msg = str(err)
        for key in ("model", "sae", "layers"):
            msg = msg.replace(f"{key}_a", key)
        raise ConfigError(f"{where}: {msg}") from None
    model = cfg.to_dict()["model_a"]
    if model["source"] != "family" and params is None:
        raise ConfigError(f"{where}.params is missing: give the parameter count of "
                          f"{model['name'] or model['path']!r} for the trend axes (only the "
                          "built-in family's members are counted here)")
    label = model["name"] or Path(model["path"]).stem
    return Rung(label, model, cfg.to_dict()["sae_a"], plain(cfg.layers_a), params)


def load_ladder(path: str | Path, overrides: dict | None = None) -> Ladder:
    """Read and check a ladder file; ConfigError names the first problem and its fix.

    ``overrides`` (``key.path=value``) apply to the shared config, as ``--set`` does for
    a main config.
    """
    data = read_config(path, what="ladder")
    if not isinstance(data, dict) or not isinstance(data.get("ladder"), dict):
        raise ConfigError(f"ladder file {path} needs a 'ladder' section with 'models' (a list "
                          "of at least 3 models, smallest first) and 'pairs' (all or adjacent)")
    data = dict(data)
    spec, base_name = data.pop("ladder"), data.pop("base", "default")
    unknown = sorted(set(spec) - {"models", "pairs"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in ladder; allowed: ['models', 'pairs']")
    pairing = spec.get("pairs", "all")
    if pairing not in PAIRINGS:
        raise ConfigError(f"ladder.pairs must be one of {list(PAIRINGS)}, got {pairing!r}")
    models = spec.get("models")
    if not isinstance(models, list) or len(models) < 3:
        n = len(models) if isinstance(models, list) else 0
        raise ConfigError(f"ladder.models lists {n} model(s); a ladder needs at least 3, "
                          "smallest first (for two models, run a main config)")
    base = merge_config(load_config(base_name), data).replace(**(overrides or {}))
    rungs = tuple(_rung(i, entry, base) for i, entry in enumerate(models))
    _check_distinct(rungs)
    return Ladder(data.get("name", base.name), rungs, pairing, base)


def _check_distinct(rungs: tuple[Rung, ...]) -> None:
    seen: dict[str, int] = {}
    for i, rung in enumerate(rungs):
        key = repr((sorted(rung.model.items()), sorted(rung.sae.items()), rung.layers))
        if key in seen:
            raise ConfigError(f"ladder.models[{seen[key]}] and ladder.models[{i}] are the same "
                              f"model ({rung.label!r}, same SAEs and layers); remove one")
        seen[key] = i
    labels = [r.label for r in rungs]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"ladder models need distinct names for their runs and plots, got "
                          f"{labels}; set model.name")
