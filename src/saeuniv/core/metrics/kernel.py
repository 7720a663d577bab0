"""Kernel and rotation metrics of paired rows: linear CKA (via HSIC) and orthogonal
Procrustes, with their fast permutation nulls and the CKA random-subset draws.

Both compare the column-centred sides as wholes: CKA the agreement of their
linear kernels (row-by-row Gram matrices), Procrustes how well one side maps
onto the other by a rotation.

Pure core: numpy in, floats out; no I/O, no logging, no global state.
"""

from __future__ import annotations

import numpy as np

from ..devices import torch_device
from .inputs import BLOCK_BYTES, centre, check_pair
from .nulls import (
    batches,
    centred_grams,
    device_batches,
    device_products,
    device_singular_values,
    permuted_products,
    singular_values,
    subset_grams,
)

__all__ = [
    "cka",
    "cka_null",
    "cka_subsets",
    "hsic",
    "procrustes",
    "procrustes_null",
]


# ----------------------------------------------------------------------------
# CKA


def hsic(cross, rows_x, rows_y, debiased):
    """HSIC of linear kernels K, L (up to a constant factor) from cross = tr(K L).

    Parameters
    ----------
    cross : float or ndarray of shape (D,)
        ``tr(K L)``, for one pair of kernels or a stack of D pairs.
    rows_x, rows_y : ndarray of shape (n,) or (D, n)
        The Gram diagonals of K and L (or stacks of them).
    debiased : bool
        False: the biased estimator, which is ``cross`` itself. True: the
        unbiased estimator of Song et al. (2012, eq. 5), written for centred
        features as in Kornblith et al. (2019); the 1 / (n (n - 3)) factor
        cancels in CKA and is left out.

    Returns
    -------
    hsic : float or ndarray of shape (D,)
    """
    if not debiased:
        return cross
    n = rows_x.shape[-1]
    correction = rows_x.sum(-1) * rows_y.sum(-1) / ((n - 1) * (n - 2))
    diagonal = np.einsum("...i,...i->...", rows_x, rows_y)
    return cross - n / (n - 2) * diagonal + correction


def _cka_sides(A, B, debiased):
    """Centred sides, their Gram diagonals and the CKA normaliser."""
    A, B = check_pair(A, B, min_rows=4 if debiased else 3)
    a, b = centre(A, "A"), centre(B, "B")
    rows_a, rows_b = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    self_a = hsic(np.sum((a.T @ a) ** 2), rows_a, rows_a, debiased)
    self_b = hsic(np.sum((b.T @ b) ** 2), rows_b, rows_b, debiased)
    if not (self_a > 0 and self_b > 0):
        raise ValueError(
            f"the debiased HSIC of a side with itself is not positive "
            f"(n={a.shape[0]}); use more pairs or debiased=False"
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
    return float(hsic(np.sum((a.T @ b) ** 2), rows_a, rows_b, debiased) / norm)


def cka_null(A, B, perms, debiased=False, device=None):
    """Observed CKA and its scores for each permutation of B's rows.

    Returns (float, ndarray of shape (n_perm,)).

    Centred sides once; per permutation ``||A^T B[p]||_F^2`` in batched
    float32 matmuls (plus O(n) terms when debiased), ~1e-8 from :func:`cka`.
    With n^2 <= d_a d_b (few pairs, wide decoders), the float64 n x n Grams
    once and per permutation ``<K_A, K_B[p, p]>``, ~1e-10. With a torch
    ``device`` (``saeuniv.core.devices``) the same per-permutation terms are
    computed there in torch (within 1e-6 of ``device=None``).
    """
    dev = torch_device(device)
    a, b, rows_a, rows_b, norm = _cka_sides(A, B, debiased)
    observed = float(hsic(np.sum((a.T @ b) ** 2), rows_a, rows_b, debiased) / norm)
    if dev is not None:
        return observed, _cka_device_null(a, b, rows_a, rows_b, norm, perms, debiased, dev)
    n = a.shape[0]
    null = []
    # few rows: tr(K_A K_B[p, p]) on the n x n Grams
    if n * n <= a.shape[1] * b.shape[1]:
        ka, kb = a @ a.T, b @ b.T
        for batch in batches(perms, max(1, BLOCK_BYTES // (8 * n * n))):
            idx = np.stack(batch)
            cross = np.einsum("ij,kij->k", ka, kb[idx[:, :, None], idx[:, None, :]])
            null += [
                hsic(c, rows_a, rows_b[p], debiased) / norm
                for c, p in zip(cross, batch)
            ]
        return observed, np.array(null)
    for batch, stack in permuted_products(a, b, perms):
        cross = np.einsum("kij,kij->k", stack, stack, dtype=np.float64)
        null += [
            hsic(c, rows_a, rows_b[p], debiased) / norm for c, p in zip(cross, batch)
        ]
    return observed, np.array(null)


def _cka_device_null(a, b, rows_a, rows_b, norm, perms, debiased, dev):
    """:func:`cka_null`'s draws with ``tr(K_A K_B[p, p])`` found in torch on ``dev``.

    Same choice of Grams or products as the numpy path; the O(n) debiasing
    terms stay on the host.
    """
    import torch

    n = a.shape[0]
    null = []
    if n * n <= a.shape[1] * b.shape[1]:
        ka = torch.as_tensor(a @ a.T, device=dev)
        kb = torch.as_tensor(b @ b.T, device=dev)
        for batch, idx in device_batches(perms, 8 * n * n, dev):
            permuted = kb[idx[:, :, None], idx[:, None, :]]
            cross = (permuted * ka).sum((1, 2)).cpu().numpy()
            null.append(hsic(cross, rows_a, rows_b[np.stack(batch)], debiased) / norm)
        return np.concatenate(null)
    for batch, stack in device_products(a, b, perms, dev):
        cross = stack.double().square().sum((1, 2)).cpu().numpy()
        null.append(hsic(cross, rows_a, rows_b[np.stack(batch)], debiased) / norm)
    return np.concatenate(null)


def cka_subsets(A, B, debiased=False):
    """Batched CKA of random subsets of a pool of pairs.

    Parameters
    ----------
    A : ndarray of float64, shape (P, d_a)
    B : ndarray of float64, shape (P, d_b)
        The pool: row i of ``A`` paired with row i of ``B``.
    debiased : bool, default=False
        As :func:`cka`.

    Returns
    -------
    draws : callable
        ``draws(picks)``: CKA of ``A[p], B[p]`` for each row ``p`` of
        ``picks`` (D, m) -> (D,). The pool Grams (P, P) are computed once;
        per draw the centred sub-Grams (m, m) give ``tr(K L)`` and the Gram
        diagonals directly. Agrees with :func:`cka` to ~1e-10.

    Notes
    -----
    ``draws`` raises a ValueError when a draw's debiased HSIC with itself is
    not positive. Its message names the config settings that avoid it,
    because it ends up in the stored results of the subspaces stage.
    """
    ga, gb = A @ A.T, B @ B.T

    def draws(picks):
        ka = centred_grams(subset_grams(ga, picks))
        kb = centred_grams(subset_grams(gb, picks))
        rows_a, rows_b = np.einsum("kii->ki", ka), np.einsum("kii->ki", kb)

        def stacked_hsic(x, y, rx, ry):
            return hsic(np.einsum("kij,kij->k", x, y), rx, ry, debiased)

        self_a = stacked_hsic(ka, ka, rows_a, rows_a)
        self_b = stacked_hsic(kb, kb, rows_b, rows_b)
        if debiased and not (np.all(self_a > 0) and np.all(self_b > 0)):
            raise ValueError(
                f"the debiased HSIC of a random subspace of {picks.shape[1]} pairs "
                "with itself is not positive; raise subspaces.min_pairs or set "
                "subspaces.cka_debiased=false"
            )
        return stacked_hsic(ka, kb, rows_a, rows_b) / np.sqrt(self_a * self_b)

    return draws


# ----------------------------------------------------------------------------
# Procrustes


def _procrustes_sides(A, B):
    """Centred sides scaled to unit Frobenius norm."""
    A, B = check_pair(A, B)
    a, b = centre(A, "A"), centre(B, "B")
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


def procrustes_null(A, B, perms, device=None):
    """Observed Procrustes score and its scores for each permutation of B's rows.

    Normalised sides once; per permutation the nuclear norm of ``A^T B[p]``
    from batched float32 products with a float64 Gram, as for SVCCA;
    ~1e-8 from :func:`procrustes`. With a torch ``device``
    (``saeuniv.core.devices``) the draws run there in torch (within 1e-6 of
    ``device=None``). Returns (float, (n_perm,)).
    """
    dev = torch_device(device)
    a, b = _procrustes_sides(A, B)
    observed = float(min(np.linalg.svd(a.T @ b, compute_uv=False).sum(), 1.0))
    if dev is not None:
        null = [device_singular_values(stack).sum(-1).clamp(max=1.0).cpu().numpy()
                for _, stack in device_products(a, b, perms, dev)]
        return observed, np.concatenate(null)
    null = [
        singular_values(stack).sum(axis=-1)
        for _, stack in permuted_products(a, b, perms)
    ]
    return observed, np.minimum(np.concatenate(null), 1.0)
