"""What the kernel wrappers share and what must not need triton: interpreter detection and input checks."""

from __future__ import annotations

import contextlib
import os

import torch

from glm.kernels.reference import check_wq_args

# The largest M served by the GEMV kernel; wq_linear sends bigger batches to the GEMM.
GEMV_MAX_ROWS = 16


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_group_ok(group_size: int | None) -> bool:
    """Whether the kernels take this group size: per-channel, or a power of two >= 32.

    A K tile must sit inside one group and still feed tl.dot at least 16 stored columns.
    """
    return group_size is None or (group_size >= 32 and group_size & (group_size - 1) == 0)


def device_guard(x: torch.Tensor):
    """Makes x's GPU current while launching: Triton launches on the current device, whatever the pointers say."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def prepare_kernel_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> tuple[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checks what the Triton kernels need beyond :func:`check_wq_args` and makes the inputs contiguous.

    Returns:
        ``(M, N, K, x, qweight, scale, bias)``, the tensors contiguous.
    """
    M, N, K = check_wq_args(x, qweight, scale, bias, bits, group_size)
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take float16 or bfloat16 x, got {x.dtype}; use wq_linear_reference")
    if not kernel_group_ok(group_size):
        raise ValueError(f"the Triton kernels need group_size to be a power of two >= 32, got {group_size}")
    tensors = {"x": x, "qweight": qweight, "scale": scale} | ({} if bias is None else {"bias": bias})
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share one device")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {x.device}; "
            "use wq_linear_reference on CPU"
        )
    bias = None if bias is None else bias.contiguous()
    return M, N, K, x.contiguous(), qweight.contiguous(), scale.contiguous(), bias
