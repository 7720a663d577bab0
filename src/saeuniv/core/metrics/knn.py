"""Mutual k-nearest-neighbour overlap of paired rows, with its fast permutation null.

Each side's rows get their k most cosine-similar other rows; the score is how
many of row i's neighbours in A are also its neighbours in B, on average. A
permutation of B's rows only renumbers B's neighbour sets, so the null finds
them once.

Pure core: numpy in, floats out; no I/O, no logging, no global state.
"""

from __future__ import annotations

import numpy as np

from ..devices import torch_device
from .inputs import BLOCK_BYTES, check_int, check_pair, unit_rows
from .nulls import device_batches

__all__ = ["mutual_knn", "mutual_knn_null"]


def _neighbours(X, k, name):
    """Indices (n, k) of each row's k most cosine-similar other rows."""
    Z = unit_rows(X, name)
    n = Z.shape[0]
    rows = max(1, BLOCK_BYTES // (8 * n))
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
    """Validate the inputs; each side's neighbour indices (n, k)."""
    A, B = check_pair(A, B)
    k = check_int(k, "k", 1)
    if k >= A.shape[0]:
        raise ValueError(
            f"k={k} must be smaller than the number of pairs n={A.shape[0]} (each row "
            f"has only n - 1 other rows); pass k <= {A.shape[0] - 1}"
        )
    return _neighbours(A, k, "A"), _neighbours(B, k, "B")


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
    nbrs_a, nbrs_b = _knn_sides(A, B, k)
    return float(_knn_overlap(np.sort(_edge_keys(nbrs_a)), nbrs_b))


def _device_overlaps(nbrs_a, nbrs_b, perms, dev):
    """:func:`_knn_overlap` of A's sets with each permutation's renumbered B sets, on ``dev``.

    Row i's renumbered B neighbours are compared with its A neighbours
    elementwise (k x k per row): neighbour sets hold no repeats, so the count of
    matches is the size of their intersection, exactly as on the host.
    """
    import torch

    n, k = nbrs_b.shape
    nbrs_a = torch.as_tensor(nbrs_a, dtype=torch.int64, device=dev)
    nbrs_b = torch.as_tensor(nbrs_b, dtype=torch.int64, device=dev)
    out = []
    for batch, idx in device_batches(perms, 8 * n * k * (k + 3), dev):
        inverse = torch.empty_like(idx).scatter_(1, idx, torch.arange(n, device=dev).expand_as(idx))
        renumbered = torch.gather(inverse, 1, nbrs_b[idx].reshape(len(batch), -1))
        hits = renumbered.reshape(len(batch), n, k, 1) == nbrs_a[:, None, :]
        out.append(hits.any(-1).sum((1, 2)).cpu().numpy() / (n * k))
    return np.concatenate(out)


def mutual_knn_null(A, B, perms, k=10, device=None):
    """Observed overlap and its scores for each permutation of B's rows.

    Returns (float, ndarray of shape (n_perm,)).

    Neighbour sets once; per permutation B's sets are renumbered and
    compared with A's, O(n k log(n k)). With a torch ``device``
    (``saeuniv.core.devices``) the sets are still found in numpy and compared
    there in torch, O(n k^2) per permutation; the counts are integers, so the
    scores equal those of ``device=None`` exactly.
    """
    dev = torch_device(device)
    nbrs_a, nbrs_b = _knn_sides(A, B, k)
    keys_a = np.sort(_edge_keys(nbrs_a))
    observed = float(_knn_overlap(keys_a, nbrs_b))
    if dev is not None:
        return observed, _device_overlaps(nbrs_a, nbrs_b, perms, dev)
    inverse = np.empty(nbrs_b.shape[0], dtype=np.intp)
    null = []
    for p in perms:
        # row i of B[p] is B[p[i]]; its neighbours, renumbered for B[p], are
        # inverse[nbrs_b[p[i]]]
        inverse[p] = np.arange(p.size)
        null.append(_knn_overlap(keys_a, inverse[nbrs_b[p]]))
    return observed, np.array(null)
