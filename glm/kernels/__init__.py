"""Weight-only INT8/INT4 matmul: fused Triton kernels (GPU), a C++ kernel (CPU), and their pure-torch references.

- ``wq_linear`` is the GPU entry point: any leading shape, the GEMV kernel for up to 16 rows (decoding), the GEMM
  kernel above (prefill), the torch reference where the kernels cannot run.
- The Triton kernels live in ``glm.kernels.wq_gemv`` and ``glm.kernels.wq_gemm``; the references, the official
  layout (``pack_int4``, ``unpack_int4``) and ``dequantize`` in ``glm.kernels.reference``.
- The CPU kernel, its own weight layout and its reference live in ``glm.kernels.cpu_wq`` (compiled on first use);
  ``glm.kernels.cpu_float`` probes which half float type this CPU runs fastest.

Nothing here imports glm.quant (which builds on this package). Importing it does not import triton (imported on
first use) nor compile anything, so CPU-only installs work.
"""

from __future__ import annotations

import functools

import torch

from glm.kernels._launch import GEMV_MAX_ROWS, interpreting, kernel_group_ok
from glm.kernels.reference import (
    dequantize,
    unpack_int4,
    wq_gemm_reference,
    wq_gemv_reference,
    wq_linear_reference,
)

__all__ = [
    "GEMV_MAX_ROWS",
    "dequantize",
    "triton_available",
    "unpack_int4",
    "wq_gemm_reference",
    "wq_gemv_reference",
    "wq_linear",
    "wq_linear_reference",
]


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available() -> bool:
    """True when the Triton kernels can run: triton imports, and CUDA is available or ``TRITON_INTERPRET=1``."""
    return _triton_imports() and (torch.cuda.is_available() or interpreting())


def wq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """Weight-only quantized linear ``y = x @ (q * scale).T + bias`` for x of any leading shape.

    Rows are flattened; up to ``GEMV_MAX_ROWS`` go to the GEMV kernel, more to the GEMM kernel. The torch reference
    runs instead where the kernels cannot: float32 x, a group size that is not a power of two >= 32, triton
    missing, or a CPU tensor outside the interpreter.

    Args:
        x: ``[..., K]`` float16 or bfloat16 (float32 takes the reference).
        qweight: int8, ``[N, K]`` for bits=8, or ``[N, K // 2]`` for bits=4 (two signed nibbles per byte, the
            even k in the high nibble).
        scale: ``[N]`` or ``[N, K // group_size]``, any float dtype, upcast to float32.
        bias: ``[N]`` or None.
        bits: 4 or 8.
        group_size: None for per-channel scales, else the group length along K.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    if torch.compiler.is_compiling():
        # Under torch.compile (CUDA graphs) the launch goes through an opaque custom op: dynamo does not trace the
        # wrapper's Python (autotuning, split-K counters), inductor calls it as an extern kernel.
        return _wq_linear_op(x, qweight, scale, bias, bits, group_size)
    return _wq_linear_eager(x, qweight, scale, bias, bits, group_size)


def _wq_linear_eager(x, qweight, scale, bias, bits, group_size):
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    kernel_args_ok = x.dtype in (torch.float16, torch.bfloat16) and kernel_group_ok(group_size)
    if not (kernel_args_ok and (x.is_cuda or interpreting()) and triton_available()):
        y = wq_linear_reference(x2, qweight, scale, bias, bits, group_size)
    elif x2.shape[0] <= GEMV_MAX_ROWS:
        from glm.kernels.wq_gemv import wq_gemv

        y = wq_gemv(x2, qweight, scale, bias, bits, group_size)
    else:
        from glm.kernels.wq_gemm import wq_gemm

        y = wq_gemm(x2, qweight, scale, bias, bits, group_size)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


# The op torch.compile sees. Registering it is the one thing importing glm.kernels does (a name in torch's op
# registry; no triton, no CUDA): it must exist before dynamo traces a call, and glm.kernels is only imported lazily.
@torch.library.custom_op("glm::wq_linear", mutates_args=())
def _wq_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                  group_size: int | None) -> torch.Tensor:
    return _wq_linear_eager(x, qweight, scale, bias, bits, group_size)


@_wq_linear_op.register_fake
def _(x, qweight, scale, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
