"""Forward throughput of the Qwen2.5-Coder 0.5B and 1.5B architectures, for extraction on a
GPU, with no download: the architecture is built from its config values (those of the GGUF
files the Qwen config reads), with freshly initialised weights, which cost the same.

    python benchmarks/bench_forward.py [--device cuda] [--dtype bfloat16] [--batch 32]

For each model: tokens/s of the base model (no LM head, as extraction runs it) on random
token ids, batch x 128 positions, stopped after the deepest layer the Qwen config extracts
(19 of 24, 22 of 28), one warm-up call then the median of --repeats timed calls; beside it,
the plan's estimate (``saeuniv.costs``: FLOPs at the calibrated or datasheet rate) and the
ratio plan / measured. On a CPU, use --dtype float32 and a small --batch.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import end, start

from saeuniv import costs, rates
from saeuniv.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# config.json of each model: layers, width, MLP width, heads, key-value heads
ARCH = {"a": (24, 896, 4864, 14, 2), "b": (28, 1536, 8960, 12, 2)}
CONTEXT = 128


def build(side: str, deepest: int, dtype):
    from transformers import AutoModel, Qwen2Config

    n_layers, d, d_mlp, heads, kv = ARCH[side]
    config = Qwen2Config(vocab_size=151_936, hidden_size=d, intermediate_size=d_mlp,
                         num_hidden_layers=deepest + 1, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    return AutoModel.from_config(config, dtype=dtype).eval()


def tokens_per_s(model, batch: int, device: str, repeats: int) -> float:
    ids = torch.randint(0, 151_936, (batch, CONTEXT), device=device)

    def call():
        with torch.inference_mode():
            model(input_ids=ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return batch * CONTEXT / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu", default="H100", choices=sorted(rates.GPU_CLASSES),
                   help="GPU class of the plan's estimate on a GPU")
    args = p.parse_args()
    start(f"Qwen2.5-Coder architectures, fresh weights, {args.dtype} on {args.device}, "
          f"batch {args.batch} x {CONTEXT}")
    cfg = load_config(ROOT / "configs/qwen2.5-coder-0.5b-vs-1.5b.yaml",
                      {"extract.batch_size": args.batch, "extract.context": CONTEXT,
                       "model_a.dtype": args.dtype, "model_b.dtype": args.dtype})
    planner = costs.Planner(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = rates.CPURates(Path(tmp) / "calibration.json")
        rate = cpu if args.device == "cpu" else rates.GPURates(args.gpu, cpu)
        how = "this CPU, calibrated now" if args.device == "cpu" else rate.how
        for side in "ab":
            deepest = max(planner.used[side])
            model = build(side, deepest, getattr(torch, args.dtype)).to(args.device)
            measured = tokens_per_s(model, args.batch, args.device, args.repeats)
            planned = args.batch * CONTEXT / planner.forward(side, args.batch * CONTEXT) \
                .seconds(rate)
            name = getattr(cfg, f"model_{side}").name
            print(f"{name}: {measured:,.0f} tokens/s measured (layers 0..{deepest}), plan "
                  f"{planned:,.0f} tokens/s ({how}); plan / measured = "
                  f"{planned / measured:.2f}")
            del model
    end()


if __name__ == "__main__":
    main()
