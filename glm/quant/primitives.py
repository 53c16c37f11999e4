"""Pure weight-only quantization primitives: quantize, pack, unpack, dequantize, and an accuracy measure.

Every function is stateless and device-agnostic. The per-channel scheme, the int4 nibble order and the
dequantization are those of the official ChatGLM-6B quantizer (`quantization.py` of THUDM/chatglm-6b-int4),
so the official int8/int4 checkpoints round-trip through these functions byte for byte.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 values two per byte along the input dimension, in the official ChatGLM layout.

    Mirrors `compress_int4_weight` of the official `quantization.py`: the first value of each pair goes in
    the high nibble, `byte = (q[2j] << 4) | (q[2j+1] & 0xF)`.

    Args:
        q: int8 `[N, K]` with values in [-8, 7], K even.

    Returns:
        int8 `[N, K // 2]`.
    """
    if q.dtype != torch.int8 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 expects int8 [N, K] with K even, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and not q.is_meta and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    # (-8..7) << 4 stays within int8, so the shift cannot overflow.
    return (q[..., 0::2] << 4) | (q[..., 1::2] & 0xF)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`.

    Args:
        packed: int8 `[N, K // 2]` in the official layout (first value in the high nibble).

    Returns:
        int8 `[N, K]` with values in [-8, 7].
    """
    # Sign-extend each nibble with (v ^ 8) - 8, which does not depend on how int8 shifts treat the sign bit.
    hi = (((packed >> 4) & 0xF) ^ 8) - 8
    lo = ((packed & 0xF) ^ 8) - 8
    return torch.stack([hi, lo], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(
    q: Tensor,
    scale: Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    packed: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Dequantize `q * scale`, with the scale as stored (upcast, never rounded down), as the official code does.

    Args:
        q: int8 `[N, K]`, or for int4 the packed `[N, K // 2]` (the stored layout).
        scale: `[N]` (per-channel) or `[N, K // group_size]` (grouped), any float dtype.
        bits: 4 or 8.
        group_size: None for per-channel scales.
        packed: whether `q` is nibble-packed; defaults to `bits == 4`, i.e. the stored layout.
        dtype: output dtype; by default fp32 (fp64 if the scale is fp64). The product is formed in that
            precision or higher, then rounded once.

    Returns:
        float `[N, K]`.
    """
    _qmax(bits)
    if packed is None:
        packed = bits == 4
    if packed:
        q = unpack_int4(q)
    acc = torch.promote_types(scale.dtype, torch.float32)
    s = scale.to(acc)
    w = q.to(acc)
    if group_size is None:
        w = w * s.unsqueeze(-1)
    else:
        n, k = w.shape
        w = (w.reshape(n, k // group_size, group_size) * s.unsqueeze(-1)).reshape(n, k)
    return w if dtype is None else w.to(dtype)


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
