"""Fan-out: how many partners above a threshold each feature has.

A larger model may split one feature of a smaller model into several (Bricken et al.,
2023): each child fires on part of the parent's tokens and correlates with it, while a
one-to-one matcher keeps one child and hides the rest. Fan-out counts them all.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class FanOut:
    """Partner counts above a threshold.

    Attributes
    ----------
    a : ndarray of int64, shape (F_a,)
        For each A feature, the number of B features with similarity above the threshold.
    b : ndarray of int64, shape (F_b,)
        For each B feature, the number of A features above the threshold.
    """

    a: np.ndarray
    b: np.ndarray

    @property
    def split_share_a(self) -> float:
        """Share of the A features with a partner that have two or more (NaN if none)."""
        return _split_share(self.a)

    @property
    def split_share_b(self) -> float:
        """Share of the B features with a partner that have two or more (NaN if none)."""
        return _split_share(self.b)

    def histogram(self, side: str = "a", top: int = 5) -> dict[str, int]:
        """Counts of features by fan-out 0, 1, ..., ``top - 1`` and ``top`` or more."""
        counts = self.a if side == "a" else self.b
        hist = {str(k): int((counts == k).sum()) for k in range(top)}
        hist[f"{top}+"] = int((counts >= top).sum())
        return hist


def _split_share(counts) -> float:
    matched = int((counts >= 1).sum())
    return float((counts >= 2).sum() / matched) if matched else float("nan")


def fan_out(corr, threshold: float) -> FanOut:
    """Count, per feature, the partners whose similarity exceeds ``threshold``.

    Parameters
    ----------
    corr : ndarray of float, shape (F_a, F_b)
        Correlations or cosines; NaN (dead) entries never count.
    threshold : float in [-1, 1]
        Strictly greater counts.

    Returns
    -------
    FanOut
    """
    corr = np.asarray(corr)
    if corr.ndim != 2 or not np.issubdtype(corr.dtype, np.floating):
        raise ValueError(f"corr must be a 2-D float array (F_a x F_b); got {corr.dtype} "
                         f"array of shape {corr.shape}")
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
            or not math.isfinite(threshold) or not -1 <= threshold <= 1):
        raise ValueError(f"threshold must be in [-1, 1]; got {threshold!r}")
    above = corr > threshold  # NaN compares False
    return FanOut(above.sum(1).astype(np.int64), above.sum(0).astype(np.int64))


def top_splits(corr, threshold: float, n: int = 10) -> list[dict]:
    """The A features with the most partners above ``threshold``, most first.

    Returns
    -------
    list of dict
        ``a`` (the A feature), ``children`` (its B partners above the threshold, best
        first) and ``corr`` (their similarities), for at most ``n`` A features with two
        or more partners; ties go to the higher summed similarity, then the lower index.
    """
    corr = np.asarray(corr)
    counts = fan_out(corr, threshold).a
    above = np.where(corr > threshold, corr, 0.0)
    order = np.lexsort((np.arange(len(counts)), -above.sum(1), -counts))
    out = []
    for a in order[:n]:
        if counts[a] < 2:
            break
        children = np.flatnonzero(corr[a] > threshold)
        children = children[np.argsort(-corr[a, children], kind="stable")]
        out.append({"a": int(a), "children": children.tolist(),
                    "corr": [float(c) for c in corr[a, children]]})
    return out
