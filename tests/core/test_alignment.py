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
    segs = pair_segments(sa, sb, 2, 1)
    assert sum(int(s[4].sum()) for s in segs) == sum(int(s[5].sum()) for s in segs) <= 1
    assert segs[-1][1] == 4 or segs[-1][3] == 1


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bodies must be >= 1"):
        pair_segments(np.zeros((1, 2)), np.zeros((1, 2)), 0, 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        pair_segments(np.array([[0, 5], [5, 3]]), np.array([[0, 5]]), 4, 4)


def test_valid_positions_masks_pad_and_leading_bos_only():
    toks = np.array([[0, 5, 6, 1, 1], [0, 0, 7, 8, 9]])
    mask = valid_positions(toks, pad_id=1, bos_id=0)
    assert mask.tolist() == [[False, True, True, False, False], [False, True, True, True, True]]
