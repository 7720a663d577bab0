"""Per-operation rates for the cost plan: measured on this machine by short calibrations
(cached by machine, each measured the first time a plan needs it), or for a GPU class.

An operation is named by its kind and, where speed depends on it, its shape:

- ``torch:M,K,N``: float32 matrix products (M x K) @ (K x N) in torch, FLOP/s (model forward
  and backward passes, SAE encoding and training, at their own widths and batch sizes);
  ``torch16:M,K,N``: the same in bfloat16 (models run in bfloat16 or float16);
- ``gemm:M,K,N``: the same in numpy (the permutation nulls' products), FLOP/s;
- ``eig:K``: eigenvalues of a K x K symmetric matrix, calls/s (SVCCA's null);
- ``eigh:K``: its eigenvalues and eigenvectors, calls/s (SVCCA's random-subset draws);
- ``svd:M,N``: thin SVD of an M x N float64 matrix, calls/s (SVCCA's and PWCCA's bases);
- ``sparse``: multiply-adds of sparse-sparse products (the correlation's cross-product), /s;
- ``elementwise``: float64 elements of a dense pass (correlations from the sums, top-k), /s;
- ``gather``: randomly gathered float32 elements (RSA's permuted dissimilarities), /s.

A GPU class's rates are measured when that GPU is present (``--calibrate`` on it); otherwise
they are its datasheet's peaks times ``GPU_EFFICIENCY``, and the plan says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

# datasheet peaks of GPU classes: dense float32 and bfloat16 FLOP/s, memory bytes/s
GPU_CLASSES = {
    "H100": {"flops": 67e12, "flops16": 989e12, "bandwidth": 3.35e12},
    "H200": {"flops": 67e12, "flops16": 989e12, "bandwidth": 4.8e12},
    "A100": {"flops": 19.5e12, "flops16": 312e12, "bandwidth": 2.0e12},
    "L40S": {"flops": 91.6e12, "flops16": 362e12, "bandwidth": 0.864e12},
}
GPU_EFFICIENCY = 0.4  # share of a datasheet peak assumed reached without a measurement
BYTES_PER = {"sparse": 24, "elementwise": 16, "gather": 8}  # memory traffic per unit of work
MAX_MATMUL = 2 ** 27  # elements of one calibration operand: large shapes are timed smaller
MAX_SVD = 2 ** 20  # elements of one calibration SVD: larger ones are timed at this size
# a 1-minute load above this many runnable tasks per CPU means other work shares the cores: a
# rate measured then can be many times too slow (eig:1024 read 18x slower at load 4 on 2 CPUs)
BUSY_LOAD_PER_CPU = 1.0


def _best(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _shape(op: str) -> tuple[int, ...]:
    return tuple(int(x) for x in op.split(":")[1].split(","))


def _matmul(kind: str, m: int, k: int, n: int, device: str = "cpu") -> float:
    """FLOP/s of (m x k) @ (k x n) in float32 (bfloat16 for ``torch16``); m is cut so the
    operands stay small (the rate of a product does not depend on its row count once it is
    large)."""
    m = max(1, min(m, MAX_MATMUL // max(k, n)))
    if kind == "gemm":
        rng = np.random.default_rng(0)
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        return 2 * m * k * n / _best(lambda: x @ w)
    import torch

    dtype = torch.bfloat16 if kind == "torch16" else torch.float32
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(k, n, device=device, dtype=dtype)
    return 2 * m * k * n / _best(lambda: (x @ w).sum().item())  # .item(): wait for a GPU


def _eig(k: int, vectors: bool = False) -> float:
    g = np.random.default_rng(0).standard_normal((k, k))
    g = g @ g.T
    return 1.0 / _best(lambda: np.linalg.eigh(g) if vectors else np.linalg.eigvalsh(g))


def _svd(m: int, n: int) -> float:
    """Calls/s of a thin SVD (U, s, Vt) of an m x n matrix. A larger one is timed at about
    ``MAX_SVD`` elements with the same aspect and scaled by m * n * min(m, n), its work."""
    scale = min(1.0, math.sqrt(MAX_SVD / (m * n)))
    small_m, small_n = max(1, round(m * scale)), max(1, round(n * scale))
    x = np.random.default_rng(0).standard_normal((small_m, small_n))
    seconds = _best(lambda: np.linalg.svd(x, full_matrices=False))
    return (small_m * small_n * min(small_m, small_n)) / (seconds * m * n * min(m, n))


def _sparse() -> float:
    import scipy.sparse as sp

    n, f, l0 = 20_000, 2048, 32
    rng = np.random.default_rng(0)
    a = sp.random(n, f, density=l0 / f, format="csr", random_state=rng, dtype=np.float64)
    b = sp.random(n, f, density=l0 / f, format="csr", random_state=rng, dtype=np.float64)
    at = a.T.tocsr()
    return n * l0 * l0 / _best(lambda: at @ b)


def _elementwise() -> float:
    x = np.random.default_rng(0).standard_normal(4_000_000)
    return x.size / _best(lambda: np.multiply(x, 1.5, out=x))


def _gather() -> float:
    rng = np.random.default_rng(0)
    x, idx = rng.standard_normal(4_000_000, dtype=np.float32), rng.permutation(4_000_000)
    return idx.size / _best(lambda: x[idx])


def measure(op: str) -> float:
    """The rate of ``op`` on this machine's CPU, measured now (well under a second)."""
    kind = op.split(":")[0]
    if kind in ("torch", "torch16", "gemm"):
        return _matmul(kind, *_shape(op))
    if kind in ("eig", "eigh"):
        return _eig(*_shape(op), vectors=kind == "eigh")
    if kind == "svd":
        return _svd(*_shape(op))
    fixed = {"sparse": _sparse, "elementwise": _elementwise, "gather": _gather}
    if kind not in fixed:
        raise ValueError(f"unknown operation {op!r}")
    return fixed[kind]()


def current_load() -> float:
    """This machine's 1-minute load average (runnable tasks)."""
    return os.getloadavg()[0]


def busy_limit() -> float:
    """The load above which a measurement is not cached (see ``BUSY_LOAD_PER_CPU``)."""
    return (os.cpu_count() or 1) * BUSY_LOAD_PER_CPU


def machine() -> str:
    """What a CPU calibration depends on: the host, its processor and its thread count."""
    import torch

    return (f"{platform.node()} {platform.processor() or platform.machine()} "
            f"{os.cpu_count()} cpus {torch.get_num_threads()} threads")


class CPURates:
    """This machine's rates: ``rates[op]``, from the cache file or measured and cached.

    ``refresh`` measures every operation again the first time it is asked for. A rate
    measured while the machine is busy (load above :func:`busy_limit`) serves this plan but
    is not cached; ``busy`` maps such operations to the load they were measured at.
    """

    def __init__(self, cache: Path, refresh: bool = False):
        self.cache, self.key = Path(cache), machine()
        known = json.loads(self.cache.read_text()) if self.cache.exists() else {}
        self.known, self.rates = known, ({} if refresh else dict(known.get(self.key, {})))
        self.measured = 0
        self.busy: dict[str, float] = {}

    def __getitem__(self, op: str) -> float:
        if op not in self.rates:
            load = current_load()
            self.rates[op] = measure(op)
            self.measured += 1
            if load > busy_limit():
                self.busy[op] = load
            else:
                self._save()
        return self.rates[op]

    def note(self) -> str:
        """Where this plan's CPU rates came from, in one line."""
        if not self.busy:
            if not self.measured:
                where = "from the cached calibration"
            elif self.measured == len(self.rates):
                where = f"all {self.measured} measured now, and cached"
            else:
                where = (f"{self.measured} of {len(self.rates)} measured now and cached, the "
                         "rest from the cached calibration")
            return f"rates {where} (at a load within the CPU count)"
        return (f"{len(self.busy)} rate(s) measured now at load up to {max(self.busy.values()):.1f}"
                f" on {os.cpu_count()} CPUs and not cached: the CPU times assume the machine "
                "stays this busy; run `saeuniv plan --calibrate` again when it is idle")

    def _save(self) -> None:
        idle = {op: r for op, r in self.rates.items() if op not in self.busy}
        self.known[self.key] = {**self.known.get(self.key, {}), **idle}
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        tmp.replace(self.cache)  # never a half-written cache


class GPURates:
    """Rates of GPU class ``name``: measured when this machine's first GPU is of that class,
    else its datasheet's peaks x ``GPU_EFFICIENCY``. The eigenvalue problems keep the CPU's
    rate (torch solves them one matrix at a time on a GPU too), and so do the SVDs (the
    bases are found in numpy on the host). ``how`` says which."""

    def __init__(self, name: str, cpu: CPURates):
        if name not in GPU_CLASSES:
            raise ValueError(f"GPU class {name!r} is unknown; choose one of "
                             f"{sorted(GPU_CLASSES)}")
        import torch

        self.cpu, self.peak = cpu, GPU_CLASSES[name]
        self.here = torch.cuda.is_available() and name in torch.cuda.get_device_name(0)
        self.how = f"{name} measured" if self.here else f"{name} datasheet x {GPU_EFFICIENCY}"
        self.rates: dict[str, float] = {}

    def __getitem__(self, op: str) -> float:
        if op not in self.rates:
            self.rates[op] = self._rate(op)
        return self.rates[op]

    def _rate(self, op: str) -> float:
        kind = op.split(":")[0]
        if kind in ("eig", "eigh", "svd"):
            return self.cpu[op]
        if kind in ("torch", "torch16", "gemm"):
            if self.here:
                return _matmul(kind.replace("gemm", "torch"), *_shape(op), device="cuda")
            return self.peak["flops16" if kind == "torch16" else "flops"] * GPU_EFFICIENCY
        return self.peak["bandwidth"] * GPU_EFFICIENCY / BYTES_PER[kind]
