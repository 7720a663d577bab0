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
    lo, hi = MIDDLE
    return lo - _EDGE <= depth <= hi + _EDGE
