"""Benchmark the random-subspace null of saeuniv.subspaces against scoring draw by draw.

Usage: python benchmarks/bench_subspaces.py [--draws N] [--sizes 20,60,150] [--threads 1,2]

For each subspace size m, one pool of matched pairs (decoder rows d_a = 576, d_b = 640,
the SmolLM2 / Gemma-3 widths) is scored with ``random_subspace_null`` (every draw read
off P x P matrices of the pool; median of --repeats warm calls) and with the metric
functions of ``saeuniv.metrics`` called on each draw (draws / 10 draws timed one by one
after a warm-up, their median scaled to all draws: 10x). Both run at the same thread
count. The largest difference between the two on the timed draws is printed too.
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import (
    add_arguments,
    end,
    median_per_call,
    median_time,
    method,
    scale_up,
    start,
    threads,
)

from saeuniv.core import metrics, subspaces

METRICS = (("svcca", False), ("rsa", False), ("cka", False), ("cka", True))


def one_size(A, B, pool, m, args):
    """Print one line per metric for subspaces of size ``m``."""
    n_naive = -(-args.draws // 10)
    for name, debiased in METRICS:
        kw = subspaces.metric_options(name, m, 0, debiased)
        batched = median_time(lambda name=name, kw=kw: subspaces.random_subspace_null(
            name, A, B, pool, pool, m, args.draws, 0, 0.0, **kw), args.repeats)
        draws = np.random.default_rng([0, 1])
        picks = [draws.choice(pool.size, m, replace=False) for _ in range(n_naive)]
        metric = getattr(metrics, name)
        direct = median_per_call(lambda p, metric=metric, kw=kw: metric(A[pool[p]], B[pool[p]],
                                                                        **kw), picks)
        naive = scale_up(direct.seconds * n_naive, n_naive, args.draws)
        diff = np.max(np.abs(batched.out.null[:n_naive] - direct.out))
        label = "cka-deb" if name == "cka" and debiased else name
        print(f"{m:>5} {label:>7} {batched.seconds:>10.3f} {naive:>18.3f} "
              f"{naive / batched.seconds:>8.1f}x {diff:>11.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--sizes", default="20,60,150")
    ap.add_argument("--pool", type=int, default=1000)
    add_arguments(ap)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d_a, d_b = 2304, 576, 640
    A = rng.standard_normal((n, d_a)) / np.sqrt(d_a)
    B = A @ rng.standard_normal((d_a, d_b)) / np.sqrt(d_a) + rng.standard_normal((n, d_b)) / 20
    pool = rng.choice(n, args.pool, replace=False)
    start(f"pool {args.pool} pairs, {args.draws} draws each, sizes {args.sizes}")
    n_naive = -(-args.draws // 10)
    for n_threads in args.threads:
        print(f"\n=== {n_threads} thread(s) ===")
        print(method(n_threads, args.repeats, f"draw by draw: {n_naive} draws timed one by one, "
                     f"median x {args.draws} (extrapolated {args.draws / n_naive:.0f}x)"))
        print(f"{'m':>5} {'metric':>7} {'batched s':>10} {'naive s (extrap.)':>18} "
              f"{'speed-up':>9} {'max |diff|':>11}")
        with threads(n_threads):
            for m in (int(x) for x in args.sizes.split(",")):
                one_size(A, B, pool, m, args)
    end()


if __name__ == "__main__":
    main()
