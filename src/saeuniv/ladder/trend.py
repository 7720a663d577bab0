"""What a ladder's pairs say together: each metric's middle-band score per pair, against the
parameter ratio and the smaller model's size, and as a models x models matrix.

The middle-band score of a pair is the mean raw score over its cells whose A and B layers
both sit at relative depth 1/3 to 2/3 (``core.depth.band_mean``); its null is the same mean
of the cells' null means, with the cells' null sd averaged the same way as the band. Raw
scores of pairs of different widths sit at different chance levels, so each row also holds
the band's mean calibrated score (``middle_calibrated``), which can be compared across
pairs.
"""

from __future__ import annotations

import numpy as np

from ..core.depth import band_mean, in_band
from ..report import grids


def pair_rows(pipe, labels: tuple[str, str], params: tuple[int, int]) -> list[dict]:
    """One row per metric of a finished pair: its middle-band score and null."""
    g = grids(pipe)
    depth_a = [pipe.a.depth(layer) for layer in g["layers_a"]]
    depth_b = [pipe.b.depth(layer) for layer in g["layers_b"]]
    middle = np.ix_(in_band(depth_a), in_band(depth_b))
    rows = []
    for name, fields in g["metrics"].items():
        n_cells = int(np.isfinite(fields["observed"][middle]).sum())
        rows.append({
            "model_a": labels[0], "model_b": labels[1], "params_a": params[0],
            "params_b": params[1], "param_ratio": params[1] / params[0], "metric": name,
            "middle_score": band_mean(fields["observed"], depth_a, depth_b),
            "middle_calibrated": band_mean(fields["calibrated"], depth_a, depth_b),
            "null_mean": band_mean(fields["null_mean"], depth_a, depth_b),
            "null_sd": band_mean(fields["null_sd"], depth_a, depth_b),
            "middle_cells": n_cells})
    return rows


def series(rows: list[dict], x: str) -> dict[str, tuple[np.ndarray, ...]]:
    """metric -> (x, score, null_mean, null_sd) over the pairs, for ``plots.trend``."""
    out = {}
    for name in dict.fromkeys(r["metric"] for r in rows):
        mine = [r for r in rows if r["metric"] == name]
        out[name] = tuple(np.array([r[k] for r in mine], dtype=float)
                          for k in (x, "middle_score", "null_mean", "null_sd"))
    return out


def matrix(rows: list[dict], labels: list[str], metric: str) -> np.ndarray:
    """(n_models, n_models) middle-band scores of ``metric``, smaller model as row; NaN
    where a pair was not compared."""
    out = np.full((len(labels), len(labels)), np.nan)
    for r in rows:
        if r["metric"] == metric:
            out[labels.index(r["model_a"]), labels.index(r["model_b"])] = r["middle_score"]
    return out
