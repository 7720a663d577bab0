"""Transport matching: an entropic optimal-transport plan between the features of A and B.

The cost of moving A feature i's mass to B feature j is ``1 - s_ij`` for a similarity
``s`` (a correlation or a cosine). Each live feature of a side carries the same mass,
so a side with twice the features gives each one half the mass, and one A feature may
send its mass to two B features: a split is a matching, not a tie broken away.

A pair is kept when its transport mass exceeds ``mass`` times the most it could carry,
``min(mass of i, mass of j)``: a share in [0, 1] that means the same at any width. As
``reg`` goes to 0 with equal sides, the plan becomes the assignment that maximises the
total similarity, each pair's share 1 and every other 0.

The solvers are POT's: ``ot.sinkhorn`` (in the log domain for small ``reg``), and
``ot.unbalanced.sinkhorn_unbalanced`` when ``reg_m`` is set, which may leave the mass of
poorly matched features untransported.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

DEFAULT_REG = 0.02
DEFAULT_MASS = 0.5
MAX_ITER = 5000
STOP = 1e-9
# below this entropy weight, exp(-cost / reg) can underflow: solve in the log domain,
# about 4x slower per iteration
LOG_DOMAIN_BELOW = 0.01


def _positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def check_options(reg, reg_m, mass) -> None:
    """Raise unless the transport options are valid."""
    _positive("reg", reg)
    _positive("reg_m", reg_m, allow_none=True)
    if (isinstance(mass, bool) or not isinstance(mass, numbers.Real)
            or not 0 <= mass < 1):
        raise ValueError(f"mass must be a share in [0, 1); got {mass!r}")


def plan(sim, reg: float = DEFAULT_REG, reg_m: float | None = None) -> np.ndarray:
    """The entropic transport plan between live features, uniform mass per side.

    Parameters
    ----------
    sim : ndarray of float, shape (F_a, F_b)
        Similarities in [-1, 1]; rows and columns that are all NaN (dead features) carry
        no mass. Other NaN entries cannot carry mass either.
    reg : float > 0
        Entropy weight, in units of the cost ``1 - sim``.
    reg_m : float > 0, optional
        Weight of the KL penalty on the marginals (unbalanced transport); None keeps
        the marginals exact.

    Returns
    -------
    ndarray of float64, shape (F_a, F_b)
        Zero in the rows and columns of dead features. Sums to 1 when balanced.
    """
    import ot  # POT loads torch when present; only this policy needs it

    check_options(reg, reg_m, DEFAULT_MASS)
    sim = np.asarray(sim, np.float64)
    live_a, live_b = ~np.isnan(sim).all(1), ~np.isnan(sim).all(0)
    out = np.zeros(sim.shape)
    if not live_a.any() or not live_b.any():
        return out
    sub = sim[np.ix_(live_a, live_b)]
    cost = np.where(np.isnan(sub), 1e6, 1.0 - sub)
    a = np.full(len(sub), 1.0 / len(sub))
    b = np.full(sub.shape[1], 1.0 / sub.shape[1])
    if reg_m is None:
        method = "sinkhorn_log" if reg < LOG_DOMAIN_BELOW else "sinkhorn"
        p = ot.sinkhorn(a, b, cost, reg, method=method, numItermax=MAX_ITER, stopThr=STOP,
                        warn=False)
    else:
        p = ot.unbalanced.sinkhorn_unbalanced(a, b, cost, reg, reg_m,
                                              method="sinkhorn_stabilized",
                                              numItermax=MAX_ITER, stopThr=STOP)
    out[np.ix_(live_a, live_b)] = p
    return out


def share(p, n_a: int, n_b: int) -> np.ndarray:
    """Each entry of a plan over the most it could carry, ``min(1/n_a, 1/n_b)``.

    With uniform masses over ``n_a`` and ``n_b`` live features, every live pair has the
    same cap, so the share is ``p * max(n_a, n_b)``, shape of ``p``.
    """
    return np.asarray(p, np.float64) * max(n_a, n_b)


def sinkhorn_pairs(sim, reg: float = DEFAULT_REG, reg_m: float | None = None,
                   mass: float = DEFAULT_MASS):
    """Pairs whose transport share exceeds ``mass``: (a, b, sim) arrays, any order.

    See :func:`plan` for ``reg`` and ``reg_m``; ``mass`` is the share in [0, 1) a pair
    must exceed. NaN similarities are never kept.
    """
    check_options(reg, reg_m, mass)
    sim = np.asarray(sim)
    n_a, n_b = int((~np.isnan(sim).all(1)).sum()), int((~np.isnan(sim).all(0)).sum())
    s = share(plan(sim, reg, reg_m), n_a, n_b)
    a, b = np.nonzero((s > mass) & ~np.isnan(sim))
    return a, b, sim[a, b].astype(np.float64)
