"""Exact Pearson correlation between the SAE features of two models, over shared tokens.

Codes are scipy.sparse CSR matrices of shape (tokens, features), or iterables of CSR
chunks covering consecutive token rows.

- :func:`correlation` (or :class:`CorrelationAccumulator`, fed shard by shard) gives the
  full (F_a, F_b) matrix;
- :func:`topk_correlation` gives only each feature's best partners, for when the full
  matrix does not fit in memory (e.g. 131,072 x 16,384); :func:`dense_topk` gives the
  same lists from a full matrix.

Dead features (zero variance over the tokens, see :func:`dead_features`) have NaN
correlations and are never anyone's partner. Statistics are accumulated in float64.

``device`` (see :mod:`saeuniv.core.devices`): ``None``, the default, is the numpy path
above, the reference. A torch device (``"cuda"``, or ``"cpu"`` to test without a GPU)
accumulates the same statistics there as float64 tensors (:mod:`.torch_corr`): sums and
sums of squares by scatter-add, the cross-product as sparse A^T times B made dense in
slabs of token rows. The conversion to correlations and the dead-feature rule are this
module's own, applied to those tensors, and results come back as numpy in the same
dtypes. Correlations agree with the numpy path to 1e-6 (float64 on both sides: in
practice to ~1e-15), partners are the same except between near-ties. Memory on the device:
:func:`correlation` holds the (F_a, F_b) float64 cross-product (8 F_a F_b bytes) plus one
dense slab of B and one converted row slice, each within ``block_bytes``;
:func:`topk_correlation` holds the codes plus one block and one dense slab of B, each
within ``max_bytes``, and only each block's top-k comes back. Small ceilings mean many
small products: on a CPU the torch path is for tests, not speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..devices import torch_device
from .inputs import as_csr, check_k, check_rows, chunk_pairs, empty_topk, float_dtype

DEFAULT_MAX_BYTES = 256 * 2**20
_SLICE_ELEMENTS = 2**22  # bounds the temporaries of the in-place block arithmetic
_DEAD_RELATIVE_VARIANCE = 1e-12  # variance below this fraction of the mean square


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
    """Boolean mask of the dead features of ``codes``.

    A feature is dead when its variance over the tokens is zero, or below 1e-12 of its
    mean square (numerically constant). Its correlations are NaN in :func:`correlation`,
    whatever the other side's features are.

    Parameters
    ----------
    codes : scipy.sparse matrix, shape (tokens, F)

    Returns
    -------
    ndarray of bool, shape (F,)
    """
    x = as_csr(codes, "codes")
    if x.shape[0] == 0:
        raise ValueError("codes have no token rows")
    return np.isnan(_std(x.shape[0], *_moments(x)))


def _cross_to_corr(block, n, sum_a, sum_b, std_a, std_b):
    """Turn raw cross-products sum_t a_t b_t into correlations, in place.

    cov = (S_ab - s_a s_b / n) / n. In float64 the cancellation loses about
    log10(mean^2 / var) digits, negligible for sparse codes. The arguments are all
    numpy arrays, or all float64 torch tensors on one device (the device path).
    """
    step = max(1, _SLICE_ELEMENTS // block.shape[1])
    for i in range(0, len(block), step):
        part, rows = block[i : i + step], slice(i, i + step)
        part -= (sum_a[rows] / n)[:, None] * sum_b  # np.outer, written for torch too
        part /= (n * std_a[rows])[:, None]
        part /= std_b
    if isinstance(block, np.ndarray):
        return np.clip(block, -1.0, 1.0, out=block)
    return block.clamp_(-1.0, 1.0)  # NaN stays NaN, as with np.clip


def _device_stats(n, a, b, device):
    """Sums and stds of both sides as float64 tensors on ``device``, from device sums.

    The stds come from :func:`_std` on the host (F values each way), so the dead-feature
    rule is the numpy path's own.
    """
    import torch

    def side(s, ss):
        std = _std(n, s.cpu().numpy(), ss.cpu().numpy())
        return s, torch.from_numpy(std).to(device)

    return (*side(*a), *side(*b))


def _add_sparse(dense, c):
    """dense += c for a CSR c of the same shape, without a dense temporary."""
    first = np.arange(c.shape[0], dtype=np.int64) * c.shape[1]
    rows = np.repeat(first, np.diff(c.indptr))
    np.add.at(dense.reshape(-1), rows + c.indices, c.data)


class CorrelationAccumulator:
    """Streaming exact Pearson correlation between the features of two models.

    Accumulates float64 sufficient statistics over token chunks: the token
    count, per-feature sums and sums of squares, and the cross-product
    ``A^T B`` (a sparse-sparse product per chunk, added into a dense float64
    (F_a, F_b) array kept in row blocks). Memory is ``8 * F_a * F_b`` bytes
    plus per-update temporaries, independent of the number of tokens.

    With a ``device`` the statistics are float64 torch tensors there, the
    cross-product one (F_a, F_b) tensor, grown per chunk by sparse A^T times B
    made dense in slabs of token rows of at most ``block_bytes``.

    Parameters
    ----------
    block_bytes : int, default=256 MiB
        Size of one row block of the cross-product accumulator. Temporaries of
        one update and of :meth:`result` scale with it, not with F_a x F_b.
    device : None, str or torch.device, default=None
        None: numpy on the host. A torch device (``"cpu"``, ``"cuda"``): torch
        there (see :mod:`saeuniv.core.devices`); refused if not present.

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

    def __init__(self, block_bytes: int = DEFAULT_MAX_BYTES, device=None):
        if block_bytes < 8:
            raise ValueError(f"block_bytes must be at least 8; got {block_bytes}")
        self.block_bytes = block_bytes
        self.device = torch_device(device)
        self.n_tokens = 0
        self.n_chunks = 0
        self.shape = None  # (F_a, F_b), set by the first update
        self._blocks = None  # list of (first row, float64 row block of A^T B)
        self._a = self._b = None  # [sum, sum of squares] per feature
        self._released = False

    def _allocate(self, f_a, f_b):
        self.shape = (f_a, f_b)
        if self.device is not None:
            from . import torch_corr

            self._blocks = [(0, torch_corr.zeros((f_a, f_b), self.device))]
            self._a = [torch_corr.zeros(f_a, self.device), torch_corr.zeros(f_a, self.device)]
            self._b = [torch_corr.zeros(f_b, self.device), torch_corr.zeros(f_b, self.device)]
            return
        rows = max(1, self.block_bytes // (8 * f_b))
        self._blocks = [(r, np.zeros((min(rows, f_a - r), f_b)))
                        for r in range(0, f_a, rows)]
        self._a = [np.zeros(f_a), np.zeros(f_a)]
        self._b = [np.zeros(f_b), np.zeros(f_b)]

    def _check_open(self):
        if self._released:
            raise ValueError(
                "accumulator was consumed by result(release=True); start a new one")

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
        self._check_open()
        where = f"chunk {self.n_chunks}"
        a, b = as_csr(chunk_a, f"codes_a {where}"), as_csr(chunk_b, f"codes_b {where}")
        check_rows(a, b, where)
        if self._blocks is None:
            self._allocate(a.shape[1], b.shape[1])
        if (a.shape[1], b.shape[1]) != self.shape:
            raise ValueError(
                f"{where} has {a.shape[1]} x {b.shape[1]} features; earlier chunks had "
                f"{self.shape[0]} x {self.shape[1]}"
            )
        if self.device is not None:
            self._update_device(a, b)
        else:
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

    def _update_device(self, a, b):
        from . import torch_corr

        for stats, x in ((self._a, a), (self._b, b)):
            s, ss = torch_corr.moments(x, self.device)
            stats[0] += s
            stats[1] += ss
        rows = torch_corr.slab_rows(self.shape[1], self.block_bytes)
        torch_corr.add_cross(self._blocks[0][1],
                             torch_corr.token_slabs(a, rows, self.device, transpose=True),
                             torch_corr.token_slabs(b, rows, self.device))

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
        dtype = float_dtype(dtype)
        self._check_open()
        if self.n_tokens == 0:
            raise ValueError(
                "no tokens accumulated; call update() with non-empty chunks first")
        if self.device is not None:
            return self._result_device(dtype, release)
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

    def _result_device(self, dtype, release):
        """:meth:`result` on the device, converted in row slices of ``block_bytes``; each
        slice comes back to the host as float64 and is cast there, as numpy casts."""
        n, cross = self.n_tokens, self._blocks[0][1]
        sum_a, std_a, sum_b, std_b = _device_stats(n, self._a, self._b, self.device)
        out = np.empty(self.shape, dtype)
        step, self._released = max(1, self.block_bytes // (8 * self.shape[1])), release
        for r in range(0, self.shape[0], step):
            rows = slice(r, r + step)
            work = cross[rows] if release else cross[rows].clone()
            out[rows] = _cross_to_corr(work, n, sum_a[rows], sum_b, std_a[rows],
                                       std_b).cpu().numpy()
        if release:
            self._blocks = None
        return out


def correlation(codes_a, codes_b, dtype=np.float32, device=None) -> np.ndarray:
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
    device : None, str or torch.device, default=None
        None: numpy on the host. A torch device (``"cpu"``, ``"cuda"``): the
        statistics accumulate there in float64 (see :class:`CorrelationAccumulator`).

    Returns
    -------
    ndarray, shape (F_a, F_b)
        NaN rows/columns for dead features: zero variance over the tokens, or
        numerically constant (variance below 1e-12 of the mean square).

    Raises
    ------
    ValueError
        On non-sparse input, mismatched rows or feature counts, NaN/inf codes,
        chunk iterables of different length, or no tokens; on a device that is
        not a torch device or not present.
    """
    acc = CorrelationAccumulator(device=device)
    for a, b in chunk_pairs(codes_a, codes_b):
        acc.update(a, b)
    return acc.result(dtype, release=True)


# ----------------------------------------------------------------------------
# top-k


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
    import torch  # here, so that importing the package does not load torch

    val, idx = torch.from_numpy(block).topk(min(k, block.shape[1]), 1)
    return idx.numpy(), val.numpy()


def _topk_cols(block, k):
    """Top-k of each column of a NaN-free block: (indices, values), shape (cols, k)."""
    if k == 1:  # column max, then its first row; avoids a strided argmax
        best = block.max(0)
        rows, cols = np.divmod(np.flatnonzero(block == best), block.shape[1])
        _, first = np.unique(cols, return_index=True)  # row-major: first = lowest row
        return rows[first][:, None], best[:, None]
    import torch  # here, so that importing the package does not load torch

    val, idx = torch.from_numpy(block).topk(min(k, len(block)), 0)
    return idx.T.numpy(), val.T.numpy()


def _merge_block(by_row, by_col, r, c, top_a, top_b):
    """Merge the top-k of the rows and of the columns of the block at (r, c), indices
    local to the block, into both running top-k's."""
    (idx_a, val_a), (idx_b, val_b) = by_row, by_col
    _merge_topk(top_a, slice(r, r + len(idx_a)), idx_a + c, val_a)
    _merge_topk(top_b, slice(c, c + len(idx_b)), idx_b + r, val_b)


def _fold_block(block, r, c, top_a, top_b):
    """Merge one dense correlation block (NaN = dead) into both running top-k's."""
    block[np.isnan(block)] = -np.inf
    k = top_a[0].shape[1]
    _merge_block(_topk_rows(block, k), _topk_cols(block, k), r, c, top_a, top_b)


def _finish_topk(top, dtype):
    missing = top[1] == -np.inf
    top[0][missing] = -1
    return top[0], np.where(missing, np.nan, top[1]).astype(dtype)


def _block_shape(f_b, max_bytes):
    cols = min(f_b, max(1, max_bytes // 8))
    return max(1, max_bytes // (8 * cols)), cols


def _fold_host(a, b, max_bytes, top_a, top_b):
    """Fold every (A rows x B columns) block of the correlation, computed with numpy."""
    n, (f_a, f_b) = a.shape[0], (a.shape[1], b.shape[1])
    (sum_a, sq_a), (sum_b, sq_b) = _moments(a), _moments(b)
    std_a, std_b = _std(n, sum_a, sq_a), _std(n, sum_b, sq_b)
    rows, cols = _block_shape(f_b, max_bytes)
    at = a.T.tocsr()
    b_blocks = [(c, b[:, c : c + cols].tocsr()) for c in range(0, f_b, cols)]
    for r in range(0, f_a, rows):
        ra = slice(r, r + rows)
        at_rows = at[ra]
        for c, b_cols in b_blocks:
            rb = slice(c, c + cols)
            block = (at_rows @ b_cols).toarray()
            _cross_to_corr(block, n, sum_a[ra], sum_b[rb], std_a[ra], std_b[rb])
            _fold_block(block, r, c, top_a, top_b)


def _fold_device(a, b, max_bytes, top_a, top_b, device):
    """:func:`_fold_host` with each block computed, and its top-k taken, on ``device``.

    A block sums sparse A^T times dense B over slabs of token rows, a dense slab being
    no larger than a block (``max_bytes``); only the block's top-k comes back.
    """
    from . import torch_corr

    n, (f_a, f_b) = a.shape[0], (a.shape[1], b.shape[1])
    moments = [torch_corr.moments(x, device) for x in (a, b)]
    sum_a, std_a, sum_b, std_b = _device_stats(n, *moments, device)
    rows, cols = _block_shape(f_b, max_bytes)
    slab = torch_corr.slab_rows(cols, max_bytes)
    b_blocks = [(c, torch_corr.token_slabs(b[:, c : c + cols], slab, device))
                for c in range(0, f_b, cols)]
    k = top_a[0].shape[1]
    for r in range(0, f_a, rows):
        ra = slice(r, r + rows)
        a_slabs = torch_corr.token_slabs(a[:, ra], slab, device, transpose=True)
        for c, b_slabs in b_blocks:
            rb = slice(c, c + cols)
            shape = (min(rows, f_a - r), min(cols, f_b - c))
            block = torch_corr.add_cross(torch_corr.zeros(shape, device), a_slabs, b_slabs)
            _cross_to_corr(block, n, sum_a[ra], sum_b[rb], std_a[ra], std_b[rb])
            _merge_block(*torch_corr.block_topk(block, k), r, c, top_a, top_b)


def topk_correlation(codes_a, codes_b, k: int = 1, max_bytes: int = DEFAULT_MAX_BYTES,
                     dtype=np.float32, device=None) -> TopK:
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
    device : None, str or torch.device, default=None
        None: numpy on the host. A torch device (``"cpu"``, ``"cuda"``): each
        block is computed there in float64 and only its top-k comes back; the
        dense slab of B codes feeding a block is bounded by max_bytes too.

    Returns
    -------
    TopK
        Partners best first; equal correlations go to the lower index, except
        that ties at the k-th place (k > 1) are broken arbitrarily. Dead
        features, and slots beyond the live partners, hold -1 and NaN.
    """
    check_k(k)
    dtype = float_dtype(dtype)
    if not max_bytes >= 8:
        raise ValueError(
            f"max_bytes must be at least 8 (one float64); got {max_bytes!r}")
    device = torch_device(device)
    a, b = as_csr(codes_a, "codes_a"), as_csr(codes_b, "codes_b")
    check_rows(a, b, "topk_correlation")
    if a.shape[0] == 0:
        raise ValueError("codes have no token rows")
    top_a, top_b = empty_topk(a.shape[1], k), empty_topk(b.shape[1], k)
    if device is None:
        _fold_host(a, b, max_bytes, top_a, top_b)
    else:
        _fold_device(a, b, max_bytes, top_a, top_b, device)
    return TopK(*_finish_topk(top_a, dtype), *_finish_topk(top_b, dtype))


def dense_topk(corr: np.ndarray, k: int = 1) -> TopK:
    """Top-k partners of every feature from a dense correlation matrix.

    The same lists as :func:`topk_correlation` on the codes, read off ``corr`` in
    row blocks of bounded size (256 MiB of float64).

    Parameters
    ----------
    corr : ndarray of float, shape (F_a, F_b)
        Correlations; NaN marks dead features. Not modified.
    k : int, default=1

    Returns
    -------
    TopK
        Correlations in float64, whatever the dtype of ``corr``.
    """
    check_k(k)
    f_a, f_b = corr.shape
    top_a, top_b = empty_topk(f_a, k), empty_topk(f_b, k)
    rows = max(1, DEFAULT_MAX_BYTES // (8 * f_b))
    for r in range(0, f_a, rows):
        block = corr[r : r + rows].copy()
        if np.isinf(block).any():
            raise ValueError(
                "corr contains inf; correlations must be finite, or NaN for dead")
        _fold_block(block, r, 0, top_a, top_b)
    return TopK(*_finish_topk(top_a, np.float64), *_finish_topk(top_b, np.float64))
