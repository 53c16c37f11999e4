"""Kernel benchmarks: the GPU decode kernels (CUDA), or on a CPU every weight-only linear at M = 1, 8 and 32 rows.

    python scripts/bench_kernels.py [--iters 200] [--dtype float16]          # CUDA: fused GEMV vs fp16 matmul
    python scripts/bench_kernels.py --device cpu [--threads 2] [--rows 1,8,32] [--shape 4096x16384]

CUDA: prints JSON lines: the device-to-device copy bandwidth measured in the same run, then one row per (shape,
kernel) with the time, the bytes moved (weights + scales + x + y), the bandwidth that makes, its fraction of the copy
bandwidth, and the speed-up over ``x @ W.T`` in fp16 (``--dtype bfloat16``: in bf16). Every call runs after a 1 GiB
memset that evicts the weights from L2 (as a decode step does, streaming 28 layers of weights) and that keeps the
GPU busy while Python launches the next call, so the CUDA events time the kernel rather than the launch overhead.
The median of ``iters`` calls is reported; the first calls (warmup) also run the autotuner.

CPU: torch's stock operators (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``, ``torch._int_mm``, fp16 and
bf16 ``F.linear``) and ours (``glm.kernels.cpu_wq``: exact and fast modes, INT4 per channel and g128, INT8) on one
linear shape, bf16 activations. Each operator cycles through copies of its weight (``--rotate`` GiB each) and the
calls of all operators take turns in random order, so that every call streams its weight from memory as a decode
step does and every operator meets the same disturbances. Prints one JSON line per (operator, M) with the median
and the minimum of ``--iters`` calls, the weight bytes read per second, and that as a fraction of the read
bandwidth measured in the same run (the faster of a copy and an fp16 GEMV over 1 GiB), then a markdown table of
the minima. On a machine shared with other work the minimum is the steadiest figure; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository's glm (and scripts/bench.py) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

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


# ------------------------------------------------------------------------------------------------------- CPU


def _inductor_operators(n: int, k: int):
    """The other route: inductor generating the dequantize-and-multiply of the same weights (compiled per M)."""

    def int8(x, q, s):
        return torch.nn.functional.linear(x, q.to(x.dtype)) * s

    def int4(x, p, s):  # the official nibble order: first value in the high nibble
        w = torch.stack([p >> 4, (p << 4) >> 4], -1).reshape(p.shape[0], -1)
        return torch.nn.functional.linear(x, w.to(x.dtype)) * s

    c8, c4 = torch.compile(int8, dynamic=False), torch.compile(int4, dynamic=False)
    return [
        ("inductor int8 (torch.compile of dequantize + F.linear)", n * k,
         lambda: (torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)),
         lambda x, st: c8(x, *st)),
        ("inductor int4 (torch.compile of unpack + F.linear)", n * k // 2,
         lambda: (torch.randint(-128, 128, (n, k // 2), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)),
         lambda x, st: c4(x, *st)),
    ]


def _cpu_operators(n: int, k: int):
    """(name, weight bytes, make() -> state, fn(x, state)) for every CPU weight-only linear we compare."""
    from glm.kernels.cpu_wq import cpu_kernels, pack_tiles, tile_scales

    ops = cpu_kernels()

    def int4_tiles(group):
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
        return pack_tiles(q, 4), tile_scales(torch.rand(n, k // group) if group else torch.rand(n), k, group)

    def int8_tiles():
        return pack_tiles(torch.randint(-127, 128, (n, k), dtype=torch.int8), 8), tile_scales(torch.rand(n), k, None)

    def stock_int4():
        u = torch.randint(0, 16, (n, k), dtype=torch.int32)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        s = torch.rand(k // 128, n, dtype=torch.bfloat16)
        return w, torch.stack([s, torch.zeros_like(s)], -1).contiguous()

    rows = [
        ("stock int4-g128 (_weight_int4pack_mm_for_cpu)", n * k // 2, stock_int4,
         lambda x, st: torch.ops.aten._weight_int4pack_mm_for_cpu(x, st[0], 128, st[1])),
        ("stock int8 (_weight_int8pack_mm)", n * k,
         lambda: (torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)),
         lambda x, st: torch.ops.aten._weight_int8pack_mm(x, st[0], st[1])),
        ("stock int8 x int8 (torch._int_mm, x already int8)", n * k,
         lambda: (torch.randint(-127, 128, (k, n), dtype=torch.int8),),
         lambda x, st: torch._int_mm(x, st[0])),
        ("fp16 F.linear", n * k * 2, lambda: (torch.randn(n, k, dtype=torch.float16),),
         lambda x, st: torch.nn.functional.linear(x.half(), st[0])),
        ("bf16 F.linear", n * k * 2, lambda: (torch.randn(n, k, dtype=torch.bfloat16),),
         lambda x, st: torch.nn.functional.linear(x, st[0])),
    ]
    if ops is not None:
        for name, bits, group, make in (("int4", 4, None, lambda: int4_tiles(None)),
                                        ("int4-g128", 4, 128, lambda: int4_tiles(128)),
                                        ("int8", 8, None, int8_tiles)):
            for fast in (False, True):
                rows.append((f"ours {name} {'fast' if fast else 'exact'}", n * k * bits // 8, make,
                             lambda x, st, b=bits, g=group, f=fast: ops.wq_linear(x, st[0], st[1], None, b, g or 0,
                                                                                  n, f)))
    return rows


def cpu_kernel_bench(n: int = 16384, k: int = 4096, rows=(1, 8, 32), iters: int = 20,
                     rotate: int = 1 << 29, inductor: bool = False) -> list[dict]:
    """Times every CPU weight-only linear of `_cpu_operators` at each M in `rows` (bf16 activations).

    Each operator holds copies of its weight filling `rotate` bytes and the calls take turns, operators and copies
    in a fresh random order every round: every operator sees the same spells of other work on the machine, and
    each call finds its weight evicted by everything read since its last turn.

    Returns:
        One dict for the bandwidth, then one per (operator, M): ``median_ms``, ``min_ms``, ``weight_gb_s`` (at the
        minimum) and ``bw_fraction`` (of the bandwidth row).
    """
    import random
    import time

    from bench import copy_bandwidth, gemv_read_bandwidth  # scripts/bench.py

    cpu = torch.device("cpu")
    bw = max(copy_bandwidth(cpu), gemv_read_bandwidth(cpu))
    out: list[dict] = [{"device": "cpu", "threads": torch.get_num_threads(), "kind": "read_bandwidth",
                        "gb_per_s": round(bw / 1e9, 1)}]
    # The inductor candidates run alone: each call allocates a dequantized weight, which disturbs other operators.
    ops = _inductor_operators(n, k) if inductor else _cpu_operators(n, k)
    sets = {}
    for name, nbytes, make, _ in ops:
        first = make()
        sets[name] = [first] + [tuple(t.clone() for t in first) for _ in range(max(0, rotate // nbytes - 1))]
    xs = {m: torch.randn(m, k).bfloat16() for m in rows}
    xq = {m: torch.randint(-127, 128, (m, k), dtype=torch.int8) for m in rows}
    times: dict[tuple[str, int], list[float]] = {(name, m): [] for name, *_ in ops for m in rows}
    rng = random.Random(0)
    for rnd in range(iters + 1):
        calls = [(op, m) for op in ops for m in rows]
        rng.shuffle(calls)
        for (name, _, _, fn), m in calls:
            x = xq[m] if "int_mm" in name else xs[m]
            st = sets[name][(rnd * len(rows) + rows.index(m)) % len(sets[name])]
            t0 = time.perf_counter()
            fn(x, st)
            if rnd:  # round 0 warms up
                times[(name, m)].append(time.perf_counter() - t0)
    for name, nbytes, _, _ in ops:
        for m in rows:
            best = min(times[(name, m)])
            out.append({"device": "cpu", "shape": f"{k}->{n}", "operator": name, "M": m,
                        "median_ms": round(statistics.median(times[(name, m)]) * 1e3, 2),
                        "min_ms": round(best * 1e3, 2), "weight_gb_s": round(nbytes / best / 1e9, 1),
                        "bw_fraction": round(nbytes / best / bw, 3)})
    return out


def markdown_table(rows: list[dict]) -> str:
    """The minima as a markdown table: ms at each M, each M's cost relative to M = 1, M = 1's share of bandwidth."""
    ms = sorted({r["M"] for r in rows if "M" in r})
    names = list(dict.fromkeys(r["operator"] for r in rows if "operator" in r))
    lines = ["| operator | " + " | ".join(f"M={m} ms" for m in ms) + " | "
             + " | ".join(f"M={m} / M={ms[0]}" for m in ms[1:]) + f" | M={ms[0]}: weight GB/s | fraction of bw |",
             "| --- |" + " ---: |" * (2 * len(ms) + 1)]
    for name in names:
        t = {r["M"]: r for r in rows if r.get("operator") == name}
        lines.append(f"| {name} | " + " | ".join(f"{t[m]['min_ms']:.2f}" for m in ms) + " | "
                     + " | ".join(f"{t[m]['min_ms'] / t[ms[0]]['min_ms']:.2f}" for m in ms[1:])
                     + f" | {t[ms[0]]['weight_gb_s']:.1f} | {t[ms[0]]['bw_fraction']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (CUDA when present)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default: 200 CUDA, 20 CPU)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--rows", default="1,8,32", help="CPU: the M values")
    parser.add_argument("--shape", default="4096x16384", help="CPU: KxN of the linear")
    parser.add_argument("--rotate", type=float, default=0.5, help="CPU: GiB of weight copies per operator")
    parser.add_argument("--inductor", action="store_true",
                        help="CPU: time the torch.compile candidates instead (a run of their own)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not cuda:
        if args.threads:
            torch.set_num_threads(args.threads)
        k, n = (int(v) for v in args.shape.lower().split("x"))
        rows = cpu_kernel_bench(n, k, tuple(int(m) for m in args.rows.split(",")), args.iters or 20,
                                int(args.rotate * (1 << 30)), args.inductor)
        print(json.dumps({"torch": torch.__version__}), flush=True)
        for row in rows:
            print(json.dumps(row), flush=True)
        print(markdown_table(rows))
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    import triton

    print(json.dumps({"torch": torch.__version__, "triton": triton.__version__}), flush=True)
    for row in kernel_bench("cuda", getattr(torch, args.dtype), args.iters or 200):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
