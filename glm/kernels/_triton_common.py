"""Triton helpers shared by the GEMV and GEMM kernels: decoding stored bytes, the tensor-core step, the epilogue.

Decoding builds floats straight from the bits instead of converting integers (I2F runs at a fraction of the FMA
rate, and a bandwidth-bound INT4 GEMV would hit that ceiling): ``0x4B000000`` is 2**23, so OR-ing an unsigned
u < 2**23 into its mantissa gives the float ``2**23 + u`` exactly, and one subtraction leaves u. Flipping the sign bit
of a two's-complement field first turns it into ``value + offset``, and the offset is folded into the subtracted
constant: one logic op and one float add per value, exact. The tensor-core path casts these floats to the 16-bit
activation dtype, which holds every stored value exactly, so its products are exact too; scales are applied
afterwards, in float32.
"""

import inspect

import triton
import triton.language as tl
import triton.testing

from glm.kernels._launch import interpreting

# The CPU interpreter multiplies bfloat16 tiles as their raw uint16 bits (triton 3.9), so there bfloat16 dots run in
# float32 instead: the same exact products and float32 sums. Compiled kernels keep 16-bit tensor-core dots.
_DOT_BF16_IN_F32 = tl.constexpr(interpreting())


def _quick_bench(kernel_call, quantiles):
    # These kernels run for microseconds: Triton's default 25 ms warmup + 100 ms of repeats per config would make
    # every first call of a new shape take seconds.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# Autotuning options shared by the kernels: the quick benchmark, and results kept in Triton's on-disk cache (so a
# new process does not tune again) where this triton has that option.
AUTOTUNE_OPTIONS = {"do_bench": _quick_bench}
if "cache_results" in inspect.signature(triton.autotune).parameters:
    AUTOTUNE_OPTIONS["cache_results"] = True


@triton.jit
def int8_as_f32(packed):
    """int8 bytes -> their signed values as float32."""
    b = packed.to(tl.uint8, bitcast=True).to(tl.int32)  # the raw byte, zero-extended
    # b ^ 0x80 is value + 128 in [0, 255]; 8388736.0 is 2**23 + 128.
    return (b ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def int4_as_f32(packed):
    """int8 bytes -> (high nibble, low nibble), each sign-extended, as float32."""
    b = packed.to(tl.uint8, bitcast=True).to(tl.int32)  # the raw byte, zero-extended
    # Flipping bit 3 (7) makes the low (high) nibble value + 8. The high nibble is left in place, bits 4-7, under
    # the exponent of 2**19, whose mantissa step is 1/16: no shift needed. 524296.0 = 2**19 + 8, 8388616.0 = 2**23 + 8.
    high = ((b & 0xF0) ^ 0x49000080).to(tl.float32, bitcast=True) - 524296.0
    low = ((b & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    return high, low


@triton.jit
def dot_packed(x, packed, BITS: tl.constexpr):
    """Tensor-core product of an activation tile with a tile of stored (unscaled) weights.

    ``x`` is ``[BLOCK_M, TILE_K]`` in float16/bfloat16, ``packed`` the ``[BLOCK_N, TILE_K * BITS // 8]`` int8 bytes
    of the same K range; returns ``x @ q.T`` as ``[BLOCK_M, BLOCK_N]`` float32.
    """
    dot_dtype = x.dtype
    if _DOT_BF16_IN_F32 and x.dtype == tl.bfloat16:
        dot_dtype = tl.float32
        x = x.to(tl.float32)
    if BITS == 4:
        high, low = int4_as_f32(packed)
        # Rather than interleave the nibbles back into K order, pair the high (even k) nibbles with the even
        # columns of x and the low ones with the odd columns: two half-depth dots, no shuffling of weights.
        x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        acc = tl.dot(x_even, tl.trans(high.to(dot_dtype)))
        acc = tl.dot(x_odd, tl.trans(low.to(dot_dtype)), acc)
    else:
        acc = tl.dot(x, tl.trans(int8_as_f32(packed).to(dot_dtype)))
    return acc


@triton.jit
def dot_loop(
    x_rows, m_mask, w_rows, scale_rows, n_mask, k_begin, k_end, K, K_BYTES,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_K: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_M, BLOCK_N]`` float32 sums of x * q over K in [k_begin, k_end), grouped scales applied.

    ``x_rows`` / ``w_rows`` point at the start of the tile's rows of x / of the stored weight, ``scale_rows`` at the
    tile's scale rows. Steps are TILE_K long and start at multiples of it, so each lies inside one scale group.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, TILE_K):
        offs_k = k0 + tl.arange(0, TILE_K)
        offs_b = k0 * BITS // 8 + tl.arange(0, TILE_K * BITS // 8)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        packed = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & (offs_b[None, :] < K_BYTES), other=0)
        part = dot_packed(x, packed, BITS)
        if GROUP_SIZE > 0:
            scale = tl.load(scale_rows + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
            part = part * scale.to(tl.float32)[None, :]
        acc += part
    return acc


@triton.jit
def store_output(
    acc,  # [BLOCK_M, BLOCK_N] fp32 sum of x * q (already scaled when the scales are grouped)
    offs_m,
    offs_n,
    M,
    N,
    scale_ptr,
    bias_ptr,
    y_ptr,
    stride_ym,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Applies a per-channel scale and the bias in float32, casts to y's dtype, stores the tile."""
    n_mask = offs_n < N
    if PER_CHANNEL:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])
