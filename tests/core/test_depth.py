"""Relative depth, the nearest layer of another model and the middle band."""

from __future__ import annotations

import numpy as np
import pytest

from saeuniv.core.depth import (
    MIDDLE,
    band_mean,
    depth_pairs,
    in_band,
    in_middle,
    nearest_layer,
    relative_depth,
)


def test_relative_depth_is_the_output_of_the_block_over_the_block_count():
    assert relative_depth(0, 4) == 0.25
    assert relative_depth(3, 4) == 1.0
    assert relative_depth(12, 26) == 13 / 26


@pytest.mark.parametrize("layer, n", [(-1, 4), (4, 4), (0, 0)])
def test_a_layer_outside_the_model_is_refused(layer, n):
    with pytest.raises(ValueError, match=f"layer {layer} is outside a model of {n} layers"):
        relative_depth(layer, n)


def test_nearest_layer_by_brute_force_on_the_papers_two_depths():
    """Gemma-2-2B (26 blocks) against Gemma-2-9B (42): each 2B layer's nearest 9B layer is
    the one minimising |(lb + 1) / 42 - (la + 1) / 26|, the first one on ties."""
    for la in range(26):
        gaps = [abs((lb + 1) / 42 - (la + 1) / 26) for lb in range(42)]
        assert nearest_layer(relative_depth(la, 26), range(42), 42) == gaps.index(min(gaps))


def test_nearest_layer_takes_the_first_listed_on_a_tie_and_only_listed_layers():
    # depth 0.5 lies exactly between layers 0 (0.25) and 2 (0.75) of a 4-block model
    assert nearest_layer(0.5, [0, 2], 4) == 0
    assert nearest_layer(0.5, [2, 0], 4) == 2
    assert nearest_layer(1.0, [0, 1], 4) == 1  # layer 3 is not a candidate
    with pytest.raises(ValueError, match="at least one candidate"):
        nearest_layer(0.5, [], 4)


def test_depth_pairs_give_each_a_layer_its_nearest_b_layer():
    assert depth_pairs([0, 1, 2], 3, [0, 1, 2, 3, 4, 5], 6) == [(0, 1), (1, 3), (2, 5)]
    assert depth_pairs([0, 2], 3, [0, 4], 6) == [(0, 0), (2, 4)]


def test_the_middle_band_holds_its_edges_and_nothing_outside():
    lo, hi = MIDDLE
    assert in_middle(lo) and in_middle(hi) and in_middle(0.5)
    assert in_middle(2 / 6) and in_middle(4 / 6)  # 1/3 and 2/3 reached by another division
    assert not in_middle(lo - 1e-6) and not in_middle(hi + 1e-6)
    assert in_middle(lo - 1e-9) and in_middle(hi + 1e-9)  # rounding at an edge is inside
    assert [la for la in range(6) if in_middle(relative_depth(la, 6))] == [1, 2, 3]


def test_band_mean_averages_the_cells_whose_two_depths_are_in_the_band():
    depth_a = [1 / 4, 2 / 4, 3 / 4, 1.0]          # in the middle band: 0.5 only
    depth_b = [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]  # 1/3, 1/2, 2/3 (edges included)
    values = np.arange(24, dtype=float).reshape(4, 6)
    assert band_mean(values, depth_a, depth_b) == np.mean([7.0, 8.0, 9.0])
    # an independent computation: loop over the cells
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 6))
    values[1, 2] = np.nan  # not scored: left out
    kept = [values[i, j] for i, da in enumerate(depth_a) for j, db in enumerate(depth_b)
            if 1 / 3 - 1e-12 <= da <= 2 / 3 + 1e-12 and 1 / 3 - 1e-12 <= db <= 2 / 3 + 1e-12
            and np.isfinite(values[i, j])]
    assert band_mean(values, depth_a, depth_b) == pytest.approx(np.mean(kept), abs=1e-15)
    assert band_mean(values, depth_a, depth_b, band=(0.0, 1.0)) == pytest.approx(
        np.nanmean(values))


def test_band_mean_is_nan_without_a_scored_cell_and_checks_its_input():
    assert np.isnan(band_mean(np.ones((2, 2)), [0.9, 1.0], [0.5, 1.0]))
    assert np.isnan(band_mean(np.full((1, 1), np.nan), [0.5], [0.5]))
    with pytest.raises(ValueError, match=r"shape \(2, 2\) but there are 3 A and 2 B depths"):
        band_mean(np.ones((2, 2)), [0.1, 0.5, 1.0], [0.5, 1.0])
    with pytest.raises(ValueError, match="band"):
        in_band([0.5], band=(0.7, 0.3))
    assert in_band([1 / 3, 2 / 3, 0.3, 0.7]).tolist() == [True, True, False, False]
