"""Similarity of paired SAE decoder vectors, with exact fast permutation nulls.

After feature matching, row ``i`` of ``A`` (n, d_a) is paired with row ``i``
of ``B`` (n, d_b). Every metric below scores that pairing; 1 means the two
sides agree perfectly. :func:`permutation_null` compares the score with the
scores of shuffled pairings (rows of ``B`` permuted).

A permutation only reorders the rows of ``B``, so the fast nulls compute once
everything a permutation leaves unchanged (centring, SVD bases, similarity
ranks, neighbour sets) and pay per permutation only for what changes.

Pure core: numpy/scipy in, floats out; no I/O, no logging, no global state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "INNER_SIMILARITIES",
    "OUTER_CORRELATIONS",
    "NullResult",
    "SVCCAResult",
    "cka",
    "mutual_knn",
    "permutation_null",
    "procrustes",
    "pwcca",
    "rsa",
    "summarise_null",
    "svcca",
    "svcca_details",
]

INNER_SIMILARITIES = ("correlation", "cosine", "euclidean")
OUTER_CORRELATIONS = ("spearman", "pearson", "kendall")
_BLOCK_BYTES = 1 << 25  # working-set budget of one blocked step (32 MiB)
_RANK_CHUNK = 1 << 20  # pairs handled per step when ranking similarities
_RSA_MAX_ROWS = 65_536  # n(n-1)/2 must fit the int32 ranks and uint32 positions


# ----------------------------------------------------------------------------
# input validation


def _as_matrix(X, name):
    """Return X as a finite 2-D float64 array, or raise a ValueError naming the problem."""
    if np.iscomplexobj(X):
        raise ValueError(f"{name} is complex; pass real-valued arrays")
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array ({exc})") from exc
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_pairs, n_dims) but has shape "
            f"{X.shape}; reshape a single vector with {name}.reshape(-1, 1)"
        )
    if X.shape[1] == 0:
        raise ValueError(f"{name} has shape {X.shape}: it needs at least one column")
    finite = np.isfinite(X)
    if not finite.all():
        n_nan = int(np.isnan(X).sum())
        n_inf = int(X.size - finite.sum()) - n_nan
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} inf values (first at row {row}, "
            f"column {col}); drop or impute them before comparing"
        )
    return X


def _check_pair(A, B, min_rows=3):
    """Validate a pair of paired-row matrices; return them as float64 arrays."""
    A, B = _as_matrix(A, "A"), _as_matrix(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"A has {A.shape[0]} rows but B has {B.shape[0]}; row i of A must be "
            "paired with row i of B, so both need the same number of rows"
        )
    if A.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} paired rows, got n={A.shape[0]}")
    return A, B


def _check_option(value, allowed, name):
    if not (isinstance(value, str) and value in allowed):
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")


def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _centre(X, name):
    """Centre columns over rows; constant columns become exactly zero."""
    varying = np.ptp(X, axis=0) > 0
    if not varying.any():
        raise ValueError(
            f"{name} has zero variance: all its rows are identical, so the metric is "
            f"undefined; check that {name} holds distinct vectors"
        )
    return np.where(varying, X - X.mean(axis=0), 0.0)


def _unit_rows(X, name):
    """Rows scaled to unit norm; zero rows have no direction and are rejected."""
    norms = np.linalg.norm(X, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(
            f"row {zero[0]} of {name} is all zeros ({zero.size} such rows), so its "
            "cosine similarity is undefined; drop zero rows first"
        )
    return X / norms[:, None]


# ----------------------------------------------------------------------------
# SVCCA and PWCCA


@dataclass(frozen=True, eq=False)
class SVCCAResult:
    """Details of one SVCCA comparison.

    Attributes
    ----------
    score : float
        Mean canonical correlation over ``min(k_a, k_b)`` directions.
    k_a, k_b : int
        Number of SVD directions kept for A and for B.
    correlations : ndarray of shape (min(k_a, k_b),)
        All canonical correlations, descending, clipped to [0, 1] (read-only).
    n : int
        Number of paired rows.
    """

    score: float
    k_a: int
    k_b: int
    correlations: np.ndarray
    n: int


def _n_directions(energy, variance, lan_compatible):
    """Smallest k whose cumulative energy reaches ``variance`` of the total."""
    total = energy.sum()
    ratio = np.cumsum(energy) / total
    if lan_compatible:  # compares a ratio with an energy; argmax of all-False is 0
        return int(np.argmax(ratio >= variance * total)) + 1
    return int(np.searchsorted(ratio, variance)) + 1


def _reduce(X, name, variance, k, lan_compatible):
    """Centre X and keep its top k SVD directions.

    Returns the orthonormal basis Q (n, k) of the reduced side and its
    coordinates Q.T @ X_centred (k, d).
    """
    U, s, Vt = np.linalg.svd(_centre(X, name), full_matrices=False)
    rank = int(np.sum(s > s[0] * max(X.shape) * np.finfo(np.float64).eps))
    if k is None:
        k = min(_n_directions(s**2, variance, lan_compatible), rank)
    elif k > rank:
        raise ValueError(f"k={k} exceeds the rank of centred {name} ({rank}); pass k <= {rank}")
    return U[:, :k], s[:k, None] * Vt[:k]


def _check_cca_size(n, k_a, k_b):
    """Centred columns span n - 1 dimensions; a side keeping all of them makes every correlation 1."""
    if max(k_a, k_b) >= n - 1:
        raise ValueError(
            f"CCA is degenerate: n={n} pairs span only n - 1 = {n - 1} dimensions after "
            f"centring and k_a={k_a}, k_b={k_b} directions fill them, so every canonical "
            f"correlation is 1 by construction; pass a smaller fixed k (well below n/2, "
            f"e.g. k={max(1, n // 4)}) or use more pairs"
        )


def _svcca_bases(A, B, variance, k, lan_compatible):
    """Validate the inputs and SVD-reduce both sides: bases Qa, Qb and A's coordinates Ra."""
    A, B = _check_pair(A, B)
    if not (isinstance(variance, (float, int, np.floating)) and 0 < variance <= 1):
        raise ValueError(f"variance must be a number in (0, 1], got {variance!r}")
    if k is not None:
        k = _check_int(k, "k", 1)
        _check_cca_size(A.shape[0], k, k)
    qa, ra = _reduce(A, "A", variance, k, lan_compatible)
    qb, _ = _reduce(B, "B", variance, k, lan_compatible)
    _check_cca_size(A.shape[0], qa.shape[1], qb.shape[1])
    return qa, ra, qb


def _canonical_correlations(qa, qb):
    """Canonical correlations between two orthonormal bases, descending."""
    return np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)


def svcca_details(A, B, variance=0.99, k=None, lan_compatible=False):
    """SVCCA similarity of paired rows, with the number of directions kept.

    Each column is centred over rows; each side is reduced by SVD to the
    smallest number of directions whose cumulative energy (sum of squared
    singular values) reaches ``variance`` of the total, or to exactly ``k``
    directions; canonical correlations between the reduced sides are the
    singular values of ``Qa.T @ Qb`` for orthonormal bases ``Qa``, ``Qb``.

    Parameters
    ----------
    A : array-like of shape (n, d_a)
        Vectors of the first model; row i is paired with row i of ``B``.
    B : array-like of shape (n, d_b)
        Vectors of the second model.
    variance : float, default=0.99
        Fraction of total energy in (0, 1] each side keeps. Ignored if ``k``
        is given.
    k : int, optional
        Keep exactly ``k`` directions on both sides instead.
    lan_compatible : bool, default=False
        Reproduce the k-selection bug of the SVCCA code behind the published
        numbers of Lan et al. (arXiv:2410.06981): k is the first index where
        the cumulative explained-variance *ratio* (at most 1) reaches
        ``variance * total_energy``. Whenever the total energy exceeds
        ``1 / variance`` (about 1.01 at the default) that never happens, and
        ``argmax`` of an all-False mask returns 0, so k = 1 and the score is a
        single canonical correlation. 3,000 unit rows have total energy near
        3,000, so the bug keeps 1 direction where 99% variance needs hundreds.
        Use it only to reproduce published numbers and see the difference.

    Returns
    -------
    result : SVCCAResult
        ``score``, ``k_a``, ``k_b``, ``correlations`` (all canonical
        correlations, descending) and ``n``.

    Raises
    ------
    ValueError
        If the inputs are not finite 2-D arrays with the same number (>= 3)
        of rows, a side has zero variance, ``variance`` is outside (0, 1],
        ``k`` exceeds a side's rank, or ``max(k_a, k_b) >= n - 1`` (CCA is
        degenerate: centred columns span only n - 1 dimensions, so a side
        keeping all of them makes every correlation 1, whatever the data;
        with ``d >= n`` this is what 99% variance usually asks for).

    Notes
    -----
    Short of that, two subspaces of the (n - 1)-dimensional space of centred
    columns still share at least ``k_a + k_b - (n - 1)`` directions, forcing
    that many correlations to 1; with few pairs the score is inflated, so use
    ``n`` well above ``k_a + k_b`` or a small fixed ``k``.
    """
    qa, _, qb = _svcca_bases(A, B, variance, k, lan_compatible)
    rho = _canonical_correlations(qa, qb)
    rho.setflags(write=False)
    return SVCCAResult(
        score=float(rho.mean()), k_a=qa.shape[1], k_b=qb.shape[1], correlations=rho, n=qa.shape[0]
    )


def svcca(A, B, variance=0.99, k=None, lan_compatible=False):
    """SVCCA similarity of paired rows: mean canonical correlation after SVD reduction.

    See :func:`svcca_details` for the method and all parameters.

    Returns
    -------
    score : float
        Mean canonical correlation in [0, 1] over ``min(k_a, k_b)`` directions.

    Raises
    ------
    ValueError
        As :func:`svcca_details`.
    """
    return svcca_details(A, B, variance, k, lan_compatible).score


def _pwcca_score(qa, ra, qb):
    """Projection-weighted mean canonical correlation, weights from side A."""
    u, rho, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
    weights = np.abs(u.T @ ra).sum(axis=1)
    return float(weights @ np.clip(rho, 0.0, 1.0) / weights.sum())


def pwcca(A, B, variance=0.99):
    """Projection-weighted CCA (Morcos et al., 2018) of paired rows.

    Both sides are centred and SVD-reduced as in :func:`svcca`. Canonical
    correlation ``rho_i`` is weighted by ``alpha_i = sum_j |<h_i, a_j>|``,
    where ``h_i`` is the i-th canonical variate of A (unit norm) and ``a_j``
    the j-th centred column of A: how much of A's representation that
    direction accounts for. Score = ``sum(alpha * rho) / sum(alpha)``.

    Parameters
    ----------
    A : array-like of shape (n, d_a)
        Vectors of the first model; the weights come from this side.
    B : array-like of shape (n, d_b)
        Vectors of the second model.
    variance : float, default=0.99
        Fraction of total energy in (0, 1] each side keeps.

    Returns
    -------
    score : float
        Weighted mean canonical correlation in [0, 1].

    Raises
    ------
    ValueError
        As :func:`svcca_details`.

    Notes
    -----
    PWCCA is asymmetric: ``pwcca(A, B) != pwcca(B, A)`` in general, because
    only A's columns set the weights. (The reference code of Morcos et al.
    weights by whichever side has fewer neurons; here it is always A.)
    """
    qa, ra, qb = _svcca_bases(A, B, variance, None, False)
    return _pwcca_score(qa, ra, qb)


# ----------------------------------------------------------------------------
# CKA and Procrustes


def _hsic(cross, rows_x, rows_y, debiased):
    """HSIC of linear kernels K, L (up to a constant factor) from cross = tr(K L).

    ``rows_x``, ``rows_y`` are the Gram diagonals (n,), or stacks of them (D, n)
    with ``cross`` (D,). The debiased form is the unbiased estimator of Song et
    al. (2012, eq. 5), written for centred features as in Kornblith et al.
    (2019); the 1 / (n (n - 3)) factor cancels in CKA.
    """
    if not debiased:
        return cross
    n = rows_x.shape[-1]
    correction = rows_x.sum(-1) * rows_y.sum(-1) / ((n - 1) * (n - 2))
    return cross - n / (n - 2) * np.einsum("...i,...i->...", rows_x, rows_y) + correction


def _cka_sides(A, B, debiased):
    """Centred sides, their Gram diagonals and the CKA normaliser."""
    A, B = _check_pair(A, B, min_rows=4 if debiased else 3)
    a, b = _centre(A, "A"), _centre(B, "B")
    rows_a, rows_b = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    self_a = _hsic(np.sum((a.T @ a) ** 2), rows_a, rows_a, debiased)
    self_b = _hsic(np.sum((b.T @ b) ** 2), rows_b, rows_b, debiased)
    if not (self_a > 0 and self_b > 0):
        raise ValueError(
            f"the debiased HSIC of a side with itself is not positive (n={a.shape[0]}); "
            "use more pairs or debiased=False"
        )
    return a, b, rows_a, rows_b, np.sqrt(self_a * self_b)


def cka(A, B, debiased=False):
    """Linear centred kernel alignment (CKA) of paired rows.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = A A^T`` and
    ``L = B B^T`` of the column-centred sides; for the biased estimator this
    is ``||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F)`` (Kornblith et al., 2019).

    Parameters
    ----------
    A : array-like of shape (n, d_a)
        Vectors of the first model; row i is paired with row i of ``B``.
    B : array-like of shape (n, d_b)
        Vectors of the second model.
    debiased : bool, default=False
        Use the unbiased HSIC estimator of Song et al. (2012, eq. 5), as in
        Kornblith et al. (2019) and Nguyen et al. (2021). Needs n >= 4; the
        score can then be slightly negative for unrelated inputs.

    Returns
    -------
    score : float
        CKA; 1 for identical inputs, invariant to rotations and isotropic
        scaling of either side.

    Raises
    ------
    ValueError
        If the inputs are not finite 2-D arrays with the same number of rows
        (>= 3, or >= 4 when debiased), or a side has zero variance.
    """
    a, b, rows_a, rows_b, norm = _cka_sides(A, B, debiased)
    return float(_hsic(np.sum((a.T @ b) ** 2), rows_a, rows_b, debiased) / norm)


def _procrustes_sides(A, B):
    """Centred sides scaled to unit Frobenius norm."""
    A, B = _check_pair(A, B)
    a, b = _centre(A, "A"), _centre(B, "B")
    return a / np.linalg.norm(a), b / np.linalg.norm(b)


def procrustes(A, B):
    """Orthogonal Procrustes similarity of paired rows.

    Both sides are centred, scaled to unit Frobenius norm and zero-padded to
    the same width. Then ``1 - min_R ||A R - B||_F^2 / 2`` over orthogonal R
    equals the nuclear norm of ``A^T B``, because
    ``||A R - B||^2 = 2 - 2 tr(R^T A^T B)`` and ``max_R tr(R^T A^T B)`` is the
    sum of singular values of ``A^T B`` (padding adds only zeros).

    Parameters
    ----------
    A : array-like of shape (n, d_a)
        Vectors of the first model; row i is paired with row i of ``B``.
    B : array-like of shape (n, d_b)
        Vectors of the second model.

    Returns
    -------
    score : float
        Similarity in [0, 1]; 1 when B is a rotated (and scaled) copy of A.

    Raises
    ------
    ValueError
        If the inputs are not finite 2-D arrays with the same number (>= 3)
        of rows, or a side has zero variance.
    """
    a, b = _procrustes_sides(A, B)
    return float(min(np.linalg.svd(a.T @ b, compute_uv=False).sum(), 1.0))


# ----------------------------------------------------------------------------
# mutual k-nearest neighbours


def _neighbours(X, k, name):
    """Indices (n, k) of each row's k most cosine-similar other rows."""
    Z = _unit_rows(X, name)
    n = Z.shape[0]
    rows = max(1, _BLOCK_BYTES // (8 * n))
    out = np.empty((n, k), dtype=np.intp)
    for i0 in range(0, n, rows):
        sim = Z[i0 : i0 + rows] @ Z.T
        local = np.arange(sim.shape[0])
        sim[local, i0 + local] = -np.inf  # exclude self
        out[i0 : i0 + rows] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    return out


def _edge_keys(nbrs):
    """Neighbour pairs (i, j) encoded as i * n + j."""
    n = nbrs.shape[0]
    return (np.arange(n)[:, None] * n + nbrs).ravel()


def _knn_overlap(sorted_keys_a, nbrs_b):
    """Mean fraction of B's neighbours that are also A's neighbours."""
    keys_b = _edge_keys(nbrs_b)
    pos = np.minimum(np.searchsorted(sorted_keys_a, keys_b), sorted_keys_a.size - 1)
    return np.count_nonzero(sorted_keys_a[pos] == keys_b) / keys_b.size


def _knn_sides(A, B, k):
    A, B = _check_pair(A, B)
    k = _check_int(k, "k", 1)
    if k >= A.shape[0]:
        raise ValueError(
            f"k={k} must be smaller than the number of pairs n={A.shape[0]} (each row "
            f"has only n - 1 other rows); pass k <= {A.shape[0] - 1}"
        )
    return np.sort(_edge_keys(_neighbours(A, k, "A"))), _neighbours(B, k, "B")


def mutual_knn(A, B, k=10):
    """Mutual k-nearest-neighbour overlap of paired rows.

    Mean over rows i of ``|N_A(i) & N_B(i)| / k``, where ``N_X(i)`` is the set
    of the k rows most cosine-similar to row i of X, row i itself excluded.

    Parameters
    ----------
    A : array-like of shape (n, d_a)
        Vectors of the first model; row i is paired with row i of ``B``.
    B : array-like of shape (n, d_b)
        Vectors of the second model.
    k : int, default=10
        Neighbours per row, 1 <= k < n.

    Returns
    -------
    score : float
        Overlap in [0, 1]; about ``k / (n - 1)`` for unrelated inputs.

    Raises
    ------
    ValueError
        If the inputs are not finite 2-D arrays with the same number (>= 3)
        of rows, a row is all zeros, or ``k`` is not in [1, n).

    Notes
    -----
    Ties in similarity are broken by ``numpy.argpartition``, which depends on
    row order; only tie-free inputs give permutation-exact neighbour sets.
    """
    keys_a, nbrs_b = _knn_sides(A, B, k)
    return float(_knn_overlap(keys_a, nbrs_b))


# ----------------------------------------------------------------------------
# RSA


def _similarity(X, inner, name):
    """Return sim(rows, cols), blocks of X's row-by-row inner similarity matrix."""
    if inner == "euclidean":
        sq = np.einsum("ij,ij->i", X, X)

        def negative_distance(r, c):
            d2 = sq[r, None] + sq[None, c] - 2 * (X[r] @ X[c].T)
            return -np.sqrt(np.maximum(d2, 0.0))

        return negative_distance
    if inner == "correlation":
        constant = np.flatnonzero(np.ptp(X, axis=1) == 0)
        if constant.size:
            raise ValueError(
                f"row {constant[0]} of {name} is constant ({constant.size} such rows), so "
                "its correlation with other rows is undefined; drop constant rows or "
                "use inner='cosine'"
            )
        X = X - X.mean(axis=1, keepdims=True)
    Z = _unit_rows(X, name)
    return lambda r, c: Z[r] @ Z[c].T


def _tri_offset(i, n):
    """Position of pair (i, i + 1) in the row-major strict upper triangle."""
    return i * (2 * n - i - 1) // 2


def _upper_chunks(sim, n):
    """Yield (offset, values) of the strict upper triangle, row-major, in row blocks."""
    rows = max(1, _BLOCK_BYTES // (8 * n))
    for i0 in range(0, n - 1, rows):
        i1 = min(i0 + rows, n - 1)
        block = sim(slice(i0, i1), slice(i0, n))
        yield _tri_offset(i0, n), block[np.arange(i0, n) > np.arange(i0, i1)[:, None]]


def _float_keys(values):
    """Order-preserving uint32 keys of values rounded to float32; -0.0 and 0.0 share a key."""
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))


def _sorted_keys(sim, n):
    """Sorted uint64 array of (float32 similarity key << 32) | pair position."""
    packed = np.empty(n * (n - 1) // 2, dtype=np.uint64)
    for off, values in _upper_chunks(sim, n):
        positions = np.arange(off, off + values.size, dtype=np.uint64)
        packed[off : off + values.size] = (_float_keys(values).astype(np.uint64) << 32) | positions
    packed.sort()
    return packed


def _rank_chunks(packed):
    """Yield (positions, centred doubled average ranks) from sorted packed keys.

    A tie group occupying sorted slots [s, e) has average rank (s + 1 + e) / 2;
    doubled and centred on the mean (N + 1) / 2 this is the integer s + e - N.
    """
    N = packed.size
    for s in range(0, N, _RANK_CHUNK):
        chunk = packed[s : s + _RANK_CHUNK]
        keys = chunk >> 32
        cuts = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        sizes = np.diff(np.concatenate(([0], cuts, [chunk.size])))
        starts = np.concatenate(([0], cuts)) + s
        ends = np.concatenate((cuts, [chunk.size])) + s
        # the first tie group may begin in an earlier chunk, the last end in a later one
        starts[0] = np.searchsorted(packed, keys[0] << 32)
        ends[-1] = np.searchsorted(packed, (keys[-1] + 1) << 32)
        yield (chunk & 0xFFFFFFFF).astype(np.intp), np.repeat(starts + ends - N, sizes)


def _sum_squares(x):
    """Sum of squares in float64, chunked so no float64 copy of x is made."""
    chunks = (x[s : s + _RANK_CHUNK].astype(np.float64) for s in range(0, x.size, _RANK_CHUNK))
    return sum(float(c @ c) for c in chunks)


def _all_tied(name):
    return ValueError(
        f"all inner similarities of {name} are equal (e.g. all rows identical), so "
        "RSA is undefined; check that the rows differ"
    )


def _centred_ranks(sim, n, name):
    """Centred doubled average ranks (int32) of the upper-triangle similarities."""
    ranks = np.empty(n * (n - 1) // 2, dtype=np.int32)
    for positions, r in _rank_chunks(_sorted_keys(sim, n)):
        ranks[positions] = r
    if not ranks.any():
        raise _all_tied(name)
    return ranks


def _spearman(ranks_a, sim_b, n):
    """Spearman correlation of A's ranks with B's, ranking B chunk by chunk."""
    num = ss_b = 0.0
    for positions, rb in _rank_chunks(_sorted_keys(sim_b, n)):
        rb = rb.astype(np.float64)
        num += ranks_a[positions].astype(np.float64) @ rb
        ss_b += rb @ rb
    if ss_b == 0:
        raise _all_tied("B")
    return num / np.sqrt(_sum_squares(ranks_a) * ss_b)


def _pearson(sim_a, sim_b, n):
    """Pearson correlation of the two upper triangles, streamed in row blocks."""
    sums = np.zeros(5)
    shift = None  # first block's means, to avoid cancellation in the raw moments
    for (_, x), (_, y) in zip(_upper_chunks(sim_a, n), _upper_chunks(sim_b, n)):
        if shift is None:
            shift = x.mean(), y.mean()
        x, y = x - shift[0], y - shift[1]
        sums += [x.sum(), y.sum(), x @ x, y @ y, x @ y]
    N = n * (n - 1) // 2
    sx, sy, sxx, syy, sxy = sums
    var_x, var_y = sxx - sx * sx / N, syy - sy * sy / N
    for var, ss, name in ((var_x, sxx, "A"), (var_y, syy, "B")):
        if var <= 1e-12 * ss:
            raise _all_tied(name)
    return (sxy - sx * sy / N) / np.sqrt(var_x * var_y)


def _kendall_tau_a(ranks_a, ranks_b):
    """Kendall tau-a from tau-b: (C - D) = tau_b * sqrt((n0 - ties_a)(n0 - ties_b))."""
    N = ranks_a.size
    n0 = N * (N - 1) / 2

    def tied_pairs(r):
        counts = np.unique(r, return_counts=True)[1].astype(np.float64)
        return counts @ (counts - 1) / 2

    tau_b = stats.kendalltau(ranks_a, ranks_b).statistic
    return tau_b * np.sqrt((n0 - tied_pairs(ranks_a)) * (n0 - tied_pairs(ranks_b))) / n0


def _rsa_sides(A, B, inner, outer):
    A, B = _check_pair(A, B)
    _check_option(inner, INNER_SIMILARITIES, "inner")
    _check_option(outer, OUTER_CORRELATIONS, "outer")
    if A.shape[0] > _RSA_MAX_ROWS:
        raise ValueError(
            f"rsa supports at most {_RSA_MAX_ROWS:,} rows (n(n-1)/2 pairs must fit int32 "
            f"ranks), got n={A.shape[0]:,}; subsample the pairs"
        )
    return _similarity(A, inner, "A"), _similarity(B, inner, "B"), A.shape[0]


def rsa(A, B, inner="correlation", outer="spearman"):
    """Representational similarity analysis of paired rows.

    Computes each side's row-by-row inner similarity matrix and correlates
    their strict upper triangles (pairs i < j) with the outer correlation.

    Parameters
    ----------
    A : array-like of shape (n, d_a)
        Vectors of the first model; row i is paired with row i of ``B``.
    B : array-like of shape (n, d_b)
        Vectors of the second model.
    inner : {"correlation", "cosine", "euclidean"}, default="correlation"
        Row similarity: Pearson correlation (rows centred, then cosine),
        cosine, or negative Euclidean distance.
    outer : {"spearman", "pearson", "kendall"}, default="spearman"
        Correlation of the two upper triangles; Spearman uses average ranks
        for ties, Kendall is tau-a (ties count as neither concordant nor
        discordant, and the denominator is all pairs of pairs).

    Returns
    -------
    score : float
        Correlation in [-1, 1]; about 0 for unrelated inputs.

    Raises
    ------
    ValueError
        If the inputs are not finite 2-D arrays with the same number (>= 3)
        of rows, ``inner`` or ``outer`` is unknown, a row is constant
        (correlation) or zero (cosine), all similarities of a side are
        equal, or n > 65,536.

    Notes
    -----
    Memory, with N = n(n-1)/2 pairs: Spearman sorts A's similarities as
    packed uint64 (key, position) words (8N bytes), keeps A's int32 ranks (4N)
    and then ranks B the same way, so it peaks near 12N bytes, 1.5 n x n
    float32 matrices, plus unit-row copies of the inputs and 32 MiB block
    buffers (measured: 1.7 matrices at n = 20,000, d = 512 and 768); no
    n x n matrix is formed.
    Pearson streams row blocks in O(n) memory. Kendall hands both rank
    vectors to :func:`scipy.stats.kendalltau`, which needs several more
    int64 arrays of length N; it is meant for n up to a few thousand.
    For ranking, similarities are rounded to float32: values closer than
    float32 resolution (about 6e-8 relative) count as ties.
    """
    sim_a, sim_b, n = _rsa_sides(A, B, inner, outer)
    if outer == "pearson":
        return float(_pearson(sim_a, sim_b, n))
    ranks_a = _centred_ranks(sim_a, n, "A")
    if outer == "kendall":
        return float(_kendall_tau_a(ranks_a, _centred_ranks(sim_b, n, "B")))
    return float(_spearman(ranks_a, sim_b, n))


# ----------------------------------------------------------------------------
# permutation nulls


@dataclass(frozen=True, eq=False)
class NullResult:
    """A metric's observed score against its permutation null.

    Attributes
    ----------
    observed : float
        ``metric(A, B)``.
    null_mean, null_sd : float
        Mean and standard deviation (ddof=1) of the null scores.
    z : float
        ``(observed - null_mean) / null_sd``; +inf or -inf if ``null_sd`` is 0
        and observed lies above or below the null, nan if it equals it.
    p : float
        One-sided p-value ``(1 + #{null >= observed}) / (1 + n_perm)``.
    n_perm : int
        Number of permutations.
    seed : int
        Seed of ``numpy.random.default_rng`` that drew the permutations.
    null : ndarray of shape (n_perm,)
        Null scores (read-only), in the order the permutations were drawn.
    """

    observed: float
    null_mean: float
    null_sd: float
    z: float
    p: float
    n_perm: int
    seed: int
    null: np.ndarray


def _batches(iterable, size):
    it = iter(iterable)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _permuted_products(left, right, perms):
    """Yield (batch, stack): K permutations and their float32 products left.T @ right[p].

    ``stack`` has shape (K, d_l, d_r). The K gathered copies of ``right`` sit
    side by side, so one matmul serves the whole batch.
    """
    left, right = left.astype(np.float32), right.astype(np.float32)
    n, d = right.shape
    for batch in _batches(perms, max(1, _BLOCK_BYTES // (4 * n * d))):
        gathered = right[np.stack(batch, axis=1)].reshape(n, -1)  # (n, K * d)
        yield batch, (left.T @ gathered).reshape(left.shape[1], len(batch), d).swapaxes(0, 1)


def _singular_values(stack):
    """Singular values (ascending) of each matrix in a stack, from its smaller Gram in float64."""
    m = stack.astype(np.float64)
    mt = m.swapaxes(-1, -2)
    gram = m @ mt if m.shape[-2] <= m.shape[-1] else mt @ m
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))


def _naive_null(metric, A, B, perms, **kwargs):
    return np.array([metric(A, B[p], **kwargs) for p in perms], dtype=np.float64)


def _svcca_null(A, B, perms, variance=0.99, k=None, lan_compatible=False):
    qa, _, qb = _svcca_bases(A, B, variance, k, lan_compatible)
    observed = float(_canonical_correlations(qa, qb).mean())
    null = [_singular_values(stack) for _, stack in _permuted_products(qa, qb, perms)]
    return observed, np.minimum(np.concatenate(null), 1.0).mean(axis=-1)


def _pwcca_null(A, B, perms, variance=0.99):
    qa, ra, qb = _svcca_bases(A, B, variance, None, False)
    return _pwcca_score(qa, ra, qb), np.array([_pwcca_score(qa, ra, qb[p]) for p in perms])


def _cka_null(A, B, perms, debiased=False):
    a, b, rows_a, rows_b, norm = _cka_sides(A, B, debiased)
    observed = float(_hsic(np.sum((a.T @ b) ** 2), rows_a, rows_b, debiased) / norm)
    n = a.shape[0]
    null = []
    if n * n <= a.shape[1] * b.shape[1]:  # few rows: tr(K_A K_B[p, p]) on the n x n Grams
        ka, kb = a @ a.T, b @ b.T
        for batch in _batches(perms, max(1, _BLOCK_BYTES // (8 * n * n))):
            idx = np.stack(batch)
            cross = np.einsum("ij,kij->k", ka, kb[idx[:, :, None], idx[:, None, :]])
            null += [_hsic(c, rows_a, rows_b[p], debiased) / norm for c, p in zip(cross, batch)]
        return observed, np.array(null)
    for batch, stack in _permuted_products(a, b, perms):
        cross = np.einsum("kij,kij->k", stack, stack, dtype=np.float64)
        null += [_hsic(c, rows_a, rows_b[p], debiased) / norm for c, p in zip(cross, batch)]
    return observed, np.array(null)


def _procrustes_null(A, B, perms):
    a, b = _procrustes_sides(A, B)
    observed = float(min(np.linalg.svd(a.T @ b, compute_uv=False).sum(), 1.0))
    null = [_singular_values(stack).sum(axis=-1) for _, stack in _permuted_products(a, b, perms)]
    return observed, np.minimum(np.concatenate(null), 1.0)


def _mutual_knn_null(A, B, perms, k=10):
    keys_a, nbrs_b = _knn_sides(A, B, k)
    inverse = np.empty(nbrs_b.shape[0], dtype=np.intp)
    null = []
    for p in perms:
        # row i of B[p] is B[p[i]]; its neighbours, renumbered for B[p], are inverse[nbrs_b[p[i]]]
        inverse[p] = np.arange(p.size)
        null.append(_knn_overlap(keys_a, inverse[nbrs_b[p]]))
    return float(_knn_overlap(keys_a, nbrs_b)), np.array(null)


def _symmetric(tri, n):
    """Symmetric float32 (n, n) matrix with zero diagonal from a row-major upper triangle."""
    full = np.zeros((n, n), dtype=np.float32)
    for i in range(n - 1):
        row = tri[_tri_offset(i, n) : _tri_offset(i + 1, n)]
        full[i, i + 1 :] = row
        full[i + 1 :, i] = row
    return full


def _centred_matrix(sim, n, outer, name):
    """Full matrix of centred ranks (spearman) or similarities (pearson); their sum of squares."""
    if outer == "spearman":
        tri = _centred_ranks(sim, n, name)
    else:
        tri = np.concatenate([values for _, values in _upper_chunks(sim, n)])
        tri -= tri.mean()
    return _symmetric(tri, n), _sum_squares(tri)


def _permuted_upper_dot(xa, xb, p):
    """sum_{i<j} xa[i, j] * xb[p[i], p[j]] for symmetric zero-diagonal float32 matrices."""
    n = p.size
    rows = max(1, (1 << 18) // n)  # a block of xa rows stays in cache
    total = 0.0
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        block = np.take(xb[p[i0:i1]], p[i0:], axis=1)
        block *= xa[i0:i1, i0:]
        # the first i1 - i0 columns form the diagonal block, which holds each of its pairs twice
        diagonal, off_diagonal = block[:, : i1 - i0], block[:, i1 - i0 :]
        total += off_diagonal.sum(dtype=np.float64) + 0.5 * diagonal.sum(dtype=np.float64)
    return total


def _rsa_null(A, B, perms, inner="correlation", outer="spearman"):
    observed = rsa(A, B, inner, outer)
    if outer == "kendall":  # tau-a has no cheap permuted update; O(N log N) per permutation
        return observed, _naive_null(rsa, A, B, perms, inner=inner, outer=outer)
    sim_a, sim_b, n = _rsa_sides(A, B, inner, outer)
    xa, ss_a = _centred_matrix(sim_a, n, outer, "A")
    xb, ss_b = _centred_matrix(sim_b, n, outer, "B")
    scale = 1.0 / np.sqrt(ss_a * ss_b)
    return observed, np.array([_permuted_upper_dot(xa, xb, p) * scale for p in perms])


_FAST_NULLS = {
    "svcca": _svcca_null,
    "pwcca": _pwcca_null,
    "rsa": _rsa_null,
    "cka": _cka_null,
    "mutual_knn": _mutual_knn_null,
    "procrustes": _procrustes_null,
}


def summarise_null(observed, null, seed):
    """A :class:`NullResult` for ``observed`` against null scores drawn with ``seed``.

    ``null`` (1-D float array) is made read-only. z and p follow
    :class:`NullResult`: p = (1 + #{null >= observed}) / (1 + n).
    """
    null = np.asarray(null, dtype=float)
    if null.ndim != 1 or null.size < 1:
        raise ValueError(f"null must be a non-empty 1-D array, got shape {null.shape}")
    null.setflags(write=False)
    mean = float(null.mean())
    sd = float(null.std(ddof=1)) if null.size > 1 else float("nan")
    diff = observed - mean
    if sd > 0 or np.isnan(sd):
        z = diff / sd
    else:
        z = float(np.copysign(np.inf, diff)) if diff != 0 else float("nan")
    p = (1 + np.count_nonzero(null >= observed)) / (1 + null.size)
    return NullResult(observed, mean, sd, z, p, null.size, seed, null)


def permutation_null(metric, A, B, n_perm=1000, seed=0, **metric_kwargs):
    """Score a pairing against the scores of shuffled pairings.

    The null permutes the rows of ``B``: the j-th null score is
    ``metric(A, B[p_j])`` where ``p_j`` is the j-th call of
    ``rng.permutation(n)`` on ``rng = numpy.random.default_rng(seed)``, so the
    same seed gives bit-identical results.

    Named metrics use exact fast paths that compute once what a permutation
    does not change and pay per permutation only for what does:

    * ``"svcca"``: SVD bases Qa, Qb once; per permutation the eigenvalues of
      the Gram of ``Qa.T @ Qb[p]``, batched into large float32 matmuls with a
      float64 Gram (agrees with the naive path to ~1e-8).
    * ``"pwcca"``: the bases once; per permutation one small SVD.
    * ``"rsa"``: the inner similarity ranks (or values) once; per permutation
      ``sum_{i<j} RA[i, j] RB[p_i, p_j]``, the mean and variance of the ranks
      being unchanged. Holds two n x n float32 matrices. ``outer="kendall"``
      falls back to the naive loop.
    * ``"cka"``: centred sides once; per permutation ``||A^T B[p]||_F^2`` in
      batched float32 matmuls (plus O(n) terms when debiased); ~1e-8. With
      n^2 <= d_a d_b, the float64 n x n Grams once and per permutation
      ``<K_A, K_B[p, p]>``.
    * ``"mutual_knn"``: neighbour sets once; per permutation O(n k log(n k)).
    * ``"procrustes"``: normalised sides once; per permutation the nuclear
      norm of ``A^T B[p]``, as for svcca; ~1e-8.

    A callable metric is recomputed from scratch for each permutation.

    Parameters
    ----------
    metric : {"svcca", "pwcca", "rsa", "cka", "mutual_knn", "procrustes"} or callable
        Metric name, or ``callable(A, B, **metric_kwargs) -> float``.
    A : array-like of shape (n, d_a)
        Vectors of the first model; row i is paired with row i of ``B``.
    B : array-like of shape (n, d_b)
        Vectors of the second model; its rows are permuted.
    n_perm : int, default=1000
        Number of permutations, >= 1 (``null_sd`` and ``z`` are nan for 1).
    seed : int, default=0
        Non-negative seed for ``numpy.random.default_rng``.
    **metric_kwargs
        Passed to the metric (e.g. ``variance``, ``k``, ``inner``).

    Returns
    -------
    result : NullResult
        Observed score, null mean and sd, z, p, n_perm, seed and null scores.
        With ``null_sd == 0``, z is +inf, -inf or nan (observed above, below
        or equal to the null mean). The smallest possible p is
        ``1 / (1 + n_perm)``.

    Raises
    ------
    ValueError
        If ``metric`` is an unknown name, ``n_perm`` < 1, ``seed`` is not a
        non-negative integer, or the metric rejects the inputs.
    """
    n_perm = _check_int(n_perm, "n_perm", 1)
    seed = _check_int(seed, "seed", 0)
    A, B = _check_pair(A, B)
    rng = np.random.default_rng(seed)
    perms = (rng.permutation(A.shape[0]) for _ in range(n_perm))
    if callable(metric):
        observed = float(metric(A, B, **metric_kwargs))
        null = _naive_null(metric, A, B, perms, **metric_kwargs)
    else:
        _check_option(metric, tuple(_FAST_NULLS), "metric")
        observed, null = _FAST_NULLS[metric](A, B, perms, **metric_kwargs)
    return summarise_null(observed, null, seed)
