"""Pair the SAE features of two models by correlating their codes on shared tokens.

Pure core: sparse codes in, arrays out; no I/O.

Codes are scipy.sparse CSR matrices of shape (tokens, features), or iterables
of CSR chunks covering consecutive token rows. The pipeline is

1. :func:`correlation` (or :class:`CorrelationAccumulator`, fed shard by
   shard) gives the exact Pearson correlation of every A feature with every B
   feature; :func:`topk_correlation` gives only each feature's best partners
   when the full matrix does not fit in memory (e.g. 131,072 x 16,384).
2. :func:`match` turns either into pairs under a named policy and a threshold.
3. :func:`junk_filter` and :func:`shared_token_filter` prune the pairs using
   each feature's top-activating tokens from :func:`top_activations`.

Dead features (zero variance over the tokens) have NaN correlations and are
never matched.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

POLICIES = ("max", "one_to_one", "mutual", "hungarian", "lan")
DEFAULT_MAX_BYTES = 256 * 2**20
_SLICE_ELEMENTS = 2**22  # bounds the temporaries of the in-place block arithmetic
_DEAD_RELATIVE_VARIANCE = 1e-12  # variance below this fraction of the mean square: constant


# ----------------------------------------------------------------------------
# results


@dataclass(frozen=True, eq=False)
class Matches:
    """Matched feature pairs: A feature ``a[i]`` with B feature ``b[i]``.

    Parameters
    ----------
    a, b : array-like of int, shape (n,)
        Feature indices in model A and model B.
    corr : array-like of float, shape (n,)
        Correlation of each pair.
    """

    a: np.ndarray
    b: np.ndarray
    corr: np.ndarray

    def __post_init__(self):
        a, b = np.asarray(self.a, np.int64), np.asarray(self.b, np.int64)
        corr = np.asarray(self.corr)
        if not a.ndim == b.ndim == corr.ndim == 1 or not len(a) == len(b) == len(corr):
            raise ValueError(
                f"Matches needs 1-D arrays of equal length; got a {a.shape}, b {b.shape}, "
                f"corr {corr.shape}"
            )
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "corr", corr)

    @property
    def n(self) -> int:
        """Number of pairs."""
        return len(self.a)

    @property
    def unique_a_fraction(self) -> float:
        """Distinct A features / pairs (1.0 when one-to-one in A; NaN if empty)."""
        return np.unique(self.a).size / self.n if self.n else float("nan")

    @property
    def unique_b_fraction(self) -> float:
        """Distinct B features / pairs (NaN if empty)."""
        return np.unique(self.b).size / self.n if self.n else float("nan")

    @property
    def mean_corr(self) -> float:
        """Mean correlation of the pairs (NaN if empty)."""
        return float(self.corr.mean()) if self.n else float("nan")

    def take(self, keep) -> Matches:
        """New Matches with the pairs selected by a boolean mask or index array."""
        return Matches(self.a[keep], self.b[keep], self.corr[keep])


@dataclass(frozen=True, eq=False)
class TopK:
    """Best correlation partners of every feature of both models, best first.

    Attributes
    ----------
    a_partner : ndarray of int64, shape (F_a, k)
        For each A feature, the B indices of its k most correlated B features.
    a_corr : ndarray, shape (F_a, k)
        Their correlations.
    b_partner : ndarray of int64, shape (F_b, k)
        For each B feature, the A indices of its k most correlated A features.
    b_corr : ndarray, shape (F_b, k)
        Their correlations.

    Slots without a partner (dead feature, or fewer than k live partners) hold
    index -1 and correlation NaN.
    """

    a_partner: np.ndarray
    a_corr: np.ndarray
    b_partner: np.ndarray
    b_corr: np.ndarray


@dataclass(frozen=True, eq=False)
class TopActivations:
    """The k largest activations of every feature, largest first.

    Attributes
    ----------
    rows : ndarray of int64, shape (F, k)
        Token rows (positions in the concatenated codes); -1 pads features
        with fewer than k non-zero activations.
    values : ndarray of float32, shape (F, k)
        The activations; 0.0 where padded.
    """

    rows: np.ndarray
    values: np.ndarray

    def tokens(self, token_ids) -> np.ndarray:
        """Map rows to token ids: ``token_ids[rows]``, keeping -1 padding.

        Parameters
        ----------
        token_ids : array-like of int, shape (n_tokens,)
            Token id of each code row.

        Returns
        -------
        ndarray of int64, shape (F, k)
        """
        ids = np.asarray(token_ids, np.int64)
        if ids.ndim != 1 or ids.size <= self.rows.max(initial=-1):
            raise ValueError(
                f"token_ids must be 1-D with one id per code row (at least "
                f"{self.rows.max(initial=-1) + 1}); got shape {ids.shape}"
            )
        return np.where(self.rows >= 0, ids[np.maximum(self.rows, 0)], -1)


# ----------------------------------------------------------------------------
# input validation


def _as_csr(x, name):
    """Validated canonical float64 CSR copy of x (other sparse formats converted)."""
    if not sp.issparse(x):
        raise ValueError(
            f"{name} must be a scipy.sparse CSR matrix (tokens x features); got "
            f"{type(x).__name__}. Wrap dense codes with scipy.sparse.csr_array(x)."
        )
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tokens x features); got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {x.shape})")
    x = x.tocsr().astype(np.float64)  # tocsr converts COO/CSC; astype copies
    x.sum_duplicates()
    n_nan, n_inf = int(np.isnan(x.data).sum()), int(np.isinf(x.data).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} inf values; clean the codes "
            "(e.g. drop the tokens or use np.nan_to_num) before correlating"
        )
    return x


def _check_rows(a, b, where):
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{where}: codes_a has {a.shape[0]} token rows but codes_b has {b.shape[0]}; "
            "both must cover the same tokens"
        )


def _chunk_pairs(codes_a, codes_b):
    """Yield (chunk_a, chunk_b) pairs from two matrices or two chunk iterables."""
    if sp.issparse(codes_a) and sp.issparse(codes_b):
        yield codes_a, codes_b
        return
    for x, name in ((codes_a, "codes_a"), (codes_b, "codes_b")):
        if sp.issparse(x) or isinstance(x, np.ndarray):
            raise ValueError(
                f"{name} is a {type(x).__name__}; pass two scipy.sparse CSR matrices "
                "(wrap dense codes with scipy.sparse.csr_array(x)) or two iterables of "
                "CSR chunks"
            )
    end = object()
    for i, (a, b) in enumerate(itertools.zip_longest(codes_a, codes_b, fillvalue=end)):
        if a is end or b is end:
            short = "codes_a" if a is end else "codes_b"
            raise ValueError(
                f"{short} ran out of chunks after {i} while the other iterable has more; "
                "chunk i of A and chunk i of B must cover the same token rows"
            )
        yield a, b


def _as_corr(corr):
    corr = np.asarray(corr)
    if corr.ndim != 2 or corr.size == 0 or not np.issubdtype(corr.dtype, np.floating):
        raise ValueError(
            f"corr must be a non-empty 2-D float array (F_a x F_b) or a TopK; got "
            f"{corr.dtype} array of shape {corr.shape}"
        )
    return corr


def _check_threshold(threshold):
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1]; got {threshold!r}")


def _check_k(k):
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")


def _float_dtype(dtype):
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a float dtype (e.g. np.float32); got {dtype}")
    return dtype


# ----------------------------------------------------------------------------
# correlation


def _moments(x):
    """Per-feature sum and sum of squares of a float64 CSR matrix."""
    f = x.shape[1]
    return (np.bincount(x.indices, x.data, minlength=f),
            np.bincount(x.indices, x.data * x.data, minlength=f))


def _std(n, s, ss):
    """Population std from sums; NaN for dead (numerically constant) features."""
    var = (ss - s * s / n) / n
    dead = var <= _DEAD_RELATIVE_VARIANCE * ss / n
    return np.where(dead, np.nan, np.sqrt(np.maximum(var, 0.0)))


def dead_features(codes) -> np.ndarray:
    """Boolean mask of the dead features of ``codes`` (tokens x features, sparse): zero
    variance over the tokens, or numerically constant. Their correlations are NaN in
    :func:`correlation`, whatever the other side's features are."""
    x = _as_csr(codes, "codes")
    if x.shape[0] == 0:
        raise ValueError("codes have no token rows")
    return np.isnan(_std(x.shape[0], *_moments(x)))


def _cross_to_corr(block, n, sum_a, sum_b, std_a, std_b):
    """Turn raw cross-products sum_t a_t b_t into correlations, in place.

    cov = (S_ab - s_a s_b / n) / n. In float64 the cancellation loses about
    log10(mean^2 / var) digits, negligible for sparse codes.
    """
    step = max(1, _SLICE_ELEMENTS // block.shape[1])
    for i in range(0, len(block), step):
        part, rows = block[i : i + step], slice(i, i + step)
        part -= np.outer(sum_a[rows] / n, sum_b)
        part /= (n * std_a[rows])[:, None]
        part /= std_b
    np.clip(block, -1.0, 1.0, out=block)
    return block


def _add_sparse(dense, c):
    """dense += c for a CSR c of the same shape, without a dense temporary."""
    rows = np.repeat(np.arange(c.shape[0], dtype=np.int64) * c.shape[1], np.diff(c.indptr))
    np.add.at(dense.reshape(-1), rows + c.indices, c.data)


class CorrelationAccumulator:
    """Streaming exact Pearson correlation between the features of two models.

    Accumulates float64 sufficient statistics over token chunks: the token
    count, per-feature sums and sums of squares, and the cross-product
    ``A^T B`` (a sparse-sparse product per chunk, added into a dense float64
    (F_a, F_b) array kept in row blocks). Memory is ``8 * F_a * F_b`` bytes
    plus per-update temporaries, independent of the number of tokens.

    Parameters
    ----------
    block_bytes : int, default=256 MiB
        Size of one row block of the cross-product accumulator. Temporaries of
        one update and of :meth:`result` scale with it, not with F_a x F_b.

    Attributes
    ----------
    n_tokens : int
        Token rows accumulated so far.
    n_chunks : int
        Chunk pairs accumulated so far.

    Examples
    --------
    >>> acc = CorrelationAccumulator()
    >>> for chunk_a, chunk_b in shards:          # doctest: +SKIP
    ...     acc.update(chunk_a, chunk_b)
    >>> corr = acc.result(release=True)          # doctest: +SKIP
    """

    def __init__(self, block_bytes: int = DEFAULT_MAX_BYTES):
        if block_bytes < 8:
            raise ValueError(f"block_bytes must be at least 8; got {block_bytes}")
        self.block_bytes = block_bytes
        self.n_tokens = 0
        self.n_chunks = 0
        self.shape = None  # (F_a, F_b), set by the first update
        self._blocks = None  # list of (first row, float64 row block of A^T B)
        self._a = self._b = None  # [sum, sum of squares] per feature
        self._released = False

    def _allocate(self, f_a, f_b):
        rows = max(1, self.block_bytes // (8 * f_b))
        self._blocks = [(r, np.zeros((min(rows, f_a - r), f_b))) for r in range(0, f_a, rows)]
        self._a, self._b = [np.zeros(f_a), np.zeros(f_a)], [np.zeros(f_b), np.zeros(f_b)]
        self.shape = (f_a, f_b)

    def update(self, chunk_a, chunk_b) -> CorrelationAccumulator:
        """Add one chunk pair covering the same token rows.

        Parameters
        ----------
        chunk_a : scipy.sparse matrix, shape (n_rows, F_a)
            Codes of model A (CSR; other sparse formats are converted).
        chunk_b : scipy.sparse matrix, shape (n_rows, F_b)
            Codes of model B for the same token rows.

        Returns
        -------
        self
        """
        if self._released:
            raise ValueError("accumulator was consumed by result(release=True); start a new one")
        where = f"chunk {self.n_chunks}"
        a, b = _as_csr(chunk_a, f"codes_a {where}"), _as_csr(chunk_b, f"codes_b {where}")
        _check_rows(a, b, where)
        if self._blocks is None:
            self._allocate(a.shape[1], b.shape[1])
        if (a.shape[1], b.shape[1]) != self.shape:
            raise ValueError(
                f"{where} has {a.shape[1]} x {b.shape[1]} features; earlier chunks had "
                f"{self.shape[0]} x {self.shape[1]}"
            )
        for stats, x in ((self._a, a), (self._b, b)):
            s, ss = _moments(x)
            stats[0] += s
            stats[1] += ss
        at = a.T.tocsr()
        for r, block in self._blocks:
            _add_sparse(block, at[r : r + len(block)] @ b)
        self.n_tokens += a.shape[0]
        self.n_chunks += 1
        return self

    def result(self, dtype=np.float32, release: bool = False) -> np.ndarray:
        """Correlation matrix of the tokens seen so far.

        Parameters
        ----------
        dtype : float dtype, default=np.float32
            Output dtype (the computation is float64).
        release : bool, default=False
            Free each float64 block as soon as it is converted, so peak memory
            stays at the accumulator's size instead of accumulator + output.
            The accumulator cannot be used afterwards.

        Returns
        -------
        ndarray, shape (F_a, F_b)
            Pearson correlations in [-1, 1]; rows of dead A features and
            columns of dead B features are NaN.
        """
        dtype = _float_dtype(dtype)
        if self._released:
            raise ValueError("accumulator was consumed by result(release=True); start a new one")
        if self.n_tokens == 0:
            raise ValueError("no tokens accumulated; call update() with non-empty chunks first")
        n, (sum_a, sq_a), (sum_b, sq_b) = self.n_tokens, self._a, self._b
        std_a, std_b = _std(n, sum_a, sq_a), _std(n, sum_b, sq_b)
        out = np.empty(self.shape, dtype)
        blocks, self._released = self._blocks, release
        for i, (r, block) in enumerate(blocks):
            if release:
                blocks[i] = None
            rows = slice(r, r + len(block))
            work = block if release else block.copy()
            out[rows] = _cross_to_corr(work, n, sum_a[rows], sum_b, std_a[rows], std_b)
        if release:
            self._blocks = None
        return out


def correlation(codes_a, codes_b, dtype=np.float32) -> np.ndarray:
    """Exact Pearson correlation of every A feature with every B feature.

    Parameters
    ----------
    codes_a : scipy.sparse matrix (tokens, F_a) or iterable of them
        SAE codes of model A, CSR (other sparse formats are converted; dense
        arrays are rejected). An iterable is read chunk by chunk.
    codes_b : scipy.sparse matrix (tokens, F_b) or iterable of them
        Codes of model B for the same tokens; chunk i must have the same rows
        as chunk i of ``codes_a``.
    dtype : float dtype, default=np.float32
        Output dtype; statistics are accumulated in float64.

    Returns
    -------
    ndarray, shape (F_a, F_b)
        NaN rows/columns for dead features: zero variance over the tokens, or
        numerically constant (variance below 1e-12 of the mean square).

    Raises
    ------
    ValueError
        On non-sparse input, mismatched rows or feature counts, NaN/inf codes,
        chunk iterables of different length, or no tokens.
    """
    acc = CorrelationAccumulator()
    for a, b in _chunk_pairs(codes_a, codes_b):
        acc.update(a, b)
    return acc.result(dtype, release=True)


# ----------------------------------------------------------------------------
# top-k


def _empty_topk(n, k):
    return np.full((n, k), -1, np.int64), np.full((n, k), -np.inf)


def _merge_topk(top, where, idx, val):
    """Merge candidates (idx, val) into the running top-k rows top[where].

    Order is descending value, ties to the lowest index; -inf marks "none".
    """
    cat_idx = np.concatenate([top[0][where], idx], axis=1)
    cat_val = np.concatenate([top[1][where], val], axis=1)
    order = np.lexsort((cat_idx, -cat_val), axis=1)[:, : top[0].shape[1]]
    top[0][where] = np.take_along_axis(cat_idx, order, axis=1)
    top[1][where] = np.take_along_axis(cat_val, order, axis=1)


def _topk_rows(block, k):
    """Top-k of each row of a NaN-free block: (indices, values), shape (rows, k)."""
    if k == 1:
        idx = block.argmax(1)[:, None]  # first maximum: lowest index on ties
        return idx, np.take_along_axis(block, idx, 1)
    val, idx = torch.from_numpy(block).topk(min(k, block.shape[1]), 1)
    return idx.numpy(), val.numpy()


def _topk_cols(block, k):
    """Top-k of each column of a NaN-free block: (indices, values), shape (cols, k)."""
    if k == 1:  # column max, then its first row; avoids a strided argmax
        best = block.max(0)
        rows, cols = np.divmod(np.flatnonzero(block == best), block.shape[1])
        _, first = np.unique(cols, return_index=True)  # row-major: first = lowest row
        return rows[first][:, None], best[:, None]
    val, idx = torch.from_numpy(block).topk(min(k, len(block)), 0)
    return idx.T.numpy(), val.T.numpy()


def _fold_block(block, r, c, top_a, top_b):
    """Merge one dense correlation block (NaN = dead) into both running top-k's."""
    block[np.isnan(block)] = -np.inf
    k = top_a[0].shape[1]
    idx, val = _topk_rows(block, k)
    _merge_topk(top_a, slice(r, r + len(block)), idx + c, val)
    idx, val = _topk_cols(block, k)
    _merge_topk(top_b, slice(c, c + block.shape[1]), idx + r, val)


def _finish_topk(top, dtype):
    missing = top[1] == -np.inf
    top[0][missing] = -1
    return top[0], np.where(missing, np.nan, top[1]).astype(dtype)


def _block_shape(f_b, max_bytes):
    cols = min(f_b, max(1, max_bytes // 8))
    return max(1, max_bytes // (8 * cols)), cols


def topk_correlation(codes_a, codes_b, k: int = 1, max_bytes: int = DEFAULT_MAX_BYTES,
                     dtype=np.float32) -> TopK:
    """Exact top-k correlation partners of every feature, without the full matrix.

    Features are processed in blocks of (A rows x B columns); each block's
    correlations are computed exactly (float64, over all tokens) and folded
    into running top-k lists for its rows and its columns. Work is that of
    :func:`correlation`; memory no longer grows with F_a x F_b.

    Parameters
    ----------
    codes_a, codes_b : scipy.sparse matrix, shape (tokens, F_a) / (tokens, F_b)
        CSR codes over all tokens (each block revisits every token, so chunk
        iterables are not accepted: stack them with scipy.sparse.vstack).
    k : int, default=1
        Partners kept per feature.
    max_bytes : int, default=256 MiB
        Upper bound on the dense float64 correlation block, i.e.
        ``8 * block_rows * block_cols <= max_bytes`` (at least one element).
        The sparse product feeding a block adds at most ~1.5x that, so the
        working memory is a few times max_bytes plus the codes, whatever
        F_a x F_b is. Larger blocks are somewhat faster.
    dtype : float dtype, default=np.float32
        Dtype of the returned correlations.

    Returns
    -------
    TopK
        Partners best first; equal correlations go to the lower index, except
        that ties at the k-th place (k > 1) are broken arbitrarily. Dead
        features, and slots beyond the live partners, hold -1 and NaN.
    """
    _check_k(k)
    dtype = _float_dtype(dtype)
    if not max_bytes >= 8:
        raise ValueError(f"max_bytes must be at least 8 (one float64); got {max_bytes!r}")
    a, b = _as_csr(codes_a, "codes_a"), _as_csr(codes_b, "codes_b")
    _check_rows(a, b, "topk_correlation")
    if a.shape[0] == 0:
        raise ValueError("codes have no token rows")
    n, (f_a, f_b) = a.shape[0], (a.shape[1], b.shape[1])
    (sum_a, sq_a), (sum_b, sq_b) = _moments(a), _moments(b)
    std_a, std_b = _std(n, sum_a, sq_a), _std(n, sum_b, sq_b)
    rows, cols = _block_shape(f_b, max_bytes)
    at = a.T.tocsr()
    b_blocks = [(c, b[:, c : c + cols].tocsr()) for c in range(0, f_b, cols)]
    top_a, top_b = _empty_topk(f_a, k), _empty_topk(f_b, k)
    for r in range(0, f_a, rows):
        ra = slice(r, r + rows)
        at_rows = at[ra]
        for c, b_cols in b_blocks:
            rb = slice(c, c + cols)
            block = (at_rows @ b_cols).toarray()
            _cross_to_corr(block, n, sum_a[ra], sum_b[rb], std_a[ra], std_b[rb])
            _fold_block(block, r, c, top_a, top_b)
    return TopK(*_finish_topk(top_a, dtype), *_finish_topk(top_b, dtype))


def _dense_topk(corr, k=1):
    """TopK of a dense correlation matrix, in row blocks of bounded size."""
    f_a, f_b = corr.shape
    top_a, top_b = _empty_topk(f_a, k), _empty_topk(f_b, k)
    rows = max(1, DEFAULT_MAX_BYTES // (8 * f_b))
    for r in range(0, f_a, rows):
        block = corr[r : r + rows].copy()
        if np.isinf(block).any():
            raise ValueError("corr contains inf; correlations must be finite, or NaN for dead")
        _fold_block(block, r, 0, top_a, top_b)
    return TopK(*_finish_topk(top_a, np.float64), *_finish_topk(top_b, np.float64))


# ----------------------------------------------------------------------------
# matching policies


def _max_pairs(top):
    b = np.flatnonzero(top.b_partner[:, 0] >= 0)
    return top.b_partner[b, 0], b, top.b_corr[b, 0]


def _one_to_one(top):
    a, b, c = _max_pairs(top)
    order = np.lexsort((b, -c, a))  # per A: best correlation first, then lowest b
    first = np.r_[True, a[order][1:] != a[order][:-1]][:len(a)]  # no pairs: none kept
    return a[order][first], b[order][first], c[order][first]


def _lan(top):
    a, b, c = _max_pairs(top)  # b ascending
    _, first = np.unique(a, return_index=True)  # first-encountered = lowest b
    return a[first], b[first], c[first]


def _mutual(top):
    a, b, c = _max_pairs(top)
    keep = top.a_partner[a, 0] == b
    return a[keep], b[keep], c[keep]


def _pool(pool, activity, pool_size, n, side):
    if pool is not None and (activity is not None or pool_size is not None):
        raise ValueError(f"give pool_{side}, or pool_size with activity_{side}, not both")
    if pool is not None:
        pool = np.unique(np.asarray(pool, np.int64))
        if pool.ndim != 1 or pool.size == 0 or pool[0] < 0 or pool[-1] >= n:
            raise ValueError(f"pool_{side} must be non-empty feature indices in [0, {n})")
        return pool
    if pool_size is None:
        return np.arange(n)
    activity = np.asarray(activity, np.float64) if activity is not None else None
    if activity is None or activity.shape != (n,):
        raise ValueError(
            f"pool_size needs activity_{side}, one activity score per feature (shape ({n},))"
        )
    return np.sort(np.argsort(-activity, kind="stable")[:pool_size])


def _hungarian(corr, pool_a=None, pool_b=None, pool_size=None, activity_a=None,
               activity_b=None):
    pa = _pool(pool_a, activity_a, pool_size, corr.shape[0], "a")
    pb = _pool(pool_b, activity_b, pool_size, corr.shape[1], "b")
    sub = corr[np.ix_(pa, pb)].astype(np.float64)
    live_a, live_b = ~np.isnan(sub).all(1), ~np.isnan(sub).all(0)
    pa, pb, sub = pa[live_a], pb[live_b], sub[np.ix_(live_a, live_b)]
    if sub.size == 0:  # every feature of a side is dead
        return pa[:0], pb[:0], np.zeros(0)
    i, j = linear_sum_assignment(np.where(np.isnan(sub), -np.inf, sub), maximize=True)
    return pa[i], pb[j], sub[i, j]


_POLICY_FUNCS = {"max": _max_pairs, "one_to_one": _one_to_one, "mutual": _mutual, "lan": _lan}


def match(corr, policy: str = "one_to_one", threshold: float = 0.1, **opts) -> Matches:
    """Pair A and B features by correlation.

    Parameters
    ----------
    corr : ndarray (F_a, F_b) or TopK
        Correlations from :func:`correlation` (NaN = dead), or partners from
        :func:`topk_correlation` (all policies but ``hungarian``).
    policy : {"max", "one_to_one", "mutual", "hungarian", "lan"}, default="one_to_one"
        - ``max``: each B feature takes its best-correlated A feature; an A
          feature may serve many B features.
        - ``one_to_one``: ``max``, then each A feature keeps only its
          best-correlated B feature (ties to the lowest b).
        - ``mutual``: mutual nearest neighbours: b's best is a and a's best is b.
        - ``hungarian``: assignment maximising the total correlation
          (``scipy.optimize.linear_sum_assignment``, rectangular allowed) on a
          pool of features. Options: ``pool_a``/``pool_b`` (index arrays), or
          ``pool_size`` with ``activity_a``/``activity_b`` (one score per
          feature, e.g. firing frequency; the ``pool_size`` highest of each
          side are kept). Default pool: all features (cubic cost, so pool
          large models). Dead features are dropped from the pool.
        - ``lan``: the published rule (Lan et al. 2024, "Sparse Autoencoders
          Reveal Universal Feature Spaces Across Large Language Models"), kept
          for parity: ``max``, then an A feature used more than once keeps
          the first-encountered B feature (lowest b) whatever its
          correlation. ``one_to_one`` differs only there: it keeps the best
          pair, which the published rule can discard in favour of a weaker one.
    threshold : float in [-1, 1], default=0.1
        Keep pairs with ``corr > threshold`` (strictly greater), applied after
        the policy, so e.g. ``lan`` may drop an A feature whose first pair
        fails although a later one would pass.
    **opts
        Options of ``hungarian`` (see above); other policies take none.

    Returns
    -------
    Matches
        Sorted by b. Dead (NaN) features are never matched.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    _check_threshold(threshold)
    if policy == "hungarian":
        if isinstance(corr, TopK):
            raise ValueError("policy 'hungarian' needs the dense correlation matrix, not a TopK")
        a, b, c = _hungarian(_as_corr(corr), **opts)
    else:
        if opts:
            raise ValueError(f"options {sorted(opts)} only apply to policy 'hungarian'")
        top = corr if isinstance(corr, TopK) else _dense_topk(_as_corr(corr))
        a, b, c = _POLICY_FUNCS[policy](top)
    keep = c > threshold  # NaN compares False
    order = np.argsort(b[keep], kind="stable")
    return Matches(a[keep][order], b[keep][order], c[keep][order])


# ----------------------------------------------------------------------------
# top activations and filters


def _chunk_top(x, k, offset):
    """Per-feature top-k (rows + offset, values) among the non-zeros of a CSR chunk."""
    f = x.shape[1]
    coo = x.tocoo()
    nz = coo.data != 0
    row, col, val = coo.row[nz] + offset, coo.col[nz], coo.data[nz]
    order = np.lexsort((row, -val, col))  # by feature, largest first, lowest row on ties
    row, col, val = row[order], col[order], val[order]
    rank = np.arange(len(col)) - np.searchsorted(col, col)
    keep = rank < k
    rows, vals = _empty_topk(f, k)
    rows[col[keep], rank[keep]] = row[keep]
    vals[col[keep], rank[keep]] = val[keep]
    return rows, vals


def top_activations(codes, k: int = 5) -> TopActivations:
    """The k largest non-zero activations of every feature and their token rows.

    Parameters
    ----------
    codes : scipy.sparse matrix (tokens, F) or iterable of them
        CSR codes; chunks are consecutive token rows, merged as they stream.
    k : int, default=5

    Returns
    -------
    TopActivations
        Ties go to the lowest row; features with fewer than k non-zeros are
        padded with row -1 (value 0.0).
    """
    _check_k(k)
    if isinstance(codes, np.ndarray):
        raise ValueError("codes is a dense ndarray; wrap it with scipy.sparse.csr_array(codes)")
    top, offset = None, 0
    for i, chunk in enumerate([codes] if sp.issparse(codes) else codes):
        x = _as_csr(chunk, f"codes chunk {i}")
        if top is None:
            top = _empty_topk(x.shape[1], k)
        if x.shape[1] != top[0].shape[0]:
            raise ValueError(f"codes chunk {i} has {x.shape[1]} features, earlier chunks "
                             f"{top[0].shape[0]}")
        rows, vals = _chunk_top(x, k, offset)
        cat_rows, cat_vals = np.concatenate([top[0], rows], 1), np.concatenate([top[1], vals], 1)
        order = np.argsort(-cat_vals, axis=1, kind="stable")[:, :k]  # earlier rows win ties
        top = np.take_along_axis(cat_rows, order, 1), np.take_along_axis(cat_vals, order, 1)
        offset += x.shape[0]
    if top is None:
        raise ValueError("codes is an empty iterable; pass at least one CSR chunk")
    missing = top[1] == -np.inf
    return TopActivations(np.where(missing, -1, top[0]),
                          np.where(missing, 0.0, top[1]).astype(np.float32))


def _tokens_for(top_tokens, idx, name):
    tok = np.asarray(top_tokens)
    if tok.ndim != 2 or not np.issubdtype(tok.dtype, np.integer):
        raise ValueError(f"{name} must be a 2-D int array (features x k, -1 padded); "
                         f"got {tok.dtype} {tok.shape}")
    if idx.size and idx.max() >= len(tok):
        raise ValueError(f"{name} has {len(tok)} features but matches use index {idx.max()}")
    return tok[idx]


def junk_filter(matches: Matches, top_tokens_a, top_tokens_b, junk_ids) -> Matches:
    """Drop pairs where either feature's top tokens include a junk token.

    Parameters
    ----------
    matches : Matches
    top_tokens_a, top_tokens_b : int array, shape (F_a, k) / (F_b, k)
        Token ids of each feature's top activations, -1 padded (see
        :meth:`TopActivations.tokens`).
    junk_ids : array-like of int
        Token ids to reject, e.g. punctuation, whitespace, BOS, pad.

    Returns
    -------
    Matches
    """
    junk = np.asarray(junk_ids, np.int64).ravel()

    def has_junk(tok):
        return (np.isin(tok, junk) & (tok >= 0)).any(1)

    bad = has_junk(_tokens_for(top_tokens_a, matches.a, "top_tokens_a")) | has_junk(
        _tokens_for(top_tokens_b, matches.b, "top_tokens_b"))
    return matches.take(~bad)


def shared_token_filter(matches: Matches, top_tokens_a, top_tokens_b) -> Matches:
    """Keep pairs whose features' top-token lists share at least one token.

    Parameters
    ----------
    matches : Matches
    top_tokens_a, top_tokens_b : int array, shape (F_a, k) / (F_b, k)
        Token ids of each feature's top activations; -1 padding is ignored.

    Returns
    -------
    Matches
    """
    ta = _tokens_for(top_tokens_a, matches.a, "top_tokens_a")[:, :, None]
    tb = _tokens_for(top_tokens_b, matches.b, "top_tokens_b")[:, None, :]
    return matches.take(((ta == tb) & (ta >= 0)).any(axis=(1, 2)))
