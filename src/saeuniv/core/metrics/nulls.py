"""Null distributions shared by the metrics: the result and the fast paths' machinery.

Two nulls score a pairing of rows, ``A`` (n, d_a) with ``B`` (n, d_b):

* shuffled pairings: the rows of ``B`` permuted. A permutation only reorders
  rows, so the fast nulls compute once what it leaves unchanged and batch what
  it changes (:func:`permuted_products`, :func:`singular_values`);
* random subsets: ``size`` pairs drawn at random from a larger pool of pairs.
  The fast draws read each subset off P x P matrices of the pool computed
  once (:func:`subset_grams`, :func:`centred_grams`), in batches that fit the
  memory budget (:func:`subset_batches`).

The shuffled-pairing nulls also run on a torch device (``saeuniv.core.devices``):
the permutations are still drawn on the host, as the numpy path draws them, and
sent to the device a batch at a time (:func:`device_batches`,
:func:`device_products`, :func:`device_singular_values`). torch is imported
only there.

Pure core: arrays in, arrays out; no I/O, no logging, no global state.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .inputs import BLOCK_BYTES

# working set of one batch of draws on a device (256 MiB): large enough to keep a GPU
# busy with one call per batch, small enough to sit beside the inputs on any GPU
DEVICE_BLOCK_BYTES = 1 << 28

__all__ = [
    "NullResult",
    "batches",
    "calibrate",
    "calibrate_scores",
    "DEVICE_BLOCK_BYTES",
    "centred_grams",
    "device_batches",
    "device_products",
    "device_singular_values",
    "draw_subsets",
    "naive_null",
    "permuted_products",
    "singular_values",
    "subset_batches",
    "subset_grams",
    "summarise_null",
]


@dataclass(frozen=True, eq=False)
class NullResult:
    """A metric's observed score against its permutation null.

    Attributes
    ----------
    observed : float
        ``metric(A, B)``.
    null_mean, null_sd : float
        Mean and standard deviation (ddof=1) of the null scores.
    z : float
        ``(observed - null_mean) / null_sd``; +inf or -inf if ``null_sd`` is 0
        and observed lies above or below the null, nan if it equals it.
    p : float
        One-sided p-value ``(1 + #{null >= observed}) / (1 + n_perm)``.
    n_perm : int
        Number of permutations.
    seed : int
        Seed of ``numpy.random.default_rng`` that drew the permutations.
    null : ndarray of shape (n_perm,)
        Null scores (read-only), in the order the permutations were drawn.
    tau : float
        The chance threshold of :func:`calibrate`: the
        ``ceil((1 - alpha) (n_perm + 1))``-th smallest of ``{observed} U null``.
    calibrated : float
        ``clamp((observed - tau) / (s_max - tau), 0, 1)``: 0 at or below chance,
        1 at the metric's maximum, comparable across layer pairs whose raw
        chance levels differ.
    """

    observed: float
    null_mean: float
    null_sd: float
    z: float
    p: float
    n_perm: int
    seed: int
    null: np.ndarray
    tau: float = float("nan")
    calibrated: float = float("nan")


def calibrate(observed, null, alpha=0.05, s_max=1.0):
    """The chance threshold of a score and the score above it, on a 0-1 scale.

    Following Groger, Wen and Brbic (2026): with K null scores,
    ``tau`` is the ``ceil((1 - alpha)(K + 1))``-th smallest of the K + 1 values
    ``{observed} U null`` (the permutation test's critical value at level
    ``alpha``), and ``calibrated = clamp((observed - tau) / (s_max - tau), 0, 1)``.
    A score that does not beat the null at level ``alpha`` calibrates to 0,
    whatever its raw value; a raw score inflated by width or by few pairs is
    read above its own chance level.

    Parameters
    ----------
    observed : float
    null : array-like of float, shape (K,)
        Null scores, K >= 1; non-finite values are not allowed.
    alpha : float in (0, 1), default=0.05
    s_max : float, default=1.0
        The metric's largest possible score.

    Returns
    -------
    tau, calibrated : float
        ``calibrated`` is 0 when ``tau >= s_max``.
    """
    null = np.asarray(null, dtype=float)
    if null.ndim != 1 or null.size < 1 or not np.all(np.isfinite(null)):
        raise ValueError(f"null must be a non-empty 1-D array of finite scores, got shape "
                         f"{null.shape}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}; 0.05 is the usual level")
    values = np.sort(np.append(null, float(observed)))
    # the rank is an integer in exact arithmetic; the tolerance keeps (1 - 0.1) * 10 at 9
    rank = min(values.size, max(1, math.ceil((1 - alpha) * values.size - 1e-9)))
    tau = float(values[rank - 1])
    return tau, float(calibrate_scores(observed, tau, s_max))


def calibrate_scores(scores, tau, s_max=1.0):
    """``clamp((scores - tau) / (s_max - tau), 0, 1)`` elementwise (0 where
    ``tau >= s_max``; NaN where a score or tau is NaN): scores on the calibrated scale of
    a cell whose chance threshold is ``tau``, e.g. that cell's null draws, so that grid
    statistics of calibrated scores have a null on the same scale. ``tau`` broadcasts
    against ``scores``."""
    scores, tau = np.asarray(scores, dtype=float), np.asarray(tau, dtype=float)
    room = s_max - tau
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.clip((scores - tau) / np.where(room > 0, room, 1.0), 0.0, 1.0)
    out = np.where(room > 0, out, 0.0)
    return np.where(np.isnan(scores) | np.isnan(tau), np.nan, out)


def summarise_null(observed, null, seed, alpha=0.05, s_max=1.0):
    """A :class:`NullResult` for ``observed`` against null scores drawn with ``seed``.

    ``null`` (1-D float array) is made read-only. z and p follow
    :class:`NullResult`: p = (1 + #{null >= observed}) / (1 + n); ``tau`` and
    ``calibrated`` follow :func:`calibrate` at ``alpha`` and ``s_max`` (nan
    when ``observed`` is not finite).
    """
    null = np.asarray(null, dtype=float)
    if null.ndim != 1 or null.size < 1:
        raise ValueError(f"null must be a non-empty 1-D array, got shape {null.shape}")
    null.setflags(write=False)
    mean = float(null.mean())
    sd = float(null.std(ddof=1)) if null.size > 1 else float("nan")
    diff = observed - mean
    if sd > 0 or np.isnan(sd):
        z = diff / sd
    else:
        z = float(np.copysign(np.inf, diff)) if diff != 0 else float("nan")
    p = (1 + np.count_nonzero(null >= observed)) / (1 + null.size)
    tau, cal = (calibrate(observed, null, alpha, s_max)
                if np.isfinite(observed) and np.all(np.isfinite(null)) else (np.nan, np.nan))
    return NullResult(observed, mean, sd, z, p, null.size, seed, null, tau, cal)


# ----------------------------------------------------------------------------
# shuffled pairings


def batches(iterable, size):
    """Yield lists of up to ``size`` consecutive items of ``iterable``."""
    it = iter(iterable)
    while batch := list(itertools.islice(it, size)):
        yield batch


def naive_null(metric, A, B, perms, **kwargs):
    """``metric(A, B[p], **kwargs)`` for each permutation ``p``, from scratch.

    Returns an ndarray of float64, shape (n_perm,).
    """
    return np.array([metric(A, B[p], **kwargs) for p in perms], dtype=np.float64)


def permuted_products(left, right, perms):
    """Yield (batch, stack): K permutations, their float32 products left.T @ right[p].

    ``left`` is (n, d_l), ``right`` (n, d_r); ``stack`` has shape (K, d_l, d_r).
    The K gathered copies of ``right`` sit side by side, so one matmul serves
    the whole batch; K keeps the gathered copies within ``BLOCK_BYTES``.
    """
    left, right = left.astype(np.float32), right.astype(np.float32)
    n, d = right.shape
    for batch in batches(perms, max(1, BLOCK_BYTES // (4 * n * d))):
        gathered = right[np.stack(batch, axis=1)].reshape(n, -1)  # (n, K * d)
        stack = (left.T @ gathered).reshape(left.shape[1], len(batch), d)
        yield batch, stack.swapaxes(0, 1)


def singular_values(stack):
    """Singular values (ascending) of each matrix in a stack (..., r, c).

    From the eigenvalues of its smaller Gram, formed in float64 so the
    float32 products of :func:`permuted_products` lose no more precision.
    """
    m = stack.astype(np.float64)
    mt = m.swapaxes(-1, -2)
    gram = m @ mt if m.shape[-2] <= m.shape[-1] else mt @ m
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))


def device_batches(perms, draw_bytes, dev):
    """Yield (batch, idx): lists of permutations and them as an int64 (K, n) tensor on ``dev``.

    ``draw_bytes`` is what one draw holds on the device; K keeps a batch within
    :data:`DEVICE_BLOCK_BYTES` (at least one draw).
    """
    import torch

    for batch in batches(perms, max(1, DEVICE_BLOCK_BYTES // draw_bytes)):
        yield batch, torch.as_tensor(np.stack(batch), device=dev)


def device_products(left, right, perms, dev):
    """Yield (batch, stack): :func:`permuted_products` in torch on ``dev``.

    ``left`` (n, d_l) and ``right`` (n, d_r) are rounded to float32 on the host,
    as :func:`permuted_products` rounds them; ``stack`` is a float32 tensor
    (K, d_l, d_r) on ``dev``, from one matmul per batch.
    """
    import torch

    left = torch.as_tensor(left.astype(np.float32), device=dev)
    right = torch.as_tensor(right.astype(np.float32), device=dev)
    n, d = right.shape
    for batch, idx in device_batches(perms, 4 * n * d, dev):
        gathered = right[idx.T].reshape(n, -1)  # (n, K * d)
        stack = (left.T @ gathered).reshape(left.shape[1], len(batch), d)
        yield batch, stack.transpose(0, 1)


def device_singular_values(stack):
    """:func:`singular_values` of a torch stack (..., r, c), on its device.

    The Gram is formed in float64 and its eigenvalues found by
    ``torch.linalg.eigvalsh``; returns a float64 tensor (..., min(r, c)), ascending.
    """
    import torch

    m = stack.double()
    mt = m.transpose(-1, -2)
    gram = m @ mt if m.shape[-2] <= m.shape[-1] else mt @ m
    return torch.linalg.eigvalsh(gram).clamp(min=0.0).sqrt()


# ----------------------------------------------------------------------------
# random subsets of a pool


def draw_subsets(n_pool, size, n_draws, seed):
    """Indices (n_draws, size) of random subsets of a pool of ``n_pool`` pairs.

    Each row is ``rng.choice(n_pool, size, replace=False)`` on
    ``rng = numpy.random.default_rng([seed, 1])``: a stream apart from the
    shuffled-pairing null's ``default_rng(seed)``, so the two nulls of one
    seed share no random numbers.
    """
    rng = np.random.default_rng([seed, 1])
    return np.stack([rng.choice(n_pool, size, replace=False) for _ in range(n_draws)])


def subset_batches(picks):
    """Split ``picks`` (D, m) into consecutive batches of draws.

    A batch holds as many draws as fit ``BLOCK_BYTES`` of float64 m x m
    matrices (at least one).
    """
    n_draws, size = picks.shape
    step = max(1, BLOCK_BYTES // (8 * size * size))
    return np.array_split(picks, range(step, n_draws, step))


def subset_grams(gram, picks):
    """Blocks ``gram[p][:, p]`` (D, m, m) of a pool matrix (P, P), picks (D, m)."""
    return gram[picks[:, :, None], picks[:, None, :]]


def centred_grams(K):
    """H K H for a stack of Grams (D, m, m): the Grams of column-centred rows."""
    rows = K.mean(2, keepdims=True)
    return K - rows - rows.swapaxes(1, 2) + K.mean((1, 2), keepdims=True)
