"""Crosscoder-style statistics of matched pairs, from codes and activations.

- :func:`cofiring`: how often the two features of a pair fire on the same tokens;
- :func:`latent_scaling`: how much of B's activation along its decoder direction a
  scaled copy of A's feature explains (the closed-form latent scaling of Minder et al.);
- :func:`cross_reconstruction`: B's SAE applied to A's activations, with no map and
  through a stitch, as explained variance of B's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .inputs import as_csr, check_rows
from .pairing import Matches
from .stitch import Stitch


def _paired_columns(codes_a, codes_b, matches):
    if not isinstance(matches, Matches):
        raise ValueError(f"matches must be a Matches; got {type(matches).__name__}")
    a, b = as_csr(codes_a, "codes_a"), as_csr(codes_b, "codes_b")
    check_rows(a, b, "pair statistics")
    for side, x, idx in (("a", a, matches.a), ("b", b, matches.b)):
        if idx.size and (idx.min() < 0 or idx.max() >= x.shape[1]):
            raise ValueError(f"matches name {side.upper()} features outside "
                             f"[0, {x.shape[1]})")
    return a.tocsc()[:, matches.a], b.tocsc()[:, matches.b]


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def cofiring(codes_a, codes_b, matches: Matches) -> dict[str, np.ndarray]:
    """Co-firing of each matched pair over the shared tokens.

    Parameters
    ----------
    codes_a : scipy.sparse matrix, shape (n, F_a)
    codes_b : scipy.sparse matrix, shape (n, F_b)
        Codes on the same n token positions; a feature fires where its code is not 0.
    matches : Matches

    Returns
    -------
    dict of ndarray, each shape (n_pairs,)
        ``cofire``: tokens where both fire / tokens where A's fires; ``iou``: tokens
        where both fire / tokens where either fires. NaN when the denominator is 0.
    """
    fa, fb = (x != 0 for x in _paired_columns(codes_a, codes_b, matches))
    both = np.asarray(fa.multiply(fb).sum(0)).ravel().astype(np.float64)
    n_a = np.asarray(fa.sum(0)).ravel().astype(np.float64)
    n_b = np.asarray(fb.sum(0)).ravel().astype(np.float64)
    return {"cofire": _ratio(both, n_a), "iou": _ratio(both, n_a + n_b - both)}


def latent_scaling(codes_a, codes_b, matches: Matches) -> dict[str, np.ndarray]:
    """Least-squares fit of B's activation along its decoder direction by A's feature.

    For a pair (i, j), ``beta`` minimises ``sum_t ||beta f_a,i(t) d_j - f_b,j(t) d_j||²``
    over the tokens, so ``beta = <f_a,i, f_b,j> / <f_a,i, f_a,i>`` (B's decoder norm
    cancels), and ``explained`` is the share of ``sum_t f_b,j(t)²`` that the fit
    explains, ``<f_a,i, f_b,j>² / (<f_a,i, f_a,i> <f_b,j, f_b,j>)``, which does not
    depend on the scale of either activation.

    Parameters
    ----------
    codes_a, codes_b, matches
        As in :func:`cofiring`.

    Returns
    -------
    dict of ndarray, each shape (n_pairs,)
        ``beta`` and ``explained`` (NaN for a feature that never fires).
    """
    fa, fb = _paired_columns(codes_a, codes_b, matches)
    cross = np.asarray(fa.multiply(fb).sum(0)).ravel()
    sq_a = np.asarray(fa.multiply(fa).sum(0)).ravel()
    sq_b = np.asarray(fb.multiply(fb).sum(0)).ravel()
    return {"beta": _ratio(cross, sq_a), "explained": _ratio(cross**2, sq_a * sq_b)}


@dataclass(frozen=True)
class CrossReconstruction:
    """Explained variance of B's activations, each ``1 - SS_res / SS_tot``.

    Attributes
    ----------
    own : float
        B's SAE on B's own activations: the most a cross reconstruction can reach.
    stitch : float
        The stitch alone (mapped A activations, no SAE).
    raw : float
        B's SAE on A's activations with no map (zero-padded or cut to B's width).
    aligned : float
        B's SAE on A's activations mapped through the stitch.
    """

    own: float
    stitch: float
    raw: float
    aligned: float


def _ev(pred, target, total) -> float:
    return float(1 - np.sum((target - pred) ** 2) / total)


def _fit_width(x, width):
    if x.shape[1] >= width:
        return x[:, :width]
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def cross_reconstruction(x_a, x_b, reconstruct_b, stitch: Stitch) -> CrossReconstruction:
    """B's SAE applied to A's activations, raw and through a stitch.

    Parameters
    ----------
    x_a : array-like of float, shape (n, d_a)
        A's residual vectors, best on rows the stitch was not fitted on.
    x_b : array-like of float, shape (n, d_b)
        B's residual vectors at the same positions.
    reconstruct_b : callable
        B's SAE: (m, d_b) float64 array in, its reconstruction (m, d_b) out.
    stitch : Stitch
        A map from A's space to B's (see :func:`~.stitch.stitch`).

    Returns
    -------
    CrossReconstruction
    """
    x_a, x_b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
    if x_a.ndim != 2 or x_b.ndim != 2 or len(x_a) != len(x_b) or len(x_a) < 2:
        raise ValueError(f"x_a and x_b must be 2-D with the same rows (at least 2); got "
                         f"shapes {x_a.shape} and {x_b.shape}")
    if (stitch.d_a, stitch.d_b) != (x_a.shape[1], x_b.shape[1]):
        raise ValueError(f"the stitch maps width {stitch.d_a} to {stitch.d_b}; the "
                         f"activations have widths {x_a.shape[1]} and {x_b.shape[1]}")
    total = float(np.sum((x_b - x_b.mean(0)) ** 2))
    if total <= 0:
        raise ValueError("x_b has no variance; explained variance is undefined")
    mapped = stitch(x_a)

    def rec(x):
        return np.asarray(reconstruct_b(x), np.float64)

    return CrossReconstruction(own=_ev(rec(x_b), x_b, total),
                               stitch=_ev(mapped, x_b, total),
                               raw=_ev(rec(_fit_width(x_a, x_b.shape[1])), x_b, total),
                               aligned=_ev(rec(mapped), x_b, total))
