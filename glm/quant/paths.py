"""The forwards `QuantLinear` chooses among, but for torch's stock operators (glm.quant.stock).

glm.quant.linear's docstring has the table of them all.

Each is `forward(layer, x2) -> y2` on the rows of x, `[M, in_features] -> [M, out_features]` in x's dtype. A layer
stores the one it runs when it is built, prepared, moved or its CPU kernel mode is set; what is left to decide per
call is what depends on the input: its dtype, and its rows (past a row count one GEMM beats the kernels).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from glm.kernels.cpu_wq import TILE_N, cpu_unpack_t, cpu_wq_linear
from glm.kernels.reference import dequantize

# Dequantized rows per matmul in the "dequant" path: about 2 MiB of fp32 weight, so it stays in cache.
_DEQUANT_CHUNK_BYTES = 2 << 20
# The input dtypes our CPU kernel takes (float64 and the rest dequantize).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_UNRESOLVED = object()
_cuda_kernel_fn: Callable | None | object = _UNRESOLVED


def cuda_kernel() -> Callable | None:
    """`glm.kernels.wq_linear`, or None where triton or the kernel is missing (then we dequantize).

    Resolved once into a module global (a plain global read is what torch.compile traces best).
    """
    global _cuda_kernel_fn
    if _cuda_kernel_fn is _UNRESOLVED:
        _cuda_kernel_fn = None
        if importlib.util.find_spec("triton") is not None:
            try:
                from glm.kernels import wq_linear

                _cuda_kernel_fn = wq_linear
            except (ImportError, AttributeError):
                pass
    return _cuda_kernel_fn  # type: ignore[return-value]


def forward_triton(layer, x2: Tensor) -> Tensor:
    """CUDA: the fused dequantize-matmul of glm.kernels (chosen only once `cuda_kernel()` has found it)."""
    return _cuda_kernel_fn(x2, layer.packed_weight(), layer.weight_scale, layer.bias, layer.bits, layer.group_size)


def forward_dequant_whole(layer, x2: Tensor) -> Tensor:
    """Devices without a kernel of ours (CUDA without triton, MPS, meta): dequantize the weight, one F.linear."""
    w = layer.dequantized_weight(x2.dtype)
    return F.linear(x2, w, None if layer.bias is None else layer.bias.to(x2.dtype))


def forward_cpu_exact(layer, x2: Tensor) -> Tensor:
    """Our CPU kernel with float activations: `F.linear(x, q * scale, b)` in fp32 up to summation order."""
    return _cpu_kernel(layer, x2, layer.exact_max_rows, fast=False)


def forward_cpu_fast(layer, x2: Tensor) -> Tensor:
    """Our CPU kernel with x quantized to int8 per block of 32 (ggml's q8_0) and integer dot products."""
    return _cpu_kernel(layer, x2, layer.fast_max_rows, fast=True)


def _cpu_kernel(layer, x2: Tensor, max_rows: int, fast: bool) -> Tensor:
    # The kernel's cost grows with the rows, a GEMM's hardly does: past `max_rows` dequantizing slices wins.
    if x2.dtype not in _KERNEL_DTYPES or not layer._cpu_tiles() or x2.shape[0] > max_rows:
        return forward_dequant(layer, x2)
    return cpu_wq_linear(x2, layer._tiles, layer._tile_scale, layer._tile_bias, layer.bits, layer.group_size,
                         layer.out_features, fast)


def forward_dequant(layer, x2: Tensor) -> Tensor:
    """CPU: dequantize ~2 MiB of rows at a time (from whichever layout holds the weight) and matmul them."""
    # fp32 and fp64 stay as they are (exact); half inputs compute in bf16, the dtype the x86 GEMMs are fast in.
    cdt = torch.bfloat16 if x2.dtype in (torch.float16, torch.bfloat16) else x2.dtype
    xc = x2.to(cdt)
    n, k = layer.out_features, layer.in_features
    rows = max(TILE_N, _DEQUANT_CHUNK_BYTES // (4 * k) // TILE_N * TILE_N)
    out = torch.empty(x2.shape[0], n, dtype=cdt, device=x2.device)
    buf = torch.empty(k, rows, dtype=cdt) if layer._tiles is not None else None
    for r in range(0, n, rows):
        r1 = min(r + rows, n)
        if buf is not None:  # the kernel layout gives the slice transposed, [K, r1 - r]
            wt = buf if r1 - r == rows else torch.empty(k, r1 - r, dtype=cdt)
            w = cpu_unpack_t(layer._tiles, layer._tile_scale, layer.bits, layer.group_size, n, k, r, wt).t()
        else:
            s = layer.weight_scale[r:r1]
            w = dequantize(layer.weight[r:r1], s, layer.bits, layer.group_size, dtype=cdt)
        b = None if layer.bias is None else layer.bias[r:r1].to(cdt)
        out[:, r:r1] = F.linear(xc, w, b)
    return out.to(x2.dtype)


__all__ = ["cuda_kernel", "forward_cpu_exact", "forward_cpu_fast", "forward_dequant", "forward_dequant_whole",
           "forward_triton"]
