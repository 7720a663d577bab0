"""Benchmark the device path of saeuniv.matching against its numpy path on planted codes.

    python benchmarks/bench_matching_device.py [--quick] [--features F] [--tokens N]
        [--threads 2] [--repeats 3] [--no-topk]

Prints the machine, then for each thread count: the full correlation matrix and the top-1
partners (topk_correlation within max_bytes) timed on the numpy path (device=None), the
torch path on "cpu" and, when a GPU is visible, on "cuda"; each side is the median of
--repeats calls after one untimed warm-up, sides interleaved so that they share the load.
Each torch side's maximum |difference| of correlations from the numpy path, and the share
of top-1 partners equal to the numpy path's, are printed with it.
"""

import argparse

import numpy as np
import torch
from bench_matching import chunks, planted_pair, versions
from timing import add_arguments, end, interleaved, method, start, threads

from saeuniv.core.matching import correlation, topk_correlation

FULL = {"n_tokens": 100_000, "f": 16_384, "l0": 64, "chunk": 10_000, "max_bytes": 256 * 2**20}
QUICK = {"n_tokens": 5_000, "f": 1_024, "l0": 32, "chunk": 1_000, "max_bytes": 4 * 2**20}


def devices():
    """The sides timed: numpy, torch on the CPU, and torch on the GPU when one is visible."""
    return [None, "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def name(device):
    return "numpy" if device is None else f"torch {device}"


def time_sides(make_call, n_threads, repeats):
    with threads(n_threads):
        return interleaved({name(d): make_call(d) for d in devices()}, repeats)


def report_corr(a, b, cfg, n_threads, repeats):
    def call(device):
        return lambda: correlation(chunks(a, cfg["chunk"]), chunks(b, cfg["chunk"]),
                                   device=device)

    timed = time_sides(call, n_threads, repeats)
    ref = timed["numpy"]
    print(f"correlation {cfg['f']:,} x {cfg['f']:,} over {a.shape[0]:,} tokens in chunks of "
          f"{cfg['chunk']:,}: numpy {ref.seconds:.2f} s")
    for side, t in timed.items():
        if side == "numpy":
            continue
        same_nan = np.array_equal(np.isnan(t.out), np.isnan(ref.out))
        diff = np.nanmax(np.abs(t.out.astype(np.float64) - ref.out))
        print(f"  {side}: {t.seconds:.2f} s (numpy / {side} = {ref.seconds / t.seconds:.2f}x); "
              f"max |diff| vs numpy {diff:.2e} (target 1e-6), NaN pattern equal: {same_nan}")
    return timed


def report_topk(a, b, cfg, n_threads, repeats):
    def call(device):
        return lambda: topk_correlation(a, b, k=1, max_bytes=cfg["max_bytes"], device=device)

    timed = time_sides(call, n_threads, repeats)
    ref = timed["numpy"].out
    print(f"topk_correlation k=1, max_bytes {cfg['max_bytes'] / 2**20:.0f} MiB: numpy "
          f"{timed['numpy'].seconds:.2f} s")
    for side, t in timed.items():
        if side == "numpy":
            continue
        agree = np.mean([(t.out.a_partner == ref.a_partner).mean(),
                         (t.out.b_partner == ref.b_partner).mean()])
        diff = np.nanmax(np.abs(t.out.a_corr.astype(np.float64) - ref.a_corr))
        print(f"  {side}: {t.seconds:.2f} s (numpy / {side} = "
              f"{timed['numpy'].seconds / t.seconds:.2f}x); top-1 partners equal to numpy's "
              f"{agree:.4f} of A and B features, max |diff| of their correlations {diff:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    p.add_argument("--features", type=int, help="F per side")
    p.add_argument("--tokens", type=int, help="tokens")
    p.add_argument("--no-topk", action="store_true", help="time the full correlation only")
    add_arguments(p)
    args = p.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({"f": args.features} if args.features else {})
    cfg.update({"n_tokens": args.tokens} if args.tokens else {})
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    start(f"{'quick' if args.quick else 'full'} {cfg}; {versions()}; GPU: {gpu}")
    n, f = cfg["n_tokens"], cfg["f"]
    a, b, _ = planted_pair(0, n, f, f, cfg["l0"])
    print(f"data: {n:,} tokens, F_a = F_b = {f:,}, L0 A {a.nnz / n:.1f}, B {b.nnz / n:.1f}")
    for n_threads in args.threads:
        print(f"\n== {n_threads} thread(s) ==")
        print(method(n_threads, args.repeats, "sides interleaved; torch on cuda returns numpy, "
                     "so each call's time includes the copies back to the host"))
        report_corr(a, b, cfg, n_threads, args.repeats)
        if not args.no_topk:
            report_topk(a, b, cfg, n_threads, args.repeats)
    end()


if __name__ == "__main__":
    main()
