"""Tests for saeuniv.core.metrics: invariances, known nulls, independent cross-checks,
the published SVCCA k-selection bug, exact fast permutation nulls, input validation,
the metric registry and the random-subset null."""

import dataclasses
import inspect
import itertools
import re

import numpy as np
import pytest
from scipy import linalg, stats
from scipy.spatial.distance import pdist, squareform

from saeuniv.core import metrics
from saeuniv.core.metrics.representational import float_keys

try:
    from threadpoolctl import threadpool_limits
except (
    ImportError
):  # scikit-learn's dependency; without it BLAS keeps its default threads
    threadpool_limits = None

NAMED = ("svcca", "pwcca", "rsa", "cka", "mutual_knn", "procrustes")


@pytest.fixture(autouse=True, scope="module")
def single_blas_thread():
    """One BLAS thread: these matrices are small, and on a shared 2-core machine
    multithreaded OpenBLAS LAPACK calls can run 50x slower than single-threaded ones."""
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(1):
        yield


def gaussian(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d))


def rotation(d_in, d_out, seed):
    """A (d_in, d_out) matrix with orthonormal rows: rotates, embeds into d_out dims."""
    q, _ = np.linalg.qr(gaussian(d_out, d_in, seed))
    return q.T


def upper(S):
    return S[np.triu_indices(S.shape[0], 1)]


# ----------------------------------------------------------------------------
# identity and invariances


IDENTITY_CASES = [
    (metrics.svcca, {}),
    (metrics.svcca, {"k": 5}),
    (metrics.pwcca, {}),
    (metrics.cka, {}),
    (metrics.cka, {"debiased": True}),
    (metrics.procrustes, {}),
    (metrics.mutual_knn, {"k": 5}),
    *[
        (metrics.rsa, {"inner": inner, "outer": outer})
        for inner, outer in itertools.product(
            metrics.INNER_SIMILARITIES, metrics.OUTER_CORRELATIONS
        )
    ],
]


@pytest.mark.parametrize("metric, kwargs", IDENTITY_CASES)
def test_identical_inputs_score_one(metric, kwargs):
    A = gaussian(60, 12, 0)
    assert metric(A, A.copy(), **kwargs) == pytest.approx(1.0, abs=1e-9)


INVARIANT_CASES = [
    (metrics.svcca, {}),
    (metrics.cka, {}),
    (metrics.cka, {"debiased": True}),
    (metrics.mutual_knn, {"k": 5}),
    (metrics.procrustes, {}),
    (metrics.rsa, {"inner": "cosine"}),
    (metrics.rsa, {"inner": "cosine", "outer": "pearson"}),
]


@pytest.mark.parametrize("metric, kwargs", INVARIANT_CASES)
def test_rotation_and_isotropic_scaling_keep_score_at_one(metric, kwargs):
    # B = 2.5 * A rotated and embedded in a wider space (d_b = 20 > d_a = 12);
    # tolerance 1e-6
    A = gaussian(80, 12, 1)
    B = 2.5 * A @ rotation(12, 20, 2)
    assert metric(A, B, **kwargs) == pytest.approx(1.0, abs=1e-6)


def test_rotation_does_not_keep_correlation_rsa_at_one():
    # row-centring is not rotation invariant: guards against inner options being ignored
    A = gaussian(80, 12, 1)
    assert metrics.rsa(A, A @ rotation(12, 12, 2), inner="correlation") < 0.99


def test_pwcca_is_asymmetric_and_svcca_symmetric():
    A = gaussian(200, 10, 3)
    B = np.hstack([A[:, :3] * [5, 1, 0.2], gaussian(200, 15, 4)])
    assert metrics.pwcca(A, B) != pytest.approx(metrics.pwcca(B, A), abs=1e-3)
    assert metrics.svcca(A, B) == pytest.approx(metrics.svcca(B, A), abs=1e-12)


def test_constant_column_does_not_change_scores():
    A, B = gaussian(100, 8, 5), gaussian(100, 9, 6)
    A_const = np.hstack([A, np.full((100, 1), 7.0)])
    for metric in (metrics.svcca, metrics.cka, metrics.procrustes):
        assert metric(A_const, B) == pytest.approx(metric(A, B), abs=1e-10)


# ----------------------------------------------------------------------------
# known values for independent inputs


def test_rsa_of_independent_inputs_is_near_zero():
    n = 200
    A, B = gaussian(n, 40, 7), gaussian(n, 60, 8)
    n_pairs = n * (n - 1) / 2
    for outer in ("spearman", "pearson"):
        assert abs(metrics.rsa(A, B, inner="cosine", outer=outer)) < 4 / np.sqrt(
            n_pairs
        )


def test_cka_of_independent_inputs_matches_its_expectation():
    # E||A^T B||^2 / sqrt(E||A^T A||^2 E||B^T B||^2)
    #     = sqrt(da db / ((n + da + 1)(n + db + 1)))
    n, d_a, d_b = 500, 20, 30
    A, B = gaussian(n, d_a, 9), gaussian(n, d_b, 10)
    expected = np.sqrt(d_a * d_b / ((n + d_a + 1) * (n + d_b + 1)))
    assert metrics.cka(A, B) == pytest.approx(expected, rel=0.3)
    assert abs(metrics.cka(A, B, debiased=True)) < 0.02  # unbiased: centred on 0


def test_mutual_knn_of_independent_inputs_is_k_over_n_minus_1():
    n, k = 500, 10
    score = metrics.mutual_knn(gaussian(n, 20, 11), gaussian(n, 30, 12), k=k)
    assert score == pytest.approx(
        k / (n - 1), abs=0.01
    )  # about 5 sd of the mean overlap


# ----------------------------------------------------------------------------
# cross-checks against independent computations


def similarity(X, inner):
    if inner == "euclidean":
        return -squareform(pdist(X))
    if inner == "correlation":
        return np.corrcoef(X)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    return Z @ Z.T


@pytest.mark.parametrize("inner", metrics.INNER_SIMILARITIES)
def test_rsa_matches_scipy_on_the_explicit_upper_triangle(inner):
    A = gaussian(40, 6, 13)
    B = A + gaussian(40, 6, 14)
    x, y = upper(similarity(A, inner)), upper(similarity(B, inner))
    # ranks come from float32-rounded similarities, hence 1e-7 for rank correlations
    assert metrics.rsa(A, B, inner, "spearman") == pytest.approx(
        stats.spearmanr(x, y)[0], abs=1e-7
    )
    assert metrics.rsa(A, B, inner, "kendall") == pytest.approx(
        stats.kendalltau(x, y)[0], abs=1e-7
    )
    assert metrics.rsa(A, B, inner, "pearson") == pytest.approx(
        stats.pearsonr(x, y)[0], abs=1e-10
    )


def test_rsa_handles_ties_with_average_ranks_and_tau_a():
    # small integer coordinates make many exactly equal distances
    rng = np.random.default_rng(15)
    A, B = rng.integers(0, 3, (14, 2)), rng.integers(0, 3, (14, 2))
    x, y = upper(similarity(A, "euclidean")), upper(similarity(B, "euclidean"))
    assert len(np.unique(x)) < len(x) / 4
    assert metrics.rsa(A, B, "euclidean", "spearman") == pytest.approx(
        stats.spearmanr(x, y)[0], abs=1e-12
    )
    # tau-a by brute force over all ordered pairs of pairs
    pairs = itertools.permutations(range(len(x)), 2)
    tau_a = np.mean([np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs])
    assert metrics.rsa(A, B, "euclidean", "kendall") == pytest.approx(tau_a, abs=1e-12)


def test_rank_keys_preserve_float_order_and_tie_signed_zeros():
    # rsa ranks similarities through order-preserving uint32 keys of their float32
    # values
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf])
    keys = float_keys(values)
    assert keys[3] == keys[4]  # -0.0 == 0.0, so they must tie
    assert np.all(np.diff(np.delete(keys, 3).astype(np.int64)) > 0)


def reduced(X, k):
    """Centred X projected on its top-k right singular vectors (not using metrics)."""
    Xc = X - X.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt[:k].T


def test_svcca_matches_the_explicit_cca_eigenproblem():
    A = gaussian(300, 15, 16)
    B = A[:, :10] @ gaussian(10, 12, 17) + gaussian(300, 12, 18)
    details = metrics.svcca_details(A, B, variance=0.95)
    a, b = reduced(A, details.k_a), reduced(B, details.k_b)
    s_aa, s_bb, s_ab = a.T @ a, b.T @ b, a.T @ b
    m = np.linalg.solve(s_aa, s_ab) @ np.linalg.solve(
        s_bb, s_ab.T
    )  # S_aa^-1 S_ab S_bb^-1 S_ba
    rho = np.sqrt(np.clip(np.sort(np.linalg.eigvals(m).real)[::-1], 0, 1))[
        : min(details.k_a, details.k_b)
    ]
    np.testing.assert_allclose(details.correlations, rho, atol=1e-8)
    assert details.score == pytest.approx(rho.mean(), abs=1e-8)
    assert 1 < details.k_a < 15 and 1 < details.k_b < 12


def test_pwcca_matches_an_explicit_projection_weighting():
    A = gaussian(300, 8, 19)
    B = A[:, :5] @ gaussian(5, 9, 20) + gaussian(300, 9, 21)
    details = metrics.svcca_details(A, B)
    a, b = reduced(A, details.k_a), reduced(B, details.k_b)
    # canonical directions of A: eigenvectors of S_aa^-1 S_ab S_bb^-1 S_ba
    m = np.linalg.solve(a.T @ a, a.T @ b) @ np.linalg.solve(b.T @ b, b.T @ a)
    evals, evecs = np.linalg.eig(m)
    top = np.argsort(evals.real)[::-1][: min(details.k_a, details.k_b)]
    h = a @ evecs[:, top].real
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ (A - A.mean(axis=0))).sum(axis=1)
    rho = np.sqrt(np.clip(evals.real[top], 0, 1))
    assert metrics.pwcca(A, B) == pytest.approx(alpha @ rho / alpha.sum(), abs=1e-8)


def hsic_unbiased(K, L):
    """Song et al. (2012), eq. 5, written out."""
    n = K.shape[0]
    K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    bracket = (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ K @ L @ one
    )
    return bracket / (n * (n - 3))


def test_cka_matches_hsic_formulas():
    A = gaussian(50, 7, 22)
    B = A @ gaussian(7, 9, 23) + gaussian(50, 9, 24)
    a, b = A - A.mean(axis=0), B - B.mean(axis=0)
    K, L = a @ a.T, b @ b.T
    H = np.eye(50) - 1 / 50
    biased = np.trace(K @ H @ L @ H) / np.sqrt(
        np.trace(K @ H @ K @ H) * np.trace(L @ H @ L @ H)
    )
    unbiased = hsic_unbiased(K, L) / np.sqrt(hsic_unbiased(K, K) * hsic_unbiased(L, L))
    assert metrics.cka(A, B) == pytest.approx(biased, abs=1e-10)
    assert metrics.cka(A, B, debiased=True) == pytest.approx(unbiased, abs=1e-10)
    assert unbiased != pytest.approx(biased, abs=1e-3)


def test_procrustes_matches_scipy_orthogonal_procrustes():
    A = gaussian(70, 6, 25)
    B = A @ gaussian(6, 9, 26) + gaussian(70, 9, 27)
    a, b = A - A.mean(axis=0), B - B.mean(axis=0)
    a = np.hstack([a / np.linalg.norm(a), np.zeros((70, 3))])  # zero-pad to B's width
    b = b / np.linalg.norm(b)
    R, _ = linalg.orthogonal_procrustes(a, b)
    assert metrics.procrustes(A, B) == pytest.approx(
        1 - np.sum((a @ R - b) ** 2) / 2, abs=1e-10
    )


def test_mutual_knn_matches_brute_force():
    A = gaussian(40, 5, 28)
    B = A + 0.8 * gaussian(40, 5, 29)

    def neighbours(X):
        Z = X / np.linalg.norm(X, axis=1, keepdims=True)
        S = Z @ Z.T
        np.fill_diagonal(S, -np.inf)
        return [set(np.argsort(-row)[:4]) for row in S]

    overlap = np.mean([len(a & b) / 4 for a, b in zip(neighbours(A), neighbours(B))])
    assert metrics.mutual_knn(A, B, k=4) == overlap


# ----------------------------------------------------------------------------
# SVCCA k selection and the published bug


def unit_rows(n, d, seed):
    X = gaussian(n, d, seed)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_lan_compatible_bug_collapses_k_to_one():
    A, B = unit_rows(3000, 256, 30), unit_rows(3000, 256, 31)
    right = metrics.svcca_details(A, B)
    bug = metrics.svcca_details(A, B, lan_compatible=True)
    assert (
        right.k_a > 200 and right.k_b > 200
    )  # random unit rows spread energy over ~all 256 dims
    assert (bug.k_a, bug.k_b) == (1, 1)
    assert bug.correlations.shape == (1,)


def test_lan_compatible_matches_correct_rule_when_total_energy_is_one():
    A, B = unit_rows(100, 20, 32), unit_rows(100, 20, 33)
    A, B = A - A.mean(axis=0), B - B.mean(axis=0)
    A, B = (
        A / np.linalg.norm(A),
        B / np.linalg.norm(B),
    )  # total energy exactly 1: the bug is harmless
    right, bug = (
        metrics.svcca_details(A, B),
        metrics.svcca_details(A, B, lan_compatible=True),
    )
    assert (bug.k_a, bug.k_b) == (right.k_a, right.k_b)


def test_k_reports_the_directions_needed_for_99_percent_variance():
    # 50 orthogonal centred directions of equal energy plus 14 of tiny energy:
    # 49/50 = 98% < 99%, so exactly 50 directions are needed
    X = gaussian(400, 64, 34)
    q, _ = np.linalg.qr(X - X.mean(axis=0))  # orthonormal, centred columns
    s = np.r_[np.ones(50), np.full(14, 1e-4)]
    A = (q * s) @ rotation(64, 64, 35)
    details = metrics.svcca_details(A, gaussian(400, 80, 36))
    assert details.k_a == 50
    assert details.k_b > 70
    assert details.correlations.shape == (50,)
    assert np.all(np.diff(details.correlations) <= 0)
    assert metrics.svcca_details(A, gaussian(400, 80, 36), k=7).k_a == 7


# ----------------------------------------------------------------------------
# permutation nulls


def planted(n=120, seed=37):
    A = gaussian(n, 8, seed)
    B = np.hstack([A, gaussian(n, 4, seed + 1)]) @ rotation(12, 12, seed + 2)
    B += 0.3 * gaussian(n, 12, seed + 3)
    return A, B


NULL_CASES = [
    ("svcca", {}),
    ("svcca", {"k": 4}),
    ("pwcca", {}),
    ("rsa", {}),
    ("rsa", {"inner": "euclidean", "outer": "pearson"}),
    ("rsa", {"inner": "cosine", "outer": "kendall"}),
    ("cka", {}),
    ("cka", {"debiased": True}),
    ("mutual_knn", {"k": 6}),
    ("procrustes", {}),
]


@pytest.mark.parametrize("name, kwargs", NULL_CASES)
def test_fast_null_equals_naive_on_the_same_permutations(name, kwargs):
    A, B = planted(n=60)
    B = B + 2.0 * gaussian(
        60, 12, 40
    )  # weaken the pairing so null and observed are less far apart
    fast = metrics.permutation_null(name, A, B, n_perm=15, seed=4, **kwargs)
    metric = getattr(metrics, name)
    rng = np.random.default_rng(4)  # the documented permutation stream
    naive = [metric(A, B[rng.permutation(60)], **kwargs) for _ in range(15)]
    np.testing.assert_allclose(fast.null, naive, rtol=0, atol=1e-6)
    assert fast.observed == metric(A, B, **kwargs)
    assert np.std(naive) > 1e-4  # the permutations really change the score


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_null_with_few_rows_uses_the_grams_and_equals_naive(debiased):
    """n^2 <= d_a d_b (a concept subspace: few pairs, wide decoders) takes the n x n
    Gram path; it must give the scores of the naive loop."""
    rng = np.random.default_rng(8)
    A = rng.normal(size=(15, 40))
    B = A @ rng.normal(size=(40, 50)) + 3.0 * rng.normal(size=(15, 50))
    fast = metrics.permutation_null("cka", A, B, n_perm=25, seed=2, debiased=debiased)
    perms = np.random.default_rng(2)
    naive = [
        metrics.cka(A, B[perms.permutation(15)], debiased=debiased) for _ in range(25)
    ]
    np.testing.assert_allclose(fast.null, naive, rtol=0, atol=1e-10)
    assert np.std(naive) > 1e-3


@pytest.mark.parametrize("name", NAMED)
def test_fast_null_equals_callable_fallback(name):
    A, B = planted(n=50)
    metric = getattr(metrics, name)
    fast = metrics.permutation_null(name, A, B, n_perm=10, seed=5)
    slow = metrics.permutation_null(lambda a, b: metric(a, b), A, B, n_perm=10, seed=5)
    np.testing.assert_allclose(fast.null, slow.null, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMED)
def test_null_is_seeded_and_bit_identical(name):
    A, B = planted(n=50)
    first = metrics.permutation_null(name, A, B, n_perm=12, seed=6)
    second = metrics.permutation_null(name, A, B, n_perm=12, seed=6)
    other = metrics.permutation_null(name, A, B, n_perm=12, seed=7)
    assert np.array_equal(first.null, second.null)
    assert (first.observed, first.p, first.z, first.seed) == (
        second.observed,
        second.p,
        second.z,
        6,
    )
    assert not np.array_equal(first.null, other.null)


@pytest.mark.parametrize("name", NAMED)
def test_planted_pairing_gets_the_smallest_p_and_a_large_z(name):
    A, B = planted()
    result = metrics.permutation_null(name, A, B, n_perm=9)
    assert result.p == pytest.approx(0.1)  # (1 + 0) / (1 + 9): the +1 keeps p above 0
    assert result.z > 10
    assert result.null.shape == (9,) and result.n_perm == 9


@pytest.mark.parametrize("name", NAMED)
def test_independent_inputs_get_a_p_value_that_is_not_small(name):
    A, B = gaussian(100, 8, 41), gaussian(100, 12, 42)
    result = metrics.permutation_null(name, A, B, n_perm=49, seed=1)
    assert result.p > 0.05
    assert result.p == (1 + np.count_nonzero(result.null >= result.observed)) / 50
    assert abs(result.z) < 3
    assert result.null_sd == pytest.approx(np.std(result.null, ddof=1))


def test_svcca_with_fewer_pairs_than_dimensions_is_rejected_not_scored_one():
    # 12 pairs in 64 dims: 99% variance keeps all 11 centred dimensions on each side,
    # which would make every canonical correlation 1 for any data
    with pytest.raises(ValueError, match="CCA is degenerate: n=12 .* k_a=11, k_b=11"):
        metrics.svcca(gaussian(12, 64, 0), gaussian(12, 64, 1))
    assert metrics.svcca(gaussian(12, 64, 0), gaussian(12, 64, 1), k=3) < 1


def test_single_permutation_has_undefined_sd():
    result = metrics.permutation_null("cka", *planted(), n_perm=1)
    assert result.null.shape == (1,) and result.p == 0.5
    assert np.isnan(result.null_sd) and np.isnan(result.z)


def test_null_scores_are_read_only():
    result = metrics.permutation_null("cka", *planted(), n_perm=3)
    with pytest.raises(ValueError):
        result.null[0] = 1.0


def test_zero_null_sd_gives_infinite_or_nan_z():
    A, B = planted()
    above = metrics.permutation_null(
        lambda a, b: float(np.array_equal(b, B)), A, B, n_perm=5
    )
    assert above.null_sd == 0 and above.z == np.inf and above.p == pytest.approx(1 / 6)
    flat = metrics.permutation_null(lambda a, b: 0.5, A, B, n_perm=5)
    assert np.isnan(flat.z) and flat.p == 1.0


# ----------------------------------------------------------------------------
# validation


ALL_METRICS = [getattr(metrics, name) for name in NAMED]


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize(
    "A, B, match",
    [
        (np.ones(10), np.ones((10, 2)), r"A must be a 2-D array .* shape \(10,\)"),
        (gaussian(10, 3, 0), gaussian(12, 3, 1), "A has 10 rows but B has 12"),
        (gaussian(2, 3, 0), gaussian(2, 3, 1), "at least 3 paired rows, got n=2"),
        (
            np.where(np.eye(10, 3) > 0, np.nan, 1.0),
            gaussian(10, 3, 1),
            "A contains 3 NaN and 0 inf",
        ),
        (gaussian(10, 3, 0), np.full((10, 3), np.inf), "B contains 0 NaN and 30 inf"),
        (gaussian(10, 3, 0), [["a"] * 3] * 10, "B must be a numeric array"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(metric, A, B, match):
    with pytest.raises(ValueError, match=match):
        metric(A, B)


@pytest.mark.parametrize(
    "metric", [metrics.svcca, metrics.pwcca, metrics.cka, metrics.procrustes]
)
def test_constant_columns_everywhere_mean_zero_variance(metric):
    with pytest.raises(ValueError, match="B has zero variance"):
        metric(gaussian(10, 3, 0), np.full((10, 4), 2.0))


def test_rsa_rejects_constant_and_zero_rows():
    A = gaussian(10, 4, 0)
    A[3] = 5.0
    with pytest.raises(ValueError, match="row 3 of A is constant"):
        metrics.rsa(A, gaussian(10, 4, 1), inner="correlation")
    A[3] = 0.0
    with pytest.raises(ValueError, match="row 3 of A is all zeros"):
        metrics.rsa(A, gaussian(10, 4, 1), inner="cosine")
    with pytest.raises(ValueError, match="row 3 of B is all zeros"):
        metrics.mutual_knn(gaussian(10, 4, 1), A, k=2)
    assert np.isfinite(metrics.rsa(A, gaussian(10, 4, 1), inner="euclidean"))


def test_rsa_rejects_all_equal_similarities():
    parallel_rows = np.arange(1, 11)[:, None] * [
        1.0,
        2.0,
        3.0,
    ]  # every cosine similarity is 1
    with pytest.raises(ValueError, match="all inner similarities of B are equal"):
        metrics.rsa(gaussian(10, 3, 0), parallel_rows, inner="cosine")


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda A, B: metrics.rsa(A, B, inner="dot"),
            (
                r"inner='dot' is not supported; choose one of "
                r"'correlation', 'cosine', 'euclidean'"
            ),
        ),
        (
            lambda A, B: metrics.rsa(A, B, outer="tau"),
            "outer='tau' is not supported; choose one of 'spearman'",
        ),
        (
            lambda A, B: metrics.permutation_null("cca", A, B),
            (
                r"metric='cca' is not supported; choose one of "
                r"'svcca', 'pwcca', 'rsa', 'cka', 'mutual_knn'"
            ),
        ),
        (
            lambda A, B: metrics.permutation_null("cka", A, B, n_perm=0),
            "n_perm must be an integer >= 1",
        ),
        (
            lambda A, B: metrics.permutation_null("cka", A, B, seed=-1),
            "seed must be an integer >= 0",
        ),
        (
            lambda A, B: metrics.svcca(A, B, k=20),
            "degenerate: n=20 pairs .* k_a=20, k_b=20 .*smaller fixed k",
        ),
        (
            lambda A, B: metrics.svcca(A, B, k=19),
            "n - 1 = 19 dimensions .* k_a=19, k_b=19 .*more pairs",
        ),
        (
            lambda A, B: metrics.pwcca(A[:6], B[:6], variance=1),
            "CCA is degenerate: n=6 .* k_a=5, k_b=5",
        ),
        (
            lambda A, B: metrics.svcca(A, B, k=7),
            r"k=7 exceeds the rank of centred A \(6\)",
        ),
        (
            lambda A, B: metrics.svcca(A, B, variance=1.5),
            r"variance must be a number in \(0, 1\], got 1.5",
        ),
        (
            lambda A, B: metrics.mutual_knn(A, B, k=20),
            "k=20 must be smaller than the number of pairs n=20",
        ),
        (lambda A, B: metrics.mutual_knn(A, B, k=0), "k must be an integer >= 1"),
        (
            lambda A, B: metrics.cka(A[:3], B[:3], debiased=True),
            "at least 4 paired rows, got n=3",
        ),
    ],
)
def test_bad_options_raise_value_errors_naming_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call(gaussian(20, 6, 0), gaussian(20, 8, 1))


# ----------------------------------------------------------------------------
# the registry


def test_the_registry_lists_every_metric_once_in_order():
    assert tuple(metrics.METRICS) == NAMED
    assert [m.name for m in metrics.METRICS.values()] == list(NAMED)
    for name, m in metrics.METRICS.items():
        assert m.score is getattr(metrics, name)
        assert isinstance(m.summary, str) and m.summary and "\n" not in m.summary


@pytest.mark.parametrize("name", NAMED)
def test_every_option_names_a_keyword_of_the_score(name):
    m = metrics.METRICS[name]
    params = inspect.signature(m.score).parameters
    assert set(m.options.values()) <= set(params)
    for null in (m.null, m.subsets, m.details):
        if null is not None:  # what the stages pass to score, they pass to these too
            assert set(m.options.values()) <= set(inspect.signature(null).parameters)


def test_options_map_analysis_settings_to_keywords():
    options = {name: dict(m.options) for name, m in metrics.METRICS.items()}
    assert options == {
        "svcca": {"variance": "variance", "svcca_k": "k"},
        "pwcca": {"variance": "variance"},
        "rsa": {},
        "cka": {"cka_debiased": "debiased"},
        "mutual_knn": {},
        "procrustes": {},
    }
    with pytest.raises(TypeError):
        metrics.METRICS["cka"].options["k"] = "k"  # read-only


def test_kwargs_picks_the_offered_settings_by_name_and_ignores_the_rest():
    offered = {"svcca_k": 5, "cka_debiased": True, "variance": 0.9, "n_perm": 10}
    kwargs = {name: m.kwargs(**offered) for name, m in metrics.METRICS.items()}
    assert kwargs == {
        "svcca": {"variance": 0.9, "k": 5},
        "pwcca": {"variance": 0.9},
        "rsa": {},
        "cka": {"debiased": True},
        "mutual_knn": {},
        "procrustes": {},
    }
    assert list(kwargs["svcca"]) == ["variance", "k"]  # the order of options
    assert metrics.METRICS["svcca"].kwargs(cka_debiased=True) == {}
    assert metrics.METRICS["mutual_knn"].kwargs(svcca_k=3) == {}  # its k is neighbours


def test_every_registered_null_is_exact_for_the_observed_score():
    A, B = planted(n=40)
    perms = [np.random.default_rng(0).permutation(40)]
    for m in metrics.METRICS.values():
        observed, null = m.null(A, B, iter(perms))
        assert observed == m.score(A, B) and null.shape == (1,)


def test_svcca_details_record_the_directions_and_the_published_bug():
    A, B = planted(n=200)
    fields = metrics.METRICS["svcca"].details(A, B, variance=0.9)
    d = metrics.svcca_details(A, B, variance=0.9)
    assert list(fields) == ["k_a", "k_b", "lan_compatible"]
    assert (fields["k_a"], fields["k_b"]) == (d.k_a, d.k_b)
    # the bug's score is taken at the default variance, whatever variance is
    assert fields["lan_compatible"] == metrics.svcca(A, B, lan_compatible=True)
    others = [m for name, m in metrics.METRICS.items() if name != "svcca"]
    assert all(m.details is None for m in others)


def test_permutation_null_refuses_an_unknown_name_listing_the_registry():
    A, B = planted(n=30)
    choices = ", ".join(repr(name) for name in metrics.METRICS)
    with pytest.raises(ValueError, match=re.escape(f"choose one of {choices}")):
        metrics.permutation_null("CKA", A, B, n_perm=3)


def test_a_registered_metric_without_a_fast_null_is_permuted_from_scratch(monkeypatch):
    A, B = planted(n=40)
    slow = dataclasses.replace(metrics.METRICS["procrustes"], null=None)
    monkeypatch.setitem(metrics.METRICS, "procrustes", slow)
    result = metrics.permutation_null("procrustes", A, B, n_perm=6, seed=3)
    rng = np.random.default_rng(3)
    naive = [metrics.procrustes(A, B[rng.permutation(40)]) for _ in range(6)]
    assert result.null.tolist() == naive
    assert result.observed == metrics.procrustes(A, B)


# ----------------------------------------------------------------------------
# random-subset null


def pool(n=150, d_a=20, d_b=24, seed=50):
    """A pool of pairs whose sides share a structure, so draws vary but are not 0."""
    A = gaussian(n, d_a, seed)
    return A, A @ gaussian(d_a, d_b, seed + 1) + 2.0 * gaussian(n, d_b, seed + 2)


def documented_picks(n_pool, size, n_draws, seed):
    """The draws subset_null documents: rng.choice on default_rng([seed, 1])."""
    rng = np.random.default_rng([seed, 1])
    return [rng.choice(n_pool, size, replace=False) for _ in range(n_draws)]


FAST_SUBSETS = [
    ("svcca", {"k": 4}),
    ("cka", {}),
    ("cka", {"debiased": True}),
    ("rsa", {}),
    ("rsa", {"inner": "correlation", "outer": "spearman"}),
]


@pytest.mark.parametrize("name, kwargs", FAST_SUBSETS)
def test_batched_subset_draws_equal_the_metric_on_each_draw(name, kwargs):
    A, B = pool()
    result = metrics.subset_null(name, A, B, 18, 30, 7, 0.5, **kwargs)
    metric = getattr(metrics, name)
    direct = [metric(A[p], B[p], **kwargs) for p in documented_picks(150, 18, 30, 7)]
    np.testing.assert_allclose(result.null, direct, rtol=0, atol=1e-9)
    assert np.std(direct) > 1e-3  # the draws really differ
    assert metrics.METRICS[name].subsets(A, B, **kwargs) is not None  # the fast path


def test_batches_of_many_small_draws_cover_every_draw_in_order():
    # size 4: 262,144 draws fit one batch, so 300 draws are one; size 100: 419 per batch
    A, B = pool(n=400)
    for size, n_draws in ((4, 300), (100, 450)):
        result = metrics.subset_null("cka", A, B, size, n_draws, 1, 0.5)
        picks = documented_picks(400, size, n_draws, 1)
        direct = [metrics.cka(A[p], B[p]) for p in picks[:: n_draws // 7]]
        np.testing.assert_allclose(result.null[:: n_draws // 7], direct, atol=1e-9)
        assert result.null.shape == (n_draws,)


@pytest.mark.parametrize(
    "metric, kwargs",
    [
        ("procrustes", {}),
        ("pwcca", {"variance": 0.8}),
        ("mutual_knn", {"k": 4}),
        ("svcca", {}),  # no fixed k: no batched draws
        ("svcca", {"variance": 0.9}),
        ("rsa", {"inner": "cosine"}),
        ("rsa", {"outer": "pearson"}),
    ],
)
def test_metrics_without_batched_draws_are_scored_draw_by_draw(metric, kwargs):
    A, B = pool()
    result = metrics.subset_null(metric, A, B, 40, 8, 2, 0.5, **kwargs)
    score = getattr(metrics, metric)
    direct = [score(A[p], B[p], **kwargs) for p in documented_picks(150, 40, 8, 2)]
    assert result.null.tolist() == direct  # the same function on the same rows
    subsets = metrics.METRICS[metric].subsets
    assert subsets is None or subsets(A, B, **kwargs) is None


def test_a_callable_metric_is_scored_draw_by_draw():
    A, B = pool()

    def first_column_correlation(a, b, sign=1.0):
        return sign * float(np.corrcoef(a[:, 0], b[:, 0])[0, 1])

    result = metrics.subset_null(first_column_correlation, A, B, 12, 9, 4, 0.0, sign=-1)
    picks = documented_picks(150, 12, 9, 4)
    direct = [first_column_correlation(A[p], B[p], -1) for p in picks]
    assert result.null.tolist() == direct


@pytest.mark.parametrize("name", ["svcca", "cka", "rsa", "procrustes"])
def test_subset_null_is_seeded_and_bit_identical(name):
    A, B = pool()
    kwargs = {"k": 3} if name == "svcca" else {}
    first = metrics.subset_null(name, A, B, 15, 20, 6, 0.5, **kwargs)
    second = metrics.subset_null(name, A, B, 15, 20, 6, 0.5, **kwargs)
    other = metrics.subset_null(name, A, B, 15, 20, 7, 0.5, **kwargs)
    assert np.array_equal(first.null, second.null)
    assert (first.p, first.z, first.seed, first.n_perm) == (second.p, second.z, 6, 20)
    assert not np.array_equal(first.null, other.null)
    with pytest.raises(ValueError):
        first.null[0] = 1.0  # read-only


@pytest.mark.parametrize("observed", [-1.0, 0.0, 0.05, 0.2, 2.0])
def test_subset_p_value_counts_draws_at_or_above_the_observed_score(observed):
    A, B = pool()
    result = metrics.subset_null("cka", A, B, 20, 49, 3, observed)
    assert result.observed == observed
    assert result.p == (1 + np.count_nonzero(result.null >= observed)) / 50
    assert result.null_mean == pytest.approx(np.mean(result.null))
    assert result.z == pytest.approx((observed - result.null_mean) / result.null_sd)
    tied = metrics.subset_null("cka", A, B, 20, 49, 3, float(result.null[0]))
    assert tied.p == (1 + np.count_nonzero(result.null >= result.null[0])) / 50


def test_subset_null_needs_a_pool_larger_than_the_draw():
    A, B = pool(n=30)
    with pytest.raises(ValueError, match="pool holds 30 pairs, not more than the 30"):
        metrics.subset_null("cka", A, B, 30, 5, 0, 0.5)
    with pytest.raises(ValueError, match="pool holds 30 pairs, not more than the 31"):
        metrics.subset_null("procrustes", A, B, 31, 5, 0, 0.5)
    assert metrics.subset_null("cka", A, B, 29, 5, 0, 0.5).null.shape == (5,)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("cka", 0, 5, 0), {}, "size must be an integer >= 1, got 0"),
        (("cka", 2.0, 5, 0), {}, "size must be an integer >= 1, got 2.0"),
        (("cka", 10, 0, 0), {}, "n_draws must be an integer >= 1, got 0"),
        (("cka", 10, True, 0), {}, "n_draws must be an integer >= 1, got True"),
        (("cka", 10, 5, -1), {}, "seed must be an integer >= 0, got -1"),
        (("cca", 10, 5, 0), {}, "metric='cca' is not supported; choose one of 'svcca'"),
        (("rsa", 10, 5, 0), {"inner": "dot"}, "inner='dot' is not supported"),
        (("svcca", 10, 5, 0), {"k": 9}, "CCA is degenerate: n=10 pairs"),
        (("svcca", 10, 5, 0), {"k": 0}, "k must be an integer >= 1, got 0"),
    ],
)
def test_subset_null_rejects_bad_arguments_naming_them(args, kwargs, match):
    A, B = pool(n=40)
    name, size, n_draws, seed = args
    with pytest.raises(ValueError, match=match):
        metrics.subset_null(name, A, B, size, n_draws, seed, 0.5, **kwargs)


def test_subset_null_rejects_a_pool_that_does_not_pair():
    A, B = pool(n=40)
    with pytest.raises(ValueError, match="the pool has 40 rows in A but 39 in B"):
        metrics.subset_null("cka", A, B[:39], 10, 5, 0, 0.5)
    B[3, 2] = np.nan
    with pytest.raises(ValueError, match="B contains 1 NaN and 0 inf"):
        metrics.subset_null("cka", A, B, 10, 5, 0, 0.5)


def test_a_draw_without_positive_debiased_self_hsic_names_the_settings_to_change():
    # identical rows: every draw's centred Gram is 0, so its debiased HSIC is 0
    flat, B = np.ones((12, 5)), gaussian(12, 5, 0)
    message = (
        "the debiased HSIC of a random subspace of 6 pairs with itself is not "
        "positive; raise subspaces.min_pairs or set subspaces.cka_debiased=false"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        metrics.subset_null("cka", flat, B, 6, 4, 0, 0.5, debiased=True)
    biased = metrics.subset_null("cka", gaussian(12, 5, 1), B, 6, 4, 0, 0.5)
    assert np.all(np.isfinite(biased.null))
