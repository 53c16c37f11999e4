"""torch's stock weight-only CPU operators: QuantLinear's forward on a CPU where our kernel cannot be built (no
compiler). `_weight_int8pack_mm` reads the official int8 tensor; `_weight_int4pack_mm_for_cpu` needs its own
repacked copy of an int4 weight, made at the first call that uses it and kept besides the official tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from glm.kernels.reference import unpack_int4
from glm.quant import paths

# Group sizes `_weight_int4pack_mm_for_cpu` accepts (torch 2.13 checks exactly these).
_STOCK_INT4_GROUPS = (256, 128, 64, 32)
# Up to this many rows torch's stock weight-only kernels beat dequantize + bf16 GEMM (their cost grows per row).
_STOCK_MAX_ROWS = {8: 48, 4: 96}
_HALF = (torch.bfloat16, torch.float16)


def stock_forward(layer) -> tuple[str, Callable[..., Tensor]] | None:
    """(name, forward) of torch's operator for this layer where it takes the shape, else None."""
    n, k = layer.out_features, layer.in_features
    if layer.bits == 8:
        # Per-channel only. With K not a multiple of 16 it returns garbage (even crashes) in torch 2.13.
        if layer.group_size is None and k % 32 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "int8_stock", forward_int8_stock
        return None
    if n % 16 or _int4_group(layer) is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    return "int4_stock", forward_int4_stock


def _int4_group(layer) -> int | None:
    span = layer.group_size or layer.in_features  # the kernel's group must divide ours: per-channel repeats one scale
    return next((g for g in _STOCK_INT4_GROUPS if span % g == 0), None)


def _takes(layer, x2: Tensor) -> bool:
    """bf16 operators: half inputs only (fp32 stays exact by dequantizing), and few rows."""
    return x2.dtype in _HALF and x2.shape[0] <= _STOCK_MAX_ROWS[layer.bits]


def forward_int8_stock(layer, x2: Tensor) -> Tensor:
    if not _takes(layer, x2):
        return paths.forward_dequant(layer, x2)
    ones = torch.ones(layer.out_features, dtype=torch.bfloat16)
    return _finish(layer, torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), layer.weight, ones), x2)


def forward_int4_stock(layer, x2: Tensor) -> Tensor:
    if not _takes(layer, x2):
        return paths.forward_dequant(layer, x2)
    if layer._stock_int4 is None:
        _repack_int4(layer)
    scales, group = layer._stock_scales
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), layer._stock_int4, group, scales)
    return _finish(layer, y, x2)


def _repack_int4(layer) -> None:
    """The operator's copy of the int4 weight and its (scale, zero) pairs, into `_stock_int4` / `_stock_scales`."""
    n, k = layer.out_features, layer.in_features
    group = _int4_group(layer)
    with torch.no_grad(), torch.inference_mode(False):
        # In slices of rows, to bound the int32 temporary the converter takes (2 GB for lm_head at once):
        # its layout packs blocks of 16 to 64 rows, which a multiple of 1024 never splits.
        convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        w = torch.cat([convert(unpack_int4(layer.weight[r : r + 1024]).to(torch.int32) + 8, 1)
                       for r in range(0, n, 1024)])
        if layer.group_size is None:  # unit scales: the per-channel scale is applied in fp32 afterwards
            scale = torch.ones(k // group, n, dtype=torch.bfloat16)
        else:
            scale = layer.weight_scale.to(torch.bfloat16).repeat_interleave(layer.group_size // group, 1).t()
        # [K/g, N, 2]: (scale, zero) per group; the kernel computes (u - 8) * scale + zero.
        layer._stock_int4 = w
        layer._stock_scales = (torch.stack([scale, torch.zeros_like(scale)], -1).contiguous(), group)


def _finish(layer, y: Tensor, x2: Tensor) -> Tensor:
    y = y.float()
    if layer.group_size is None:
        y = y * layer.weight_scale.float()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x2.dtype)


__all__ = ["forward_int4_stock", "forward_int8_stock", "stock_forward"]
