"""The matching rule: which SAE features of A and B are paired, and how many pairs each
step of the rule leaves.

A :class:`Rule` names a policy (how each feature picks its partner by correlation), a
correlation threshold, and two token filters. :func:`pair` applies all of it, in that
order, and is the one place where the threshold and the filters are applied;
:func:`match` is :func:`pair` with the filters off.

Dead (NaN) features are never matched. Pairs are always sorted by their B feature.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .activations import TopTokens, shares_text
from .topk import TopK, dense_topk
from .transport import sinkhorn_pairs

POLICIES = ("max", "one_to_one", "mutual", "hungarian", "lan", "sinkhorn")
# policies that need the dense matrix, with the options each one takes
_DENSE_OPTIONS = {"hungarian": ("pool_a", "pool_b", "pool_size", "activity_a", "activity_b"),
                  "sinkhorn": ("reg", "reg_m", "mass")}


@dataclass(frozen=True, eq=False)
class Matches:
    """Matched feature pairs: A feature ``a[i]`` with B feature ``b[i]``.

    Parameters
    ----------
    a, b : array-like of int, shape (n,)
        Feature indices in model A and model B.
    corr : array-like of float, shape (n,)
        Correlation of each pair.
    """

    a: np.ndarray
    b: np.ndarray
    corr: np.ndarray

    def __post_init__(self):
        a, b = np.asarray(self.a, np.int64), np.asarray(self.b, np.int64)
        corr = np.asarray(self.corr)
        if (not a.ndim == b.ndim == corr.ndim == 1
                or not len(a) == len(b) == len(corr)):
            raise ValueError(
                f"Matches needs 1-D arrays of equal length; got a {a.shape}, "
                f"b {b.shape}, corr {corr.shape}"
            )
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "corr", corr)

    @property
    def n(self) -> int:
        """Number of pairs."""
        return len(self.a)

    @property
    def unique_a_fraction(self) -> float:
        """Distinct A features / pairs (1.0 when one-to-one in A; NaN if empty)."""
        return np.unique(self.a).size / self.n if self.n else float("nan")

    @property
    def unique_b_fraction(self) -> float:
        """Distinct B features / pairs (NaN if empty)."""
        return np.unique(self.b).size / self.n if self.n else float("nan")

    @property
    def mean_corr(self) -> float:
        """Mean correlation of the pairs (NaN if empty)."""
        return float(self.corr.mean()) if self.n else float("nan")

    def take(self, keep) -> Matches:
        """New Matches with the pairs selected by a boolean mask or index array."""
        return Matches(self.a[keep], self.b[keep], self.corr[keep])


# ----------------------------------------------------------------------------
# the rule


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}")


@dataclass(frozen=True)
class Rule:
    """How SAE features of A and B are paired (the analysis defaults).

    Attributes
    ----------
    policy : {"max", "one_to_one", "mutual", "hungarian", "lan"}
        How each feature picks its partner (see :func:`match`).
    threshold : float in [-1, 1]
        Keep pairs with ``corr > threshold`` (strictly), after the policy. Kept as
        given: compared with float32 correlations, a Python float is cast to float32
        and a NumPy float64 is not.
    junk_filter : bool
        Drop a pair when a top activation of either feature is on a junk token.
    shared_token : bool
        Keep a pair only when the two features' top tokens share one (by text).
    """

    policy: str = "one_to_one"
    threshold: float = 0.1  # keep pairs with corr > threshold (strictly)
    junk_filter: bool = True  # drop a pair when a top activation is a junk token
    shared_token: bool = False  # keep a pair only when top tokens share one (by text)

    def __post_init__(self):
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of "
                             f"{', '.join(POLICIES)}")
        t = self.threshold
        if (isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Real)
                or not math.isfinite(t) or not -1.0 <= t <= 1.0):
            raise ValueError(f"threshold must be in [-1, 1] (a finite number); got "
                             f"{t!r}")
        _check_flag("junk_filter", self.junk_filter)
        _check_flag("shared_token", self.shared_token)

    @property
    def needs_tokens(self) -> bool:
        """Whether a token filter is on, so :func:`pair` needs both TopTokens."""
        return bool(self.junk_filter or self.shared_token)


@dataclass(frozen=True, eq=False)
class Pairing:
    """What :func:`pair` returns: the pairs and the pairs left after each step.

    Attributes
    ----------
    matches : Matches
        The final pairs, sorted by b.
    counts : dict
        ``n_policy``, ``mean_corr_before``, ``n_threshold``, ``n_junk``,
        ``n_shared_token``, ``n_pairs``, ``mean_corr_after``, ``unique_a_fraction``
        (see :func:`pair`).
    """

    matches: Matches
    counts: dict


# ----------------------------------------------------------------------------
# policies: each returns (a, b, corr) arrays of its pairs, dead features excluded


def _max_pairs(top):
    b = np.flatnonzero(top.b_partner[:, 0] >= 0)
    return top.b_partner[b, 0], b, top.b_corr[b, 0]


def _one_to_one(top):
    a, b, c = _max_pairs(top)
    order = np.lexsort((b, -c, a))  # per A: best correlation first, then lowest b
    first = np.r_[True, a[order][1:] != a[order][:-1]][:len(a)]  # no pairs: none kept
    return a[order][first], b[order][first], c[order][first]


def _lan(top):
    a, b, c = _max_pairs(top)  # b ascending
    _, first = np.unique(a, return_index=True)  # first-encountered = lowest b
    return a[first], b[first], c[first]


def _mutual(top):
    a, b, c = _max_pairs(top)
    keep = top.a_partner[a, 0] == b
    return a[keep], b[keep], c[keep]


def _pool(pool, activity, pool_size, n, side):
    if pool is not None and (activity is not None or pool_size is not None):
        raise ValueError(f"give pool_{side}, or pool_size with activity_{side}, "
                         "not both")
    if pool is not None:
        pool = np.unique(np.asarray(pool, np.int64))
        if pool.ndim != 1 or pool.size == 0 or pool[0] < 0 or pool[-1] >= n:
            raise ValueError(f"pool_{side} must be non-empty feature indices in "
                             f"[0, {n})")
        return pool
    if pool_size is None:
        return np.arange(n)
    activity = np.asarray(activity, np.float64) if activity is not None else None
    if activity is None or activity.shape != (n,):
        raise ValueError(f"pool_size needs activity_{side}, one activity score per "
                         f"feature (shape ({n},))")
    return np.sort(np.argsort(-activity, kind="stable")[:pool_size])


def _hungarian(corr, pool_a=None, pool_b=None, pool_size=None, activity_a=None,
               activity_b=None):
    pa = _pool(pool_a, activity_a, pool_size, corr.shape[0], "a")
    pb = _pool(pool_b, activity_b, pool_size, corr.shape[1], "b")
    sub = corr[np.ix_(pa, pb)].astype(np.float64)
    live_a, live_b = ~np.isnan(sub).all(1), ~np.isnan(sub).all(0)
    pa, pb, sub = pa[live_a], pb[live_b], sub[np.ix_(live_a, live_b)]
    if sub.size == 0:  # every feature of a side is dead
        return pa[:0], pb[:0], np.zeros(0)
    i, j = linear_sum_assignment(np.where(np.isnan(sub), -np.inf, sub), maximize=True)
    return pa[i], pb[j], sub[i, j]


_POLICY_FUNCS = {"max": _max_pairs, "one_to_one": _one_to_one, "mutual": _mutual,
                 "lan": _lan}


def _as_corr(corr):
    if isinstance(corr, TopK):
        return corr
    corr = np.asarray(corr)
    if (corr.ndim != 2 or corr.size == 0
            or not np.issubdtype(corr.dtype, np.floating)):
        raise ValueError(
            f"corr must be a non-empty 2-D float array (F_a x F_b) or a TopK; got "
            f"{corr.dtype} array of shape {corr.shape}"
        )
    return corr


def _policy_pairs(corr, policy, opts) -> Matches:
    """Every pair the policy makes, sorted by b (stable), with no threshold."""
    unknown = sorted(set(opts) - set(_DENSE_OPTIONS.get(policy, ())))
    if unknown:
        takers = [f"{p} ({', '.join(o)})" for p, o in _DENSE_OPTIONS.items()]
        raise ValueError(f"options {unknown} do not apply to policy {policy!r}; options "
                         f"are taken by {'; '.join(takers)}")
    if policy in _DENSE_OPTIONS and isinstance(corr, TopK):
        raise ValueError(f"policy {policy!r} needs the dense correlation matrix, not a TopK")
    if policy == "hungarian":
        a, b, c = _hungarian(corr, **opts)
    elif policy == "sinkhorn":
        a, b, c = sinkhorn_pairs(corr, **opts)
    else:
        top = corr if isinstance(corr, TopK) else dense_topk(corr)
        a, b, c = _POLICY_FUNCS[policy](top)
    order = np.lexsort((a, b))  # by b, then a: a policy may pair one b with several a
    return Matches(a[order], b[order], c[order])


# ----------------------------------------------------------------------------
# applying the rule


def _check_tokens(rule, corr, tokens_a, tokens_b):
    """Raise unless the tokens a filter of ``rule`` needs are given and fit ``corr``."""
    if rule.needs_tokens and (tokens_a is None or tokens_b is None):
        on = [name for name in ("junk_filter", "shared_token") if getattr(rule, name)]
        raise ValueError(
            f"the rule's {' and '.join(on)} needs the top tokens of both sides; pass "
            "tokens_a and tokens_b (see top_tokens), or turn the filter off in the Rule"
        )
    if isinstance(corr, TopK):
        n_features = {"a": len(corr.a_partner), "b": len(corr.b_partner)}
    else:
        n_features = dict(zip("ab", corr.shape))
    for side, tokens in (("a", tokens_a), ("b", tokens_b)):
        if tokens is None:
            continue
        if not isinstance(tokens, TopTokens):
            raise ValueError(f"tokens_{side} must be a TopTokens (see top_tokens); got "
                             f"{type(tokens).__name__}")
        if tokens.n_features != n_features[side]:
            raise ValueError(f"tokens_{side} describes {tokens.n_features} features "
                             f"but corr has {n_features[side]} on side {side}")


def pair(corr, rule: Rule, tokens_a: TopTokens | None = None,
         tokens_b: TopTokens | None = None, **opts) -> Pairing:
    """Pair A and B features under a rule: policy, threshold, junk and shared-token
    filters, in that order.

    Parameters
    ----------
    corr : ndarray (F_a, F_b) or TopK
        Correlations from :func:`correlation` (NaN = dead), or partners from
        :func:`topk_correlation` (all policies but ``hungarian``).
    rule : Rule
    tokens_a, tokens_b : TopTokens, optional
        Top tokens of the F_a and F_b features (see :func:`top_tokens`); needed when
        a filter of the rule is on.
    **opts
        Options of the ``hungarian`` policy (see :func:`match`).

    Returns
    -------
    Pairing
        ``matches``: the pairs left, sorted by b. ``counts``, in this order:

        - ``n_policy``: pairs the policy makes (every one, whatever its correlation;
          dead features are never matched); ``mean_corr_before``: their mean
          correlation, summed in b order;
        - ``n_threshold``: pairs with ``corr > rule.threshold`` (strictly);
        - ``n_junk``: of those, pairs whose two features have no top activation on a
          junk token (``n_threshold`` when the filter is off);
        - ``n_shared_token``: of those, pairs whose features' top tokens share a text,
          padding ignored (``n_junk`` when the filter is off);
        - ``n_pairs``, ``mean_corr_after``, ``unique_a_fraction`` of the pairs left.

        Means and fractions are NaN when there are no pairs.
    """
    if not isinstance(rule, Rule):
        raise ValueError(f"rule must be a Rule; got {type(rule).__name__}")
    corr = _as_corr(corr)
    _check_tokens(rule, corr, tokens_a, tokens_b)
    m = _policy_pairs(corr, rule.policy, opts)
    counts = {"n_policy": m.n, "mean_corr_before": m.mean_corr}
    m = m.take(m.corr > rule.threshold)  # NaN compares False
    counts["n_threshold"] = m.n
    if rule.junk_filter:
        m = m.take(~(tokens_a.any_junk[m.a] | tokens_b.any_junk[m.b]))
    counts["n_junk"] = m.n
    if rule.shared_token:
        m = m.take(shares_text(tokens_a.take(m.a), tokens_b.take(m.b)))
    counts["n_shared_token"] = m.n
    counts.update(n_pairs=m.n, mean_corr_after=m.mean_corr,
                  unique_a_fraction=m.unique_a_fraction)
    return Pairing(m, counts)


def match(corr, policy: str = Rule.policy, threshold: float = Rule.threshold,
          **opts) -> Matches:
    """Pair A and B features by correlation: :func:`pair` with the token filters off.

    Parameters
    ----------
    corr : ndarray (F_a, F_b) or TopK
        Correlations from :func:`correlation` (NaN = dead), or partners from
        :func:`topk_correlation` (all policies but ``hungarian``).
    policy : {"max", "one_to_one", "mutual", "hungarian", "lan"}, default=Rule.policy
        - ``max``: each B feature takes its best-correlated A feature; an A
          feature may serve many B features.
        - ``one_to_one``: ``max``, then each A feature keeps only its
          best-correlated B feature (ties to the lowest b).
        - ``mutual``: mutual nearest neighbours: b's best is a and a's best is b.
        - ``hungarian``: assignment maximising the total correlation
          (``scipy.optimize.linear_sum_assignment``, rectangular allowed) on a
          pool of features. Options: ``pool_a``/``pool_b`` (index arrays), or
          ``pool_size`` with ``activity_a``/``activity_b`` (one score per
          feature, e.g. firing frequency; the ``pool_size`` highest of each
          side are kept). Default pool: all features (cubic cost, so pool
          large models). Dead features are dropped from the pool.
        - ``lan``: the published rule (Lan et al. 2024, "Sparse Autoencoders
          Reveal Universal Feature Spaces Across Large Language Models"), kept
          for parity: ``max``, then an A feature used more than once keeps
          the first-encountered B feature (lowest b) whatever its
          correlation. ``one_to_one`` differs only there: it keeps the best
          pair, which the published rule can discard in favour of a weaker one.
    threshold : float in [-1, 1], default=Rule.threshold
        Keep pairs with ``corr > threshold`` (strictly greater), applied after
        the policy, so e.g. ``lan`` may drop an A feature whose first pair
        fails although a later one would pass.
    **opts
        Options of ``hungarian`` (see above); other policies take none.

    Returns
    -------
    Matches
        Sorted by b. Dead (NaN) features are never matched.
    """
    rule = Rule(policy, threshold, junk_filter=False, shared_token=False)
    return pair(corr, rule, **opts).matches
