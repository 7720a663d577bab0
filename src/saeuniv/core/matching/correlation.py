"""Exact Pearson correlation between the SAE features of two models, over shared tokens.

Codes are scipy.sparse CSR matrices of shape (tokens, features), or iterables of CSR
chunks covering consecutive token rows.

- :func:`correlation` (or :class:`CorrelationAccumulator`, fed shard by shard) gives the
  full (F_a, F_b) matrix;
- :mod:`.topk` gives only each feature's best partners, for when the full matrix does
  not fit in memory, from the statistics and the conversion defined here
  (:func:`feature_moments`, :func:`feature_std`, :func:`cross_to_corr`).

Dead features (zero variance over the tokens, see :func:`dead_features`) have NaN
correlations and are never anyone's partner. Statistics are accumulated in float64.

``device`` (see :mod:`saeuniv.core.devices`): ``None``, the default, is the numpy path
above, the reference. A torch device (``"cuda"``, or ``"cpu"`` to test without a GPU)
accumulates the same statistics there as float64 tensors (:mod:`.torch_corr`): sums and
sums of squares by scatter-add, the cross-product as sparse A^T times B made dense in
slabs of token rows. The conversion to correlations and the dead-feature rule are this
module's own, applied to those tensors, and results come back as numpy in the same
dtypes. Correlations agree with the numpy path to 1e-6 (float64 on both sides: in
practice to ~1e-15), partners are the same except between near-ties. Memory on the device:
:func:`correlation` holds the (F_a, F_b) float64 cross-product (8 F_a F_b bytes) plus one
dense slab of B and one converted row slice, each within ``block_bytes``;
:func:`.topk.topk_correlation` holds the codes plus one block and one dense slab of B, each
within ``max_bytes``, and only each block's top-k comes back. Small ceilings mean many
small products: on a CPU the torch path is for tests, not speed.
"""

from __future__ import annotations

import numpy as np

from ..devices import torch_device
from .inputs import as_csr, check_rows, chunk_pairs, float_dtype

DEFAULT_MAX_BYTES = 256 * 2**20
_SLICE_ELEMENTS = 2**22  # bounds the temporaries of the in-place block arithmetic
_DEAD_RELATIVE_VARIANCE = 1e-12  # variance below this fraction of the mean square


def feature_moments(x):
    """Per-feature sum and sum of squares of a float64 CSR matrix."""
    f = x.shape[1]
    return (np.bincount(x.indices, x.data, minlength=f),
            np.bincount(x.indices, x.data * x.data, minlength=f))


def feature_std(n, s, ss):
    """Population std from sums; NaN for dead (numerically constant) features."""
    var = (ss - s * s / n) / n
    dead = var <= _DEAD_RELATIVE_VARIANCE * ss / n
    return np.where(dead, np.nan, np.sqrt(np.maximum(var, 0.0)))


def dead_features(codes) -> np.ndarray:
    """Boolean mask of the dead features of ``codes``.

    A feature is dead when its variance over the tokens is zero, or below 1e-12 of its
    mean square (numerically constant). Its correlations are NaN in :func:`correlation`,
    whatever the other side's features are.

    Parameters
    ----------
    codes : scipy.sparse matrix, shape (tokens, F)

    Returns
    -------
    ndarray of bool, shape (F,)
    """
    x = as_csr(codes, "codes")
    if x.shape[0] == 0:
        raise ValueError("codes have no token rows")
    return np.isnan(feature_std(x.shape[0], *feature_moments(x)))


def cross_to_corr(block, n, sum_a, sum_b, std_a, std_b):
    """Turn raw cross-products sum_t a_t b_t into correlations, in place.

    cov = (S_ab - s_a s_b / n) / n. In float64 the cancellation loses about
    log10(mean^2 / var) digits, negligible for sparse codes. The arguments are all
    numpy arrays, or all float64 torch tensors on one device (the device path).
    """
    step = max(1, _SLICE_ELEMENTS // block.shape[1])
    for i in range(0, len(block), step):
        part, rows = block[i : i + step], slice(i, i + step)
        part -= (sum_a[rows] / n)[:, None] * sum_b  # np.outer, written for torch too
        part /= (n * std_a[rows])[:, None]
        part /= std_b
    if isinstance(block, np.ndarray):
        return np.clip(block, -1.0, 1.0, out=block)
    return block.clamp_(-1.0, 1.0)  # NaN stays NaN, as with np.clip


def device_stats(n, a, b, device):
    """Sums and stds of both sides as float64 tensors on ``device``, from device sums.

    The stds come from :func:`feature_std` on the host (F values each way), so the dead-feature
    rule is the numpy path's own.
    """
    import torch

    def side(s, ss):
        std = feature_std(n, s.cpu().numpy(), ss.cpu().numpy())
        return s, torch.from_numpy(std).to(device)

    return (*side(*a), *side(*b))


def _add_sparse(dense, c):
    """dense += c for a CSR c of the same shape, without a dense temporary."""
    first = np.arange(c.shape[0], dtype=np.int64) * c.shape[1]
    rows = np.repeat(first, np.diff(c.indptr))
    np.add.at(dense.reshape(-1), rows + c.indices, c.data)


class CorrelationAccumulator:
    """Streaming exact Pearson correlation between the features of two models.

    Accumulates float64 sufficient statistics over token chunks: the token
    count, per-feature sums and sums of squares, and the cross-product
    ``A^T B`` (a sparse-sparse product per chunk, added into a dense float64
    (F_a, F_b) array kept in row blocks). Memory is ``8 * F_a * F_b`` bytes
    plus per-update temporaries, independent of the number of tokens.

    With a ``device`` the statistics are float64 torch tensors there, the
    cross-product one (F_a, F_b) tensor, grown per chunk by sparse A^T times B
    made dense in slabs of token rows of at most ``block_bytes``.

    Parameters
    ----------
    block_bytes : int, default=256 MiB
        Size of one row block of the cross-product accumulator. Temporaries of
        one update and of :meth:`result` scale with it, not with F_a x F_b.
    device : None, str or torch.device, default=None
        None: numpy on the host. A torch device (``"cpu"``, ``"cuda"``): torch
        there (see :mod:`saeuniv.core.devices`); refused if not present.

    Attributes
    ----------
    n_tokens : int
        Token rows accumulated so far.
    n_chunks : int
        Chunk pairs accumulated so far.

    Examples
    --------
    >>> acc = CorrelationAccumulator()
    >>> for chunk_a, chunk_b in shards:          # doctest: +SKIP
    ...     acc.update(chunk_a, chunk_b)
    >>> corr = acc.result(release=True)          # doctest: +SKIP
    """

    def __init__(self, block_bytes: int = DEFAULT_MAX_BYTES, device=None):
        if block_bytes < 8:
            raise ValueError(f"block_bytes must be at least 8; got {block_bytes}")
        self.block_bytes = block_bytes
        self.device = torch_device(device)
        self.n_tokens = 0
        self.n_chunks = 0
        self.shape = None  # (F_a, F_b), set by the first update
        self._blocks = None  # list of (first row, float64 row block of A^T B)
        self._a = self._b = None  # [sum, sum of squares] per feature
        self._released = False

    def _allocate(self, f_a, f_b):
        self.shape = (f_a, f_b)
        if self.device is not None:
            from . import torch_corr

            self._blocks = [(0, torch_corr.zeros((f_a, f_b), self.device))]
            self._a = [torch_corr.zeros(f_a, self.device), torch_corr.zeros(f_a, self.device)]
            self._b = [torch_corr.zeros(f_b, self.device), torch_corr.zeros(f_b, self.device)]
            return
        rows = max(1, self.block_bytes // (8 * f_b))
        self._blocks = [(r, np.zeros((min(rows, f_a - r), f_b)))
                        for r in range(0, f_a, rows)]
        self._a = [np.zeros(f_a), np.zeros(f_a)]
        self._b = [np.zeros(f_b), np.zeros(f_b)]

    def _check_open(self):
        if self._released:
            raise ValueError(
                "accumulator was consumed by result(release=True); start a new one")

    def update(self, chunk_a, chunk_b) -> CorrelationAccumulator:
        """Add one chunk pair covering the same token rows.

        Parameters
        ----------
        chunk_a : scipy.sparse matrix, shape (n_rows, F_a)
            Codes of model A (CSR; other sparse formats are converted).
        chunk_b : scipy.sparse matrix, shape (n_rows, F_b)
            Codes of model B for the same token rows.

        Returns
        -------
        self
        """
        self._check_open()
        where = f"chunk {self.n_chunks}"
        a, b = as_csr(chunk_a, f"codes_a {where}"), as_csr(chunk_b, f"codes_b {where}")
        check_rows(a, b, where)
        if self._blocks is None:
            self._allocate(a.shape[1], b.shape[1])
        if (a.shape[1], b.shape[1]) != self.shape:
            raise ValueError(
                f"{where} has {a.shape[1]} x {b.shape[1]} features; earlier chunks had "
                f"{self.shape[0]} x {self.shape[1]}"
            )
        if self.device is not None:
            self._update_device(a, b)
        else:
            for stats, x in ((self._a, a), (self._b, b)):
                s, ss = feature_moments(x)
                stats[0] += s
                stats[1] += ss
            at = a.T.tocsr()
            for r, block in self._blocks:
                _add_sparse(block, at[r : r + len(block)] @ b)
        self.n_tokens += a.shape[0]
        self.n_chunks += 1
        return self

    def _update_device(self, a, b):
        from . import torch_corr

        for stats, x in ((self._a, a), (self._b, b)):
            s, ss = torch_corr.moments(x, self.device)
            stats[0] += s
            stats[1] += ss
        rows = torch_corr.slab_rows(self.shape[1], self.block_bytes)
        torch_corr.add_cross(self._blocks[0][1],
                             torch_corr.token_slabs(a, rows, self.device, transpose=True),
                             torch_corr.token_slabs(b, rows, self.device))

    def result(self, dtype=np.float32, release: bool = False) -> np.ndarray:
        """Correlation matrix of the tokens seen so far.

        Parameters
        ----------
        dtype : float dtype, default=np.float32
            Output dtype (the computation is float64).
        release : bool, default=False
            Free each float64 block as soon as it is converted, so peak memory
            stays at the accumulator's size instead of accumulator + output.
            The accumulator cannot be used afterwards.

        Returns
        -------
        ndarray, shape (F_a, F_b)
            Pearson correlations in [-1, 1]; rows of dead A features and
            columns of dead B features are NaN.
        """
        dtype = float_dtype(dtype)
        self._check_open()
        if self.n_tokens == 0:
            raise ValueError(
                "no tokens accumulated; call update() with non-empty chunks first")
        if self.device is not None:
            return self._result_device(dtype, release)
        n, (sum_a, sq_a), (sum_b, sq_b) = self.n_tokens, self._a, self._b
        std_a, std_b = feature_std(n, sum_a, sq_a), feature_std(n, sum_b, sq_b)
        out = np.empty(self.shape, dtype)
        blocks, self._released = self._blocks, release
        for i, (r, block) in enumerate(blocks):
            if release:
                blocks[i] = None
            rows = slice(r, r + len(block))
            work = block if release else block.copy()
            out[rows] = cross_to_corr(work, n, sum_a[rows], sum_b, std_a[rows], std_b)
        if release:
            self._blocks = None
        return out

    def _result_device(self, dtype, release):
        """:meth:`result` on the device, converted in row slices of ``block_bytes``; each
        slice comes back to the host as float64 and is cast there, as numpy casts."""
        n, cross = self.n_tokens, self._blocks[0][1]
        sum_a, std_a, sum_b, std_b = device_stats(n, self._a, self._b, self.device)
        out = np.empty(self.shape, dtype)
        step, self._released = max(1, self.block_bytes // (8 * self.shape[1])), release
        for r in range(0, self.shape[0], step):
            rows = slice(r, r + step)
            work = cross[rows] if release else cross[rows].clone()
            out[rows] = cross_to_corr(work, n, sum_a[rows], sum_b, std_a[rows],
                                       std_b).cpu().numpy()
        if release:
            self._blocks = None
        return out


def correlation(codes_a, codes_b, dtype=np.float32, device=None) -> np.ndarray:
    """Exact Pearson correlation of every A feature with every B feature.

    Parameters
    ----------
    codes_a : scipy.sparse matrix (tokens, F_a) or iterable of them
        SAE codes of model A, CSR (other sparse formats are converted; dense
        arrays are rejected). An iterable is read chunk by chunk.
    codes_b : scipy.sparse matrix (tokens, F_b) or iterable of them
        Codes of model B for the same tokens; chunk i must have the same rows
        as chunk i of ``codes_a``.
    dtype : float dtype, default=np.float32
        Output dtype; statistics are accumulated in float64.
    device : None, str or torch.device, default=None
        None: numpy on the host. A torch device (``"cpu"``, ``"cuda"``): the
        statistics accumulate there in float64 (see :class:`CorrelationAccumulator`).

    Returns
    -------
    ndarray, shape (F_a, F_b)
        NaN rows/columns for dead features: zero variance over the tokens, or
        numerically constant (variance below 1e-12 of the mean square).

    Raises
    ------
    ValueError
        On non-sparse input, mismatched rows or feature counts, NaN/inf codes,
        chunk iterables of different length, or no tokens; on a device that is
        not a torch device or not present.
    """
    acc = CorrelationAccumulator(device=device)
    for a, b in chunk_pairs(codes_a, codes_b):
        acc.update(a, b)
    return acc.result(dtype, release=True)
