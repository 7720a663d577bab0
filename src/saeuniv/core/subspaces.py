"""Semantic subspaces: features grouped by the concepts they fire on, compared across models.

A concept set holds categories (``time``, ``countries``, ...), each a list of
phrases: single words ("yesterday") and multi-word phrases ("last week", "red
blood cell"). A feature belongs to a category when one of its top-k
activations falls on a token whose character span overlaps an occurrence of
one of the category's phrases in the text. Matching on character spans, not
token strings, lets a phrase that a tokenizer splits into several tokens count
wherever the feature fires inside it ("York" in "New York").

Within a category, the features of A and B are paired by correlation (as
the whole layer pair is: same policy, threshold and filters), and their
decoder rows are scored against two nulls:

* shuffled pairing: the category's B rows permuted (``metrics.permutation_null``);
* random subspaces: as many pairs, drawn at random from the pairs matched
  among all features of the layer pair, so size and matching are alike and
  only the concept differs. A category is special only when it beats both.

Pure core: strings and arrays in, arrays out; no I/O, no logging.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from . import matching, metrics
from .devices import torch_device

__all__ = ["ConceptSet", "Occurrences", "Labels", "CategoryScore", "find_phrases",
           "occurrences", "label_features", "category_pairs", "svcca_k", "metric_options",
           "random_subspace_null", "score_category"]


@dataclass(frozen=True)
class ConceptSet:
    """Named categories of phrases.

    Parameters
    ----------
    name : str
        Name of the set (e.g. ``reference``).
    categories : tuple of str
        Category names, in report order.
    phrases : tuple of tuple of str
        ``phrases[c]``: the phrases of category ``c``. A phrase written with a
        capital letter matches only with that capitalisation ("May", "Turkey");
        one written in lower case matches in any case ("last week", "Last Week").
        Words match whole (``cell`` does not match inside ``cellar``), and the
        words of a phrase may be separated by any whitespace.
    """

    name: str
    categories: tuple[str, ...]
    phrases: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        if len(self.categories) != len(self.phrases):
            raise ValueError(f"{len(self.categories)} categories but {len(self.phrases)} "
                             "phrase lists")
        if not self.categories:
            raise ValueError(f"concept set {self.name!r} has no categories")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"concept set {self.name!r} repeats a category name")
        for cat, phrases in zip(self.categories, self.phrases):
            if not phrases:
                raise ValueError(f"category {cat!r} has no phrases")
            for p in phrases:
                if not isinstance(p, str) or not p.split():
                    raise ValueError(f"category {cat!r} has an empty or non-text phrase {p!r}")

    def multi_word(self, c: int, p: int) -> bool:
        """Whether phrase ``p`` of category ``c`` has more than one word."""
        return len(self.phrases[c][p].split()) > 1


def _phrase_pattern(phrase: str) -> str:
    body = r"\s+".join(re.escape(w) for w in phrase.split())
    body = body if any(ch.isupper() for ch in phrase) else f"(?i:{body})"
    return rf"(?<!\w)(?:{body})(?!\w)"


def find_phrases(text: str, phrases) -> list[tuple[int, int, int]]:
    """Occurrences of ``phrases`` in ``text`` as ``(start, end, phrase index)``.

    Occurrences do not overlap: at each position the longest phrase that
    matches wins ("red blood cell" over "blood"), scanning left to right.
    ``end`` is exclusive, in characters of ``text``.
    """
    phrases = list(phrases)
    if not phrases:
        return []
    order = sorted(range(len(phrases)), key=lambda i: (-len(phrases[i]), i))
    regex = re.compile("|".join(f"({_phrase_pattern(phrases[i])})" for i in order))
    return [(m.start(), m.end(), order[m.lastindex - 1]) for m in regex.finditer(text)]


@dataclass(frozen=True, eq=False)
class Occurrences:
    """Phrase occurrences of each category over texts laid end to end.

    ``starts[c]``, ``ends[c]`` and ``phrase[c]`` are sorted, non-overlapping
    character spans (in the concatenation of the texts, text ``i`` starting at
    ``base[i]``) and the phrase index of each.
    """

    base: np.ndarray
    starts: tuple[np.ndarray, ...]
    ends: tuple[np.ndarray, ...]
    phrase: tuple[np.ndarray, ...]

    def count(self, c: int) -> int:
        return int(self.starts[c].size)

    def hits(self, c: int, spans) -> tuple[np.ndarray, np.ndarray]:
        """For character spans (n, 2) (``[start, end)``; empty or negative: no text), whether
        each overlaps an occurrence of category ``c``, and that occurrence's phrase (-1)."""
        spans = np.asarray(spans, np.int64).reshape(-1, 2)
        s, e = spans[:, 0], spans[:, 1]
        starts, ends = self.starts[c], self.ends[c]
        if not starts.size:
            return np.zeros(len(spans), bool), np.full(len(spans), -1, np.int64)
        idx = np.searchsorted(ends, s, side="right")  # first occurrence ending after s
        safe = np.minimum(idx, starts.size - 1)
        hit = (idx < starts.size) & (s >= 0) & (e > s) & (starts[safe] < e)
        phrase = np.where(hit, self.phrase[c][safe], -1)
        return hit, phrase


def occurrences(texts, concepts: ConceptSet) -> Occurrences:
    """Find every category's phrases in ``texts`` (a list of str), end to end."""
    lengths = np.asarray([len(t) for t in texts], np.int64)
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(texts) else np.zeros(0, np.int64)
    starts, ends, phrase = [], [], []
    for phrases in concepts.phrases:
        found = [(b + s, b + e, p) for t, b in zip(texts, base) for s, e, p in
                 find_phrases(t, phrases)]
        arr = np.asarray(found, np.int64).reshape(-1, 3)
        starts.append(arr[:, 0])
        ends.append(arr[:, 1])
        phrase.append(arr[:, 2])
    return Occurrences(base, tuple(starts), tuple(ends), tuple(phrase))


@dataclass(frozen=True, eq=False)
class Labels:
    """Which features of one SAE belong to which category.

    Attributes
    ----------
    hits : ndarray of int, shape (F, C)
        How many of each feature's top-k activations fall inside an occurrence
        of the category's phrases.
    phrase : ndarray of int, shape (F, C)
        The phrase hit most often (ties: the one hit by the higher-ranked
        activation); -1 where ``hits`` is 0.
    member : ndarray of bool, shape (F, C)
        ``hits >= min_hits``.
    top_k : int
        Activations considered per feature.
    """

    hits: np.ndarray
    phrase: np.ndarray
    member: np.ndarray
    top_k: int

    def features(self, c: int) -> np.ndarray:
        """Indices of the features in category ``c``."""
        return np.flatnonzero(self.member[:, c])


def label_features(top_rows, row_spans, occ: Occurrences, min_hits: int = 1) -> Labels:
    """Label features by the phrases their top activations fall in.

    Parameters
    ----------
    top_rows : array-like of int, shape (F, k)
        Code rows of each feature's k largest activations (``-1``: none).
    row_spans : array-like of int, shape (n_rows, 2)
        Character span of the token at each code row, in the coordinates of ``occ``.
    occ : Occurrences
        Phrase occurrences of every category.
    min_hits : int, default=1
        Top activations that must hit a category for the feature to belong to it.

    Returns
    -------
    Labels
    """
    top_rows = np.asarray(top_rows, np.int64)
    row_spans = np.asarray(row_spans, np.int64)
    if top_rows.ndim != 2:
        raise ValueError(f"top_rows must be 2-D (features, k), got shape {top_rows.shape}")
    if row_spans.ndim != 2 or row_spans.shape[1] != 2:
        raise ValueError(f"row_spans must have shape (rows, 2), got {row_spans.shape}")
    if top_rows.size and top_rows.max() >= len(row_spans):
        raise ValueError(f"top_rows reaches row {top_rows.max()} but row_spans has "
                         f"{len(row_spans)} rows")
    if not (isinstance(min_hits, (int, np.integer)) and min_hits >= 1):
        raise ValueError(f"min_hits must be an integer >= 1, got {min_hits!r}")
    n_feat, k = top_rows.shape
    n_cat = len(occ.starts)
    valid = top_rows >= 0
    spans = np.where(valid[..., None], row_spans[np.maximum(top_rows, 0)], -1).reshape(-1, 2)
    hits = np.zeros((n_feat, n_cat), np.int64)
    phrase = np.full((n_feat, n_cat), -1, np.int64)
    for c in range(n_cat):
        hit, ph = occ.hits(c, spans)
        hit, ph = hit.reshape(n_feat, k) & valid, ph.reshape(n_feat, k)
        hits[:, c] = hit.sum(1)
        for f in np.flatnonzero(hits[:, c]):
            found = ph[f][hit[f]]  # in rank order
            uniq, first, counts = np.unique(found, return_index=True, return_counts=True)
            best = np.lexsort((first, -counts))[0]
            phrase[f, c] = uniq[best]
    return Labels(hits, phrase, hits >= min_hits, k)


def category_pairs(corr, features_a, features_b, rule: matching.Rule,
                   tokens_a: matching.TopTokens | None = None,
                   tokens_b: matching.TopTokens | None = None) -> matching.Matches:
    """Pair the category's A features with its B features only, by the layer pair's rule.

    Parameters
    ----------
    corr : ndarray, shape (len(features_a), len(features_b))
        Correlations of the category's features (NaN: dead).
    features_a, features_b : array-like of int
        The category's features of each side, ascending.
    rule : matching.Rule
        Policy, threshold and token filters, as for the whole layer pair.
    tokens_a, tokens_b : matching.TopTokens, optional
        The top tokens of ALL features of each side (needed by the token filters).

    Returns
    -------
    matching.Matches
        Pairs as indices into all features, sorted by b.
    """
    features_a, features_b = np.asarray(features_a, np.int64), np.asarray(features_b, np.int64)
    corr = np.asarray(corr)
    if corr.shape != (features_a.size, features_b.size):
        raise ValueError(f"corr has shape {corr.shape}, expected "
                         f"({features_a.size}, {features_b.size})")
    if not features_a.size or not features_b.size:
        return matching.Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    sub_a = None if tokens_a is None else tokens_a.take(features_a)
    sub_b = None if tokens_b is None else tokens_b.take(features_b)
    m = matching.pair(corr, rule, sub_a, sub_b).matches
    return matching.Matches(features_a[m.a], features_b[m.b], m.corr)


def svcca_k(n_pairs: int, k: int = 0) -> int:
    """SVD directions SVCCA keeps for ``n_pairs`` pairs: ``k`` when given, else n // 4 (>= 2).

    A fixed count that depends only on the number of pairs, so the observed
    score, the shuffled null and the random subspaces of the same size are
    measured alike, and well below n - 1 so CCA is not degenerate.
    """
    return int(k) if k else max(2, n_pairs // 4)


def metric_options(name: str, n_pairs: int, k: int, cka_debiased: bool) -> dict:
    """The keyword options metric ``name`` takes in a category of ``n_pairs`` pairs: SVCCA
    keeps :func:`svcca_k` directions, CKA is debiased or not, the others use their
    defaults."""
    return metrics.METRICS[name].kwargs(svcca_k=svcca_k(n_pairs, k),
                                        cka_debiased=bool(cka_debiased))


def random_subspace_null(name: str, dec_a, dec_b, pool_a, pool_b, size: int, n_draws: int,
                         seed: int, observed: float, **kwargs) -> metrics.NullResult:
    """``observed`` against ``n_draws`` random subspaces of ``size`` matched pairs.

    Each draw takes ``size`` pairs at random (without replacement) from the
    pool, ``pool_a[i]`` with ``pool_b[i]`` (rows of ``dec_a``/``dec_b``), and
    scores their decoder rows with metric ``name`` and its keyword options
    ``kwargs`` (see :func:`metric_options`), as :func:`metrics.subset_null` does.

    Raises
    ------
    ValueError
        When the pool holds no more pairs than ``size``: such subspaces cannot vary.
    """
    pool_a, pool_b = np.asarray(pool_a, np.int64), np.asarray(pool_b, np.int64)
    if pool_a.size <= size:
        raise ValueError(f"the pool holds {pool_a.size} matched pairs, not more than the "
                         f"{size} to draw: random subspaces of that size cannot vary; lower "
                         "match.threshold or use more tokens for a larger pool")
    A = np.asarray(dec_a, np.float64)[pool_a]
    B = np.asarray(dec_b, np.float64)[pool_b]
    return metrics.subset_null(name, A, B, size, n_draws, seed, observed, **kwargs)


@dataclass
class CategoryScore:
    """One category at one layer pair: its pairs and, when scored, both nulls per metric."""

    category: str
    n_features_a: int
    n_features_b: int
    n_pairs: int
    status: str = "ok"
    metrics: dict = field(default_factory=dict)


def score_category(category: str, dec_a, dec_b, pairs: matching.Matches, n_features_a: int,
                   n_features_b: int, pool_a, pool_b, metric_names=("svcca", "rsa", "cka"),
                   n_perm: int = 1000, seed: int = 0, min_pairs: int = 8,
                   k: int = 0, cka_debiased: bool = True, device=None) -> CategoryScore:
    """Score a category's pairs against shuffled pairing and random subspaces.

    Parameters
    ----------
    dec_a, dec_b : ndarray (F_a, d_a), (F_b, d_b)
        Decoder rows of all features of each SAE.
    pairs : Matches
        The category's pairs (indices into all features).
    pool_a, pool_b : array-like of int
        Pairs matched among all features: where random subspaces are drawn from.
    n_perm : int
        Shuffles and random draws, each.
    min_pairs : int
        Fewer pairs than this: ``status`` says so and nothing is scored.
    k : int
        SVCCA directions (0: :func:`svcca_k`).
    cka_debiased : bool
        CKA with the unbiased HSIC estimator. With far fewer pairs than
        dimensions, as in most categories, the biased estimator is close to 1
        for any two sets of vectors (about ``1 / (1 + n / d)`` for unrelated
        isotropic ones), the category's and the random subspaces' alike.
    device : None, str or torch.device
        Where the shuffled-pairing nulls' draws run (``metrics.permutation_null``);
        None: numpy. The random-subspace null runs in numpy either way. A device that is
        not a torch device, or a GPU not visible, raises ValueError before any scoring.

    Returns
    -------
    CategoryScore
        ``metrics[name]`` holds ``observed``, the metric's options, ``shuffle`` and
        ``random`` (each ``null_mean``, ``null_sd``, ``z``, ``p``), or ``error`` when the
        metric rejects the pairs.
    """
    device = torch_device(device)  # a bad device is the caller's error, not a metric's
    out = CategoryScore(category, int(n_features_a), int(n_features_b), pairs.n)
    if pairs.n < min_pairs:
        out.status = f"too few pairs ({pairs.n} < min_pairs={min_pairs})"
        return out
    A, B = dec_a[pairs.a], dec_b[pairs.b]
    for name in metric_names:
        kw = metric_options(name, pairs.n, k, cka_debiased)
        try:
            shuffle = metrics.permutation_null(name, A, B, n_perm=n_perm, seed=seed,
                                               device=device, **kw)
            random = random_subspace_null(name, dec_a, dec_b, pool_a, pool_b, pairs.n, n_perm,
                                          seed, shuffle.observed, **kw)
        except ValueError as err:
            out.metrics[name] = {"error": str(err)}
            continue
        out.metrics[name] = {"observed": shuffle.observed, **kw, **{
            null_name: {"null_mean": r.null_mean, "null_sd": r.null_sd, "z": r.z, "p": r.p}
            for null_name, r in (("shuffle", shuffle), ("random", random))}}
    return out
