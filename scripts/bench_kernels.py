"""Decode-kernel benchmark: the fused INT8/INT4 GEMV against the fp16 matmul on ChatGLM-6B's linear shapes, M = 1.

    python scripts/bench_kernels.py [--iters 200] [--dtype float16]

Prints JSON lines: the device-to-device copy bandwidth measured in the same run, then one row per (shape, kernel)
with the time, the bytes moved (weights + scales + x + y), the bandwidth that makes, its fraction of the copy
bandwidth, and the speed-up over ``x @ W.T`` in fp16 (``--dtype bfloat16``: in bf16).

Timing: every call runs after a 1 GiB memset that evicts the weights from L2 (as a decode step does, streaming
28 layers of weights) and that keeps the GPU busy while Python launches the next call, so the CUDA events time
the kernel rather than the launch overhead. The median of ``iters`` calls is reported; the first calls (warmup)
also run the autotuner.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository's glm importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (K, N, module): the four quantized linears of each ChatGLM-6B layer.
SHAPES = [
    (4096, 12288, "query_key_value"),
    (4096, 4096, "dense"),
    (4096, 16384, "dense_h_to_4h"),
    (16384, 4096, "dense_4h_to_h"),
]
# (name, bits, group_size)
KERNELS = [("int8", 8, None), ("int4", 4, None), ("int4_g128", 4, 128)]
_FLUSH_BYTES = 1 << 30
_COPY_BYTES = 1 << 30


def _median_time_us(fn, iters: int, warmup: int, flush: torch.Tensor) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        flush.zero_()  # cold L2, and GPU work to hide the launch of fn behind
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _copy_bandwidth(device: torch.device, iters: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return 2 * _COPY_BYTES / seconds / 1e9


def _quantized(N: int, K: int, bits: int, group_size: int | None, device: torch.device):
    """Random stored weights and float16 scales (as in the released checkpoints): speed does not depend on values."""
    qweight = torch.randint(-128, 128, (N, K * bits // 8), dtype=torch.int8, device=device)
    groups = 1 if group_size is None else K // group_size
    scale = (torch.rand(N, groups, device=device) * 1e-3).to(torch.float16)
    return qweight, scale.reshape(N) if group_size is None else scale


def kernel_bench(device: str = "cuda", dtype: torch.dtype = torch.float16, iters: int = 200) -> list[dict]:
    """Times the decode kernels against the fp16 matmul on the real shapes at M = 1.

    Args:
        device: a CUDA device.
        dtype: activation dtype (float16 or bfloat16); the baseline weight has it too.
        iters: timed calls per measurement (the median is reported).

    Returns:
        One dict for the copy bandwidth, then one per (shape, kernel): ``time_us``, ``bytes``, ``gb_per_s``,
        ``copy_fraction``, ``speedup_vs_matmul`` (over ``x @ W.T`` in ``dtype``; None for that baseline itself).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"kernel_bench needs a CUDA device, got {device}")
    from glm.kernels.wq_gemv import wq_gemv

    torch.manual_seed(0)
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    copy_gbps = _copy_bandwidth(device, iters=max(10, iters // 10))
    name = torch.cuda.get_device_name(device)
    rows: list[dict] = [{"device": name, "kind": "copy_bandwidth", "gb_per_s": round(copy_gbps, 1)}]
    warmup = 10
    for K, N, module in SHAPES:
        x = torch.randn(1, K, dtype=dtype, device=device)
        weight = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
        base_us = _median_time_us(lambda w=weight: torch.matmul(x, w.T), iters, warmup, flush)
        timings = [(f"{str(dtype).removeprefix('torch.')}_matmul", base_us, weight.nbytes)]
        weight = None  # free it before the quantized copies are made
        for kernel, bits, group_size in KERNELS:
            qweight, scale = _quantized(N, K, bits, group_size, device)
            us = _median_time_us(lambda: wq_gemv(x, qweight, scale, None, bits, group_size), iters, warmup, flush)
            timings.append((kernel, us, qweight.nbytes + scale.nbytes))
        for kernel, us, weight_bytes in timings:
            moved = weight_bytes + x.nbytes + N * x.element_size()  # + y
            gbps = moved / (us * 1e-6) / 1e9
            rows.append(
                {
                    "device": name,
                    "shape": f"{K}->{N}",
                    "module": module,
                    "M": 1,
                    "dtype": str(dtype).removeprefix("torch."),
                    "kernel": kernel,
                    "time_us": round(us, 2),
                    "bytes": moved,
                    "gb_per_s": round(gbps, 1),
                    "copy_fraction": round(gbps / copy_gbps, 3),
                    "speedup_vs_matmul": None if kernel == timings[0][0] else round(base_us / us, 2),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; these are GPU kernels (CPU quantized paths are benchmarked elsewhere)")
        return 0
    import triton

    print(json.dumps({"torch": torch.__version__, "triton": triton.__version__}), flush=True)
    for row in kernel_bench("cuda", getattr(torch, args.dtype), args.iters):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
