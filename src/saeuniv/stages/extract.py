"""The ``extract`` stage: run both models over the analysis windows and store each layer's
SAE codes (``saeuniv.extract`` does the work, shard by shard), then log their quality.

Logged: ``n_tokens`` (compared positions), and per side, step = layer, ``sae_l0_<side>``,
``sae_fvu_<side>`` and ``sae_dead_<side>`` on the analysis tokens; the tag
``saeuniv.windows``; ``saeuniv.warning.dead_<side><layer>`` for an SAE whose features are
all dead on these tokens, and ``saeuniv.warning.fvu_<side><layer>`` for one that leaves
more than ``BAD_FVU`` of their variance unexplained (the preflight sees only a few hundred
tokens; a model whose stream holds rare huge activations can pass it and fail here).
"""

from __future__ import annotations

import mlflow

from ..tracking import warn
from .saes import BAD_FVU


def cell(pipe, side: str, *layers: int) -> None:
    """Build the codes of one block of one side's layers (``saeuniv.tasks``)."""
    pipe.side(side).extract(list(layers))


def run(pipe) -> None:
    for side, layer, q in log_quality(pipe):
        if q["dead_fraction"] >= 1:
            warn(f"dead_{side}{layer}", f"every feature of SAE {side} layer {layer} is dead on "
                 f"the {q['n_tokens']} analysis tokens (all codes are zero): none of this "
                 "layer's features can be matched; check that the SAE belongs to this model, "
                 "layer and dtype")
        elif q["fvu"] > BAD_FVU:
            warn(f"fvu_{side}{layer}", f"SAE {side} layer {layer} reconstructs badly on the "
                 f"{q['n_tokens']} analysis tokens: FVU {q['fvu']:.2f} (variance explained "
                 f"{1 - q['fvu']:.2f}); its features, and the scores of its layer pairs, are "
                 "unreliable")


def log_quality(pipe) -> list[tuple[str, int, dict]]:
    """Log the token count and each layer's SAE quality on the analysis tokens (L0, FVU,
    dead fraction; step = layer); returns (side, layer, quality) for every layer."""
    windows = pipe.up.windows_entry
    mlflow.log_metric("n_tokens", windows.meta["n_valid_tokens"])
    mlflow.set_tag("saeuniv.windows", windows.key)
    out = []
    for side in pipe.sides:
        for layer, entry in side.codes.items():
            q = entry.meta["quality"]
            mlflow.log_metrics({f"sae_l0_{side.name}": q["l0"], f"sae_fvu_{side.name}": q["fvu"],
                                f"sae_dead_{side.name}": q["dead_fraction"]}, step=layer)
            out.append((side.name, layer, q))
    return out
