"""Pure weight-only quantization primitives: quantize, pack, unpack, dequantize, and an accuracy measure.

Every function is stateless and device-agnostic. The per-channel scheme, the int4 nibble order and the
dequantization are those of the official ChatGLM-6B quantizer (`quantization.py` of THUDM/chatglm-6b-int4),
so the official int8/int4 checkpoints round-trip through these functions byte for byte. The stored layout
(`pack_int4`, `unpack_int4`, `dequantize`) belongs to the kernels, whose reference it is: it lives in
`glm.kernels.reference` and is re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from glm.kernels.reference import dequantize, pack_int4, unpack_int4

__all__ = ["quantize_per_channel", "quantize_grouped", "pack_int4", "unpack_int4", "dequantize", "sqnr"]


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _symmetric(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    # The official formula, in w's own dtype and in this order: a true division by the scale (not a multiply by
    # its reciprocal) and round-half-to-even, or the bytes differ from the released checkpoints.
    scale = w.abs().amax(dim=-1) / _qmax(bits)
    # An all-zero row has scale 0 and 0/0 = NaN; dividing it by 1 instead gives q = 0, and q * 0 is still 0.
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / safe.unsqueeze(-1)).to(torch.int8)
    return q, scale


def quantize_per_channel(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization, the official ChatGLM-6B scheme.

    Mirrors `QuantizedLinear.__init__` of the official `quantization.py`:
    `scale = absmax(row) / (2**(bits-1) - 1)`, `q = round(w / scale)`. The arithmetic runs in `w`'s dtype:
    pass fp32 (fp16 weights `.float()`) to reproduce the reference CPU quantizer, whose output the fixtures
    hold; fp16 on a GPU is what produced the released files. All-zero rows get scale 0 and q 0, not NaN.

    Args:
        w: float weight `[N, K]` (out_features, in_features).
        bits: 8 (q in [-127, 127]) or 4 (q in [-7, 7]).

    Returns:
        `(q, scale)`: q int8 `[N, K]`, unpacked; scale `[N]` in `w`'s dtype.
    """
    return _symmetric(w, bits)


def quantize_grouped(w: Tensor, bits: int = 4, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """Symmetric per-group quantization: the official formula applied to each run of `group_size` inputs.

    Not in the official releases (they are per-channel); it is the groupwise variant of the same scheme
    (as GPTQ/torchao int4 weight-only without a zero point), and it packs and dequantizes the same way.

    Args:
        w: float weight `[N, K]`, K divisible by `group_size`.
        bits: 4 or 8.
        group_size: number of consecutive input features sharing one scale.

    Returns:
        `(q, scale)`: q int8 `[N, K]`, unpacked; scale `[N, K // group_size]` in `w`'s dtype.
    """
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {k}")
    q, scale = _symmetric(w.reshape(n, k // group_size, group_size), bits)
    return q.reshape(n, k), scale


def sqnr(x: Tensor, y: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, `20 * log10(||x|| / ||x - y||)` (torchao's `compute_error`).

    Args:
        x: the reference, any shape.
        y: the approximation, same shape.

    Returns:
        SQNR in dB; `inf` when `y == x`.
    """
    x64, y64 = x.detach().double(), y.detach().double()
    noise = torch.linalg.vector_norm(x64 - y64).item()
    signal = torch.linalg.vector_norm(x64).item()
    if noise == 0:
        return math.inf
    return 20 * math.log10(signal / noise) if signal > 0 else -math.inf
