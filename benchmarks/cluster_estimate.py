"""What the Gemma-2-2B x 9B full grid costs on a cluster: tasks, CPU and GPU hours, disk.

    python benchmarks/cluster_estimate.py [--tokens 100000] [--pairs 2048] [--perm 1000]

Measures one layer pair's cell work on this machine (matching: streamed correlation of two
16,384-feature SAEs' codes over --tokens tokens, L0 64, then the max policy; similarity:
every default metric with its permutation null on --pairs paired decoder rows of widths
2,304 and 3,584, timed at 10 and 40 permutations and extended linearly to --perm), and
prints it next to the grid's counts from the config
``configs/gemma-2-2b-vs-9b.yaml`` with ``pairs: all``. The extraction figures are
arithmetic (forward-pass FLOPs and stored bytes), not measurements: no GPU here.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
from bench_matching import chunks, random_codes
from timing import end, start

from saeuniv.config import load_config
from saeuniv.core.matching import correlation, match
from saeuniv.core.metrics import METRICS, permutation_null

LAYERS = {"a": 26, "b": 42}  # Gemma-2-2B and Gemma-2-9B residual layers
D_MODEL = {"a": 2304, "b": 3584}
PARAMS = {"a": 2.6e9, "b": 9.2e9}
F = 16_384  # Gemma Scope width compared
CODES_BYTES_PER_TOKEN = 100 * 8  # ~100 active features x (float32 value + int32 index)
FIT = (10, 40)  # permutations of the two timed runs of each null
HF_CACHE_GB = 5.2 + 18.5 + 26 * 0.30 + 42 * 0.47  # weights bf16, SAEs (README, scale)


def time_matching(n_tokens: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    a, b = random_codes(rng, n_tokens, F, 64), random_codes(rng, n_tokens, F, 64)
    t0 = time.perf_counter()
    corr = correlation(chunks(a, 10_000), chunks(b, 10_000))
    match(corr, "max", 0.1)
    return time.perf_counter() - t0


def time_similarity(n_pairs: int, n_perm: int, sim, seed: int = 0) -> dict[str, float]:
    """Seconds of each metric with its null of ``n_perm`` permutations, from two timed
    runs (``FIT`` permutations) and the straight line through them: a fixed part (the
    observed score, the decompositions) plus a cost per permutation."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n_pairs, D_MODEL["a"]))
    B = 0.5 * A @ rng.standard_normal((D_MODEL["a"], D_MODEL["b"])) / 48 \
        + rng.standard_normal((n_pairs, D_MODEL["b"]))
    out = {}
    for name in sim.metrics:
        kwargs = METRICS[name].kwargs(variance=sim.variance)
        times = []
        for n in FIT:
            t0 = time.perf_counter()
            permutation_null(name, A, B, n_perm=n, seed=sim.seed, alpha=sim.alpha,
                             s_max=sim.s_max, **kwargs)
            times.append(time.perf_counter() - t0)
        per_perm = max(times[1] - times[0], 0.0) / (FIT[1] - FIT[0])
        out[name] = times[0] + per_perm * (n_perm - FIT[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000, help="compared tokens")
    p.add_argument("--pairs", type=int, default=2048, help="matched pairs per layer pair")
    p.add_argument("--perm", type=int, default=1000, help="permutations per null")
    args = p.parse_args()
    start(f"{args.tokens:,} tokens, {args.pairs:,} pairs, {args.perm} permutations")
    config = Path(__file__).resolve().parents[1] / "configs" / "gemma-2-2b-vs-9b.yaml"
    cfg = load_config(str(config), {"pairs": "all"})
    per_pass = cfg.extract.layers_per_pass
    blocks = {s: math.ceil(n / per_pass) for s, n in LAYERS.items()}
    cells = LAYERS["a"] * LAYERS["b"]
    print(f"grid: {LAYERS['a']} x {LAYERS['b']} = {cells:,} layer pairs; tasks: "
          f"{blocks['a']} + {blocks['b']} extraction blocks ({per_pass} layers per pass), "
          f"then {cells:,} cell tasks (match + similarity + subspaces, one per layer pair)")

    t_match = time_matching(args.tokens)
    t_sim = time_similarity(args.pairs, args.perm, cfg.similarity)
    t_cell = t_match + sum(t_sim.values())
    print(f"\none layer pair on this machine (one process, BLAS on every core): matching "
          f"{t_match:.1f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in t_sim.items())
          + f" ({args.perm} permutations, {args.pairs:,} pairs; timed at {FIT[0]} and {FIT[1]}"
          f" permutations, extended linearly); cell {t_cell:.1f} s")
    print(f"cells: {cells:,} x {t_cell:.1f} s = {cells * t_cell / 3600:.1f} CPU-task hours "
          f"(concept subspaces not included); at 64 array tasks at once "
          f"{cells * t_cell / 64 / 3600:.2f} h wall")

    fwd = {s: 2 * PARAMS[s] * args.tokens for s in LAYERS}
    enc = {s: LAYERS[s] * 2 * 2 * args.tokens * D_MODEL[s] * F for s in LAYERS}
    flops = sum(fwd.values()) + sum(enc.values())
    print(f"\nextraction (arithmetic): forward passes {sum(fwd.values()):.2e} FLOP + SAE "
          f"encoders {sum(enc.values()):.2e} FLOP = {flops:.2e} FLOP: "
          f"{flops / 200e12 / 60:.1f} min at 200 TFLOP/s sustained bf16 on one H100, so "
          "model and SAE loading (tens of GB from the Hugging Face cache) dominates; "
          f"{blocks['a'] + blocks['b']} block tasks of 1 GPU each: about 0.5 GPU-hours "
          "with loading")
    codes_gb = (LAYERS["a"] + LAYERS["b"]) * args.tokens * CODES_BYTES_PER_TOKEN / 1e9
    print(f"disk: codes {LAYERS['a'] + LAYERS['b']} layers x {args.tokens:,} tokens x "
          f"~{CODES_BYTES_PER_TOKEN} B = {codes_gb:.1f} GB; Hugging Face cache "
          f"{HF_CACHE_GB:.0f} GB; per layer pair pairs + scores + nulls: well under 1 MB")
    end()


if __name__ == "__main__":
    main()
