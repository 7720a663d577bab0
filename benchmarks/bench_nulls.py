"""Benchmark the permutation nulls against their floors, on numpy, torch cpu and (when
present) a GPU.

Usage: python benchmarks/bench_nulls.py [--quick] [--draws N] [--rsa-draws N]
       [--threads 2] [--repeats 3] [--steps]

The SVCCA null at n = 5,000 with k_a = 500, k_b = 745 needs one 5,000 x 500 x 745 product
per draw, so N draws cannot cost less than N such float32 products: that is its floor,
timed alone in the same run (N products of the null's float32 bases, one after another).
The CKA null at n = 5,000, d_a = 512, d_b = 768 has the same floor with its own widths. The
RSA null's floor is one float32 dot of the two n x n centred-rank matrices per draw (every
draw must read both; the null also gathers B's permuted entries). Each null is timed on the
numpy path (device=None), then on torch "cpu" and "cuda" where present, each against its own
library's floor, and printed as null / floor. Both sides of a ratio are timed in turns within
one threads(n) block, each after an untimed warm-up of a few draws, as the median of
--repeats rounds. With --steps the SVCCA draw is split into its steps (gather, product,
float64 Gram, eigvalsh), each timed alone on one batch and printed per draw as a fraction of
the product. Every null's time includes the work it does once (one plain score's bases or
ranks); that share is timed beside it and taken off in a second ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from timing import add_arguments, end, loadavg, method, start, threads

from saeuniv.core import metrics

FULL = {"n": 5000, "k_a": 500, "k_b": 745, "d_a": 512, "d_b": 768, "draws": 1000,
        "rsa_draws": 100}
QUICK = {**FULL, "draws": 50, "rsa_draws": 10}
WARM_DRAWS = 3


def devices():
    """torch devices to time beside numpy: cpu, and cuda when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def paired_data(n, d_a, d_b, seed=0, shared=32, strength=0.5):
    """Random rows plus a planted shared component, so scores are non-trivial."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, shared))

    def side(d):
        return (rng.standard_normal((n, d)) / np.sqrt(d)
                + strength * z @ rng.standard_normal((shared, d)) / np.sqrt(shared * d))

    return side(d_a), side(d_b)


def rounds(fns, repeats):
    """Warm each ``fns[name](WARM_DRAWS)`` untimed, then ``repeats`` rounds of the full calls
    ``fns[name](None)`` in turn; the median seconds and the last output per name."""
    for fn in fns.values():
        fn(WARM_DRAWS)
    times = {name: [] for name in fns}
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn(None)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def product_floor(left, right, draws, device):
    """``fn(k)``: k (default ``draws``) float32 products left.T @ right, one at a time."""
    if device is None:
        lt, r = np.ascontiguousarray(left.T, dtype=np.float32), right.astype(np.float32)
    else:
        lt = torch.as_tensor(left.T.astype(np.float32), device=device).contiguous()
        r = torch.as_tensor(right.astype(np.float32), device=device)

    def fn(k):
        for _ in range(k or draws):
            lt @ r
        sync(device)

    return fn


def null_fn(name, A, B, draws, device, **kwargs):
    def fn(k):
        return metrics.permutation_null(name, A, B, n_perm=k or draws, seed=0, device=device,
                                        **kwargs)

    return fn


def report(title, draws, t, outs, floor_of):
    print(f"\n[{title}] {draws} draws", flush=True)
    ref = outs["null numpy"].null
    for side, floor in floor_of.items():
        null_t = t[f"null {side}"]
        diff = np.abs(outs[f"null {side}"].null - ref).max()
        print(f"  {side}: null {null_t:.2f} s, floor {t[floor]:.2f} s -> null / floor = "
              f"{null_t / t[floor]:.2f}x; max |null - numpy null| = {diff:.1e}", flush=True)
    if "plain" in t:
        once = {"svcca": "the SVD bases", "cka": "the centred sides", "rsa": "the ranks"}
        metric = title.split(",")[0]
        print(f"  every null's time includes what one plain {metric} computes once "
              f"({t['plain']:.2f} s: {once[metric]}); beyond that:")
        for side, floor in floor_of.items():
            extra = t[f"null {side}"] - t["plain"]
            print(f"    {side}: (null - plain) / floor = {extra / t[floor]:.2f}x")
    if "cuda" in floor_of:
        print(f"  cuda vs torch cpu: null {t['null cpu'] / t['null cuda']:.1f}x faster, "
              f"floor {t['floor cpu'] / t['floor cuda']:.1f}x faster")


def bench_products_metric(name, A, B, left, right, draws, repeats, **kwargs):
    """A null whose floor is ``draws`` products left.T @ right, on numpy and each device."""
    fns = {"floor numpy": product_floor(left, right, draws, None),
           "null numpy": null_fn(name, A, B, draws, None, **kwargs)}
    for dev in devices():
        fns[f"floor {dev}"] = product_floor(left, right, draws, dev)
        fns[f"null {dev}"] = null_fn(name, A, B, draws, dev, **kwargs)
    fns["plain"] = lambda k: getattr(metrics, name)(A, B, **kwargs)
    t, outs = rounds(fns, repeats)
    floor_of = {"numpy": "floor numpy", **{dev: f"floor {dev}" for dev in devices()}}
    return t, outs, floor_of


def svcca_bases(A, B):
    """The null's orthonormal bases (as svcca_null finds them at variance=1)."""
    def basis(X):
        u, s, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
        return u[:, s > s[0] * max(X.shape) * np.finfo(float).eps]

    return basis(A), basis(B)


def svcca_steps(qa, qb, repeats):
    """Per-draw seconds of each numpy step, on one batch as permuted_products forms it."""
    left, right = qa.astype(np.float32), qb.astype(np.float32)
    n, d = right.shape
    rng = np.random.default_rng(0)
    k = max(1, metrics.nulls.BLOCK_BYTES // (4 * n * d))
    idx = np.stack([rng.permutation(n) for _ in range(k)], axis=1)
    gathered = right[idx].reshape(n, -1)
    stack = (left.T @ gathered).reshape(left.shape[1], k, d).swapaxes(0, 1)
    m = stack.astype(np.float64)
    gram = m @ m.swapaxes(-1, -2)
    steps = {"gather B[p]": lambda: right[idx].reshape(n, -1),
             "product Qa^T B[p] (batched)": lambda: left.T @ gathered,
             "float64 Gram": lambda: stack.astype(np.float64) @ m.swapaxes(-1, -2),
             "eigvalsh": lambda: np.linalg.eigvalsh(gram)}
    out = {}
    for label, fn in steps.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times) / k
    return out


def bench_svcca(cfg, repeats, steps):
    A, B = paired_data(cfg["n"], cfg["k_a"], cfg["k_b"])
    qa, qb = svcca_bases(A, B)
    d = metrics.svcca_details(A, B, variance=1.0)
    assert (d.k_a, d.k_b) == (qa.shape[1], qb.shape[1]) == (cfg["k_a"], cfg["k_b"])
    t, outs, floor_of = bench_products_metric("svcca", A, B, qa, qb, cfg["draws"], repeats,
                                              variance=1.0)
    report(f"svcca, n={cfg['n']}, k_a={d.k_a}, k_b={d.k_b}; floor: {cfg['draws']} float32 "
           f"{cfg['n']}x{d.k_a}x{d.k_b} products", cfg["draws"], t, outs, floor_of)
    ratio = t["null numpy"] / t["floor numpy"]
    print(f"  target: numpy null within 1.3x of its floor -> "
          f"{'MET' if ratio <= 1.3 else 'NOT MET'} ({ratio:.2f}x)")
    if steps:
        per = svcca_steps(qa, qb, repeats)
        product = per["product Qa^T B[p] (batched)"]
        print("  numpy steps per draw (one batch, timed alone):")
        for label, sec in per.items():
            print(f"    {label}: {sec * 1e3:.1f} ms = {sec / product:.2f}x the product")
        print(f"    sum {sum(per.values()) * 1e3:.1f} ms = "
              f"{sum(per.values()) / product:.2f}x the product", flush=True)


def bench_cka(cfg, repeats):
    A, B = paired_data(cfg["n"], cfg["d_a"], cfg["d_b"], seed=1)
    t, outs, floor_of = bench_products_metric("cka", A, B, A, B, cfg["draws"], repeats)
    report(f"cka, n={cfg['n']}, d_a={cfg['d_a']}, d_b={cfg['d_b']}; floor: {cfg['draws']} "
           f"float32 {cfg['n']}x{cfg['d_a']}x{cfg['d_b']} products", cfg["draws"], t, outs,
           floor_of)


def rsa_floor(A, B, draws, device):
    """``fn(k)``: k float32 dots of two n x n matrices, the size of the null's rank matrices."""
    n = A.shape[0]
    rng = np.random.default_rng(2)
    xa = rng.standard_normal((n, n), dtype=np.float32)
    xb = rng.standard_normal((n, n), dtype=np.float32)
    if device is not None:
        xa, xb = torch.as_tensor(xa, device=device), torch.as_tensor(xb, device=device)

    def fn(k):
        for _ in range(k or draws):
            if device is None:
                np.dot(xa.ravel(), xb.ravel())
            else:
                torch.dot(xa.ravel(), xb.ravel())
        sync(device)

    return fn


def bench_rsa(cfg, repeats):
    A, B = paired_data(cfg["n"], cfg["d_a"], cfg["d_b"], seed=2)
    draws = cfg["rsa_draws"]
    fns = {"floor numpy": rsa_floor(A, B, draws, None),
           "null numpy": null_fn("rsa", A, B, draws, None)}
    for dev in devices():
        fns[f"floor {dev}"] = rsa_floor(A, B, draws, dev)
        fns[f"null {dev}"] = null_fn("rsa", A, B, draws, dev)
    fns["plain"] = lambda k: metrics.rsa(A, B)
    t, outs = rounds(fns, repeats)
    report(f"rsa, n={cfg['n']}; floor: {draws} float32 dots of two n x n matrices", draws, t,
           outs, {"numpy": "floor numpy", **{dev: f"floor {dev}" for dev in devices()}})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws, same sizes")
    parser.add_argument("--draws", type=int, help="SVCCA and CKA draws (default 1000, 50 quick)")
    parser.add_argument("--rsa-draws", type=int, help="RSA draws (default 100, 10 quick)")
    parser.add_argument("--steps", action="store_true", help="split the SVCCA draw into steps")
    parser.add_argument("--metrics", default="svcca,cka,rsa")
    add_arguments(parser, repeats=3)
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("draws", args.draws), ("rsa_draws", args.rsa_draws))
                if v is not None})
    label = "quick" if args.quick else "full" if cfg == FULL else "custom"
    start(f"{label}: {cfg}; torch {torch.__version__}, devices "
          f"numpy + torch {devices()}")
    for n_threads in args.threads:
        with threads(n_threads):
            print(f"\n== {n_threads} thread(s); load average {loadavg()}")
            print(method(n_threads, args.repeats, f"warm-up: {WARM_DRAWS} draws of each side"))
            for name in args.metrics.split(","):
                {"svcca": lambda: bench_svcca(cfg, args.repeats, args.steps),
                 "cka": lambda: bench_cka(cfg, args.repeats),
                 "rsa": lambda: bench_rsa(cfg, args.repeats)}[name]()
    end()


if __name__ == "__main__":
    main()
