"""When a score counts as significant: permutation p-values, the Benjamini-Hochberg
correction and the rule that a concept subspace must beat both of its nulls.

Pure core: p-values in, q-values and decisions out.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.05  # the significance level of every p- and q-value saeuniv reports


def fdr_bh(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order.

    ``q_(i) = min_{j >= i} p_(j) n / j`` over the p-values sorted ascending,
    capped at 1. Controls the false discovery rate over the tests given.

    Parameters
    ----------
    pvalues : array-like of float in [0, 1], shape (n,)

    Returns
    -------
    ndarray of float, shape (n,)
    """
    p = np.asarray(pvalues, float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-D, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("pvalues must be finite and in [0, 1]")
    n = p.size
    if not n:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(q, 1.0)
    return out


def significant_against_both(p_first, p_second, alpha: float = ALPHA):
    """The rule for a family of cells tested against two nulls: each null's p-values are
    corrected over the family (Benjamini-Hochberg), and a cell is significant when both of
    its q-values are below ``alpha``.

    Parameters
    ----------
    p_first, p_second : array-like of float, shape (n,)
        Each cell's p-value against the first and the second null.
    alpha : float, default=ALPHA

    Returns
    -------
    q_first, q_second : ndarray of float, shape (n,)
    significant : ndarray of bool, shape (n,)
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    q_first, q_second = fdr_bh(p_first), fdr_bh(p_second)
    if q_first.shape != q_second.shape:
        raise ValueError(f"the two nulls' p-values differ in length: {q_first.size} and "
                         f"{q_second.size}")
    return q_first, q_second, (q_first < alpha) & (q_second < alpha)
