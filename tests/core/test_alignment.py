"""Shared token boundaries between two tokenizations (pure core)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from saeuniv.core.alignment import last_ends, pair_segments, valid_positions


def spans_of(text: str, pattern: str) -> np.ndarray:
    """Token spans of a regex tokenizer that covers the whole text."""
    spans = [m.span() for m in re.finditer(pattern, text)]
    assert "".join(text[s:e] for s, e in spans) == text
    return np.asarray(spans)


TEXT = "The whale crossed the United States in March, 1851. Ishmael followed it!"
WORDS = r"\s?\w+|\s?[^\w\s]|\s+"        # words with their leading space
PIECES = r"\s?\w{1,3}|\s?[^\w\s]|\s+"   # words cut into pieces of at most 3 characters


def test_one_tokenizer_gives_plain_chunks_with_every_position():
    sp = spans_of(TEXT, WORDS)
    segs = pair_segments(sp, sp, 5, 5)
    assert [(a0, a1) for a0, a1, *_ in segs] == [(i, min(i + 5, len(sp)))
                                              for i in range(0, len(sp), 5)]
    for a0, a1, b0, b1, ka, kb in segs:
        assert (a0, a1) == (b0, b1) and ka.all() and kb.all()


def test_two_tokenizers_compare_only_shared_boundaries_in_the_same_text():
    sa, sb = spans_of(TEXT, WORDS), spans_of(TEXT, PIECES)
    segs = pair_segments(sa, sb, 6, 9)
    shared = np.intersect1d(sa[:, 1], sb[:, 1])
    kept = []
    for a0, a1, b0, b1, ka, kb in segs:
        assert a1 - a0 <= 6 and b1 - b0 <= 9
        assert sa[a1 - 1, 1] == sb[b1 - 1, 1]  # both windows end at the same character
        assert ka.sum() == kb.sum()
        np.testing.assert_array_equal(sa[a0:a1][ka, 1], sb[b0:b1][kb, 1])
        kept += list(sa[a0:a1][ka, 1])
    # every segment covers the text once, in order
    assert segs[0][0] == 0 and segs[-1][1] == len(sa) and segs[-1][3] == len(sb)
    assert all(s[1] == t[0] and s[3] == t[2] for s, t in zip(segs, segs[1:]))
    # every shared boundary is compared once (windows end on shared boundaries)
    assert kept == list(shared)
    # " Ishmael" is one token of A but " Ish" + "mae" + "l" in B: only its end is shared
    end = TEXT.index("Ishmael") + len("Ishmael")
    assert end in kept and end - 1 not in kept and end - 4 not in kept


def test_a_model_without_bos_never_compares_its_first_position():
    sa, sb = spans_of(TEXT, WORDS), spans_of(TEXT, PIECES)
    for _a0, _a1, _b0, _b1, ka, kb in pair_segments(sa, sb, 6, 9, first_a=True, first_b=False):
        assert not kb[0] and ka.sum() == kb.sum()


def test_bytes_of_one_character_count_once():
    # "é" split into two byte tokens with the same span: only the last one ends there
    spans = np.array([[0, 3], [3, 4], [3, 4], [4, 8]])
    assert last_ends(spans).tolist() == [3, -1, 4, 8]
    segs = pair_segments(spans, np.array([[0, 4], [4, 8]]), 8, 8)
    (_, _, _, _, ka, kb), = segs
    assert ka.tolist() == [False, False, True, True] and kb.tolist() == [True, True]


def test_no_reachable_shared_boundary_moves_on_without_comparing():
    sa = np.array([[0, 1], [1, 2], [2, 3], [3, 10]])
    sb = np.array([[0, 10]])
    # the one shared boundary (10) ends A's 4th token, beyond A's body of 2: one segment of
    # both bodies, nothing compared, and B is used up
    got = [(a0, a1, b0, b1, ka.tolist(), kb.tolist())
           for a0, a1, b0, b1, ka, kb in pair_segments(sa, sb, 2, 1)]
    assert got == [(0, 2, 0, 1, [False, False], [False])]
    # a body that reaches it compares that boundary alone
    got = [(a0, a1, b0, b1, ka.tolist(), kb.tolist())
           for a0, a1, b0, b1, ka, kb in pair_segments(sa, sb, 4, 1)]
    assert got == [(0, 4, 0, 1, [False, False, False, True], [True])]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bodies must be >= 1"):
        pair_segments(np.zeros((1, 2)), np.zeros((1, 2)), 0, 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        pair_segments(np.array([[0, 5], [5, 3]]), np.array([[0, 5]]), 4, 4)


def test_valid_positions_masks_pad_and_leading_bos_only():
    toks = np.array([[0, 5, 6, 1, 1], [0, 0, 7, 8, 9]])
    mask = valid_positions(toks, pad_id=1, bos_id=0)
    assert mask.tolist() == [[False, True, True, False, False], [False, True, True, True, True]]


# -- the contract of pair_segments on random tokenizations -------------------

def random_spans(rng: np.random.Generator, length: int) -> np.ndarray:
    """Spans of a random tokenizer over text [0, length): random cuts, some tokens split
    into byte pieces that share one span, some zero-width tokens."""
    cuts = np.flatnonzero(rng.random(length - 1) < 0.5) + 1
    bounds = [0, *cuts.tolist(), length]
    spans = []
    for s, e in zip(bounds, bounds[1:]):
        if rng.random() < 0.1:
            spans.append((s, s))  # zero-width
        spans += [(s, e)] * (2 if rng.random() < 0.15 else 1)  # byte pieces of one character
    return np.asarray(spans)


def unique_ends(spans: np.ndarray) -> dict[int, int]:
    """Boundary -> index of the one token that stands for it (the last to end there)."""
    out = {}
    for i, (s, e) in enumerate(spans):
        if e > s:
            out[e] = i  # a later token ending at the same offset replaces it
    return out


def check_segments(sa, sb, body_a, body_b, first_a, first_b):
    segs = pair_segments(sa, sb, body_a, body_b, first_a, first_b)
    ua, ub = unique_ends(sa), unique_ends(sb)
    shared = sorted(set(ua) & set(ub))
    assert last_ends(sa).tolist() == [e if ua.get(e) == i else -1
                                      for i, (_, e) in enumerate(sa)]
    assert (segs[0][0], segs[0][2]) == (0, 0)
    # it stops when one side runs out (bodies too short to reach a shared boundary can
    # leave the other side's last tokens unvisited; nothing wrong is compared)
    assert segs[-1][1] == len(sa) or segs[-1][3] == len(sb)
    kept = []
    for (a0, a1, b0, b1, ka, kb), nxt in zip(segs, [*segs[1:], None]):
        assert 1 <= a1 - a0 <= body_a and 1 <= b1 - b0 <= body_b
        assert nxt is None or (nxt[0], nxt[2]) == (a1, b1)
        assert ka.shape == (a1 - a0,) and kb.shape == (b1 - b0,)
        # compared: every shared boundary whose two tokens both lie in the segment
        inside = [e for e in shared if a0 <= ua[e] < a1 and b0 <= ub[e] < b1
                  and (first_a or ua[e] != a0) and (first_b or ub[e] != b0)]
        assert sa[a0:a1][ka, 1].tolist() == inside == sb[b0:b1][kb, 1].tolist()
        assert [ua[e] - a0 for e in inside] == np.flatnonzero(ka).tolist()
        assert [ub[e] - b0 for e in inside] == np.flatnonzero(kb).tolist()
        kept += inside
        # the segment is the longest that ends on a shared boundary within both bodies
        fits = [e for e in shared if a0 < np.searchsorted(sa[:, 1], e, "right") <= a0 + body_a
                and b0 < np.searchsorted(sb[:, 1], e, "right") <= b0 + body_b]
        if fits:
            assert a1 == np.searchsorted(sa[:, 1], max(fits), "right")
            assert b1 == np.searchsorted(sb[:, 1], max(fits), "right")
    assert kept == sorted(set(kept))  # each boundary compared at most once, in order
    return segs, kept, shared


@pytest.mark.parametrize("seed", range(300))
def test_pair_segments_keeps_its_contract_on_random_tokenizations(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, 40))
    sa, sb = random_spans(rng, length), random_spans(rng, length)
    body_a, body_b = (int(b) for b in rng.integers(1, 7, size=2))
    first_a, first_b = (bool(f) for f in rng.random(2) < 0.7)
    check_segments(sa, sb, body_a, body_b, first_a, first_b)


def test_pair_segments_with_room_for_everything_compares_every_shared_boundary():
    rng = np.random.default_rng(7)
    for _ in range(50):
        sa, sb = random_spans(rng, 30), random_spans(rng, 30)
        segs, kept, shared = check_segments(sa, sb, len(sa), len(sb), True, True)
        assert len(segs) == 1 and kept == shared
        assert (segs[0][1], segs[0][3]) == (len(sa), len(sb))


def test_pair_segments_refuses_spans_out_of_order_on_either_side():
    ok, bad = np.array([[0, 3], [3, 5]]), np.array([[0, 5], [5, 3]])
    with pytest.raises(ValueError, match="non-decreasing"):
        pair_segments(ok, bad, 4, 4)
    # equal ends (the byte pieces of one character) are in order on both sides
    same_end = np.array([[0, 3], [3, 5], [3, 5]])
    assert len(pair_segments(same_end, same_end, 1, 1)) == 3


def test_a_leading_pad_stays_masked_when_the_model_has_a_bos():
    toks = np.array([[1, 1, 5], [0, 6, 1]])  # left padding; BOS then text then pad
    assert valid_positions(toks, pad_id=1, bos_id=0).tolist() == [[False, False, True],
                                                                   [False, True, False]]
