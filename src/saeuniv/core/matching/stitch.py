"""A linear map from model A's residual space into model B's, fitted on shared tokens.

Decoders of two models live in different spaces, usually of different widths, so weight
space matching needs a map first. :func:`stitch` fits one on the residual vectors of the
same token positions:

- ``orthogonal``: Procrustes after zero-padding the narrower side to the wider width,
  with one global scale. Independently trained models differ by a near-random rotation,
  which this map undoes without fitting anything else.
- ``affine``: ridge-regularised least squares with a bias.

The fit uses a seeded share of the rows; R² is reported on the rows left out as well as
on the rows fitted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

KINDS = ("orthogonal", "affine")


@dataclass(frozen=True, eq=False)
class Stitch:
    """A fitted map ``x_b ≈ (x_a - mean_a) @ weight + mean_b``.

    Attributes
    ----------
    kind : {"orthogonal", "affine"}
    weight : ndarray of float64, shape (d_a, d_b)
        The linear part. For ``orthogonal`` it is ``scale`` times a matrix with
        orthonormal rows (d_a <= d_b) or columns (d_a >= d_b).
    mean_a : ndarray of float64, shape (d_a,)
    mean_b : ndarray of float64, shape (d_b,)
    r2_fit, r2_heldout : float
        Explained variance of B's rows by the mapped A rows, on the fitted and on the
        held-out rows: ``1 - SS_res / SS_tot``, with ``SS_tot`` summed over every
        dimension around the rows' own mean (NaN when no rows were held out).
    n_fit : int
        Rows used to fit.
    heldout : ndarray of int64, shape (n_heldout,)
        Indices of the held-out rows, ascending.
    """

    kind: str
    weight: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    r2_fit: float
    r2_heldout: float
    n_fit: int
    heldout: np.ndarray

    @property
    def n_heldout(self) -> int:
        return len(self.heldout)

    @property
    def d_a(self) -> int:
        return self.weight.shape[0]

    @property
    def d_b(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x_a) -> np.ndarray:
        """Map residual vectors of A, shape (n, d_a), into B's space: (n, d_b)."""
        x_a = _as_rows(x_a, "x_a", self.d_a)
        return (x_a - self.mean_a) @ self.weight + self.mean_b

    def directions(self, w_a) -> np.ndarray:
        """Map directions of A (decoder rows), shape (F, d_a), to B's space: (F, d_b).

        Directions are differences of residual vectors, so only the linear part
        applies; the means do not.
        """
        return _as_rows(w_a, "w_a", self.d_a) @ self.weight


def _as_rows(x, name, width=None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be a 2-D numeric array (rows x width); got "
                         f"{x.dtype} array of shape {x.shape}")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name} has width {x.shape[1]}; the stitch maps width {width}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; clean the activations first")
    return x


def _check_args(x_a, x_b, kind, ridge, holdout):
    if kind not in KINDS:
        raise ValueError(f"unknown stitch kind {kind!r}; choose one of {', '.join(KINDS)}")
    if (isinstance(ridge, bool) or not isinstance(ridge, numbers.Real)
            or not math.isfinite(ridge) or ridge < 0):
        raise ValueError(f"ridge must be a finite number >= 0; got {ridge!r}")
    if (isinstance(holdout, bool) or not isinstance(holdout, numbers.Real)
            or not 0 <= holdout < 1):
        raise ValueError(f"holdout must be a fraction in [0, 1); got {holdout!r}")
    x_a, x_b = _as_rows(x_a, "x_a"), _as_rows(x_b, "x_b")
    if len(x_a) != len(x_b):
        raise ValueError(f"x_a has {len(x_a)} rows but x_b has {len(x_b)}; both must "
                         "hold the same token positions")
    return x_a, x_b


def _split(n, holdout, seed):
    n_test = int(round(n * holdout))
    if n - n_test < 2:
        raise ValueError(f"{n} rows leave {n - n_test} to fit the stitch; give at least "
                         "2 (more rows, or a smaller holdout)")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _orthogonal(xa, xb):
    """Scaled semi-orthogonal ``W`` minimising ``||xa @ W - xb||``.

    The thin SVD of ``xa.T @ xb`` gives the same map as Procrustes on the zero-padded
    square problem: the padding only adds rows or columns that meet zeros.
    """
    u, s, vt = np.linalg.svd(xa.T @ xb, full_matrices=False)
    rotation = u @ vt
    norm = np.sum(xa * xa)
    scale = s.sum() / norm if norm > 0 else 0.0
    return scale * rotation


def _affine(xa, xb, ridge):
    """Ridge least squares; ``ridge`` is relative to the mean eigenvalue of ``xa.T xa``."""
    gram = xa.T @ xa
    lam = ridge * np.trace(gram) / gram.shape[0]
    if lam == 0:  # no penalty: least squares, also when the Gram matrix is singular
        return np.linalg.lstsq(xa, xb, rcond=None)[0]
    gram[np.diag_indices_from(gram)] += lam
    return np.linalg.solve(gram, xa.T @ xb)


def _r2(pred, target) -> float:
    if len(target) == 0:
        return float("nan")
    total = np.sum((target - target.mean(0)) ** 2)
    return float(1 - np.sum((target - pred) ** 2) / total) if total > 0 else float("nan")


def stitch(x_a, x_b, kind: str = "orthogonal", ridge: float = 1e-3,
           holdout: float = 0.2, seed: int = 0) -> Stitch:
    """Fit a map from A's residual vectors to B's on the same token positions.

    Parameters
    ----------
    x_a : array-like of float, shape (n, d_a)
        Residual vectors of model A.
    x_b : array-like of float, shape (n, d_b)
        Residual vectors of model B at the same n positions.
    kind : {"orthogonal", "affine"}, default="orthogonal"
        ``orthogonal``: Procrustes on the centred rows after zero-padding to
        ``max(d_a, d_b)``, times the least-squares global scale. ``affine``: ridge
        least squares on the centred rows, then the means (a bias).
    ridge : float >= 0, default=1e-3
        ``affine`` only: the penalty as a multiple of the mean eigenvalue of A's
        centred Gram matrix, so it does not depend on the activations' scale.
    holdout : float in [0, 1), default=0.2
        Share of the rows left out of the fit, drawn with ``seed``, on which
        ``r2_heldout`` is measured.
    seed : int, default=0

    Returns
    -------
    Stitch
    """
    x_a, x_b = _check_args(x_a, x_b, kind, ridge, holdout)
    fit, test = _split(len(x_a), holdout, seed)
    mean_a, mean_b = x_a[fit].mean(0), x_b[fit].mean(0)
    xa, xb = x_a[fit] - mean_a, x_b[fit] - mean_b
    weight = _orthogonal(xa, xb) if kind == "orthogonal" else _affine(xa, xb, ridge)
    s = Stitch(kind, weight, mean_a, mean_b, float("nan"), float("nan"), len(fit), test)
    r2_fit, r2_test = _r2(s(x_a[fit]), x_b[fit]), _r2(s(x_a[test]), x_b[test])
    return Stitch(kind, weight, mean_a, mean_b, r2_fit, r2_test, len(fit), test)
