"""Which half-precision float type runs fastest on this CPU: a short probe of torch's own matmuls.

x86 CPUs differ: with AMX (Sapphire Rapids and later) bfloat16 is fastest at both matrix-vector (decode) and
matrix-matrix (prefill) products; on a Zen 4 float16 matrix-vector products are faster than bfloat16 ones while its
float16 GEMMs are several times slower. The probe times both on one small matrix and keeps bfloat16 unless
float16 is faster at decode without being slower at prefill.
"""

from __future__ import annotations

import functools
import sys
import time

import torch
import torch.nn.functional as F

__all__ = ["announce_cpu_half_dtype", "fastest_cpu_half_dtype"]

# A float16 prefill may be at most this much slower than bfloat16's for float16 to be chosen.
_PREFILL_SLACK = 1.1


@functools.cache
def fastest_cpu_half_dtype() -> tuple[torch.dtype, dict[str, float]]:
    """bfloat16 or float16 for a large model on this CPU, with the probe's timings.

    Times ``F.linear`` on a 2048 -> 4096 weight with 1 row (decode) and 64 rows (prefill) in both dtypes, the
    dtypes taking turns, and keeps the fastest call of each (the steadiest figure on a machine shared with other
    work): about 0.2 s, once per process.

    Returns:
        ``(dtype, {"bf16_decode_ms": ..., "fp16_decode_ms": ..., "bf16_prefill_ms": ..., "fp16_prefill_ms": ...})``.
    """
    times = _probe_times()
    fp16_wins = (times["fp16_decode_ms"] < times["bf16_decode_ms"]
                 and times["fp16_prefill_ms"] <= _PREFILL_SLACK * times["bf16_prefill_ms"])
    return (torch.float16 if fp16_wins else torch.bfloat16), times


def _probe_times() -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(4096, 2048, generator=gen)
    cases = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        w = w32.to(dt)
        for phase, rows in (("decode", 1), ("prefill", 64)):
            cases[f"{name}_{phase}_ms"] = (w, torch.randn(rows, 2048, generator=gen).to(dt))
    best = dict.fromkeys(cases, float("inf"))
    with torch.inference_mode():
        for rnd in range(12):
            for key, (w, x) in cases.items():
                if rnd >= 4 and "prefill" in key:
                    continue  # GEMMs take longer and vary less: four rounds suffice
                t0 = time.perf_counter()
                F.linear(x, w)
                if rnd:  # round 0 warms up (and lets the library set itself up)
                    best[key] = min(best[key], time.perf_counter() - t0)
    return {k: round(v * 1e3, 3) for k, v in best.items()}


@functools.cache
def announce_cpu_half_dtype() -> torch.dtype:
    """:func:`fastest_cpu_half_dtype`, saying once on stderr what it picked and why."""
    picked, times = fastest_cpu_half_dtype()
    print(f"glm: dtype='auto' on this CPU: {str(picked).removeprefix('torch.')} (F.linear probe, ms: "
          + ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in times.items()) + ")", file=sys.stderr)
    return picked
