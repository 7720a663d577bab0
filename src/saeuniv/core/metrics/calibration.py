"""Reading scores across a grid of layer pairs: grid-wide tests, ceilings and the
convergence index.

Each cell (A layer, B layer) of a grid has an observed score and K null scores from the
same seeded permutation draws (:func:`saeuniv.core.metrics.permutation_null`), so draw k
of every cell together is one null grid. A statistic of the whole grid (its best cell, a
contrast of depth bands) is then tested against the same statistic of the K null grids:
a family-wise test that needs no correction for the number of cells.

Pure core: arrays in, numbers out; no I/O, no logging, no global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..depth import MIDDLE, in_band
from .inputs import check_int, check_option
from .nulls import summarise_null

KINDS = ("middle", "diagonal")  # the depth contrasts of :func:`depth_contrast`

__all__ = [
    "KINDS",
    "GridTest",
    "check_alpha",
    "contrast_cells",
    "convergence_index",
    "depth_contrast",
    "half_sample_interval",
    "max_cell",
    "pair_ceiling",
]


@dataclass(frozen=True, eq=False)
class GridTest:
    """A statistic of a grid of scores against the same statistic of the null grids.

    Attributes
    ----------
    statistic : float
        The statistic of the observed grid.
    null_mean, null_sd, z : float
        Of the statistic over the K null grids (as in ``NullResult``).
    p : float
        ``(1 + #{null >= statistic}) / (1 + K)``: the chance that pairings with no
        information give a statistic at least this large.
    n_perm : int
        K, the number of null grids.
    null : ndarray of shape (K,)
        The statistic of each null grid, in draw order (read-only).
    p_layers : float
        For a depth contrast: ``(1 + #{relabelled >= statistic}) / (1 + R)`` over R
        random reorderings of the grid's A layers and of its B layers: the chance that
        the same scores, at depths drawn at random, give a contrast at least this large.
        It holds the null of "no depth effect" when every cell is above chance, which the
        permutation p does not (there every cell beats its null). nan for the best cell.
    n_relabel : int
        R (0 for the best cell).
    """

    statistic: float
    null_mean: float
    null_sd: float
    z: float
    p: float
    n_perm: int
    null: np.ndarray
    p_layers: float = float("nan")
    n_relabel: int = 0


def check_alpha(alpha) -> float:
    """``alpha`` as a float in (0, 1), or a ValueError naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}; 0.05 is the usual "
                         "level")
    return float(alpha)


def _check_grid(observed, null) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(observed (La, Lb), null (K, La, Lb), scored cells (La, Lb)) as float arrays."""
    observed, null = np.asarray(observed, dtype=float), np.asarray(null, dtype=float)
    if observed.ndim != 2:
        raise ValueError(f"observed must be an (La, Lb) grid, got shape {observed.shape}")
    if null.ndim != 3 or null.shape[1:] != observed.shape or null.shape[0] < 1:
        raise ValueError(f"null must be (K, La, Lb) = (K, {observed.shape[0]}, "
                         f"{observed.shape[1]}) with K >= 1, got shape {null.shape}")
    scored = np.isfinite(observed) & np.isfinite(null).all(axis=0)
    if not scored.any():
        raise ValueError("no cell of the grid is scored (every cell is NaN)")
    return observed, null, scored


def _statistic_test(statistic: float, null_stats: np.ndarray, **extra) -> GridTest:
    r = summarise_null(statistic, null_stats, seed=0)
    return GridTest(r.observed, r.null_mean, r.null_sd, r.z, r.p, r.n_perm, r.null, **extra)


def max_cell(observed, null) -> GridTest:
    """The best cell of a grid against the best cell of each null grid.

    A family-wise test of "the best layer pair is above chance": taking the best of many
    cells inflates a raw score, and the null grids are inflated the same way.

    Parameters
    ----------
    observed : array-like of shape (La, Lb)
        One score per (A layer, B layer); NaN cells (not scored) are left out.
    null : array-like of shape (K, La, Lb)
        Draw k of every cell's null (the same seeded draws across cells).

    Returns
    -------
    GridTest
    """
    observed, null, scored = _check_grid(observed, null)
    best = np.where(scored, null, -np.inf).max(axis=(1, 2))
    return _statistic_test(float(observed[scored].max()), best)


def contrast_cells(depth_a, depth_b, band=MIDDLE, kind: str = "middle") -> np.ndarray:
    """The cells on the high side of a depth contrast, boolean (La, Lb).

    ``middle``: both relative depths in ``band`` (ends included). ``diagonal``: the B
    layer is the one at the relative depth nearest to the A layer's, or one B layer (in
    depth order) either side of it.
    """
    check_option(kind, KINDS, "kind")
    depth_a, depth_b = np.asarray(depth_a, dtype=float), np.asarray(depth_b, dtype=float)
    for name, d in (("depth_a", depth_a), ("depth_b", depth_b)):
        if d.ndim != 1 or d.size < 1 or np.any(~np.isfinite(d)) or np.any((d <= 0) | (d > 1)):
            raise ValueError(f"{name} must be a non-empty 1-D array of relative depths in "
                             f"(0, 1], got {d.tolist()}")
    if kind == "middle":
        return in_band(depth_a, band)[:, None] & in_band(depth_b, band)[None, :]
    rank_b = np.argsort(np.argsort(depth_b, kind="stable"), kind="stable")
    nearest = np.abs(depth_a[:, None] - depth_b[None, :]).argmin(axis=1)
    return np.abs(rank_b[None, :] - rank_b[nearest][:, None]) <= 1


def _contrast(grids: np.ndarray, inside: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Mean of the scored inside cells minus that of the scored outside cells, per grid
    of ``grids`` (..., La, Lb)."""
    def mean(cells):
        keep = cells & scored & np.isfinite(grids)
        return np.where(keep, grids, 0.0).sum(axis=(-2, -1)) / keep.sum(axis=(-2, -1))

    with np.errstate(invalid="ignore", divide="ignore"):
        return mean(inside) - mean(~inside)


def depth_contrast(observed, null, depth_a, depth_b, band=MIDDLE, kind: str = "middle",
                   n_relabel: int = 1000, seed: int = 0) -> GridTest:
    """Whether one depth region of a grid scores higher than the rest, beyond chance.

    The statistic is the mean of the cells of :func:`contrast_cells` minus the mean of the
    other cells (scored cells only). ``p`` compares it with the same contrast of each
    null grid (draw k of every cell); ``p_layers`` with the contrast after reordering
    the grid's A layers and B layers at random (``n_relabel`` times, seeded). Read
    "this region agrees most" only when both are small: ``p`` alone is also small when
    every cell is above chance and the region differs by noise.

    Parameters
    ----------
    observed : array-like of shape (La, Lb)
        One score per (A layer, B layer), best calibrated; NaN cells are left out of
        both sides.
    null : array-like of shape (K, La, Lb)
        Draw k of every cell's null, on the same scale as ``observed``.
    depth_a : array-like of shape (La,)
        Relative depth of each A layer, in (0, 1].
    depth_b : array-like of shape (Lb,)
        Relative depth of each B layer, in (0, 1].
    band : (float, float), default=(1/3, 2/3)
        The middle band of relative depth (``kind="middle"``).
    kind : {"middle", "diagonal"}, default="middle"
    n_relabel : int, default=1000
        Random reorderings of the layers for ``p_layers`` (>= 1).
    seed : int, default=0
        Seed of ``numpy.random.default_rng`` for the reorderings.

    Returns
    -------
    GridTest
        ``statistic``, ``null_mean``, ``null_sd``, ``z``, ``p``, ``n_perm``, ``null``,
        ``p_layers`` and ``n_relabel``.

    Raises
    ------
    ValueError
        On shapes that do not agree, depths outside (0, 1], an unknown ``kind``, or a
        contrast with no scored cell on one of its sides.
    """
    observed, null, scored = _check_grid(observed, null)
    inside = contrast_cells(depth_a, depth_b, band, kind)
    if inside.shape != observed.shape:
        raise ValueError(f"observed is {observed.shape} but there are {inside.shape[0]} A and "
                         f"{inside.shape[1]} B depths; give one depth per layer of the grid")
    for side, cells in (("inside", inside), ("outside", ~inside)):
        if not (cells & scored).any():
            raise ValueError(
                f"the {kind} contrast has no scored cell {side} its region (A depths "
                f"{np.round(depth_a, 3).tolist()}, B depths {np.round(depth_b, 3).tolist()}, "
                f"band {band}); compare layers on both sides of it")
    n_relabel, seed = check_int(n_relabel, "n_relabel", 1), check_int(seed, "seed", 0)
    statistic = float(_contrast(observed, inside, scored))
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(observed.shape[0]) for _ in range(n_relabel)])
    cols = np.stack([rng.permutation(observed.shape[1]) for _ in range(n_relabel)])
    relabelled = _contrast(observed[rows[:, :, None], cols[:, None, :]], inside,
                           scored[rows[:, :, None], cols[:, None, :]])
    relabelled = relabelled[np.isfinite(relabelled)]
    p_layers = (1 + np.count_nonzero(relabelled >= statistic)) / (1 + relabelled.size)
    return _statistic_test(statistic, _contrast(null, inside, scored),
                           p_layers=float(p_layers), n_relabel=n_relabel)


def pair_ceiling(ceiling_a, ceiling_b):
    """The ceiling of a cross-model score from each side's own ceiling.

    Each side's ceiling is its SAE's score against a twin SAE of the same model and
    layer: the agreement the pipeline reaches with no difference between models. As in
    Spearman's correction for attenuation, a score between two sides is bounded by the
    geometric mean of their reliabilities: ``sqrt(ceiling_a * ceiling_b)`` (0 where a
    side's ceiling is 0 or below; nan where one is nan).
    """
    a, b = np.asarray(ceiling_a, dtype=float), np.asarray(ceiling_b, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.clip(a, 0.0, None) * np.clip(b, 0.0, None))


def convergence_index(observed, floor, ceiling):
    """``(observed - floor) / (ceiling - floor)``: where a score sits between what no
    learning gives (0) and what the same model gives again (1).

    Not clipped: below 0 the models agree less than the floor, above 1 more than the
    ceiling. nan where ``ceiling <= floor`` (no room to place a score) or an input is nan.
    Arrays broadcast.
    """
    observed, floor = np.asarray(observed, dtype=float), np.asarray(floor, dtype=float)
    ceiling = np.asarray(ceiling, dtype=float)
    room = ceiling - floor
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(room > 0, (observed - floor) / np.where(room > 0, room, 1.0), np.nan)
    return out if out.ndim else float(out)


def half_sample_interval(observed: float, halves, level: float = 0.95) -> tuple[float, float]:
    """A ``level`` interval of a score over its matched pairs, from half samples.

    ``halves`` are the score on random halves of the pairs (drawn without replacement,
    e.g. by ``subset_null`` with ``size = n // 2``). For a mean-like statistic a half
    sample without replacement varies exactly as much as the whole sample does around
    its mean (the finite-population factor (1 - m/n)/m is 1/n at m = n/2), and a half
    repeats no pair, so metrics that compare pairs with each other (RSA, mutual k-NN)
    see no duplicated rows. The halves' spread, centred on their mean (the score of
    fewer pairs sits at another chance level), is placed around ``observed``.

    Returns
    -------
    lo, hi : float
    """
    halves = np.asarray(halves, dtype=float)
    if halves.ndim != 1 or halves.size < 2 or not np.all(np.isfinite(halves)):
        raise ValueError(f"halves must be a 1-D array of at least 2 finite scores, got "
                         f"shape {halves.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    spread = halves - halves.mean()
    lo, hi = np.quantile(spread, [(1 - level) / 2, (1 + level) / 2])
    return float(observed + lo), float(observed + hi)
