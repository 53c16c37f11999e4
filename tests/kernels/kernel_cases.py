"""Random quantized layers, a plain dequantize-then-matmul oracle, and the tolerance the kernels are held to.

Written independently of ``glm.kernels``: the packing and the oracle are the spec's formulas, spelled out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Case:
    """A random quantized linear layer and an input for it."""

    x: torch.Tensor  # (..., M, K)
    q: torch.Tensor  # (N, K) int8, the unpacked values
    qweight: torch.Tensor  # (N, K) or (N, K // 2) int8, as stored
    scale: torch.Tensor  # (N,) or (N, K // group_size)
    bias: torch.Tensor | None  # (N,)
    bits: int
    group_size: int | None

    @property
    def args(self) -> tuple:
        return self.x, self.qweight, self.scale, self.bias, self.bits, self.group_size

    def oracle(self) -> torch.Tensor:
        """Plain dequantize-then-matmul in float64, rounded once to x's dtype."""
        scale = self.scale.double()
        if self.group_size is None:
            w = self.q.double() * scale[:, None]
        else:
            w = self.q.double() * scale.repeat_interleave(self.group_size, dim=1)
        y = self.x.double() @ w.T
        if self.bias is not None:
            y = y + self.bias.double()
        return y.to(self.x.dtype)


N = 37  # not a multiple of any BLOCK_N
# (bits, group_size, K): K is never a whole number of 64-wide tiles when per-channel; grouped K holds whole groups.
LAYOUTS = [
    (8, None, 136),
    (8, 32, 96),
    (8, 64, 192),
    (4, None, 200),
    (4, 32, 160),
    (4, 64, 192),
]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """The official packing: ``byte = (q[2j] << 4) | (q[2j + 1] & 0xF)``."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)


def make_case(
    M: int,
    N: int,
    K: int,
    bits: int,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float16,
    scale_dtype: torch.dtype = torch.float32,
    bias: bool = True,
    device: str = "cpu",
    lead: tuple[int, ...] = (),
) -> Case:
    """A random layer with the full range of stored values; x is ``(*lead, M, K)``."""
    limit = 8 if bits == 4 else 128
    q = torch.randint(-limit, limit, (N, K), dtype=torch.int8, device=device)
    scale_shape = (N,) if group_size is None else (N, K // group_size)
    # Scales like a real layer's, so that outputs are O(1) whatever K is.
    scale = (0.5 + torch.rand(scale_shape, device=device)) / (0.6 * limit * K**0.5)
    return Case(
        x=torch.randn(*lead, M, K, device=device).to(dtype),
        q=q,
        qweight=pack_int4(q) if bits == 4 else q,
        scale=scale.to(scale_dtype),
        bias=torch.randn(N, device=device).to(dtype) if bias else None,
        bits=bits,
        group_size=group_size,
    )


def assert_output_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to one unit in the last place of the output dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # Kernel, reference and oracle all sum exact products in float32 (the oracle in float64) and round once to the
    # output dtype. Summation order moves a float32 sum by ~1e-7 relative, which can carry a result lying next to a
    # rounding boundary to the neighbouring value: one unit in the last place, i.e. eps relative (2**-10 for
    # float16, 2**-7 for bfloat16; the latter also covers the CPU interpreter, which rounds float32 to bfloat16
    # toward zero where a GPU rounds to nearest). atol covers sums that cancel to near zero. A real fault (a lost
    # tile, a wrong nibble, a rounded scale) is far larger than either.
    rtol = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5)
