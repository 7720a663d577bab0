"""Benchmark the random-subspace null of saeuniv.subspaces against scoring draw by draw.

Usage: python benchmarks/bench_subspaces.py [--draws N] [--sizes 20,60,150]

For each subspace size m, one pool of matched pairs (decoder rows d_a = 576, d_b = 640,
the SmolLM2 / Gemma-3 widths) is scored with ``random_subspace_null`` (every draw read
off P x P matrices of the pool) and with the metric functions of ``saeuniv.metrics``
called on each draw (timed on a few draws and extrapolated; the output says so). The
largest difference between the two on the timed draws is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from saeuniv.core import metrics, subspaces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--sizes", default="20,60,150")
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--naive", type=int, default=20, help="draws timed one by one")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}")
    rng = np.random.default_rng(0)
    n, d_a, d_b = 2304, 576, 640
    A = rng.standard_normal((n, d_a)) / np.sqrt(d_a)
    B = A @ rng.standard_normal((d_a, d_b)) / np.sqrt(d_a) + rng.standard_normal((n, d_b)) / 20
    pool = rng.choice(n, args.pool, replace=False)
    print(f"pool {args.pool} pairs, {args.draws} draws each; naive timed on {args.naive} "
          "draws and extrapolated")
    print(f"{'m':>5} {'metric':>7} {'batched s':>10} {'naive s (extrap.)':>18} {'speed-up':>9} "
          f"{'max |diff|':>11}")
    for m in (int(x) for x in args.sizes.split(",")):
        for name, debiased in (("svcca", False), ("rsa", False), ("cka", False), ("cka", True)):
            t = time.perf_counter()
            kw = subspaces.metric_options(name, m, 0, debiased)
            r = subspaces.random_subspace_null(name, A, B, pool, pool, m, args.draws, 0, 0.0,
                                               **kw)
            batched = time.perf_counter() - t
            draws = np.random.default_rng([0, 1])
            picks = [draws.choice(pool.size, m, replace=False) for _ in range(args.naive)]
            t = time.perf_counter()
            direct = [getattr(metrics, name)(A[pool[p]], B[pool[p]], **kw) for p in picks]
            naive = (time.perf_counter() - t) / args.naive * args.draws
            diff = np.max(np.abs(r.null[:args.naive] - direct))
            label = "cka-deb" if name == "cka" and debiased else name
            print(f"{m:>5} {label:>7} {batched:>10.2f} {naive:>18.2f} {naive / batched:>8.1f}x "
                  f"{diff:>11.1e}", flush=True)


if __name__ == "__main__":
    main()
