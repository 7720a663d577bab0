"""Objectives over stored scores: the mean over the selected layer pairs that have a
score, and a TrialError when none has one."""

from __future__ import annotations

import pytest

from saeuniv.sweep import Objective, TrialError, objective_value, selected_pairs


class Side:
    def __init__(self, n_layers):
        self.layers = list(range(n_layers))
        self.n_layers = n_layers

    def depth(self, layer):
        return (layer + 1) / self.n_layers


class ThreeByTwo:
    """Layer pairs of a 3-layer A against a 2-layer B (what objectives read of a
    pipeline)."""

    a, b = Side(3), Side(2)
    pairs = [(la, lb) for la in range(3) for lb in range(2)]


def _scores(n_pairs, rsa_z):
    if rsa_z is None:
        return {"scores": {"n_pairs": n_pairs, "status": "too few pairs (2 < 5)",
                           "metrics": {}}}
    return {"scores": {"n_pairs": n_pairs, "status": "ok",
                       "metrics": {"rsa": {"observed": rsa_z / 10, "z": rsa_z}}}}


def test_objective_is_the_mean_over_the_selected_pairs_with_a_score():
    pipe = ThreeByTwo()
    middle = Objective("m", "rsa", "z", "middle")
    # depth 1/3 and 2/3: both edges of the band
    assert selected_pairs(pipe, middle) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    scored = {(0, 0): _scores(10, 2.0), (0, 1): _scores(2, None),
              (1, 0): _scores(20, 4.0), (1, 1): _scores(30, float("nan")),
              (2, 0): _scores(40, 9.0), (2, 1): _scores(50, 9.0)}
    # a pair with no score is skipped
    assert objective_value(middle, pipe, scored) == pytest.approx(3.0)
    assert objective_value(Objective("a", "rsa", "observed", "all"), pipe, scored) == \
        pytest.approx((0.2 + 0.4 + 0.9 + 0.9) / 4)
    n_pairs = Objective("n", "n_pairs", layers="middle")
    assert objective_value(n_pairs, pipe, scored) == pytest.approx(15.5)
    empty = {pair: _scores(2, None) for pair in pipe.pairs}
    with pytest.raises(TrialError, match=r"objective 'm': no middle layer pair has a "
                       r"rsa z score at these settings \(too few pairs \(2 < 5\)\)"):
        objective_value(middle, pipe, empty)
