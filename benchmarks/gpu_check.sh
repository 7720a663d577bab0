#!/usr/bin/env bash
# Every GPU measurement of the device path in one go, for a machine with one GPU:
#   bash benchmarks/gpu_check.sh            (about 8 minutes on an H100)
# 1. matching at 16,384 x 16,384 features over 100,000 tokens: numpy vs torch on the GPU,
#    with the largest difference from the numpy path (target: 1e-6);
# 2. the SVCCA, CKA and RSA nulls at n = 5,000 against their floors, numpy vs the GPU;
# 3. forward throughput of the Qwen2.5-Coder 0.5B and 1.5B architectures in bfloat16
#    (fresh weights: no download), against the plan's estimate;
# 4. the device tests of the core on "cuda" as well as "cpu".
# Each figure is printed with the machine and its load; nothing is written outside /tmp.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
python -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; \
print('GPU:', torch.cuda.get_device_name(0))"
timeout 300 python bench_matching_device.py --tokens 100000 --features 16384 --repeats 1
timeout 240 python bench_nulls.py --draws 1000 --rsa-draws 100 --repeats 1 --threads 16
timeout 120 python bench_forward.py --device cuda --dtype bfloat16 --batch 32
cd .. && SAEUNIV_TEST_DEVICE=cuda timeout 120 python -m pytest -q tests/core/test_matching_device.py \
    tests/core/test_nulls_device.py
