"""The controls a cross-model score is read against, as configs of the same pipeline.

- the **ceiling** of side A (or B): the model against itself, its SAEs against twin SAEs
  of the same layers (trained with the next seed, or a configured pretrained variant),
  each layer with itself (``pairs: depth``);
- the **floor**: A against a randomly initialised model of B's architecture, with SAEs
  trained here, on the same layer pairs.

Each is an ordinary config, so its models, SAEs, codes, matches and scores are built and
reused through the content-keyed store like every other artefact.
"""

from __future__ import annotations

from dataclasses import asdict

from .config import Config, SAERef
from .config.loading import from_dict


def twin_config(cfg: Config, side: str, layers: list[int]) -> Config | None:
    """Side ``side``'s model against itself at ``layers``, its SAEs against their twins
    (None when the side's pretrained SAEs have no ``twin`` configured)."""
    ref, sae = getattr(cfg, f"model_{side}"), getattr(cfg, f"sae_{side}")
    twin = sae.twin_ref()
    if twin is None:
        return None
    data = cfg.to_dict()
    data.update(name=f"{cfg.name}:ceiling-{side}", model_a=asdict(ref), model_b=asdict(ref),
                sae_a=asdict(sae), sae_b=asdict(twin), layers_a=list(layers),
                layers_b=list(layers), pairs="depth")
    return from_dict(data)


def floor_config(cfg: Config) -> Config:
    """A against a randomly initialised model of B's architecture (SAEs trained here)."""
    data = cfg.to_dict()
    data.update(name=f"{cfg.name}:control", model_b={**asdict(cfg.model_b), "init": "random"},
                sae_b=asdict(SAERef()))
    return from_dict(data)
