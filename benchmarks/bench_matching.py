"""Benchmark saeuniv.matching on SAE-like codes with a planted matching.

    python benchmarks/bench_matching.py [--quick] [--threads 1,2] [--repeats 3]

Prints the machine, exactness (streamed vs dense float64 on a feature subset,
planted-pair recovery), speed against the reference dense method at each thread count
(ours: median of --repeats warm calls; the dense method: z-scoring A timed the same way,
then at least 10% of B's columns in blocks of 100, each block timed after a warm-up
block, the median block scaled to all blocks, at most 10x), and peak RSS of the
streaming correlation and of blocked top-k (each in a fresh subprocess so that its peak
is its own).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp
import torch
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

from saeuniv.core.matching import correlation, match, topk_correlation

FULL = {"n_tokens": 50_000, "f": 16_384, "l0": 64, "f_big": 131_072, "chunk": 10_000, "subset": 512,
            "max_bytes": 256 * 2**20}
QUICK = {"n_tokens": 5_000, "f": 1_024, "l0": 32, "f_big": 8_192, "chunk": 1_000, "subset": 256,
             "max_bytes": 4 * 2**20}
THRESHOLD = 0.1
BLOCK = 100  # B columns per block of the dense reference method


# ---------------------------------------------------------------- data


def random_codes(rng, n_tokens, n_features, l0):
    """CSR codes: ~l0 active features per token, lognormal feature frequencies,
    exponential (nonnegative) magnitudes."""
    freq = rng.lognormal(0.0, 1.0, n_features)
    counts = rng.poisson(l0, n_tokens)
    rows = np.repeat(np.arange(n_tokens), counts)
    cols = rng.choice(n_features, size=rows.size, p=freq / freq.sum())
    vals = rng.exponential(1.0, rows.size).astype(np.float32)
    return sp.csr_array((vals, (rows, cols)), shape=(n_tokens, n_features))


def planted_pair(seed, n_tokens, f_a, f_b, l0, matched=0.9):
    """Codes of A and B where B feature j is a noisy copy of A feature truth[j].

    A fraction `matched` of B features copy distinct A features (10% of
    activations dropped, lognormal(0, 0.3) magnitude noise); every B feature
    also gets independent background activity topping B's L0 up to ~l0.
    truth[j] = -1 for B features with no partner.
    """
    rng = np.random.default_rng(seed)
    a = random_codes(rng, n_tokens, f_a, l0)
    truth = np.full(f_b, -1)
    m = int(matched * f_b)
    truth[rng.choice(f_b, m, replace=False)] = rng.choice(f_a, m, replace=False)
    dest = np.full(f_a, -1)
    dest[truth[truth >= 0]] = np.flatnonzero(truth >= 0)
    coo = a.tocoo()
    keep = (dest[coo.col] >= 0) & (rng.random(coo.nnz) > 0.1)
    noise = rng.lognormal(0.0, 0.3, keep.sum()).astype(np.float32)
    copies = sp.csr_array((coo.data[keep] * noise, (coo.row[keep], dest[coo.col[keep]])),
                          shape=(n_tokens, f_b))
    background = random_codes(rng, n_tokens, f_b, max(l0 - copies.nnz / n_tokens, 1.0))
    return a, (copies + background).tocsr(), truth


def chunks(x, size):
    return (x[i : i + size] for i in range(0, x.shape[0], size))


# ---------------------------------------------------------------- helpers


def versions():
    return (f"scipy {scipy.__version__}, torch {torch.__version__} "
            f"(default {torch.get_num_threads()} threads)")


def peak_rss_gb():
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it resets at exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def recovered(m, truth):
    """Fraction of planted B features matched to their true A feature."""
    planted = truth >= 0
    hit = np.zeros(len(truth), bool)
    hit[m.b] = m.a == truth[m.b]
    return hit[planted].mean()


def zscore_(x):
    """Reference z-scoring, in place: (x - mean) / (std + 1e-8) per column."""
    mean, std = x.mean(0), x.std(0)
    return x.sub_(mean).div_(std + 1e-8)


def block_counts(f):
    """(blocks of BLOCK columns in all of B's f columns, blocks the dense method is timed on:
    at least a tenth of them)."""
    n_blocks = -(-f // BLOCK)
    return n_blocks, -(-n_blocks // 10)


def dense_baseline(a, b, repeats):
    """Reference method: z-score A, then A_z^T B_z / N in float32 (torch) over blocks of
    BLOCK B columns, keeping max/argmax per column. Times z-scoring A (median of
    ``repeats`` warm calls) and the first ceil(10%) of blocks one by one after a warm-up
    block; returns (argmax of the timed columns, z-score seconds, median block seconds,
    blocks timed)."""
    n, f = b.shape
    z_a = median_time(lambda: zscore_(torch.from_numpy(a.toarray())), repeats)
    az = z_a.out
    b_csc = b.tocsc()
    _, timed_blocks = block_counts(f)

    def block(j):
        bz = zscore_(torch.from_numpy(b_csc[:, j:j + BLOCK].toarray()))
        return (az.T @ bz / n).max(0).indices.numpy()

    blocks = median_per_call(block, list(range(0, timed_blocks * BLOCK, BLOCK)))
    return np.concatenate(blocks.out), z_a.seconds, blocks.seconds, timed_blocks


# ---------------------------------------------------------------- memory children


def child(kind, cfg, n_threads):
    """Run one measurement in this (fresh) process and print a JSON line."""
    with threads(n_threads):
        if kind == "corr":
            a, b, _ = planted_pair(0, cfg["n_tokens"], cfg["f"], cfg["f"], cfg["l0"])
            before = peak_rss_gb()
            t = median_time(lambda: correlation(chunks(a, cfg["chunk"]), chunks(b, cfg["chunk"])),
                            1, warmup=False).seconds
            out = {"time": t, "peak": peak_rss_gb()}
        else:
            a, b, truth = planted_pair(1, cfg["n_tokens"], cfg["f_big"], cfg["f"], cfg["l0"])
            before = peak_rss_gb()
            run = median_time(lambda: topk_correlation(a, b, k=1, max_bytes=cfg["max_bytes"]),
                              1, warmup=False)
            top = run.out
            out = {"time": run.seconds, "peak": peak_rss_gb(), "l0_b": b.nnz / b.shape[0],
                   "recovered": float(recovered(match(top, "one_to_one", THRESHOLD), truth))}
            cols = np.sort(np.random.default_rng(2).choice(cfg["f"], 256, replace=False))
            best = np.nanargmax(np.nan_to_num(correlation(a, b[:, cols]), nan=-np.inf), axis=0)
            out["agree"] = float((top.b_partner[cols, 0] == best).mean())
    print(json.dumps(dict(out, before=before)))


def run_child(kind, cfg, quick, n_threads):
    cmd = [sys.executable, __file__, "--child", kind, "--threads", str(n_threads),
           "--features", str(cfg["f"]), "--tokens", str(cfg["n_tokens"])]
    cmd += ["--quick"] if quick else []
    return json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                     text=True).stdout.splitlines()[-1])


# ---------------------------------------------------------------- main


def exactness(a, b, truth, cfg):
    """Streamed vs dense float64 on a subset, planted recovery per policy, top-k agreement."""
    f = cfg["f"]
    print("\n== exactness (single calls; times here are not the speed figures) ==")
    corr = correlation(chunks(a, cfg["chunk"]), chunks(b, cfg["chunk"]))
    rng = np.random.default_rng(1)
    sa, sb = (np.sort(rng.choice(f, cfg["subset"], replace=False)) for _ in range(2))
    with np.errstate(invalid="ignore", divide="ignore"):
        xa, xb = a[:, sa].toarray().astype(np.float64), b[:, sb].toarray().astype(np.float64)
        ref = np.corrcoef(xa.T, xb.T)[: len(sa), len(sa):]
    sub = corr[np.ix_(sa, sb)]
    same_nan = np.array_equal(np.isnan(sub), np.isnan(ref))
    print(f"streamed ({a.shape[0] // cfg['chunk']} chunks of {cfg['chunk']:,} tokens, float32 "
          f"output) vs dense float64 np.corrcoef on a random {len(sa)} x {len(sb)} feature "
          f"subset: max |diff| = {np.nanmax(np.abs(sub - ref)):.2e} (target 1e-6), "
          f"NaN pattern equal: {same_nan}")
    for policy in ("max", "one_to_one", "mutual", "lan"):
        m = match(corr, policy, THRESHOLD)
        false = np.isin(m.b, np.flatnonzero(truth < 0)).sum()
        print(f"planted pairs recovered, {policy:>10} (corr > {THRESHOLD}): "
              f"{recovered(m, truth):.4f}; {m.n:,} pairs, {false} on unmatched B features")
    top = topk_correlation(a, b, k=1, max_bytes=cfg["max_bytes"])
    best = match(corr, "max", -1.0)
    agree = (top.b_partner[best.b, 0] == best.a).mean()
    print(f"topk_correlation(k=1, max_bytes={cfg['max_bytes'] / 2**20:.0f} MiB) best partner "
          f"of B agrees with the full matrix: {agree:.4f}")
    return best


def time_ours(a, b, cfg, repeats):
    """Seconds of the streaming correlation and of match(max) on its matrix, each the median
    of ``repeats`` warm calls (the F x F matrix is freed on return)."""
    corr = median_time(lambda: correlation(chunks(a, cfg["chunk"]), chunks(b, cfg["chunk"])),
                       repeats)
    return corr.seconds, median_time(lambda: match(corr.out, "max", -1.0), repeats).seconds


def speed(a, b, best, cfg, n_threads, repeats):
    """Ours (correlation + match) against the dense reference method at ``n_threads``."""
    n, f = a.shape[0], cfg["f"]
    print(f"\n== speed, {n_threads} thread(s) ==")
    n_blocks, timed_blocks = block_counts(f)
    print(method(n_threads, repeats, f"dense method: {timed_blocks} of {n_blocks} blocks "
                 f"of {BLOCK} B columns timed one by one after a warm-up block, median block x "
                 f"all blocks (extrapolated {n_blocks / timed_blocks:.1f}x)"))
    with threads(n_threads):
        t_corr, t_match = time_ours(a, b, cfg, repeats)
        ours = t_corr + t_match
        arg, t_a, t_block, done = dense_baseline(a, b, repeats)
    total = t_a + scale_up(t_block * done, done, n_blocks)
    cols = np.arange(done * BLOCK)
    live = np.isin(cols, best.b)
    agree = (arg[live] == best.a[np.searchsorted(best.b, cols[live])]).mean()
    print(f"ours: streaming correlation of the full {f:,} x {f:,} matrix {t_corr:.2f} s "
          f"({n / t_corr:,.0f} tokens/s) + match(max) {t_match:.2f} s = {ours:.2f} s")
    print(f"reference dense method (torch float32, z-score, A_z^T B_z / N in blocks of {BLOCK} "
          f"B columns, max/argmax): z-scoring A {t_a:.1f} s + {t_block:.2f} s per block x "
          f"{n_blocks} blocks ({done * BLOCK:,} of {f:,} columns timed, "
          f"{done * BLOCK / f:.1%}) = {total:.3g} s; its argmax agrees with ours on "
          f"{agree:.4f} of the timed columns")
    print(f"speed-up: {total / ours:.0f}x (target >= 20x)", flush=True)


def memory(cfg, quick, n_threads):
    n, f = cfg["n_tokens"], cfg["f"]
    print(f"\n== memory (peak RSS of a fresh process: interpreter, torch, codes and one cold "
          f"call; {n_threads} thread(s)) ==")
    r = run_child("corr", cfg, quick, n_threads)
    dense_gb = f * f * 8 / 2**30
    print(f"correlation {f:,} x {f:,} over {n:,} tokens: peak RSS {r['peak']:.2f} GiB "
          f"(before the call {r['before']:.2f} GiB; float64 accumulator alone {dense_gb:.2f} "
          f"GiB; target < 3 GB = 2.79 GiB), {r['time']:.1f} s")
    r = run_child("topk", cfg, quick, n_threads)
    full_gb = cfg["f_big"] * f * 4 / 2**30
    print(f"topk_correlation {cfg['f_big']:,} x {f:,}, k=1, max_bytes = "
          f"{cfg['max_bytes'] / 2**20:.0f} MiB, over all {n:,} tokens (B L0 {r['l0_b']:.1f}): "
          f"peak RSS {r['peak']:.2f} GiB (before the call {r['before']:.2f} GiB) vs "
          f"{full_gb:.1f} GiB for the full matrix even in float32; {r['time']:.1f} s")
    print(f"  exact: best A partner of 256 random B features equals the argmax of "
          f"correlation() on those columns for {r['agree']:.4f}; planted pairs recovered "
          f"(one_to_one) {r['recovered']:.4f} (low by construction: copies of A "
          f"features are only ~{cfg['l0'] * 0.81 * f / cfg['f_big']:.0f} of B's L0, the rest "
          f"is background)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--features", type=int, help="F per side (top-k's A side: 8 F)")
    p.add_argument("--tokens", type=int, help="tokens (a multiple of the chunk size)")
    p.add_argument("--child", choices=["corr", "topk"], help=argparse.SUPPRESS)
    add_arguments(p)
    args = p.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({"f": args.features, "f_big": 8 * args.features} if args.features else {})
    cfg.update({"n_tokens": args.tokens} if args.tokens else {})
    if args.child:
        return child(args.child, cfg, args.threads[0])
    n, f = cfg["n_tokens"], cfg["f"]
    start(f"{'quick' if args.quick else 'full'} {cfg}; {versions()}")
    a, b, truth = planted_pair(0, n, f, f, cfg["l0"])
    print(f"data: {n:,} tokens, F_a = F_b = {f:,}, L0 A {a.nnz / n:.1f}, B {b.nnz / n:.1f}, "
          f"{(truth >= 0).sum():,} planted pairs, {(truth < 0).sum():,} unmatched B features")
    best = exactness(a, b, truth, cfg)
    for n_threads in args.threads:
        speed(a, b, best, cfg, n_threads, args.repeats)
    if not args.no_memory:
        memory(cfg, args.quick, args.threads[0])
    end()


if __name__ == "__main__":
    main()
