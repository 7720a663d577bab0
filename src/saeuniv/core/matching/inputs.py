"""Helpers shared by the modules of the matching package: validated sparse codes and
chunk pairs, validated ``k`` and dtype, and the empty running top-k lists that
correlations and activations are merged into.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.sparse as sp


def as_csr(x, name: str) -> sp.csr_matrix:
    """Validated canonical float64 CSR copy of ``x`` (other sparse formats converted).

    Parameters
    ----------
    x : scipy.sparse matrix or array, shape (tokens, features)
    name : str
        What ``x`` is, for the error messages.

    Returns
    -------
    scipy.sparse CSR, float64, shape (tokens, features)
        Duplicate entries summed.
    """
    if not sp.issparse(x):
        raise ValueError(
            f"{name} must be a scipy.sparse CSR matrix (tokens x features); got "
            f"{type(x).__name__}. Wrap dense codes with scipy.sparse.csr_array(x)."
        )
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tokens x features); got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {x.shape})")
    x = x.tocsr().astype(np.float64)  # tocsr converts COO/CSC; astype copies
    x.sum_duplicates()
    n_nan, n_inf = int(np.isnan(x.data).sum()), int(np.isinf(x.data).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} inf values; clean the codes "
            "(e.g. drop the tokens or use np.nan_to_num) before correlating"
        )
    return x


def check_rows(a, b, where: str) -> None:
    """Raise unless codes ``a`` and ``b`` have the same number of token rows."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{where}: codes_a has {a.shape[0]} token rows but codes_b has "
            f"{b.shape[0]}; both must cover the same tokens"
        )


def chunk_pairs(codes_a, codes_b):
    """Yield (chunk_a, chunk_b) pairs from two matrices or two chunk iterables.

    Two sparse matrices are one pair. Two iterables are zipped, and must end together:
    chunk i of A and chunk i of B cover the same token rows.
    """
    if sp.issparse(codes_a) and sp.issparse(codes_b):
        yield codes_a, codes_b
        return
    for x, name in ((codes_a, "codes_a"), (codes_b, "codes_b")):
        if sp.issparse(x) or isinstance(x, np.ndarray):
            raise ValueError(
                f"{name} is a {type(x).__name__}; pass two scipy.sparse CSR matrices "
                "(wrap dense codes with scipy.sparse.csr_array(x)) or two iterables "
                "of CSR chunks"
            )
    end = object()
    pairs = itertools.zip_longest(codes_a, codes_b, fillvalue=end)
    for i, (a, b) in enumerate(pairs):
        if a is end or b is end:
            short = "codes_a" if a is end else "codes_b"
            raise ValueError(
                f"{short} ran out of chunks after {i} while the other iterable has "
                "more; chunk i of A and chunk i of B must cover the same token rows"
            )
        yield a, b


def float_dtype(dtype) -> np.dtype:
    """``np.dtype(dtype)``, refused unless it is a float dtype."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a float dtype (e.g. np.float32); got {dtype}")
    return dtype


def check_k(k) -> None:
    """Raise unless ``k`` (entries kept per feature) is a positive integer."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")


def empty_topk(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k lists of ``n`` features with nothing in them yet.

    Returns
    -------
    index : ndarray of int64, shape (n, k)
        All -1.
    value : ndarray of float64, shape (n, k)
        All -inf, which every real candidate beats.
    """
    return np.full((n, k), -1, np.int64), np.full((n, k), -np.inf)
