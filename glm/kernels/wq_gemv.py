"""Fused weight-only INT8/INT4 GEMV for decoding: ``y = x @ (q * scale).T + bias`` for a handful of rows.

Algorithm
---------
At decode time M is 1 (a few rows with batching) and every weight byte is used once per row, so the kernel is
bound by memory bandwidth: the job is to stream the packed weight once, with the whole GPU busy, and to spend as few
instructions per byte as possible. The full-precision weight is never written anywhere.

- **Grid** ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``. Program ``(n, s, m)`` owns BLOCK_N output channels
  and the s-th contiguous slice of K. A 4096 -> 4096 layer has only 64 blocks of 64 channels, far fewer than the
  SMs of a large GPU can run at once; splitting K multiplies the programs (``_plan_split_k`` aims for about four
  per SM) and so the loads in flight.
- **K loop.** Each step loads a ``[BLOCK_N, BLOCK_KB]`` tile of stored bytes (consecutive bytes of a row, so the
  loads are wide and coalesced) and the matching ``TILE_K = BLOCK_KB * 8 / BITS`` values of x. With grouped
  scales the step shrinks to one group if need be, so that every tile sits inside one group.
- **INT4** is not interleaved back into K order: the high nibbles (even k) multiply ``x[0::2]`` and the low
  nibbles (odd k) multiply ``x[1::2]``; x is loaded contiguously and split into its even and odd halves.
- **M == 1** (``BLOCK_M == 1``): one FMA per stored value into a float32 accumulator per stored byte, reduced
  across K once after the loop. Bytes become floats with the magic-number trick of ``_triton_common`` instead of
  int-to-float conversions.
  **M > 1** (``BLOCK_M == 16``): ``tl.dot`` on the integer-valued weights in x's dtype, with rows padded to the
  tensor-core minimum of 16, so the weight tile is read once for all the rows.
- **Scales** are upcast to float32 and applied to sums, not to weights: once per tile for grouped scales, once at
  the end for per-channel scales. The sums of ``x * q`` are exact products accumulated in float32.
- **Split-K reduction in the same launch.** Each program writes its float32 partial tile to a workspace and takes
  a ticket from a per-tile atomic counter. The program that draws the last ticket adds the partials up, in slice
  order, so the result does not depend on which program finished first, then adds the bias, casts, stores and
  sets the counter back to zero for the next launch. A second kernel (or zeroing an atomic accumulator) would
  cost as much as the GEMV itself on the smaller layers.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from glm.kernels._launch import device_guard, interpreting, prepare_kernel_args
from glm.kernels._triton_common import AUTOTUNE_OPTIONS, dot_loop, int4_as_f32, int8_as_f32, store_output
from glm.kernels.reference import wq_gemv_reference

__all__ = ["get_gemv_autotune_configs", "wq_gemv", "wq_gemv_reference"]

# Programs per SM that the split-K plan aims for: enough resident warps to keep the memory pipes full.
_CTAS_PER_SM = 4
_MAX_SPLIT_K = 16
# The interpreter has no SMs; a small number makes tests on small shapes take the split-K path.
_INTERPRETER_SMS = 2


def get_gemv_autotune_configs() -> list[triton.Config]:
    """Tile sizes to try: one small config under the interpreter, where tuning would only cost time.

    Tiles are counted in stored bytes per row (BLOCK_KB), not in K values, so that a config needs the same
    registers at 4 and 8 bits.
    """
    if interpreting():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_KB": 32}, num_warps=4)]
    # 16-32 stored bytes per thread per step: two 16-byte loads in flight per thread (four with the prefetch) and
    # float32 accumulators that leave room for several programs per SM. 64 bytes per thread needs ~245 registers.
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_KB": block_kb}, num_warps=num_warps)
        for block_n, block_kb, num_warps in ((32, 64, 4), (32, 128, 4), (64, 64, 4), (128, 64, 8))
    ]


def _gemv_tile_k(args: dict) -> int:
    """Triton heuristic: K values per step, BLOCK_KB bytes' worth, shrunk to one scale group if grouped."""
    tile = args["BLOCK_KB"] * 8 // args["BITS"]
    return min(tile, args["GROUP_SIZE"]) if args["GROUP_SIZE"] else tile


@triton.jit
def _load_fma_step(x_row, w_rows, scale_rows, n_mask, k0, K, K_BYTES, BITS, GROUP_SIZE, BLOCK_N, TILE_K):
    """Loads one step of the M == 1 loop: the stored bytes, x in float32 and (if grouped) the scales."""
    offs_k = k0 + tl.arange(0, TILE_K)
    offs_b = k0 * BITS // 8 + tl.arange(0, TILE_K * BITS // 8)
    packed = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & (offs_b[None, :] < K_BYTES), other=0)
    xk = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    if GROUP_SIZE > 0:
        scale = tl.load(scale_rows + k0 // GROUP_SIZE, mask=n_mask, other=0.0).to(tl.float32)
    else:
        scale = tl.zeros((BLOCK_N,), dtype=tl.float32)  # unused: per-channel scales come in the epilogue
    return packed, xk, scale


@triton.jit
def _fma_loop(
    x_row, w_rows, scale_rows, n_mask, k_begin, k_end, K, K_BYTES,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_K: tl.constexpr,
):  # fmt: skip
    """M == 1: ``[1, BLOCK_N]`` float32 sums of x * q over [k_begin, k_end), grouped scales applied."""
    # One float32 accumulator per stored byte, summed across threads once after the loop: each stored value then
    # costs one FMA.
    acc_bytes = tl.zeros((BLOCK_N, TILE_K * BITS // 8), dtype=tl.float32)
    # Software pipelining by hand (Triton pipelines only loads that feed tl.dot): the loads of step i + 1 are issued
    # before the math of step i, so that every warp keeps two tiles in flight. The last step fetches itself again
    # (from cache) rather than step past the slice; k_last keeps the tile alignment the compiler can see.
    k_last = k_begin + (k_end - k_begin - 1) // TILE_K * TILE_K
    packed, xk, scale = _load_fma_step(
        x_row, w_rows, scale_rows, n_mask, k_begin, K, K_BYTES, BITS, GROUP_SIZE, BLOCK_N, TILE_K
    )
    for k0 in range(k_begin, k_end, TILE_K):
        next_packed, next_xk, next_scale = _load_fma_step(
            x_row, w_rows, scale_rows, n_mask, tl.minimum(k0 + TILE_K, k_last), K, K_BYTES,
            BITS, GROUP_SIZE, BLOCK_N, TILE_K,
        )  # fmt: skip
        if BITS == 4:
            high, low = int4_as_f32(packed)
            x_even, x_odd = tl.split(tl.reshape(xk, (TILE_K // 2, 2)))
            if GROUP_SIZE > 0:
                acc_bytes += (high * x_even[None, :] + low * x_odd[None, :]) * scale[:, None]
            else:
                # Two separate updates, so that each contracts to one FMA.
                acc_bytes += high * x_even[None, :]
                acc_bytes += low * x_odd[None, :]
        else:
            if GROUP_SIZE > 0:
                acc_bytes += int8_as_f32(packed) * xk[None, :] * scale[:, None]
            else:
                acc_bytes += int8_as_f32(packed) * xk[None, :]
        packed, xk, scale = next_packed, next_xk, next_scale
    return tl.sum(acc_bytes, axis=1)[None, :]


@triton.autotune(
    configs=get_gemv_autotune_configs(),
    key=["N", "K", "SPLIT_K", "BITS", "GROUP_SIZE", "BLOCK_M"],
    **AUTOTUNE_OPTIONS,
)
@triton.heuristics({"TILE_K": _gemv_tile_k})
@triton.jit
def _wq_gemv_kernel(
    # Pointers
    x_ptr,  # [M, K] float16/bfloat16
    w_ptr,  # [N, K * BITS // 8] int8
    scale_ptr,  # [N] or [N, K // GROUP_SIZE], any float dtype
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    y_ptr,  # [M, N], x's dtype
    partial_ptr,  # [SPLIT_K, M, N] float32 workspace (unused when SPLIT_K == 1)
    ticket_ptr,  # int32, one counter per (m block, n block), zero between launches
    # Sizes
    M,
    N,
    K,
    K_BYTES,  # K * BITS // 8, the stored bytes per row (its own argument, so its divisibility is known)
    UNITS_PER_SLICE,  # each program's slice of K is UNITS_PER_SLICE * K_UNIT long
    # Strides (the inner strides are 1)
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    SPLIT_K,  # slices of K; a plain int, so that each shape's count does not compile a kernel of its own
    # Meta-parameters
    K_UNIT: tl.constexpr,  # the longest K tile of all configs, so that slices hold whole tiles
    BITS: tl.constexpr,  # 4 or 8
    GROUP_SIZE: tl.constexpr,  # 0 for per-channel scales
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 1 (FMA path) or 16 (tensor-core path)
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,  # stored bytes per row per K step, whatever BITS is: the register budget
    TILE_K: tl.constexpr,  # K values per step: BLOCK_KB * 8 // BITS, at most GROUP_SIZE (the heuristic)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # A constexpr factor in k_begin tells the compiler that tiles start aligned, for 16-byte loads.
    k_begin = pid_k * UNITS_PER_SLICE * K_UNIT
    k_end = tl.minimum(k_begin + UNITS_PER_SLICE * K_UNIT, K)
    w_rows = w_ptr + offs_n[:, None] * stride_wn  # [BLOCK_N, 1]
    scale_rows = scale_ptr + offs_n * stride_sn  # [BLOCK_N]
    if BLOCK_M == 1:
        acc = _fma_loop(
            x_ptr + pid_m * stride_xm, w_rows, scale_rows, n_mask, k_begin, k_end, K, K_BYTES,
            BITS, GROUP_SIZE, BLOCK_N, TILE_K,
        )  # fmt: skip
    else:
        acc = dot_loop(
            x_ptr + offs_m[:, None] * stride_xm, m_mask, w_rows, scale_rows, n_mask, k_begin, k_end, K, K_BYTES,
            BITS, GROUP_SIZE, BLOCK_M, BLOCK_N, TILE_K,
        )  # fmt: skip

    if SPLIT_K == 1:
        store_output(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, GROUP_SIZE == 0, HAS_BIAS)
    else:
        tile_offs = offs_m[:, None] * N + offs_n[None, :]
        tile_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(partial_ptr + pid_k * M * N + tile_offs, acc, mask=tile_mask)
        # Every thread's partial must be written before the ticket (taken by one thread) releases them.
        tl.debug_barrier()
        ticket_ptr += pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                # .cg reads through to L2, where the other programs' partials are, past this SM's L1.
                total += tl.load(partial_ptr + s * M * N + tile_offs, mask=tile_mask, other=0.0, cache_modifier=".cg")
            store_output(total, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, GROUP_SIZE == 0, HAS_BIAS)
            tl.atomic_xchg(ticket_ptr, 0)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _plan_split_k(tiles: int, K: int, unit: int, sms: int) -> int:
    """How many slices of K: about _CTAS_PER_SM programs per SM, each slice at least two units of K long."""
    chunks = triton.cdiv(K, unit)
    return max(1, min(triton.cdiv(_CTAS_PER_SM * sms, tiles), chunks // 2, _MAX_SPLIT_K))


def _split_bounds(K: int, unit: int, split_k: int) -> tuple[int, int]:
    """Balances split_k slices of whole units of K; returns (slices actually used, units per slice)."""
    chunks = max(1, triton.cdiv(K, unit))
    per_slice = triton.cdiv(chunks, min(max(1, split_k), chunks))
    return triton.cdiv(chunks, per_slice), per_slice


_tickets: dict[tuple[torch.device, int], torch.Tensor] = {}


def _ticket_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for the split-K tickets, kept per device and stream.

    The kernel leaves them at zero, so they are allocated once. Two launches in flight on different streams
    must not share them, hence one set per stream.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counters = _tickets.get((device, stream))
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _tickets[(device, stream)] = counters
    return counters


def wq_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """Weight-only quantized ``y = x @ (q * scale).T + bias`` for a few rows of x (decoding).

    Args:
        x: ``[M, K]`` float16 or bfloat16, M small (at most 16 for the intended use; any M works).
        qweight: int8, ``[N, K]`` for bits=8, or ``[N, K // 2]`` for bits=4 (two signed nibbles per byte, the
            even k in the high nibble).
        scale: ``[N]`` per output channel, or ``[N, K // group_size]``; float16, bfloat16 or float32, upcast to
            float32 in the kernel.
        bias: ``[N]`` or None.
        bits: 4 or 8.
        group_size: None for per-channel scales, else a power of two >= 32 dividing K.

    Returns:
        ``[M, N]`` in x's dtype, accumulated in float32.

    Raises:
        TypeError, ValueError: on inputs the kernel cannot take (see ``prepare_kernel_args``).
    """
    return _wq_gemv(x, qweight, scale, bias, bits, group_size, split_k=None)


def _wq_gemv(x, qweight, scale, bias, bits, group_size, split_k: int | None) -> torch.Tensor:
    """wq_gemv with the number of K slices forced (None: planned from the SM count); tests use it."""
    M, N, K, x, qweight, scale, bias = prepare_kernel_args(x, qweight, scale, bias, bits, group_size)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    block_m = 1 if M == 1 else 16
    m_blocks = triton.cdiv(M, block_m)
    configs = _wq_gemv_kernel.configs
    unit = max(c.kwargs["BLOCK_KB"] for c in configs) * 8 // bits  # slices hold whole tiles whatever the config
    if split_k is None:
        # Plan for the largest block, so that every config the autotuner may pick fills the GPU.
        tiles = m_blocks * triton.cdiv(N, max(c.kwargs["BLOCK_N"] for c in configs))
        split_k = _plan_split_k(tiles, K, unit, _num_sms(x.device))
    split_k, units_per_slice = _split_bounds(K, unit, split_k)
    # Allocated (without a kernel) even when SPLIT_K == 1, so that both cases share one kernel signature.
    partials = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    tickets = _ticket_counters(x.device, m_blocks * triton.cdiv(N, min(c.kwargs["BLOCK_N"] for c in configs)))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), split_k, m_blocks)

    with device_guard(x):
        _wq_gemv_kernel[grid](
            x, qweight, scale, y if bias is None else bias, y, partials, tickets,
            M, N, K, qweight.shape[1], units_per_slice,
            x.stride(0), qweight.stride(0), scale.stride(0), y.stride(0),
            split_k, K_UNIT=unit, BITS=bits, GROUP_SIZE=group_size or 0, HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
        )  # fmt: skip
    return y
