"""Each feature's best correlation partners, without the full correlation matrix.

:func:`topk_correlation` computes the exact correlation (:mod:`.correlation`) block by
block, (A rows x B columns), and folds each block into running top-k lists for its rows
and its columns, so memory no longer grows with F_a x F_b (e.g. 131,072 x 16,384);
:func:`dense_topk` gives the same lists from a full matrix. With a torch ``device`` each
block is computed there and only its top-k comes back (:mod:`.torch_corr`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..devices import torch_device
from .correlation import (
    DEFAULT_MAX_BYTES,
    cross_to_corr,
    device_stats,
    feature_moments,
    feature_std,
)
from .inputs import as_csr, check_k, check_rows, empty_topk, float_dtype


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
    (sum_a, sq_a), (sum_b, sq_b) = feature_moments(a), feature_moments(b)
    std_a, std_b = feature_std(n, sum_a, sq_a), feature_std(n, sum_b, sq_b)
    rows, cols = _block_shape(f_b, max_bytes)
    at = a.T.tocsr()
    b_blocks = [(c, b[:, c : c + cols].tocsr()) for c in range(0, f_b, cols)]
    for r in range(0, f_a, rows):
        ra = slice(r, r + rows)
        at_rows = at[ra]
        for c, b_cols in b_blocks:
            rb = slice(c, c + cols)
            block = (at_rows @ b_cols).toarray()
            cross_to_corr(block, n, sum_a[ra], sum_b[rb], std_a[ra], std_b[rb])
            _fold_block(block, r, c, top_a, top_b)


def _fold_device(a, b, max_bytes, top_a, top_b, device):
    """:func:`_fold_host` with each block computed, and its top-k taken, on ``device``.

    A block sums sparse A^T times dense B over slabs of token rows, a dense slab being
    no larger than a block (``max_bytes``); only the block's top-k comes back.
    """
    from . import torch_corr

    n, (f_a, f_b) = a.shape[0], (a.shape[1], b.shape[1])
    moments = [torch_corr.moments(x, device) for x in (a, b)]
    sum_a, std_a, sum_b, std_b = device_stats(n, *moments, device)
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
            cross_to_corr(block, n, sum_a[ra], sum_b[rb], std_a[ra], std_b[rb])
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
