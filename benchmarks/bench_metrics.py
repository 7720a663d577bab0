"""Benchmark saeuniv.metrics: fast permutation nulls against the naive loop, and RSA memory.

Usage: python benchmarks/bench_metrics.py [--quick] [--threads N]

The naive method recomputes the metric from scratch for every permutation; it
is timed on a few permutations and extrapolated to the full count (the output
says so). Every figure is printed as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import resource
import time
import tracemalloc

import numpy as np

from saeuniv.core import metrics

try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:  # optional: only used to report and set BLAS threads
    threadpool_info = threadpool_limits = None

FULL = {"n": 5000, "d_a": 512, "d_b": 768, "n_perm": 1000, "n_naive": 20, "rsa_n": 20_000}
QUICK = {"n": 600, "d_a": 64, "d_b": 96, "n_perm": 100, "n_naive": 5, "rsa_n": 2_000}


def paired_data(n, d_a, d_b, seed=0, shared=32, strength=0.5):
    """Random unit rows plus a planted shared component, so scores are non-trivial."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, shared))

    def side(d):
        x = rng.standard_normal((n, d)) / np.sqrt(d)
        x += strength * z @ rng.standard_normal((shared, d)) / np.sqrt(shared * d)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return side(d_a), side(d_b)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def blas_threads(threads):
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(threads) if threads else contextlib.nullcontext()


def describe_machine():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"cpu count: {os.cpu_count()} (usable {cpus}); load average {os.getloadavg()[0]:.2f}")
    print(f"python {platform.python_version()}, numpy {np.__version__}")
    if threadpool_info is None:
        print("BLAS threads: unknown (threadpoolctl not installed)")
    for pool in threadpool_info() if threadpool_info else []:
        print(f"{pool['user_api']}: {pool['internal_api']} {pool.get('version')}, "
              f"{pool['num_threads']} threads, {pool.get('architecture')}")


def naive_seconds(metric, A, B, cfg, **kwargs):
    """Time the from-scratch metric on cfg['n_naive'] permutations, extrapolate to n_perm."""
    rng = np.random.default_rng(0)
    perms = [rng.permutation(A.shape[0]) for _ in range(cfg["n_naive"])]
    _, seconds = timed(lambda: [metric(A, B[p], **kwargs) for p in perms])
    return seconds / len(perms) * cfg["n_perm"]


def bench_null(name, A, B, cfg, **kwargs):
    """Print and return (plain, fast null, naive null) seconds for one metric."""
    metric = getattr(metrics, name)
    _, plain = timed(metric, A, B, **kwargs)
    res, fast = timed(metrics.permutation_null, name, A, B, n_perm=cfg["n_perm"], seed=0, **kwargs)
    naive = naive_seconds(metric, A, B, cfg, **kwargs)
    print(f"\n[{name}] observed {res.observed:.4f}, null {res.null_mean:.4f} +- {res.null_sd:.4f}, "
          f"z {res.z:.1f}, p {res.p:.4f}")
    print(f"  one plain {name}: {plain:.2f} s")
    print(f"  fast null, {cfg['n_perm']} permutations: {fast:.2f} s = {fast / plain:.1f}x "
          "one plain")
    print(f"  naive null: {naive:.1f} s (timed {cfg['n_naive']} permutations, extrapolated "
          f"to {cfg['n_perm']}); fast is {naive / fast:.1f}x faster")
    return plain, fast, naive


def explain_svcca(A, B, cfg, plain, fast):
    """Judge the 3x target; if missed, show the matmul floor and a small-k run."""
    details = metrics.svcca_details(A, B)
    n, k_a, k_b = details.n, details.k_a, details.k_b
    flop = 2 * n * k_a * k_b
    qa, qb = np.ones((n, k_a), dtype=np.float32), np.ones((n, k_b), dtype=np.float32)
    _, gemm = timed(lambda: [qa.T @ qb for _ in range(3)])
    floor = cfg["n_perm"] * gemm / 3
    print(f"  target: null < 3x one plain SVCCA -> {'MET' if fast < 3 * plain else 'NOT MET'} "
          f"({fast / plain:.1f}x)")
    if fast < 3 * plain:
        return
    print(f"  why: 99% variance keeps k_a={k_a}, k_b={k_b} directions, so each permutation "
          f"needs Qa^T Qb[p], a {n}x{k_a}x{k_b} product ({flop / 1e9:.2f} GFLOP). At the "
          f"measured float32 matmul rate ({3 * flop / gemm / 1e9:.0f} GFLOP/s) "
          f"{cfg['n_perm']} such products alone take "
          f"{floor:.1f} s = {floor / plain:.1f}x one plain SVCCA, before any eigenvalues.")
    _, plain_k = timed(metrics.svcca, A, B, k=50)
    _, fast_k = timed(metrics.permutation_null, "svcca", A, B, n_perm=cfg["n_perm"], k=50)
    print(f"  with a fixed k=50 the per-permutation product is tiny: null {fast_k:.2f} s = "
          f"{fast_k / plain_k:.1f}x one plain svcca(k=50) ({plain_k:.2f} s) -> "
          f"{'MET' if fast_k < 3 * plain_k else 'NOT MET'}")


def current_rss():
    """Resident set size now, in bytes (Linux /proc; else 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def rsa_memory(cfg, threads):
    """Run in a fresh process: time one RSA and measure its peak memory."""
    with blas_threads(threads):
        A, B = paired_data(cfg["rsa_n"], cfg["d_a"], cfg["d_b"], seed=1)
        before = current_rss()
        tracemalloc.start()
        score, seconds = timed(metrics.rsa, A, B)
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return score, seconds, traced_peak, peak_rss - before


def bench_rsa_memory(cfg, threads):
    n = cfg["rsa_n"]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        score, seconds, traced, rss = pool.apply(rsa_memory, (cfg, threads))
    matrix = 4 * n * n
    print(f"\n[rsa, n={n:,}] score {score:.4f} in {seconds:.1f} s (fresh process)")
    print(f"  one n x n float32 matrix = {matrix / 2**30:.2f} GiB")
    for label, peak in (("traced allocations (tracemalloc)", traced), ("RSS above baseline", rss)):
        print(f"  peak {label}: {peak / 2**30:.2f} GiB = {peak / matrix:.2f} matrices")
    if n < 10_000:
        print("  (target judged at full size only: fixed block buffers dominate at small n)")
    else:
        verdict = "MET" if max(traced, rss) <= 2 * matrix else "NOT MET"
        print(f"  target: at most two n x n float32 matrices at once -> {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--threads", type=int, help="BLAS threads (default: the library's)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    with blas_threads(args.threads):
        describe_machine()
        print(f"mode: {'quick' if args.quick else 'full'}; {cfg}")
        A, B = paired_data(cfg["n"], cfg["d_a"], cfg["d_b"])
        plain, fast, _ = bench_null("svcca", A, B, cfg)
        explain_svcca(A, B, cfg, plain, fast)
        _, rsa_fast, _ = bench_null("rsa", A, B, cfg)
        print(f"  target: {cfg['n_perm']}-permutation RSA null < 60 s -> "
              f"{'MET' if rsa_fast < 60 else 'NOT MET'} ({rsa_fast:.1f} s)")
        bench_null("cka", A, B, cfg)
        bench_null("mutual_knn", A, B, cfg)
    bench_rsa_memory(cfg, args.threads)


if __name__ == "__main__":
    main()
