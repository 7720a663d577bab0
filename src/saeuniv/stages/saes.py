"""The ``saes`` stage: train or fetch every SAE, check it against its model, and measure it
on a few hundred analysis tokens before the long extraction.

Logged per side, step = layer: ``sae_d_sae_<side>``, ``sae_preflight_fvu_<side>`` and
``sae_preflight_l0_<side>``; the tag ``saeuniv.sae.<side><layer>`` (the SAE's store key);
and ``saeuniv.warning.sae_<side><layer>`` with a log line for an SAE that reconstructs
badly (FVU above ``BAD_FVU``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import torch

from ..models import NONFINITE_FIX, check_finite
from ..saes import Quality, quality
from ..tracking import warn

PREFLIGHT_TOKENS = 256
BAD_FVU = 0.5  # an SAE that leaves more than half the variance unexplained is suspect


def run(pipe) -> None:
    for side in pipe.sides:
        for layer in side.used_layers:
            sae = side.saes[layer]
            mlflow.log_metric(f"sae_d_sae_{side.name}", sae.cfg.d_sae, step=layer)
            mlflow.set_tag(f"saeuniv.sae.{side.name}{layer}", side.sae_keys[layer])
        for layer, q in preflight(pipe, side).items():
            mlflow.log_metrics({f"sae_preflight_fvu_{side.name}": q.fvu,
                                f"sae_preflight_l0_{side.name}": q.l0}, step=layer)
            if q.fvu > BAD_FVU:
                warn(f"sae_{side.name}{layer}", bad_fvu_message(side.name, layer, q))


def bad_fvu_message(name: str, layer: int, q: Quality) -> str:
    return (f"SAE {name} layer {layer} reconstructs badly on {q.n_tokens} tokens: "
            f"FVU {q.fvu:.2f}, variance explained {1 - q.fvu:.2f}"
            + (" (NEGATIVE: worse than predicting the mean)" if q.fvu > 1 else "")
            + "; check that the SAE belongs to this model, layer and dtype")


def preflight(pipe, side, n_tokens: int = PREFLIGHT_TOKENS) -> dict[int, Quality]:
    """SAE quality (L0, FVU, dead fraction) per layer on the side's first analysis tokens,
    cached in the store so a warm run loads no model."""
    layers = side.used_layers
    spec = {"model": side.model_key, "windows": pipe.up.windows_entry.key,
            "side": side.windows_side,
            "saes": {str(layer): side.sae_keys[layer] for layer in layers}, "n_tokens": n_tokens}

    @torch.no_grad()
    def build(out: Path) -> dict:
        win = side.windows
        rows = int(np.searchsorted(np.cumsum(win.mask.sum(1)), n_tokens)) + 1
        model = side.model
        res = model.residuals(torch.as_tensor(win.tokens[:rows], dtype=torch.long), layers)
        keep = torch.as_tensor(win.mask[:rows]).to(model.device)
        result = {}
        for layer in layers:
            acts = res[layer][keep].float()
            check_finite(acts, f"model {side.label} layer {layer}: activations on the first "
                         f"{n_tokens} analysis tokens", NONFINITE_FIX)
            sae = side.saes[layer].to(model.device)
            result[str(layer)] = asdict(quality(sae, acts))
            sae.to("cpu")
        return result

    entry, _ = pipe.store.get_or_create("preflight", spec, build)
    return {int(layer): Quality(**q) for layer, q in entry.meta.items()}
