#!/usr/bin/env bash
# One prepared GPU run: the GPU-marked tests, the kernel micro-benchmarks, the decode benchmarks and the P-Tuning
# training step of the full model.
# Usage: bash scripts/gpu_check.sh [OUTDIR]   (writes gpu_tests.log, bench.jsonl, bench_train.jsonl; default ./out)
set -uo pipefail
out=${1:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -5
{
  timeout 120 python scripts/bench_kernels.py
  timeout 300 python scripts/bench.py --device cuda --compile --modes fp16,int8,int4 --prompt 512 --new 256 \
    --memory-context 2048
  timeout 120 python scripts/bench.py --device cuda --compile --modes int4 --batch 4 --prompt 512 --new 128 --no-naive
} 2>&1 | tee "$out/bench.jsonl"
# Tensor parallelism over NCCL with the one GPU there is (N = 1: the whole code path, one rank); the GPU-marked tests
# above include tests/parallel/test_tensor_parallel_gpu.py.
timeout 240 python scripts/bench.py --device cuda --tensor-parallel 1 --modes fp16 --layers 4 --prompt 512 --new 128 \
  2>&1 | tee "$out/bench_parallel.jsonl"
# Serving: 32 concurrent streaming clients against glm-serve vs the same requests one at a time (full model).
{
  timeout 300 python scripts/bench_serve.py --device cuda --dtype float16 --clients 32 --requests 32 --new 128
  timeout 300 python scripts/bench_serve.py --device cuda --dtype float16 --quant 4 --clients 32 --requests 32 \
    --new 128
} 2>&1 | tee "$out/bench_serve.jsonl"
# P-Tuning v2 training of the full model, the official shape (batch 1, source 64, target 64, pre_seq_len 128); goal:
# INT4 in <= 7 GB (peak_reserved_gb), fp16 the reference point.
timeout 300 python scripts/bench_train.py --device cuda --modes fp16,int8,int4 --steps 5 2>&1 | tee "$out/bench_train.jsonl"
