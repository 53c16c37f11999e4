"""Fused weight-only INT8/INT4 GEMM for prefill: ``y = x @ (q * scale).T + bias`` for many rows.

Algorithm
---------
The tiled matmul of the Triton tutorial, with the weight dequantized on the way into the tensor cores:

- **Grid** is one program per ``[BLOCK_M, BLOCK_N]`` output tile, ordered in groups of GROUP_M row blocks so that
  programs running together share column blocks of the weight in L2.
- **K loop.** Each step loads a ``[BLOCK_M, TILE_K]`` tile of x and the ``[BLOCK_N, TILE_K * BITS / 8]`` stored
  bytes of the weight over the same K range, turns the bytes into their integer values in x's dtype (exact: every
  int8 value is a float16/bfloat16 integer) and multiplies on the tensor cores with float32 accumulation.
  ``TILE_K`` is ``BLOCK_K``, shrunk to the scale group when the scales are grouped, so that each tile sits inside
  one group.
- **INT4** stays in its packed order: the high nibbles (even k) meet the even columns of x and the low nibbles the
  odd columns, two half-depth dots per step.
- **Scales** are upcast to float32 and applied to the float32 products, never folded into 16-bit weights: per tile
  for grouped scales, once in the epilogue for per-channel ones. The epilogue adds the bias and casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm.kernels._launch import device_guard, interpreting, prepare_kernel_args
from glm.kernels._triton_common import AUTOTUNE_OPTIONS, dot_loop, store_output
from glm.kernels.reference import wq_gemm_reference

__all__ = ["get_gemm_autotune_configs", "wq_gemm", "wq_gemm_reference"]

# Autotuning is keyed on M rounded up to a power of two (capped here), so prompts of new lengths reuse a result.
_MAX_M_BUCKET = 4096


def get_gemm_autotune_configs() -> list[triton.Config]:
    """Tile sizes to try: one small config under the interpreter, where tuning would only cost time."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config(
            {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
            num_stages=num_stages,
            num_warps=num_warps,
        )
        # Checked by compiling for sm_90: INT8 fits every tile; INT4 (whose grouped variant holds two accumulator
        # tiles) spills on the largest ones, which the autotuner then passes over.
        for block_m, block_n, block_k, num_stages, num_warps in (
            (128, 256, 64, 3, 8),
            (128, 128, 64, 3, 8),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 8),
            (64, 64, 128, 4, 4),
        )
    ]


def _gemm_tile_k(args: dict) -> int:
    """Triton heuristic: K values per step, BLOCK_K shrunk to one scale group if grouped."""
    return min(args["BLOCK_K"], args["GROUP_SIZE"]) if args["GROUP_SIZE"] else args["BLOCK_K"]


@triton.autotune(
    configs=get_gemm_autotune_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"], **AUTOTUNE_OPTIONS
)
@triton.heuristics({"TILE_K": _gemm_tile_k})
@triton.jit
def _wq_gemm_kernel(
    # Pointers
    x_ptr,  # [M, K] float16/bfloat16
    w_ptr,  # [N, K * BITS // 8] int8
    scale_ptr,  # [N] or [N, K // GROUP_SIZE], any float dtype
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    y_ptr,  # [M, N], x's dtype
    # Sizes
    M,
    N,
    K,
    K_BYTES,  # K * BITS // 8, the stored bytes per row (its own argument, so its divisibility is known)
    M_BUCKET,  # M rounded up to a power of two: only an autotuning key
    # Strides (the inner strides are 1)
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    # Meta-parameters
    BITS: tl.constexpr,  # 4 or 8
    GROUP_SIZE: tl.constexpr,  # 0 for per-channel scales
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks per group of the program order
    TILE_K: tl.constexpr,  # min(BLOCK_K, GROUP_SIZE), from the heuristic
):
    # Grouped program order (from the Triton tutorial): GROUP_M row blocks walk a column block together.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n[:, None] * stride_wn  # [BLOCK_N, 1]
    scale_rows = scale_ptr + offs_n * stride_sn  # [BLOCK_N]
    acc = dot_loop(
        x_rows, m_mask, w_rows, scale_rows, n_mask, 0, K, K, K_BYTES, BITS, GROUP_SIZE, BLOCK_M, BLOCK_N, TILE_K
    )
    store_output(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, GROUP_SIZE == 0, HAS_BIAS)


def wq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """Weight-only quantized ``y = x @ (q * scale).T + bias`` for many rows of x (prefill).

    Args:
        x: ``[M, K]`` float16 or bfloat16.
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
    M, N, K, x, qweight, scale, bias = prepare_kernel_args(x, qweight, scale, bias, bits, group_size)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(x):
        _wq_gemm_kernel[grid](
            x, qweight, scale, y if bias is None else bias, y,
            M, N, K, qweight.shape[1], min(triton.next_power_of_2(M), _MAX_M_BUCKET),
            x.stride(0), qweight.stride(0), scale.stride(0), y.stride(0),
            BITS=bits, GROUP_SIZE=group_size or 0, HAS_BIAS=bias is not None,
        )  # fmt: skip
    return y
