"""Pure-torch weight-only INT8/INT4 linear: the oracle the Triton kernels are tested against, and their CPU fallback.

The scheme is the official ChatGLM-6B quantized release's (see the spec, "Quantized releases"):

- the dequantized weight is ``w[n, k] = q[n, k] * scale[n]``, or ``q[n, k] * scale[n, k // group_size]`` when the
  scales are grouped along K;
- INT8 stores ``q`` as ``[N, K]`` int8;
- INT4 stores ``[N, K // 2]`` int8 bytes, two signed nibbles per byte along K, the even k in the high nibble:
  ``byte = (q[2j] << 4) | (q[2j + 1] & 0xF)``.

Everything here is written to be obviously right rather than fast: unpack, dequantize in float32, matmul in float32,
cast once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_wq_args", "dequantize", "pack_int4", "unpack_int4", "wq_gemm_reference", "wq_gemv_reference",
           "wq_linear_reference"]


# ---------------------------------------------------------------- the official layout (glm.quant re-exports these)

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
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
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



# ------------------------------------------------------------------------------------------------ the linear


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_wq_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> tuple[int, int, int]:
    """Checks that the arguments of a weight-only quantized linear fit together.

    Args:
        x: ``[M, K]`` activations.
        qweight: int8, ``[N, K]`` (bits=8) or ``[N, K // 2]`` (bits=4).
        scale: ``[N]`` or ``[N, K // group_size]``.
        bias: ``[N]`` or None.
        bits: 4 or 8.
        group_size: None or a positive divisor of K.

    Returns:
        ``(M, N, K)``.

    Raises:
        TypeError: on a wrong dtype.
        ValueError: on a wrong shape or an unsupported bits / group_size.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if qweight.dtype != torch.int8:
        raise TypeError(f"qweight must be int8, got {qweight.dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
    M, K = x.shape
    N = qweight.shape[0]
    if bits == 4 and K % 2:
        raise ValueError(f"bits=4 packs two values per byte along K, so K must be even, got K={K}")
    packed_k = K * bits // 8
    if qweight.shape[1] != packed_k:
        raise ValueError(
            f"qweight has shape {tuple(qweight.shape)}, expected [N, {packed_k}] for bits={bits} and x with K={K}"
        )
    if scale.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"scale must be float16, bfloat16 or float32, got {scale.dtype}")
    if group_size is None:
        expected_scale: tuple[int, ...] = (N,)
    else:
        if not isinstance(group_size, int) or group_size <= 0 or K % group_size:
            raise ValueError(f"group_size must be None or a positive divisor of K={K}, got {group_size}")
        expected_scale = (N, K // group_size)
    if tuple(scale.shape) != expected_scale:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)}, expected {list(expected_scale)} for group_size={group_size}"
        )
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{N}]")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    return M, N, K


def wq_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """``y = x @ dequant(W).T + b`` in float32, cast once to x's dtype.

    Args:
        x: ``[M, K]`` float16, bfloat16 or float32.
        qweight: int8, ``[N, K]`` for bits=8 or ``[N, K // 2]`` packed for bits=4.
        scale: ``[N]`` or ``[N, K // group_size]``, any float dtype (upcast to float32).
        bias: ``[N]`` or None.
        bits: 4 or 8.
        group_size: None for per-channel scales, else the group length along K.

    Returns:
        ``[M, N]`` in x's dtype.
    """
    check_wq_args(x, qweight, scale, bias, bits, group_size)
    y = x.float() @ dequantize(qweight, scale, bits, group_size).T  # (M, N) fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# The kernels differ only in how they are tuned, so both share one oracle; the names mirror the kernels'.
wq_gemv_reference = wq_linear_reference
wq_gemm_reference = wq_linear_reference
