"""Similarity of SAE features from their weights alone: no activations needed.

- :func:`decoder_cosine`: the cosine of A's decoder rows, mapped into B's space by a
  :class:`~.stitch.Stitch` (or zero-padded when there is none), with B's decoder rows;
- :func:`vocab_cosine`: when both models share a tokenizer, the cosine of the two
  features' direct effects on the vocabulary: each decoder row through its own model's
  unembedding, centred over the vocabulary.

Both return an (F_a, F_b) matrix that :func:`~.pairing.match` and
:func:`~.pairing.pair` take like a correlation matrix. A zero decoder row (a feature
with no direction) has NaN similarities and is never matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stitch import Stitch


def _as_matrix(w, name) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0 or not np.issubdtype(w.dtype, np.number):
        raise ValueError(f"{name} must be a non-empty 2-D numeric array; got {w.dtype} "
                         f"array of shape {w.shape}")
    w = w.astype(np.float64)
    if not np.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or inf")
    return w


def _unit_rows(w) -> np.ndarray:
    """Rows scaled to unit norm; zero rows become NaN."""
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, w / norm, np.nan)


def _pad(w, width) -> np.ndarray:
    return np.pad(w, ((0, 0), (0, width - w.shape[1]))) if w.shape[1] < width else w


def decoder_cosine(w_dec_a, w_dec_b, stitch: Stitch | None = None,
                   dtype=np.float32) -> np.ndarray:
    """Cosine similarity of every A decoder row with every B decoder row.

    Parameters
    ----------
    w_dec_a : array-like of float, shape (F_a, d_a)
        A's SAE decoder, one row per feature.
    w_dec_b : array-like of float, shape (F_b, d_b)
        B's SAE decoder.
    stitch : Stitch, optional
        A map from A's residual space to B's (see :func:`~.stitch.stitch`); A's rows
        are mapped with :meth:`Stitch.directions` first. Without one, the narrower
        side is zero-padded to the wider width: the identity map, meaningful only
        when the two spaces share a basis.
    dtype : float dtype, default=np.float32

    Returns
    -------
    ndarray of dtype, shape (F_a, F_b)
        NaN in the rows and columns of zero decoder rows.
    """
    a, b = _as_matrix(w_dec_a, "w_dec_a"), _as_matrix(w_dec_b, "w_dec_b")
    if stitch is not None:
        if (stitch.d_a, stitch.d_b) != (a.shape[1], b.shape[1]):
            raise ValueError(f"the stitch maps width {stitch.d_a} to {stitch.d_b}; the "
                             f"decoders have widths {a.shape[1]} and {b.shape[1]}")
        a = stitch.directions(a)
    width = max(a.shape[1], b.shape[1])
    return (_unit_rows(_pad(a, width)) @ _unit_rows(_pad(b, width)).T).astype(dtype)


def _centred(w_u, name) -> np.ndarray:
    """Unembedding (d, V) with each row centred over the vocabulary, so that a
    direction's logits come out centred (softmax ignores a constant shift)."""
    w_u = _as_matrix(w_u, name)
    return w_u - w_u.mean(1, keepdims=True)


@dataclass(frozen=True)
class VocabGram:
    """Gram matrices of two unembeddings, each centred over one shared vocabulary.

    Attributes
    ----------
    ab : ndarray of float64, shape (d_a, d_b)
    aa : ndarray of float64, shape (d_a, d_a)
    bb : ndarray of float64, shape (d_b, d_b)
    """

    ab: np.ndarray
    aa: np.ndarray
    bb: np.ndarray


def vocab_gram(w_u_a, w_u_b) -> VocabGram:
    """The Gram matrices :func:`vocab_cosine` reads, computed once per pair of models.

    Parameters
    ----------
    w_u_a : array-like of float, shape (d_a, V)
        A's unembedding (transformer-lens ``W_U``).
    w_u_b : array-like of float, shape (d_b, V)
        B's unembedding over the same V tokens in the same order: the models must
        share a tokenizer.

    Returns
    -------
    VocabGram
    """
    u_a, u_b = _centred(w_u_a, "w_u_a"), _centred(w_u_b, "w_u_b")
    if u_a.shape[1] != u_b.shape[1]:
        raise ValueError(f"the unembeddings cover {u_a.shape[1]} and {u_b.shape[1]} "
                         "tokens; the vocabulary effect needs one shared tokenizer")
    return VocabGram(u_a @ u_b.T, u_a @ u_a.T, u_b @ u_b.T)


def vocab_cosine(w_dec_a, w_u_a, w_dec_b, w_u_b, dtype=np.float32) -> np.ndarray:
    """Cosine of the two features' centred logit effects, ``w_dec @ w_u``, per pair.

    Computed through the (d_a, d_b) and (d, d) Gram matrices of the unembeddings
    (:func:`vocab_gram`), never as (F, V) logit tables, so a 152k vocabulary costs one
    ``d_a x V x d_b`` product.

    Parameters
    ----------
    w_dec_a : array-like of float, shape (F_a, d_a)
    w_u_a : array-like of float, shape (d_a, V)
        A's unembedding (transformer-lens ``W_U``).
    w_dec_b : array-like of float, shape (F_b, d_b)
    w_u_b : array-like of float, shape (d_b, V)
        B's unembedding over the same V tokens in the same order: the models must
        share a tokenizer.
    dtype : float dtype, default=np.float32

    Returns
    -------
    ndarray of dtype, shape (F_a, F_b)
        NaN for a feature whose logit effect is constant over the vocabulary.
    """
    return vocab_cosine_gram(w_dec_a, w_dec_b, vocab_gram(w_u_a, w_u_b), dtype)


def vocab_cosine_gram(w_dec_a, w_dec_b, gram: VocabGram, dtype=np.float32) -> np.ndarray:
    """:func:`vocab_cosine` from the unembeddings' :class:`VocabGram`.

    Parameters
    ----------
    w_dec_a : array-like of float, shape (F_a, d_a)
    w_dec_b : array-like of float, shape (F_b, d_b)
    gram : VocabGram
        Of A's and B's unembeddings (:func:`vocab_gram`).
    dtype : float dtype, default=np.float32

    Returns
    -------
    ndarray of dtype, shape (F_a, F_b)
    """
    a, b = _as_matrix(w_dec_a, "w_dec_a"), _as_matrix(w_dec_b, "w_dec_b")
    for w, d, side in ((a, gram.aa.shape[0], "a"), (b, gram.bb.shape[0], "b")):
        if w.shape[1] != d:
            raise ValueError(f"w_dec_{side} has width {w.shape[1]} but w_u_{side} has "
                             f"{d} rows")
    cross = a @ gram.ab @ b.T
    norm_a = np.sqrt(np.maximum(np.einsum("fi,ij,fj->f", a, gram.aa, a), 0))
    norm_b = np.sqrt(np.maximum(np.einsum("fi,ij,fj->f", b, gram.bb, b), 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = cross / np.outer(norm_a, norm_b)
    out[~(norm_a > 0)] = np.nan
    out[:, ~(norm_b > 0)] = np.nan
    return out.astype(dtype)
