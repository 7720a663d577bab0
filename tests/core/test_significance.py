"""The Benjamini-Hochberg correction and the both-nulls rule, against their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from saeuniv.core.significance import ALPHA, fdr_bh, significant_against_both


def test_fdr_bh_matches_the_step_up_rule():
    q = fdr_bh([0.01, 0.04, 0.03, 0.2])
    assert q == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20) ** 3
    n = p.size
    ranked = np.sort(p)
    brute = [min(min(ranked[j] * n / (j + 1) for j in range(i, n)), 1.0)
             for i in range(n)]
    assert fdr_bh(p) == pytest.approx(np.asarray(brute)[np.argsort(np.argsort(p))])


def test_fdr_bh_refuses_what_is_not_a_p_value():
    for bad in ([0.5, np.nan], [1.5], [-0.1]):
        with pytest.raises(ValueError, match="finite and in \\[0, 1\\]"):
            fdr_bh(bad)
    with pytest.raises(ValueError, match="1-D"):
        fdr_bh([[0.1, 0.2]])
    assert fdr_bh([]).size == 0


def test_fdr_bh_controls_the_rate_by_definition():
    """Rejecting where q < alpha is the step-up procedure: the largest k with
    p_(k) <= k alpha / n, and every p-value up to it."""
    for p in itertools.product([0.001, 0.01, 0.02, 0.04, 0.3], repeat=3):
        p = np.asarray(p)
        order = np.sort(p)
        k = max((i + 1 for i in range(p.size) if order[i] <= (i + 1) * ALPHA / p.size),
                default=0)
        expected = p <= order[k - 1] if k else np.zeros(p.size, bool)
        assert np.array_equal(fdr_bh(p) <= ALPHA, expected), p


def test_a_cell_is_significant_only_when_both_nulls_reject_it():
    p_shuffle = [0.001, 0.001, 0.5, 0.5]
    p_random = [0.001, 0.5, 0.001, 0.5]
    q_s, q_r, sig = significant_against_both(p_shuffle, p_random)
    assert np.array_equal(q_s, fdr_bh(p_shuffle)) and np.array_equal(q_r, fdr_bh(p_random))
    assert sig.tolist() == [True, False, False, False]
    assert significant_against_both([0.04], [0.04], alpha=0.05)[2].tolist() == [True]
    assert significant_against_both([0.04], [0.04], alpha=0.01)[2].tolist() == [False]


def test_the_both_nulls_rule_refuses_mismatched_families_and_bad_alpha():
    with pytest.raises(ValueError, match="differ in length"):
        significant_against_both([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="alpha must be in"):
        significant_against_both([0.1], [0.1], alpha=0)


def test_the_ends_of_the_p_value_range_are_p_values():
    q = fdr_bh([0, 1, 0.5])
    assert q.dtype == np.float64 and q.tolist() == [0.0, 1.0, 0.75]
    assert fdr_bh(np.array([1, 0])).tolist() == [1.0, 0.0]  # integers read as p-values
    assert (fdr_bh(np.linspace(0, 1, 11)) <= 1).all()


def test_a_q_value_equal_to_alpha_is_not_significant():
    # q = 0.05 exactly against alpha = 0.05: the rule is q < alpha, on each null
    assert significant_against_both([0.05], [0.01], alpha=0.05)[2].tolist() == [False]
    assert significant_against_both([0.01], [0.05], alpha=0.05)[2].tolist() == [False]
    assert significant_against_both([0.0499], [0.0499], alpha=0.05)[2].tolist() == [True]
    for bad in (1, 1.5, -0.1):
        with pytest.raises(ValueError, match="alpha must be in"):
            significant_against_both([0.1], [0.1], alpha=bad)
