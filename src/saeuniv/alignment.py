"""Which token positions are compared (pure core: arrays in, arrays out).

Pad positions and the BOS position carry no text, so they never enter a
correlation. For two models that share a tokenizer the surviving positions are
identical by construction; ``assert_same_positions`` checks it.
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
