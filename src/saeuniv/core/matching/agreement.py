"""Agreement between matchers: how far two pair sets of the same layer pair overlap."""

from __future__ import annotations

import itertools

from .pairing import Matches


def jaccard(m1: Matches, m2: Matches) -> float:
    """|pairs in both| / |pairs in either|, pairs as (a, b); NaN when both are empty."""
    s1, s2 = set(zip(m1.a.tolist(), m1.b.tolist())), set(zip(m2.a.tolist(), m2.b.tolist()))
    union = len(s1 | s2)
    return len(s1 & s2) / union if union else float("nan")


def agreement(matches: dict[str, Matches]) -> dict[str, float]:
    """The Jaccard overlap of every two matchers' pairs, keyed ``"name1_vs_name2"`` in
    the order the names are given."""
    for name, m in matches.items():
        if not isinstance(m, Matches):
            raise ValueError(f"matches[{name!r}] must be a Matches; got "
                             f"{type(m).__name__}")
    return {f"{x}_vs_{y}": jaccard(matches[x], matches[y])
            for x, y in itertools.combinations(matches, 2)}
