"""Relative depth: where a layer sits in its model, and which layers of two models face each
other.

Layer ``L`` of a model with ``N`` blocks is the output of block ``L``, at relative depth
``(L + 1) / N`` (1 for the last block). Two models of different depths are compared layer by
layer at the nearest relative depth; the middle layers are those at relative depth 1/3 to
2/3. Pure core: numbers in, numbers out.
"""

from __future__ import annotations

import numpy as np

MIDDLE = (1 / 3, 2 / 3)  # the middle band of relative depth, both ends included
_EDGE = 1e-9  # a depth on an edge of the band within rounding counts as inside


def relative_depth(layer: int, n_layers: int) -> float:
    """Relative depth ``(layer + 1) / n_layers`` of block ``layer`` of ``n_layers``."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside a model of {n_layers} layers "
                         f"(valid: 0..{n_layers - 1})")
    return (layer + 1) / n_layers


def nearest_layer(depth: float, layers, n_layers: int) -> int:
    """The layer of ``layers`` (of a model with ``n_layers``) whose relative depth is nearest
    to ``depth``; the first one listed on ties."""
    layers = list(layers)
    if not layers:
        raise ValueError("nearest_layer needs at least one candidate layer")
    gaps = [abs(relative_depth(layer, n_layers) - depth) for layer in layers]
    return layers[int(np.argmin(gaps))]


def depth_pairs(layers_a, n_layers_a: int, layers_b, n_layers_b: int) -> list[tuple[int, int]]:
    """Each A layer with the B layer at the nearest relative depth."""
    return [(la, nearest_layer(relative_depth(la, n_layers_a), layers_b, n_layers_b))
            for la in layers_a]


def in_middle(depth: float) -> bool:
    """Whether a relative depth lies in the middle band ``MIDDLE`` (1/3 to 2/3)."""
    return bool(in_band([depth])[0])


def band_mean(values: np.ndarray, depth_a, depth_b, band: tuple[float, float] = MIDDLE) -> float:
    """Mean of a layer-pair grid over the cells whose A and B relative depths both lie in
    ``band`` (ends included).

    Parameters
    ----------
    values : ndarray of shape (n_a, n_b)
        One value per (A layer, B layer) cell; NaN cells (not scored) are left out.
    depth_a : array-like of shape (n_a,)
        Relative depth of each A layer, in (0, 1].
    depth_b : array-like of shape (n_b,)
        Relative depth of each B layer, in (0, 1].
    band : (float, float), default=MIDDLE
        Lower and upper relative depth of the band.

    Returns
    -------
    mean : float
        NaN when no scored cell lies in the band.
    """
    values = np.asarray(values, dtype=float)
    depth_a, depth_b = np.asarray(depth_a, dtype=float), np.asarray(depth_b, dtype=float)
    if values.shape != (len(depth_a), len(depth_b)):
        raise ValueError(f"values has shape {values.shape} but there are {len(depth_a)} A and "
                         f"{len(depth_b)} B depths; give one value per (A layer, B layer)")
    cells = values[np.ix_(in_band(depth_a, band), in_band(depth_b, band))]
    cells = cells[np.isfinite(cells)]
    return float(cells.mean()) if cells.size else float("nan")


def in_band(depths, band: tuple[float, float] = MIDDLE) -> np.ndarray:
    """Whether each relative depth of ``depths`` (shape (n,)) lies in ``band`` (ends
    included, within rounding); boolean array of shape (n,)."""
    lo, hi = band
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"band {band} must be (lo, hi) with 0 <= lo <= hi <= 1")
    depths = np.asarray(depths, dtype=float)
    return (depths >= lo - _EDGE) & (depths <= hi + _EDGE)
