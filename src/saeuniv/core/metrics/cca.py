"""SVCCA and PWCCA of paired rows, with fast permutation nulls and random-subset draws.

Both centre each side, reduce it by SVD to its leading directions and compare
the reduced sides by canonical correlation analysis: SVCCA averages the
canonical correlations, PWCCA (Morcos et al., 2018) weights them by how much
of side A each canonical direction accounts for.

Pure core: numpy in, floats out; no I/O, no logging, no global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..devices import torch_device
from .inputs import centre, check_int, check_pair
from .nulls import (
    centred_grams,
    device_products,
    device_singular_values,
    permuted_products,
    singular_values,
    subset_grams,
)

__all__ = [
    "SVCCAResult",
    "pwcca",
    "pwcca_null",
    "svcca",
    "svcca_details",
    "svcca_fields",
    "svcca_null",
    "svcca_subsets",
]


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


# ----------------------------------------------------------------------------
# SVD reduction


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
    U, s, Vt = np.linalg.svd(centre(X, name), full_matrices=False)
    rank = int(np.sum(s > s[0] * max(X.shape) * np.finfo(np.float64).eps))
    if k is None:
        k = min(_n_directions(s**2, variance, lan_compatible), rank)
    elif k > rank:
        raise ValueError(
            f"k={k} exceeds the rank of centred {name} ({rank}); pass k <= {rank}"
        )
    return U[:, :k], s[:k, None] * Vt[:k]


def _check_cca_size(n, k_a, k_b):
    """Centred columns span n - 1 dimensions; a side keeping all of them makes
    every correlation 1."""
    if max(k_a, k_b) >= n - 1:
        raise ValueError(
            f"CCA is degenerate: n={n} pairs span only n - 1 = {n - 1} dimensions "
            f"after centring and k_a={k_a}, k_b={k_b} directions fill them, so every "
            f"canonical correlation is 1 by construction; pass a smaller fixed k (well "
            f"below n/2, e.g. k={max(1, n // 4)}) or use more pairs"
        )


def _check_variance(variance):
    if not (isinstance(variance, (float, int, np.floating)) and 0 < variance <= 1):
        raise ValueError(f"variance must be a number in (0, 1], got {variance!r}")


def _svcca_bases(A, B, variance, k, lan_compatible):
    """Validate the inputs and SVD-reduce both sides.

    Returns the bases Qa (n, k_a), Qb (n, k_b) and A's coordinates Ra (k_a, d_a).
    """
    A, B = check_pair(A, B)
    _check_variance(variance)
    if k is not None:
        k = check_int(k, "k", 1)
        _check_cca_size(A.shape[0], k, k)
    qa, ra = _reduce(A, "A", variance, k, lan_compatible)
    qb, _ = _reduce(B, "B", variance, k, lan_compatible)
    _check_cca_size(A.shape[0], qa.shape[1], qb.shape[1])
    return qa, ra, qb


def _canonical_correlations(qa, qb):
    """Canonical correlations between two orthonormal bases, descending."""
    return np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)


# ----------------------------------------------------------------------------
# SVCCA


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
        score=float(rho.mean()), k_a=qa.shape[1], k_b=qb.shape[1], correlations=rho,
        n=qa.shape[0],
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


def svcca_fields(A, B, variance=0.99, k=None):
    """What a scores table records about SVCCA beside its null.

    Parameters
    ----------
    A : array-like of shape (n, d_a)
    B : array-like of shape (n, d_b)
    variance : float, default=0.99
        As :func:`svcca_details`.
    k : int, optional
        As :func:`svcca_details`; then ``k_a == k_b == k``.

    Returns
    -------
    fields : dict
        ``k_a`` and ``k_b``, the directions kept, and ``lan_compatible``, the
        score with the published k-selection bug (:func:`svcca_details`).
        The bug's score is computed at the default ``variance`` whatever
        ``variance`` is: that is the number the published code reports.
    """
    d = svcca_details(A, B, variance=variance, k=k)
    lan = svcca(A, B, lan_compatible=True)
    return {"k_a": d.k_a, "k_b": d.k_b, "lan_compatible": lan}


def svcca_null(A, B, perms, variance=0.99, k=None, lan_compatible=False, device=None):
    """Observed SVCCA and its scores for each permutation of B's rows.

    Returns (float, ndarray of shape (n_perm,)).

    The SVD bases Qa, Qb once; per permutation the eigenvalues of the Gram of
    ``Qa.T @ Qb[p]``, batched into large float32 matmuls with a float64 Gram
    (agrees with :func:`svcca` on ``B[p]`` to ~1e-8). With a torch ``device``
    (``saeuniv.core.devices``) the bases are still found in numpy and the
    draws run there in torch, the same steps (within 1e-6 of ``device=None``).
    """
    dev = torch_device(device)
    qa, _, qb = _svcca_bases(A, B, variance, k, lan_compatible)
    observed = float(_canonical_correlations(qa, qb).mean())
    if dev is not None:
        null = [device_singular_values(stack).clamp(max=1.0).mean(-1).cpu().numpy()
                for _, stack in device_products(qa, qb, perms, dev)]
        return observed, np.concatenate(null)
    null = [singular_values(stack) for _, stack in permuted_products(qa, qb, perms)]
    return observed, np.minimum(np.concatenate(null), 1.0).mean(axis=-1)


def svcca_subsets(A, B, variance=0.99, k=None, lan_compatible=False):
    """Batched SVCCA of random subsets of a pool of pairs, or None without ``k``.

    Parameters
    ----------
    A : ndarray of float64, shape (P, d_a)
    B : ndarray of float64, shape (P, d_b)
        The pool: row i of ``A`` paired with row i of ``B``.
    variance, lan_compatible
        Checked as :func:`svcca` does; a fixed ``k`` makes them irrelevant.
    k : int, optional
        Directions kept on each side. The draws need a fixed ``k``: without
        it (None returned) each subset is scored by :func:`svcca` itself.

    Returns
    -------
    draws : callable or None
        ``draws(picks)``: SVCCA of ``A[p], B[p]`` for each row ``p`` of
        ``picks`` (D, m) -> (D,). The pool Grams ``A @ A.T``, ``B @ B.T``
        (P, P) are computed once; per draw the top-k eigenvectors of the
        centred sub-Grams (m, m), which span the same space as the left
        singular vectors of the centred rows, and the eigenvalues of an
        m x m Gram. Agrees with :func:`svcca` to ~1e-10 where both sides of
        a draw have rank >= k (the eigenvectors of a rank-deficient draw are
        arbitrary, where :func:`svcca` would refuse it).
    """
    _check_variance(variance)
    if k is None:
        return None
    k = check_int(k, "k", 1)
    ga, gb = A @ A.T, B @ B.T

    def draws(picks):
        _check_cca_size(picks.shape[1], k, k)
        ka, kb = subset_grams(ga, picks), subset_grams(gb, picks)
        qa, qb = (np.linalg.eigh(centred_grams(K))[1][:, :, -k:] for K in (ka, kb))
        M = qa.swapaxes(1, 2) @ qb
        rho2 = np.linalg.eigvalsh(M @ M.swapaxes(1, 2))
        return np.sqrt(np.clip(rho2, 0.0, 1.0)).mean(1)

    return draws


# ----------------------------------------------------------------------------
# PWCCA


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


def pwcca_null(A, B, perms, variance=0.99):
    """Observed PWCCA and its scores for each permutation of B's rows.

    Returns (float, ndarray of shape (n_perm,)).

    The SVD bases once; per permutation one small SVD of ``Qa.T @ Qb[p]``
    (k_a x k_b), exactly as :func:`pwcca` computes it.
    """
    qa, ra, qb = _svcca_bases(A, B, variance, None, False)
    null = np.array([_pwcca_score(qa, ra, qb[p]) for p in perms])
    return _pwcca_score(qa, ra, qb), null
