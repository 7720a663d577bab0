"""Similarity of paired SAE decoder vectors: one registry of metrics, two nulls.

After feature matching, row ``i`` of ``A`` (n, d_a) is paired with row ``i``
of ``B`` (n, d_b). Every metric scores that pairing; 1 means the two sides
agree perfectly. :data:`METRICS` lists them all, each with its score, its
exact fast permutation null, its batched random-subset draws and the analysis
settings it takes; whatever needs the list of metrics derives it from there.

Two nulls tell whether a score is special:

* :func:`permutation_null`: the scores of shuffled pairings (rows of ``B``
  permuted);
* :func:`subset_null`: the scores of random subsets of as many pairs, drawn
  from a larger pool of pairs.

Scores of different layer pairs sit at different chance levels (width, pair
count), so each is also calibrated against its own null (``tau``,
``calibrated``), and a grid of them is read with :func:`max_cell`,
:func:`depth_contrast` and :func:`convergence_index`.

Modules: ``inputs`` (validation), ``nulls`` (the null result, calibration and
the shared machinery of the fast paths), ``calibration`` (grid tests,
ceilings, the convergence index), ``cca`` (SVCCA, PWCCA), ``kernel`` (CKA,
Procrustes), ``knn`` (mutual k-NN), ``representational`` (RSA).

Pure core: numpy/scipy in, floats out; no I/O, no logging, no global state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from ..devices import torch_device
from .calibration import (
    KINDS,
    GridTest,
    check_alpha,
    contrast_cells,
    convergence_index,
    depth_contrast,
    half_sample_interval,
    max_cell,
    pair_ceiling,
)
from .cca import (
    SVCCAResult,
    pwcca,
    pwcca_null,
    svcca,
    svcca_details,
    svcca_fields,
    svcca_null,
    svcca_subsets,
)
from .inputs import as_matrix, check_int, check_option, check_pair
from .kernel import cka, cka_null, cka_subsets, hsic, procrustes, procrustes_null
from .knn import mutual_knn, mutual_knn_null
from .nulls import (
    NullResult,
    calibrate,
    calibrate_scores,
    draw_subsets,
    naive_null,
    subset_batches,
    summarise_null,
)
from .representational import INNER_SIMILARITIES, OUTER_CORRELATIONS, rsa, rsa_null, rsa_subsets

__all__ = [
    "KINDS",
    "GridTest",
    "INNER_SIMILARITIES",
    "METRICS",
    "OUTER_CORRELATIONS",
    "Metric",
    "NullResult",
    "SVCCAResult",
    "calibrate",
    "calibrate_scores",
    "cka",
    "contrast_cells",
    "convergence_index",
    "depth_contrast",
    "half_sample_interval",
    "hsic",
    "max_cell",
    "mutual_knn",
    "pair_ceiling",
    "permutation_null",
    "procrustes",
    "pwcca",
    "rsa",
    "subset_null",
    "summarise_null",
    "svcca",
    "svcca_details",
]


@dataclass(frozen=True)
class Metric:
    """One similarity metric of paired rows and everything the stages need of it.

    Attributes
    ----------
    name : str
        Registry key, also the name configs use.
    score : callable
        ``score(A, B, **kwargs) -> float`` for A (n, d_a), B (n, d_b).
    null : callable or None
        Exact fast permutation null:
        ``null(A, B, perms, **kwargs) -> (observed, null scores (n_perm,))``;
        None: :func:`permutation_null` rescores each permutation.
    subsets : callable or None
        Batched random-subset draws over a pool A (P, d_a), B (P, d_b):
        ``subsets(A, B, **kwargs)`` computes once what every draw needs and
        returns ``draws(picks (D, m)) -> scores (D,)``, or None where these
        ``kwargs`` have no fast path; None: :func:`subset_null` scores each
        draw with ``score``.
    options : mapping of str to str
        Name of an analysis setting -> the keyword of ``score`` that takes it
        (read-only). Settings are mapped, not shared, because one keyword name
        means different things to different metrics (``k``: SVCCA directions,
        mutual_knn neighbours).
    details : callable or None
        ``details(A, B, **kwargs) -> dict``: extra fields a scores table
        records beside the null.
    summary : str
        One line: what the metric measures.
    on_device : bool, default=False
        Whether ``null`` takes ``device=`` and runs its draws on a torch
        device (``saeuniv.core.devices``).
    """

    name: str
    score: Callable[..., float]
    null: Callable | None
    subsets: Callable | None
    options: Mapping[str, str]
    details: Callable | None
    summary: str
    on_device: bool = False

    def __post_init__(self):
        if not callable(self.score):
            raise TypeError(f"metric {self.name!r}: score must be callable")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def kwargs(self, **available) -> dict:
        """Keywords of ``score`` from the analysis settings ``available``, by name.

        ``{keyword: available[option]}`` for each of :attr:`options` present in
        ``available``, in the order of :attr:`options`; other settings are
        ignored.
        """
        return {
            kw: available[opt] for opt, kw in self.options.items() if opt in available
        }


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("svcca", svcca, svcca_null, svcca_subsets,
               {"variance": "variance", "svcca_k": "k"}, svcca_fields,
               "mean canonical correlation of the SVD-reduced sides", True),
        Metric("pwcca", pwcca, pwcca_null, None, {"variance": "variance"}, None,
               "canonical correlations weighted by how much of side A each explains"),
        Metric("rsa", rsa, rsa_null, rsa_subsets, {}, None,
               "correlation of the two sides' row-by-row similarities", True),
        Metric("cka", cka, cka_null, cka_subsets, {"cka_debiased": "debiased"}, None,
               "linear centred kernel alignment of the two sides' Gram matrices", True),
        Metric("mutual_knn", mutual_knn, mutual_knn_null, None, {}, None,
               "overlap of each row's cosine nearest neighbours in the two sides", True),
        Metric("procrustes", procrustes, procrustes_null, None, {}, None,
               "how well a rotation maps one normalised side onto the other", True),
    )
}


def permutation_null(metric, A, B, n_perm=1000, seed=0, alpha=0.05, s_max=1.0,
                     device=None, **metric_kwargs):
    """Score a pairing against the scores of shuffled pairings, raw and calibrated.

    The null permutes the rows of ``B``: the j-th null score is
    ``metric(A, B[p_j])`` where ``p_j`` is the j-th call of
    ``rng.permutation(n)`` on ``rng = numpy.random.default_rng(seed)``, so the
    same seed gives bit-identical results.

    Named metrics use exact fast paths that compute once what a permutation
    does not change and pay per permutation only for what does:

    * ``"svcca"``: SVD bases Qa, Qb once; per permutation the eigenvalues of
      the Gram of ``Qa.T @ Qb[p]``, batched into large float32 matmuls with a
      float64 Gram (agrees with the naive path to ~1e-8).
    * ``"pwcca"``: the bases once; per permutation one small SVD.
    * ``"rsa"``: the inner similarity ranks (or values) once; per permutation
      ``sum_{i<j} RA[i, j] RB[p_i, p_j]``, the mean and variance of the ranks
      being unchanged. Holds two n x n float32 matrices. ``outer="kendall"``
      falls back to the naive loop.
    * ``"cka"``: centred sides once; per permutation ``||A^T B[p]||_F^2`` in
      batched float32 matmuls (plus O(n) terms when debiased); ~1e-8. With
      n^2 <= d_a d_b, the float64 n x n Grams once and per permutation
      ``<K_A, K_B[p, p]>``.
    * ``"mutual_knn"``: neighbour sets once; per permutation O(n k log(n k)).
    * ``"procrustes"``: normalised sides once; per permutation the nuclear
      norm of ``A^T B[p]``, as for svcca; ~1e-8.

    A callable metric is recomputed from scratch for each permutation.

    With a torch ``device`` (``saeuniv.core.devices``: ``"cpu"``, ``"cuda"``)
    the fast nulls of svcca, rsa, cka, mutual_knn and procrustes compute once
    what they compute once on the host, then send the same permutations,
    drawn on the host, to the device a batch at a time and score each batch
    there in torch (:attr:`Metric.on_device`). Their null scores agree with
    ``device=None`` within 1e-6 (mutual_knn: exactly) and the observed score
    is the numpy one. pwcca, rsa with ``outer="kendall"`` and a callable
    metric have no device path and run in numpy whatever ``device`` is.

    The same draws calibrate the score (:func:`~.nulls.calibrate`): ``tau`` is
    the permutation test's critical value at level ``alpha`` and ``calibrated``
    the score above it on a 0-1 scale, so that scores of layer pairs with
    different pair counts and widths (hence different chance levels) can be
    compared. Every call with one seed draws the same permutations of ``n``
    rows: the k-th draw of two layer pairs with as many pairs is one
    permutation, and grid statistics take their null from the k-th draws of
    all cells (:func:`depth_contrast`, :func:`max_cell`).

    Parameters
    ----------
    metric : {"svcca", "pwcca", "rsa", "cka", "mutual_knn", "procrustes"} or callable
        Metric name, or ``callable(A, B, **metric_kwargs) -> float``.
    A : array-like of shape (n, d_a)
        Vectors of the first model; row i is paired with row i of ``B``.
    B : array-like of shape (n, d_b)
        Vectors of the second model; its rows are permuted.
    n_perm : int, default=1000
        Number of permutations, >= 1 (``null_sd`` and ``z`` are nan for 1).
    seed : int, default=0
        Non-negative seed for ``numpy.random.default_rng``.
    alpha : float in (0, 1), default=0.05
        Level of the chance threshold ``tau``.
    s_max : float, default=1.0
        The metric's largest score (1 for every registry metric).
    device : None, str or torch.device, default=None
        None: the numpy path (the reference). A torch device: the draws run
        there, see above.
    **metric_kwargs
        Passed to the metric (e.g. ``variance``, ``k``, ``inner``).

    Returns
    -------
    result : NullResult
        Observed score, null mean and sd, z, p, n_perm, seed, null scores,
        ``tau`` and ``calibrated``.
        With ``null_sd == 0``, z is +inf, -inf or nan (observed above, below
        or equal to the null mean). The smallest possible p is
        ``1 / (1 + n_perm)``.

    Raises
    ------
    ValueError
        If ``metric`` is an unknown name, ``n_perm`` < 1, ``seed`` is not a
        non-negative integer, ``alpha`` is outside (0, 1), ``device`` is not
        a torch device or names a GPU this process cannot see, or the metric
        rejects the inputs.
    """
    dev = torch_device(device)
    n_perm = check_int(n_perm, "n_perm", 1)
    seed = check_int(seed, "seed", 0)
    check_alpha(alpha)
    A, B = check_pair(A, B)
    rng = np.random.default_rng(seed)
    perms = (rng.permutation(A.shape[0]) for _ in range(n_perm))
    score, fast = _resolve(metric)
    if dev is not None and fast is not None and METRICS[metric].on_device:
        fast = functools.partial(fast, device=dev)
    if fast is None:
        observed = float(score(A, B, **metric_kwargs))
        null = naive_null(score, A, B, perms, **metric_kwargs)
    else:
        observed, null = fast(A, B, perms, **metric_kwargs)
    return summarise_null(observed, null, seed, alpha, s_max)


def _resolve(metric):
    """(score, fast null or None) of a registry name or a callable metric."""
    if callable(metric):
        return metric, None
    check_option(metric, tuple(METRICS), "metric")
    return METRICS[metric].score, METRICS[metric].null


def subset_null(metric, A, B, size, n_draws, seed, observed, **kwargs):
    """Score ``observed`` against random subsets of ``size`` pairs drawn from a pool.

    The j-th null score is ``metric(A[p_j], B[p_j], **kwargs)`` for the j-th
    row ``p_j`` of the draws: ``rng.choice(P, size, replace=False)`` called
    ``n_draws`` times on ``rng = numpy.random.default_rng([seed, 1])``, a
    stream apart from :func:`permutation_null`'s ``default_rng(seed)``. The
    same seed gives bit-identical results.

    Metrics with batched draws (:attr:`Metric.subsets`) read every draw off
    P x P matrices of the pool computed once, in batches of as many draws as
    fit 32 MiB of float64 ``size x size`` matrices:

    * ``"svcca"`` with a fixed ``k``: the top-k eigenvectors of the centred
      sub-Grams; without ``k``, draw by draw;
    * ``"cka"``: HSIC from the centred sub-Grams;
    * ``"rsa"`` with the default correlation similarities and Spearman
      correlation: float32-rounded similarities ranked by
      :func:`scipy.stats.rankdata`; with other options, draw by draw.

    These agree with the metric itself to ~1e-10. Other metrics, and a
    callable ``metric``, are computed draw by draw, which costs a full
    score per draw.

    Parameters
    ----------
    metric : {"svcca", "pwcca", "rsa", "cka", "mutual_knn", "procrustes"} or callable
        Metric name, or ``callable(A, B, **kwargs) -> float``.
    A : array-like of shape (P, d_a)
        The pool's vectors of the first model; row i is paired with row i of
        ``B``.
    B : array-like of shape (P, d_b)
        The pool's vectors of the second model.
    size : int
        Pairs per draw, 1 <= size < P.
    n_draws : int
        Number of draws, >= 1.
    seed : int
        Non-negative seed (see above).
    observed : float
        The score to compare with the draws, e.g. the metric on a category's
        own ``size`` pairs.
    **kwargs
        Passed to the metric (e.g. ``k``, ``debiased``).

    Returns
    -------
    result : NullResult
        ``observed`` against the draws' scores: null mean and sd, z,
        p = (1 + #{null >= observed}) / (1 + n_draws), ``n_perm`` = n_draws,
        seed and the scores in the order drawn.

    Raises
    ------
    ValueError
        If ``metric`` is an unknown name, the pool is not a pair of finite 2-D
        arrays with as many rows each, ``size`` or ``n_draws`` is not a
        positive integer, P <= size (every draw would be the whole pool, or
        impossible), ``seed`` is negative, or the metric rejects a draw.
    """
    size, n_draws = check_int(size, "size", 1), check_int(n_draws, "n_draws", 1)
    seed = check_int(seed, "seed", 0)
    A, B = _check_pool(A, B, size)
    score, draws = _subset_scorer(metric, A, B, **kwargs)
    picks = draw_subsets(A.shape[0], size, n_draws, seed)
    if draws is None:
        null = np.array([float(score(A[p], B[p], **kwargs)) for p in picks])
    else:
        null = np.concatenate([draws(batch) for batch in subset_batches(picks)])
    return summarise_null(observed, null, seed)


def _check_pool(A, B, size):
    """The pool as float64 matrices, with more pairs than a draw takes."""
    A, B = as_matrix(A, "A"), as_matrix(B, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"the pool has {A.shape[0]} rows in A but {B.shape[0]} in B; row i of A "
            "must be paired with row i of B, so both need the same number of rows"
        )
    if A.shape[0] <= size:
        raise ValueError(
            f"the pool holds {A.shape[0]} pairs, not more than the {size} to draw: "
            "random subsets of that size cannot vary; use a larger pool or a "
            "smaller size"
        )
    return A, B


def _subset_scorer(metric, A, B, **kwargs):
    """(score, batched draws or None) of a metric over the pool A, B."""
    score, _ = _resolve(metric)
    subsets = None if callable(metric) else METRICS[metric].subsets
    return score, (None if subsets is None else subsets(A, B, **kwargs))
