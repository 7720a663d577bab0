"""Calibrated scores, grid-wide tests, ceilings and the convergence index."""

import numpy as np
import pytest

from saeuniv.core import metrics
from saeuniv.core.depth import MIDDLE

NAMED = {"svcca": {"k": 40}, "rsa": {}, "cka": {}, "mutual_knn": {}}


def aristotelian(observed, null, alpha, s_max):
    """tau and the calibrated score as Groger, Wen and Brbic define them, computed here
    from numpy's inverted-CDF quantile: the smallest value whose empirical CDF over
    {observed} U null reaches 1 - alpha."""
    tau = np.quantile(np.append(null, observed), 1 - alpha, method="inverted_cdf")
    return tau, min(max((observed - tau) / (s_max - tau), 0.0), 1.0)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.01])
@pytest.mark.parametrize("k", [1, 9, 19, 99, 200])
def test_tau_and_calibrated_equal_the_aristotelian_formula(alpha, k):
    rng = np.random.default_rng(k)
    null = rng.normal(size=k)
    for observed in (null.max() + 0.5, float(np.median(null)), null.min() - 1):
        tau, cal = metrics.calibrate(observed, null, alpha, s_max=4.0)
        want_tau, want_cal = aristotelian(observed, null, alpha, 4.0)
        assert tau == pytest.approx(want_tau, abs=0)
        assert cal == pytest.approx(want_cal, abs=1e-15)


def test_tau_in_a_closed_case():
    null = np.arange(99.0)  # K = 99: tau is the 95th smallest of the 100 values
    tau, cal = metrics.calibrate(200.0, null, 0.05, s_max=300.0)
    assert tau == 94.0
    assert cal == pytest.approx((200 - 94) / (300 - 94))
    assert metrics.calibrate(50.0, null, 0.05)[1] == 0.0  # below tau: 0
    assert metrics.calibrate(0.5, np.zeros(9), 0.05, s_max=1.0) == (0.5, 0.0)  # observed is tau
    # with K < 1/alpha - 1 draws the observed score is always tau: calibrated is 0
    assert metrics.calibrate(2.0, np.zeros(9), 0.05, s_max=1.0) == (2.0, 0.0)
    assert metrics.calibrate(2.0, np.zeros(99), 0.05, s_max=1.0) == (0.0, 1.0)  # clamped
    assert metrics.calibrate(0.5, np.full(9, 2.0), 0.05, s_max=1.0)[1] == 0.0  # tau >= s_max


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), "0.05", True])
def test_permutation_null_refuses_a_bad_alpha(bad):
    A = np.random.default_rng(0).normal(size=(20, 5))
    with pytest.raises(ValueError, match="alpha"):
        metrics.permutation_null("cka", A, A, n_perm=5, alpha=bad)


@pytest.mark.parametrize("name", list(NAMED))
def test_permutation_null_carries_its_own_calibration(name):
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(120, 30)), rng.normal(size=(120, 40))
    B[:, :30] += A  # shared structure: above chance
    kw = {"k": 10} if name == "svcca" else {}
    r = metrics.permutation_null(name, A, B, n_perm=99, seed=3, alpha=0.1, **kw)
    assert (r.tau, r.calibrated) == metrics.calibrate(r.observed, r.null, 0.1)
    assert r.calibrated > 0


def test_unrelated_wide_inputs_calibrate_to_zero():
    """d much larger than n: raw CKA and SVCCA are high for any two sets, yet the
    calibrated score is 0 in 95% of seeds, for every metric. 95% is the test's own level
    (an exact permutation test puts a share alpha = 0.05 of unrelated pairs above tau), so
    the share of non-zero scores is held to 0.05 within binomial noise: three standard
    errors per metric, two for the four metrics pooled."""
    n, seeds = 100, range(200)
    raw = {name: [] for name in NAMED}
    zero = dict.fromkeys(NAMED, 0)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        A, B = rng.normal(size=(n, 300)), rng.normal(size=(n, 500))
        for name, kw in NAMED.items():
            r = metrics.permutation_null(name, A, B, n_perm=99, seed=seed, **kw)
            raw[name].append(r.observed)
            zero[name] += r.calibrated == 0
    assert np.mean(raw["cka"]) > 0.7 and np.mean(raw["svcca"]) > 0.5
    se = np.sqrt(0.05 * 0.95 / len(seeds))
    for name in NAMED:
        assert 1 - zero[name] / len(seeds) <= 0.05 + 3 * se, (name, zero[name])
    pooled = 1 - sum(zero.values()) / (len(seeds) * len(NAMED))
    assert pooled <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / (len(seeds) * len(NAMED))), zero


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_planted_shared_fraction_gives_the_convergence_index(fraction):
    """B shares a fraction of A's variance through a rotation: linear CKA is close to that
    fraction, the ceiling (A against a rotated copy of itself) is close to 1 and the floor
    (unrelated sides) is 0 after calibration, so the index recovers the fraction."""
    rng = np.random.default_rng(int(fraction * 100))
    n, d = 3000, 16
    A = rng.normal(size=(n, d))
    R = np.linalg.qr(rng.normal(size=(d, d)))[0]
    B = np.sqrt(fraction) * A @ R + np.sqrt(1 - fraction) * rng.normal(size=(n, d))
    twin = A @ R + 0.01 * rng.normal(size=(n, d))
    unrelated = rng.normal(size=(n, d))
    cal = {k: metrics.permutation_null("cka", A, X, n_perm=199, seed=0).calibrated
           for k, X in (("observed", B), ("ceiling", twin), ("floor", unrelated))}
    assert cal["observed"] > 0 and cal["floor"] == 0
    index = metrics.convergence_index(cal["observed"], cal["floor"], cal["ceiling"])
    assert index == pytest.approx(fraction, abs=0.05)


def test_convergence_index_and_pair_ceiling_closed_forms():
    assert metrics.convergence_index(0.3, 0.1, 0.5) == pytest.approx(0.5)
    assert metrics.convergence_index(0.05, 0.1, 0.5) == pytest.approx(-0.125)
    assert np.isnan(metrics.convergence_index(0.3, 0.5, 0.5))
    got = metrics.convergence_index(np.array([0.2, 0.4]), 0.0, np.array([0.4, 0.0]))
    assert got[0] == pytest.approx(0.5) and np.isnan(got[1])
    assert metrics.pair_ceiling(0.36, 0.64) == pytest.approx(0.48)
    assert metrics.pair_ceiling(-0.1, 0.5) == 0.0


def test_half_sample_interval_has_the_spread_of_the_whole_sample():
    """For a mean, halves drawn without replacement vary as the full sample's mean does:
    sd sigma / sqrt(n), so the 95% interval is about +-1.96 sigma / sqrt(n)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    picks = np.stack([rng.choice(400, 200, replace=False) for _ in range(4000)])
    lo, hi = metrics.half_sample_interval(x.mean(), x[picks].mean(axis=1))
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std() / 20, rel=0.1)
    assert lo < x.mean() < hi
    with pytest.raises(ValueError, match="halves"):
        metrics.half_sample_interval(0.1, [0.2])


# -- grid-wide tests -------------------------------------------------------------------------

DEPTH_A = (np.arange(6) + 1) / 6
DEPTH_B = (np.arange(8) + 1) / 8


def calibrated_grid(raw, null, alpha=0.05):
    """Each cell calibrated against its own null, and the null draws on the same scale."""
    cal, cal_null = np.empty(raw.shape), np.empty(null.shape)
    for i, j in np.ndindex(raw.shape):
        tau, cal[i, j] = metrics.calibrate(raw[i, j], null[:, i, j], alpha)
        cal_null[:, i, j] = metrics.calibrate_scores(null[:, i, j], tau)
    return cal, cal_null


def flat_grid(seed, level=0.0, planted=0.0, k=199):
    """Raw scores of a 6 x 8 grid: every cell's observed score and its k null draws share
    one distribution, shifted by ``level`` (all cells) and ``planted`` (middle cells)."""
    rng = np.random.default_rng(seed)
    null = 0.2 + 0.05 * rng.normal(size=(k, 6, 8))
    raw = 0.2 + level + 0.05 * rng.normal(size=(6, 8))
    raw += planted * metrics.contrast_cells(DEPTH_A, DEPTH_B, MIDDLE, "middle")
    return calibrated_grid(raw, null)


@pytest.mark.parametrize("kind", ["middle", "diagonal"])
def test_contrast_p_is_uniform_on_grids_at_chance(kind):
    ps = [metrics.depth_contrast(*flat_grid(seed), DEPTH_A, DEPTH_B, kind=kind,
                                 n_relabel=199, seed=seed) for seed in range(300)]
    assert 0.02 <= np.mean([r.p < 0.05 for r in ps]) <= 0.09
    # most calibrated cells are 0 at chance: reorderings tie, and p_layers is conservative
    assert np.mean([r.p_layers < 0.05 for r in ps]) <= 0.09


@pytest.mark.parametrize("kind", ["middle", "diagonal"])
def test_layers_p_is_uniform_when_every_cell_is_above_chance(kind):
    """Every cell far above chance, no depth effect: the contrast against the null grids
    is 'significant' about half the time (the region differs by noise and every null is
    at chance), which is why "this region agrees most" also needs p_layers."""
    ps = [metrics.depth_contrast(*flat_grid(seed, level=0.3), DEPTH_A, DEPTH_B, kind=kind,
                                 n_relabel=199, seed=seed) for seed in range(300)]
    assert 0.02 <= np.mean([r.p_layers < 0.05 for r in ps]) <= 0.09
    assert np.mean([r.p < 0.05 for r in ps]) > 0.3


@pytest.mark.parametrize("level", [0.0, 0.3])
def test_a_planted_middle_band_is_detected(level):
    hits = [metrics.depth_contrast(*flat_grid(seed, level, planted=0.15), DEPTH_A, DEPTH_B,
                                   n_relabel=199, seed=seed) for seed in range(20)]
    assert all(r.p < 0.05 and r.p_layers < 0.05 and r.statistic > 0 for r in hits)


def test_max_cell_is_family_wise():
    """The best of 48 cells at chance beats a single cell's 5% level far more often than
    5%, but its family-wise p does not."""
    below, single = [], []
    for seed in range(300):
        cal, null = flat_grid(seed)
        below.append(metrics.max_cell(cal, null).p < 0.05)
        single.append(cal.max() > 0)
    assert 0.02 <= np.mean(below) <= 0.09
    assert np.mean(single) > 0.5


def test_contrast_statistic_by_hand_and_nan_cells_left_out():
    obs = np.arange(48, dtype=float).reshape(6, 8)[::-1] / 48
    null = np.zeros((5, 6, 8))
    inside = metrics.contrast_cells(DEPTH_A, DEPTH_B, MIDDLE, "middle")
    obs[inside] += 1
    # A depths 2/6, 3/6, 4/6 and B depths 3/8 .. 5/8 lie in the band
    assert inside.sum() == 9 and inside[1:4, 2:5].all()
    obs[0, 0] = np.nan
    r = metrics.depth_contrast(obs, null, DEPTH_A, DEPTH_B, n_relabel=10)
    want = obs[inside].mean() - np.nanmean(obs[~inside])
    assert r.statistic == pytest.approx(want)
    assert r.null_mean == 0 and r.p == pytest.approx(1 / 6)
    diag = metrics.contrast_cells([0.5, 1.0], [0.25, 0.5, 0.75, 1.0], kind="diagonal")
    assert diag.tolist() == [[True, True, True, False], [False, False, True, True]]


def test_max_cell_statistic_and_null():
    obs = np.array([[0.1, np.nan], [0.3, 0.2]])
    null = np.array([[[0.0, 9.0], [0.1, 0.4]], [[0.5, 9.0], [0.0, 0.0]]])
    r = metrics.max_cell(obs, null)
    assert r.statistic == 0.3 and r.null.tolist() == [0.4, 0.5] and r.p == 1.0


@pytest.mark.parametrize("args,match", [
    ((np.zeros(3), np.zeros((2, 3))), "observed must be"),
    ((np.zeros((2, 3)), np.zeros((2, 3, 2))), "null must be"),
    ((np.full((2, 3), np.nan), np.zeros((2, 2, 3))), "no cell"),
])
def test_grid_tests_refuse_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.max_cell(*args)


def test_depth_contrast_refuses_bad_depths_and_empty_sides():
    obs, null = np.zeros((2, 2)), np.zeros((3, 2, 2))
    with pytest.raises(ValueError, match=r"depth_a must be .* \(0, 1\]"):
        metrics.depth_contrast(obs, null, [0.0, 0.5], [0.5, 1.0])
    with pytest.raises(ValueError, match="no scored cell inside"):
        metrics.depth_contrast(obs, null, [0.9, 1.0], [0.5, 1.0])
    with pytest.raises(ValueError, match="kind"):
        metrics.depth_contrast(obs, null, [0.5, 1.0], [0.5, 1.0], kind="corner")
    with pytest.raises(ValueError, match="one depth per layer"):
        metrics.depth_contrast(np.zeros((3, 2)), np.zeros((1, 3, 2)), [0.5, 1.0],
                               [0.5, 1.0])
