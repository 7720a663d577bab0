"""Which token positions are compared (pure core: arrays in, arrays out).

Pad positions and the BOS position carry no text, so they never enter a
correlation. Two models with different tokenizers are compared on shared token
boundaries: a position counts only where both tokenizations end a token at the
same character offset of the same document (``pair_segments``). For one
tokenizer every text position is kept.
"""

from __future__ import annotations

import numpy as np


def valid_positions(tokens: np.ndarray, pad_id: int | None, bos_id: int | None) -> np.ndarray:
    """Boolean mask of positions that are neither padding nor a leading BOS.

    Parameters
    ----------
    tokens : ndarray of shape (n_windows, context), integer token ids.
    pad_id : id of the pad token, or None if the tokenizer has none.
    bos_id : id of the BOS token, or None. Only BOS at position 0 is dropped;
        a BOS id elsewhere would be text and is kept.

    Returns
    -------
    mask : ndarray of bool, same shape as ``tokens``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D (windows, context), got shape {tokens.shape}")
    mask = np.ones(tokens.shape, dtype=bool)
    if pad_id is not None:
        mask &= tokens != pad_id
    if bos_id is not None:
        mask[:, 0] &= tokens[:, 0] != bos_id
    return mask


def flat_positions(mask: np.ndarray) -> np.ndarray:
    """(n, 2) array of (window, position) for each True entry of ``mask``, row-major."""
    return np.argwhere(mask).astype(np.int32)


def assert_same_positions(pos_a: np.ndarray, pos_b: np.ndarray) -> None:
    """Raise if two models' surviving positions differ (they must be compared token for token)."""
    if pos_a.shape != pos_b.shape or not np.array_equal(pos_a, pos_b):
        raise ValueError(
            f"the two models kept different token positions ({len(pos_a)} vs {len(pos_b)}); "
            "they must be run on the same windows with the same pad/BOS rule")


# -- two tokenizers: compare on shared token boundaries ----------------------

def last_ends(spans: np.ndarray) -> np.ndarray:
    """End offset of each token that is the last to end at that character; -1 otherwise.

    Parameters
    ----------
    spans : ndarray of shape (n_tokens, 2)
        Character span ``[start, end)`` of each token in its document, in order.

    Returns
    -------
    ends : ndarray of int64, shape (n_tokens,)
        ``-1`` for zero-width tokens and for tokens followed by another
        non-zero-width token that ends at the same offset (e.g. the bytes of one
        character split over tokens), so a boundary is represented by exactly
        one token. A zero-width token never hides the boundary before it.
    """
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    ends = np.full(len(spans), -1, dtype=np.int64)
    real = np.flatnonzero(spans[:, 1] > spans[:, 0])
    last = np.ones(len(real), dtype=bool)
    last[:-1] = spans[real[:-1], 1] < spans[real[1:], 1]
    ends[real[last]] = spans[real[last], 1]
    return ends


def pair_segments(spans_a: np.ndarray, spans_b: np.ndarray, body_a: int, body_b: int,
                  first_a: bool = True, first_b: bool = True) -> list[tuple]:
    """Cut one document, tokenized twice, into segments that cover the same text.

    Each segment ends at a character offset where both tokenizations end a token,
    holds at most ``body_a`` tokens of A and ``body_b`` of B, and marks the tokens
    that are compared: those ending at a boundary shared by both. For one
    tokenizer (identical spans) every token is kept and segments are plain
    chunks of ``body`` tokens.

    Parameters
    ----------
    spans_a, spans_b : ndarray of shape (n, 2)
        Character spans of the document's tokens under each tokenizer.
    body_a, body_b : int
        Tokens per segment (window length minus a BOS, if any).
    first_a, first_b : bool, default=True
        Whether the first token of a segment may be compared. Pass False for a
        model that gets no BOS, whose first position is an attention sink.

    Returns
    -------
    segments : list of (a0, a1, b0, b1, keep_a, keep_b)
        Token ranges ``[a0, a1)`` and ``[b0, b1)`` and boolean masks over them;
        ``keep_a.sum() == keep_b.sum()`` and the kept tokens of A and B end at the
        same offsets, in the same order.
    """
    if body_a < 1 or body_b < 1:
        raise ValueError(f"segment bodies must be >= 1 token, got {body_a} and {body_b}")
    spans_a = np.asarray(spans_a, dtype=np.int64).reshape(-1, 2)
    spans_b = np.asarray(spans_b, dtype=np.int64).reshape(-1, 2)
    raw_a, raw_b = spans_a[:, 1], spans_b[:, 1]
    if np.any(np.diff(raw_a) < 0) or np.any(np.diff(raw_b) < 0):
        raise ValueError("token spans must end in non-decreasing order")
    ends_a, ends_b = last_ends(spans_a), last_ends(spans_b)
    shared = np.intersect1d(ends_a[ends_a >= 0], ends_b[ends_b >= 0])
    na, nb = len(raw_a), len(raw_b)
    out, ia, ib = [], 0, 0
    while ia < na and ib < nb:
        ja, jb = min(ia + body_a, na), min(ib + body_b, nb)
        # a boundary in reach ends a token of each side inside the bodies; it may equal
        # the previous cut's offset when that cut fell between the byte pieces of one
        # character
        lo, cap = max(raw_a[ia], raw_b[ib]), min(raw_a[ja - 1], raw_b[jb - 1])
        cut = None
        for e in shared[(shared >= lo) & (shared <= cap)][::-1]:  # the longest that fits
            ka, kb = np.searchsorted(raw_a, e, "right"), np.searchsorted(raw_b, e, "right")
            if ia < ka <= ja and ib < kb <= jb:
                cut = (ka, kb)
                break
        if cut is None:  # no shared boundary in reach: move on without comparing
            ka = max(ia + 1, min(ja, np.searchsorted(raw_a, cap, "right")))
            kb = max(ib + 1, min(jb, np.searchsorted(raw_b, raw_a[ka - 1], "right")))
            cut = (ka, kb)
        ka, kb = cut
        seg_a, seg_b = ends_a[ia:ka], ends_b[ib:kb]
        both = np.intersect1d(seg_a[seg_a >= 0], seg_b[seg_b >= 0])
        drop = [seg[0] for seg, first in ((seg_a, first_a), (seg_b, first_b))
                if not first and seg[0] >= 0]
        both = np.setdiff1d(both, drop)
        out.append((ia, ka, ib, kb, np.isin(seg_a, both), np.isin(seg_b, both)))
        ia, ib = ka, kb
    return out
