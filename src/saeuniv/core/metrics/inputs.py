"""Input validation shared by the metrics, and the memory budget of their blocked loops.

Every metric scores paired rows: row ``i`` of ``A`` (n, d_a) with row ``i`` of
``B`` (n, d_b). The checks here turn array-likes into finite float64 matrices
and reject, with an error naming the bad value and the fix, what would make a
metric undefined (shapes that do not pair, constant sides, zero rows) or an
option it does not know.

Pure core: arrays in, arrays out; no I/O, no logging, no global state.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BLOCK_BYTES",
    "as_matrix",
    "centre",
    "check_int",
    "check_option",
    "check_pair",
    "unit_rows",
]

BLOCK_BYTES = 1 << 25  # working-set budget of one blocked step (32 MiB)


def as_matrix(X, name):
    """``X`` as a finite 2-D float64 array.

    Parameters
    ----------
    X : array-like of shape (n, d)
        Real numbers, d >= 1.
    name : str
        What the caller calls ``X``, for the error messages.

    Returns
    -------
    X : ndarray of float64, shape (n, d)

    Raises
    ------
    ValueError
        If ``X`` is complex, not numeric, not 2-D, has no column, or holds
        NaN or inf (the message counts them and gives the first position).
    """
    if np.iscomplexobj(X):
        raise ValueError(f"{name} is complex; pass real-valued arrays")
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array ({exc})") from exc
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_pairs, n_dims) but has shape "
            f"{X.shape}; reshape a single vector with {name}.reshape(-1, 1)"
        )
    if X.shape[1] == 0:
        raise ValueError(f"{name} has shape {X.shape}: it needs at least one column")
    finite = np.isfinite(X)
    if not finite.all():
        n_nan = int(np.isnan(X).sum())
        n_inf = int(X.size - finite.sum()) - n_nan
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} inf values (first at row {row}, "
            f"column {col}); drop or impute them before comparing"
        )
    return X


def check_pair(A, B, min_rows=3):
    """Validate a pair of paired-row matrices.

    Parameters
    ----------
    A : array-like of shape (n, d_a)
    B : array-like of shape (n, d_b)
        Row i of ``B`` is paired with row i of ``A``.
    min_rows : int, default=3
        Fewest pairs the caller can score.

    Returns
    -------
    A, B : ndarray of float64, shapes (n, d_a) and (n, d_b)

    Raises
    ------
    ValueError
        As :func:`as_matrix`, or if the row counts differ or n < ``min_rows``.
    """
    A, B = as_matrix(A, "A"), as_matrix(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"A has {A.shape[0]} rows but B has {B.shape[0]}; row i of A must be "
            "paired with row i of B, so both need the same number of rows"
        )
    if A.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} paired rows, got n={A.shape[0]}")
    return A, B


def check_option(value, allowed, name):
    """Raise a ValueError listing ``allowed`` unless ``value`` is one of them."""
    if not (isinstance(value, str) and value in allowed):
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")


def check_int(value, name, low):
    """``value`` as an int; a ValueError unless it is an integer >= ``low``.

    A bool is refused: ``True`` passed as a count is a mistake, not 1.
    """
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not integer or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def centre(X, name):
    """Columns of ``X`` (n, d) centred over rows; constant columns become exactly zero.

    Exact zeros, rather than rounding residue, keep a constant column from
    adding a spurious direction to the SVD-based metrics.

    Raises
    ------
    ValueError
        If every column is constant (all rows identical).
    """
    varying = np.ptp(X, axis=0) > 0
    if not varying.any():
        raise ValueError(
            f"{name} has zero variance: all its rows are identical, so the metric is "
            f"undefined; check that {name} holds distinct vectors"
        )
    return np.where(varying, X - X.mean(axis=0), 0.0)


def unit_rows(X, name):
    """Rows of ``X`` (n, d) scaled to unit norm.

    Raises
    ------
    ValueError
        If a row is all zeros: it has no direction, so its cosine similarity
        is undefined.
    """
    norms = np.linalg.norm(X, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(
            f"row {zero[0]} of {name} is all zeros ({zero.size} such rows), so its "
            "cosine similarity is undefined; drop zero rows first"
        )
    return X / norms[:, None]
