"""Each feature's top activations and the tokens they fall on: what the token filters of
the matching rule know about a feature.

- :func:`top_activations` finds the k largest activations of every feature
  (:class:`TopActivations`: code rows and values);
- :func:`top_tokens` turns them into :class:`TopTokens` for one model: the token id, the
  decoded text and the junk flag of each top activation;
- :func:`junk_ids` gives the junk tokens of a vocabulary (specials, whitespace,
  punctuation: :data:`JUNK_TEXTS`);
- :func:`junk_filter` and :func:`shared_token_filter` prune pairs of features by token
  ids of one vocabulary; :func:`shares_text` compares top tokens by text, so that two
  tokenizers can be compared.

Pure core: arrays in, arrays out. The tokenizer stays in the shell, which passes its
decode function and the decoded vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .inputs import as_csr, check_k, empty_topk

if TYPE_CHECKING:  # pairing imports this module; Matches is only named in annotations
    from .pairing import Matches

# Decoded (and stripped) texts of junk tokens: nothing, or one punctuation mark.
JUNK_TEXTS = frozenset({"", ".", ",", "!", "?", "-", ";", ":", '"', "'", "(", ")"})


@dataclass(frozen=True, eq=False)
class TopActivations:
    """The k largest activations of every feature, largest first.

    Attributes
    ----------
    rows : ndarray of int64, shape (F, k)
        Token rows (positions in the concatenated codes); -1 pads features
        with fewer than k non-zero activations.
    values : ndarray of float32, shape (F, k)
        The activations; 0.0 where padded.
    """

    rows: np.ndarray
    values: np.ndarray

    def tokens(self, token_ids) -> np.ndarray:
        """Map rows to token ids: ``token_ids[rows]``, keeping -1 padding.

        Parameters
        ----------
        token_ids : array-like of int, shape (n_tokens,)
            Token id of each code row.

        Returns
        -------
        ndarray of int64, shape (F, k)
        """
        ids = np.asarray(token_ids, np.int64)
        if ids.ndim != 1 or ids.size <= self.rows.max(initial=-1):
            raise ValueError(
                f"token_ids must be 1-D with one id per code row (at least "
                f"{self.rows.max(initial=-1) + 1}); got shape {ids.shape}"
            )
        return np.where(self.rows >= 0, ids[np.maximum(self.rows, 0)], -1)


def _chunk_top(x, k, offset):
    """Per-feature top-k (rows + offset, values) among the non-zeros of a CSR chunk."""
    f = x.shape[1]
    coo = x.tocoo()
    nz = coo.data != 0
    row, col, val = coo.row[nz] + offset, coo.col[nz], coo.data[nz]
    # by feature, largest first, lowest row on ties
    order = np.lexsort((row, -val, col))
    row, col, val = row[order], col[order], val[order]
    rank = np.arange(len(col)) - np.searchsorted(col, col)
    keep = rank < k
    rows, vals = empty_topk(f, k)
    rows[col[keep], rank[keep]] = row[keep]
    vals[col[keep], rank[keep]] = val[keep]
    return rows, vals


def top_activations(codes, k: int = 5) -> TopActivations:
    """The k largest non-zero activations of every feature and their token rows.

    Parameters
    ----------
    codes : scipy.sparse matrix (tokens, F) or iterable of them
        CSR codes; chunks are consecutive token rows, merged as they stream.
    k : int, default=5

    Returns
    -------
    TopActivations
        Ties go to the lowest row; features with fewer than k non-zeros are
        padded with row -1 (value 0.0).
    """
    check_k(k)
    if isinstance(codes, np.ndarray):
        raise ValueError(
            "codes is a dense ndarray; wrap it with scipy.sparse.csr_array(codes)")
    top, offset = None, 0
    for i, chunk in enumerate([codes] if sp.issparse(codes) else codes):
        x = as_csr(chunk, f"codes chunk {i}")
        if top is None:
            top = empty_topk(x.shape[1], k)
        if x.shape[1] != top[0].shape[0]:
            raise ValueError(f"codes chunk {i} has {x.shape[1]} features, earlier "
                             f"chunks {top[0].shape[0]}")
        rows, vals = _chunk_top(x, k, offset)
        cat_rows = np.concatenate([top[0], rows], 1)
        cat_vals = np.concatenate([top[1], vals], 1)
        order = np.argsort(-cat_vals, axis=1, kind="stable")[:, :k]  # earlier rows win
        top = (np.take_along_axis(cat_rows, order, 1),
               np.take_along_axis(cat_vals, order, 1))
        offset += x.shape[0]
    if top is None:
        raise ValueError("codes is an empty iterable; pass at least one CSR chunk")
    missing = top[1] == -np.inf
    return TopActivations(np.where(missing, -1, top[0]),
                          np.where(missing, 0.0, top[1]).astype(np.float32))


# ----------------------------------------------------------------------------
# tokens of the top activations


@dataclass(frozen=True, eq=False)
class TopTokens:
    """The tokens of every feature's top activations, for the token filters.

    Built by :func:`top_tokens`. Row f describes feature f; column j its j-th largest
    activation (see :class:`TopActivations`).

    Attributes
    ----------
    ids : ndarray of int64, shape (F, k)
        Token ids; -1 where the feature has fewer than k activations.
    text : ndarray of object (str), shape (F, k)
        Decoded text of each token; '' where padded.
    junk : ndarray of bool, shape (F, k)
        Whether the token is a junk token of its vocabulary; False where padded.
    """

    ids: np.ndarray
    text: np.ndarray
    junk: np.ndarray

    def __post_init__(self):
        ids, text, junk = (np.asarray(self.ids), np.asarray(self.text, object),
                           np.asarray(self.junk))
        if ids.ndim != 2 or not text.shape == junk.shape == ids.shape:
            raise ValueError(f"TopTokens needs ids, text and junk of one 2-D shape "
                             f"(features, k); got {ids.shape}, {text.shape}, "
                             f"{junk.shape}")
        if not np.issubdtype(ids.dtype, np.integer) or junk.dtype != bool:
            raise ValueError(f"TopTokens needs integer ids and boolean junk; got "
                             f"{ids.dtype} and {junk.dtype}")
        pad = ids < 0
        if (ids < -1).any() or junk[pad].any() or (text[pad] != "").any():
            raise ValueError("TopTokens ids must be token ids or -1 (padding), with "
                             "junk False and text '' where padded")
        if not all(isinstance(t, str) for t in text.flat):
            raise ValueError("TopTokens text must hold str (decoded token texts)")
        object.__setattr__(self, "ids", ids.astype(np.int64, copy=False))
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "junk", junk)

    @property
    def n_features(self) -> int:
        """Number of features F."""
        return self.ids.shape[0]

    @property
    def any_junk(self) -> np.ndarray:
        """(F,) bool: whether any top activation of the feature is on a junk token."""
        return self.junk.any(axis=1)

    def take(self, features) -> TopTokens:
        """The rows of some features, in the order given.

        Parameters
        ----------
        features : array-like of int, shape (n,), or boolean mask of shape (F,)

        Returns
        -------
        TopTokens
            Row i describes feature ``features[i]``.
        """
        features = np.asarray(features)
        if features.size == 0:  # [] is float64 to numpy: no features is no rows
            features = features.astype(np.int64)
        if features.dtype != bool and not np.issubdtype(features.dtype, np.integer):
            raise ValueError(f"features must be integer indices or a boolean mask; got "
                             f"{features.dtype}")
        if features.ndim != 1:
            raise ValueError(f"features must be 1-D; got shape {features.shape}")
        return TopTokens(self.ids[features], self.text[features], self.junk[features])


def _decoded(decode, ids) -> np.ndarray:
    """``decode(ids)`` as a validated object array of str, one per id."""
    texts = np.asarray(decode(ids), object)
    if texts.shape != ids.shape or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"decode must map a 1-D array of {ids.size} token ids to as "
                         f"many str (an object array); got shape {texts.shape}")
    return texts


def top_tokens(top: TopActivations, row_token_ids, junk_ids,
               decode: Callable[[np.ndarray], np.ndarray]) -> TopTokens:
    """The token id, text and junk flag of every feature's top activations.

    Parameters
    ----------
    top : TopActivations
        Top activations of one model's features (code rows, -1 padded).
    row_token_ids : array-like of int, shape (n_rows,)
        Token id of every code row.
    junk_ids : array-like of int, shape (n_junk,)
        Junk token ids of this model's vocabulary (see :func:`junk_ids`).
    decode : callable
        Maps a 1-D int64 array of token ids to an array (or list) of their texts,
        e.g. ``lambda ids: [tokenizer.decode([int(i)]) for i in ids]``. Called once,
        with each distinct id once.

    Returns
    -------
    TopTokens
    """
    if not isinstance(top, TopActivations):
        raise ValueError(f"top must be a TopActivations (see top_activations); got "
                         f"{type(top).__name__}")
    junk = np.asarray(junk_ids)
    if junk.ndim != 1 or (junk.size and not np.issubdtype(junk.dtype, np.integer)):
        raise ValueError(f"junk_ids must be a 1-D array of token ids; got {junk.dtype} "
                         f"{junk.shape}")
    ids = top.tokens(row_token_ids)
    uniq, inv = np.unique(ids, return_inverse=True)
    live = uniq >= 0
    text = np.full(uniq.size, "", object)
    text[live] = _decoded(decode, uniq[live])
    return TopTokens(ids, text[inv].reshape(ids.shape), (ids >= 0) & np.isin(ids, junk))


def junk_ids(texts, special_ids) -> np.ndarray:
    """The junk tokens of a vocabulary: special tokens, and tokens whose text is junk.

    A token is junk when it is special, or when its decoded text, stripped of
    whitespace, is in :data:`JUNK_TEXTS` (empty: whitespace or a token that decodes to
    nothing; or one punctuation mark).

    Parameters
    ----------
    texts : sequence of str, length V
        Decoded text of every token id of the vocabulary: ``texts[i]`` for id i
        (e.g. ``[tokenizer.decode([i]) for i in range(len(tokenizer))]``).
    special_ids : iterable of int
        The tokenizer's special token ids (e.g. ``tokenizer.all_special_ids``), each
        in [0, V).

    Returns
    -------
    ndarray of int64, shape (n_junk,)
        Ascending.
    """
    n = len(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must hold the decoded text (str) of every token id")
    special = np.asarray(list(special_ids))
    if special.size and not np.issubdtype(special.dtype, np.integer):
        raise ValueError(f"special_ids must be token ids (int); got {special.dtype}")
    outside = special[(special < 0) | (special >= n)]
    if outside.size:
        raise ValueError(f"special ids {outside.tolist()} are outside the vocabulary "
                         f"of {n} texts; pass the text of every token id, "
                         "len(tokenizer) of them")
    junk = np.fromiter((t.strip() in JUNK_TEXTS for t in texts), bool, n)
    junk[special.astype(np.int64)] = True
    return np.flatnonzero(junk).astype(np.int64)


# ----------------------------------------------------------------------------
# token filters


def _tokens_for(top_tokens, idx, name):
    tok = np.asarray(top_tokens)
    if tok.ndim != 2 or not np.issubdtype(tok.dtype, np.integer):
        raise ValueError(f"{name} must be a 2-D int array (features x k, -1 padded); "
                         f"got {tok.dtype} {tok.shape}")
    if idx.size and idx.max() >= len(tok):
        raise ValueError(f"{name} has {len(tok)} features but matches use index "
                         f"{idx.max()}")
    return tok[idx]


def _share(tok_a, tok_b):
    """Row i: whether rows i of two -1 padded id arrays share an id, padding aside."""
    ta, tb = tok_a[:, :, None], tok_b[:, None, :]
    return ((ta == tb) & (ta >= 0)).any(axis=(1, 2))


def junk_filter(matches: Matches, top_tokens_a, top_tokens_b, junk_ids) -> Matches:
    """Drop pairs where either feature's top tokens include a junk token.

    Parameters
    ----------
    matches : Matches
    top_tokens_a, top_tokens_b : int array, shape (F_a, k) / (F_b, k)
        Token ids of each feature's top activations, -1 padded (see
        :meth:`TopActivations.tokens`).
    junk_ids : array-like of int
        Token ids to reject, e.g. punctuation, whitespace, BOS, pad.

    Returns
    -------
    Matches
    """
    junk = np.asarray(junk_ids, np.int64).ravel()

    def has_junk(tok):
        return (np.isin(tok, junk) & (tok >= 0)).any(1)

    bad = has_junk(_tokens_for(top_tokens_a, matches.a, "top_tokens_a")) | has_junk(
        _tokens_for(top_tokens_b, matches.b, "top_tokens_b"))
    return matches.take(~bad)


def shared_token_filter(matches: Matches, top_tokens_a, top_tokens_b) -> Matches:
    """Keep pairs whose features' top-token lists share at least one token.

    Parameters
    ----------
    matches : Matches
    top_tokens_a, top_tokens_b : int array, shape (F_a, k) / (F_b, k)
        Token ids of each feature's top activations; -1 padding is ignored.

    Returns
    -------
    Matches
    """
    return matches.take(_share(_tokens_for(top_tokens_a, matches.a, "top_tokens_a"),
                               _tokens_for(top_tokens_b, matches.b, "top_tokens_b")))


def shares_text(tokens_a: TopTokens, tokens_b: TopTokens) -> np.ndarray:
    """Row i: whether feature row i of ``tokens_a`` and of ``tokens_b`` have a top
    token of the same text (padding ignored).

    Texts rather than ids, so that features of two tokenizers can be compared. Each
    distinct text gets one code, and rows are compared as :func:`shared_token_filter`
    compares token ids.

    Parameters
    ----------
    tokens_a, tokens_b : TopTokens, n rows each
        E.g. ``tokens_a.take(matches.a)`` and ``tokens_b.take(matches.b)``.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    if tokens_a.n_features != tokens_b.n_features:
        raise ValueError(f"shares_text compares rows pairwise; got "
                         f"{tokens_a.n_features} and {tokens_b.n_features} rows")
    both = np.concatenate([tokens_a.text.ravel(), tokens_b.text.ravel()])
    code = np.unique(both, return_inverse=True)[1].reshape(-1)
    code_a = code[: tokens_a.text.size].reshape(tokens_a.ids.shape)
    code_b = code[tokens_a.text.size :].reshape(tokens_b.ids.shape)
    return _share(np.where(tokens_a.ids >= 0, code_a, -1),
                  np.where(tokens_b.ids >= 0, code_b, -1))
