"""The torch side of :mod:`.correlation`: sufficient statistics and block top-k on a device.

Arrays in, arrays out, like the numpy path: codes arrive as validated float64 scipy CSR
(``inputs.as_csr``), statistics stay on the device as float64 tensors, and a block's top-k
comes back as numpy. The formulas that turn statistics into correlations, and the rule for
dead features, are not here: :mod:`.correlation` applies its own to these tensors, so both
paths share them. Importing this module imports torch; :mod:`.correlation` imports it only
when a device is named.
"""

from __future__ import annotations

import numpy as np
import torch


def zeros(shape, device) -> torch.Tensor:
    """A float64 tensor of zeros on ``device``."""
    return torch.zeros(shape, dtype=torch.float64, device=device)


def sparse_tensor(x, device) -> torch.Tensor:
    """A scipy sparse matrix as a coalesced float64 sparse COO tensor on ``device``.

    Parameters
    ----------
    x : scipy.sparse matrix, float64, shape (m, n)

    Returns
    -------
    torch.Tensor, sparse COO, float64, shape (m, n)
    """
    csr = x.tocsr()
    if not csr.has_canonical_format:  # sorted and unique is what is_coalesced promises
        csr = csr.copy()  # tocsr() may return x itself, which is not ours to change
        csr.sum_duplicates()
    coo = csr.tocoo()
    index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    # COO rather than CSR: torch calls its sparse CSR tensors beta and warns on each one
    return torch.sparse_coo_tensor(index, torch.from_numpy(coo.data), size=coo.shape,
                                   dtype=torch.float64, device=device, is_coalesced=True,
                                   check_invariants=False)


def moments(x, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature sum and sum of squares of CSR codes, computed on ``device``.

    Parameters
    ----------
    x : scipy.sparse CSR, float64, shape (tokens, F)

    Returns
    -------
    sum, sum_of_squares : torch.Tensor, float64, shape (F,)
    """
    index = torch.from_numpy(x.indices.astype(np.int64)).to(device)
    data = torch.from_numpy(x.data).to(device)
    s, ss = zeros(x.shape[1], device), zeros(x.shape[1], device)
    return s.index_add_(0, index, data), ss.index_add_(0, index, data * data)


def slab_rows(n_cols: int, max_bytes: int) -> int:
    """Token rows per dense float64 slab of ``n_cols`` columns within ``max_bytes`` (>= 1)."""
    return max(1, max_bytes // (8 * n_cols))


def token_slabs(x, rows: int, device, transpose: bool = False) -> list[torch.Tensor]:
    """``x`` cut into slabs of ``rows`` token rows, each a sparse tensor on ``device``.

    Parameters
    ----------
    x : scipy.sparse CSR, float64, shape (tokens, F)
    rows : int
        Token rows per slab.
    transpose : bool, default=False
        Give each slab as (F, rows), the left factor of ``x^T y``.

    Returns
    -------
    list of torch.Tensor, sparse COO, shape (rows, F) or (F, rows)
    """
    slabs = (x[t : t + rows] for t in range(0, x.shape[0], rows))
    return [sparse_tensor(s.T if transpose else s, device) for s in slabs]


def add_cross(acc: torch.Tensor, a_slabs, b_slabs) -> torch.Tensor:
    """``acc += a^T b`` summed over token slabs, in place, in float64 on ``acc``'s device.

    Each B slab is made dense (sparse A^T times dense B is what the GPU libraries do
    fast); its size is what bounds the memory of one step.

    Parameters
    ----------
    acc : torch.Tensor, float64, shape (F_a, F_b)
    a_slabs : list of sparse torch.Tensor, shapes (F_a, rows_i)
        Transposed token slabs of A (``token_slabs(a, rows, device, transpose=True)``).
    b_slabs : list of sparse torch.Tensor, shapes (rows_i, F_b)
        The same token slabs of B.

    Returns
    -------
    acc
    """
    for a_t, b in zip(a_slabs, b_slabs, strict=True):
        acc.addmm_(a_t, b.to_dense())
    return acc


def block_topk(block: torch.Tensor, k: int):
    """Top-k of each row and of each column of one correlation block, back on the host.

    NaN (dead) entries are set to -inf in ``block`` first, so they rank last. For k = 1
    ties go to the lowest index (``argmax`` returns the first maximum); for k > 1 ties
    are sorted out when the caller merges blocks, except at the k-th place.

    Parameters
    ----------
    block : torch.Tensor, float64, shape (rows, cols)
        Modified in place.
    k : int

    Returns
    -------
    (row_index, row_value), (col_index, col_value) : ndarrays
        Int64 and float64, shapes (rows, min(k, cols)) and (cols, min(k, rows)).
    """
    block.masked_fill_(block.isnan(), -np.inf)
    if k == 1:
        rows, cols = block.argmax(1)[:, None], block.argmax(0)[None, :]
        picks = ((rows, block.gather(1, rows)), (cols.T, block.gather(0, cols).T))
    else:
        by_row = block.topk(min(k, block.shape[1]), 1)
        by_col = block.topk(min(k, block.shape[0]), 0)
        picks = ((by_row.indices, by_row.values), (by_col.indices.T, by_col.values.T))
    return tuple((i.cpu().numpy(), v.cpu().numpy()) for i, v in picks)
