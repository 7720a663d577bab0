"""Representational similarity analysis (RSA) of paired rows, with its fast permutation
null and random-subset draws.

Each side's rows are compared with each other (the inner similarity), and the
two sides' similarities over all pairs of rows i < j are correlated (the outer
correlation). With N = n(n-1)/2 pairs of rows, the similarities are never held
as n x n matrices when scoring: they are computed, ranked and correlated in row
blocks.

Pure core: numpy/scipy in, floats out; no I/O, no logging, no global state.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..devices import torch_device
from .inputs import BLOCK_BYTES, check_option, check_pair, unit_rows
from .nulls import DEVICE_BLOCK_BYTES, device_batches, naive_null, subset_grams

__all__ = [
    "INNER_SIMILARITIES",
    "OUTER_CORRELATIONS",
    "float_keys",
    "rsa",
    "rsa_null",
    "rsa_subsets",
]

INNER_SIMILARITIES = ("correlation", "cosine", "euclidean")
OUTER_CORRELATIONS = ("spearman", "pearson", "kendall")
_RANK_CHUNK = 1 << 20  # pairs handled per step when ranking similarities
_RSA_MAX_ROWS = 65_536  # n(n-1)/2 must fit the int32 ranks and uint32 positions


# ----------------------------------------------------------------------------
# inner similarities, in blocks of the upper triangle


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
                f"row {constant[0]} of {name} is constant ({constant.size} such "
                "rows), so its correlation with other rows is undefined; drop constant "
                "rows or use inner='cosine'"
            )
        X = X - X.mean(axis=1, keepdims=True)
    Z = unit_rows(X, name)
    return lambda r, c: Z[r] @ Z[c].T


def _tri_offset(i, n):
    """Position of pair (i, i + 1) in the row-major strict upper triangle."""
    return i * (2 * n - i - 1) // 2


def _upper_chunks(sim, n):
    """Yield (offset, values) of the strict upper triangle, row-major, in row blocks."""
    rows = max(1, BLOCK_BYTES // (8 * n))
    for i0 in range(0, n - 1, rows):
        i1 = min(i0 + rows, n - 1)
        block = sim(slice(i0, i1), slice(i0, n))
        yield _tri_offset(i0, n), block[np.arange(i0, n) > np.arange(i0, i1)[:, None]]


# ----------------------------------------------------------------------------
# ranks and outer correlations


def float_keys(values):
    """Order-preserving uint32 keys of ``values`` rounded to float32.

    Parameters
    ----------
    values : ndarray of float
        Any shape; NaN has no place in the order.

    Returns
    -------
    keys : ndarray of uint32, same shape
        ``keys[i] < keys[j]`` exactly when ``float32(values[i]) <
        float32(values[j])``; -0.0 and 0.0 share a key, so they tie.
    """
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))


def _sorted_keys(sim, n):
    """Sorted uint64 array of (float32 similarity key << 32) | pair position."""
    packed = np.empty(n * (n - 1) // 2, dtype=np.uint64)
    for off, values in _upper_chunks(sim, n):
        positions = np.arange(off, off + values.size, dtype=np.uint64)
        keys = float_keys(values).astype(np.uint64) << 32
        packed[off : off + values.size] = keys | positions
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
    chunks = (
        x[s : s + _RANK_CHUNK].astype(np.float64) for s in range(0, x.size, _RANK_CHUNK)
    )
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


# ----------------------------------------------------------------------------
# RSA


def _rsa_sides(A, B, inner, outer):
    """Validate the inputs; each side's block similarity function and n."""
    A, B = check_pair(A, B)
    check_option(inner, INNER_SIMILARITIES, "inner")
    check_option(outer, OUTER_CORRELATIONS, "outer")
    if A.shape[0] > _RSA_MAX_ROWS:
        raise ValueError(
            f"rsa supports at most {_RSA_MAX_ROWS:,} rows (n(n-1)/2 pairs must fit "
            f"int32 ranks), got n={A.shape[0]:,}; subsample the pairs"
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
# permutation null


def _symmetric(tri, n):
    """Symmetric float32 (n, n) matrix, zero diagonal, from a row-major triangle."""
    full = np.zeros((n, n), dtype=np.float32)
    for i in range(n - 1):
        row = tri[_tri_offset(i, n) : _tri_offset(i + 1, n)]
        full[i, i + 1 :] = row
        full[i + 1 :, i] = row
    return full


def _centred_matrix(sim, n, outer, name):
    """Full matrix of centred ranks (spearman) or similarities (pearson).

    Returns the float32 (n, n) matrix and the float64 sum of squares of the triangle.
    """
    if outer == "spearman":
        tri = _centred_ranks(sim, n, name)
    else:
        tri = np.concatenate([values for _, values in _upper_chunks(sim, n)])
        tri -= tri.mean()
    return _symmetric(tri, n), _sum_squares(tri)


def _permuted_upper_dot(xa, xb, p):
    """sum_{i<j} xa[i, j] * xb[p[i], p[j]] for symmetric float32 (n, n), 0 diagonal."""
    n = p.size
    rows = max(1, (1 << 18) // n)  # a block of xa rows stays in cache
    total = 0.0
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        block = np.take(xb[p[i0:i1]], p[i0:], axis=1)
        block *= xa[i0:i1, i0:]
        # the first i1 - i0 columns form the diagonal block, which holds each of its
        # pairs twice
        diagonal, off_diagonal = block[:, : i1 - i0], block[:, i1 - i0 :]
        total += (
            off_diagonal.sum(dtype=np.float64) + 0.5 * diagonal.sum(dtype=np.float64)
        )
    return total


def _device_upper_dots(xa, xb, perms, dev):
    """:func:`_permuted_upper_dot` for each permutation, in torch on ``dev``.

    The full-matrix sum ``sum_{i, j} xa[i, j] xb[p_i, p_j]`` counts each pair
    twice (the diagonals are zero); float32 products summed in float64, as on
    the host. Rows are taken in blocks so that a batch's gathered rows and their
    products stay within :data:`DEVICE_BLOCK_BYTES`.
    """
    import torch

    n = xa.shape[0]
    xa, xb = torch.as_tensor(xa, device=dev), torch.as_tensor(xb, device=dev)
    out = []
    for batch, idx in device_batches(perms, 8 * n * n, dev):
        rows = max(1, DEVICE_BLOCK_BYTES // (8 * n * len(batch)))
        total = torch.zeros(len(batch), dtype=torch.float64, device=dev)
        for i0 in range(0, n, rows):
            block = xb[idx[:, i0 : i0 + rows, None], idx[:, None, :]]  # (K, rows, n)
            total += (block * xa[i0 : i0 + rows]).sum((1, 2), dtype=torch.float64)
        out.append(0.5 * total.cpu().numpy())
    return np.concatenate(out)


def rsa_null(A, B, perms, inner="correlation", outer="spearman", device=None):
    """Observed RSA and its scores for each permutation of B's rows.

    Returns (float, ndarray of shape (n_perm,)).

    The inner similarity ranks (or values) once; per permutation
    ``sum_{i<j} RA[i, j] RB[p_i, p_j]``, the mean and variance of the ranks
    being unchanged. Holds two n x n float32 matrices. ``outer="kendall"``
    has no cheap permuted update and scores each permutation from scratch,
    O(N log N) with N = n(n-1)/2, in numpy whatever ``device`` is. With a torch
    ``device`` (``saeuniv.core.devices``) the ranks are still found in numpy and
    the per-permutation sums run there in torch (within 1e-6 of ``device=None``);
    the device then holds both n x n matrices too.
    """
    dev = torch_device(device)
    observed = rsa(A, B, inner, outer)
    if outer == "kendall":
        return observed, naive_null(rsa, A, B, perms, inner=inner, outer=outer)
    sim_a, sim_b, n = _rsa_sides(A, B, inner, outer)
    xa, ss_a = _centred_matrix(sim_a, n, outer, "A")
    xb, ss_b = _centred_matrix(sim_b, n, outer, "B")
    scale = 1.0 / np.sqrt(ss_a * ss_b)
    if dev is not None:
        return observed, _device_upper_dots(xa, xb, perms, dev) * scale
    return observed, np.array([_permuted_upper_dot(xa, xb, p) * scale for p in perms])


# ----------------------------------------------------------------------------
# random-subset draws


def _correlation_gram(X):
    """Gram (P, P) of the row-centred unit rows of X: the rows' Pearson correlations.

    Unlike :func:`rsa`, a constant row is not rejected here; it makes the
    scores of the draws that include it NaN.
    """
    Z = X - X.mean(1, keepdims=True)
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    return Z @ Z.T


def _spearman_rows(ra, rb):
    """Pearson correlation of each row of two stacks of ranks (D, N) -> (D,)."""
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)

    def dot(x, y):
        return np.einsum("ki,ki->k", x, y)

    return dot(ra, rb) / np.sqrt(dot(ra, ra) * dot(rb, rb))


def rsa_subsets(A, B, inner="correlation", outer="spearman"):
    """Batched RSA of random subsets of a pool of pairs, or None for other options.

    Parameters
    ----------
    A : ndarray of float64, shape (P, d_a)
    B : ndarray of float64, shape (P, d_b)
        The pool: row i of ``A`` paired with row i of ``B``.
    inner, outer : str
        As :func:`rsa`. Only the defaults, correlation similarities compared
        by Spearman, have batched draws; for others (None returned) each
        subset is scored by :func:`rsa` itself.

    Returns
    -------
    draws : callable or None
        ``draws(picks)``: RSA of ``A[p], B[p]`` for each row ``p`` of
        ``picks`` (D, m) -> (D,). The pool's row-correlation matrices (P, P)
        are computed once; per draw the upper triangle of each sub-matrix is
        rounded to float32, as :func:`rsa` rounds before ranking, and ranked
        with :func:`scipy.stats.rankdata` (average ranks). Agrees with
        :func:`rsa` to ~1e-10.
    """
    check_option(inner, INNER_SIMILARITIES, "inner")
    check_option(outer, OUTER_CORRELATIONS, "outer")
    if (inner, outer) != ("correlation", "spearman"):
        return None
    ga, gb = _correlation_gram(A), _correlation_gram(B)

    def draws(picks):
        iu = np.triu_indices(picks.shape[1], 1)
        ka, kb = subset_grams(ga, picks), subset_grams(gb, picks)
        ra, rb = (
            stats.rankdata(K[:, iu[0], iu[1]].astype(np.float32), axis=1)
            for K in (ka, kb)
        )
        return _spearman_rows(ra, rb)

    return draws
