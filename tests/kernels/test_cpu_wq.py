"""The CPU kernel (glm/kernels/cpu_wq.cpp) against its pure-torch reference, and its tile16 layout.

The default build is this machine's (-march=native). The `slow` tests build the other x86 code paths once each
(AVX2 with and without VNNI, plain C++) and run the same checks: `pytest -m slow tests/kernels/test_cpu_wq.py`.
"""

import pytest
import torch

from glm.kernels.cpu_wq import (
    cpu_kernels,
    cpu_unpack_rows,
    cpu_unpack_rows_reference,
    cpu_unpack_t,
    cpu_unpack_t_reference,
    cpu_wq_linear,
    cpu_wq_linear_reference,
    official_from_tiles,
    pack_tiles,
    tile_bias,
    tile_scales,
    tiles_from_official,
    unpack_tiles,
)
from glm.kernels.reference import pack_int4

# (bits, group_size, N, K): N not a multiple of the 16-row tile, K not of the 32-value block (per channel only).
SHAPES = [(4, None, 37, 200), (4, 32, 40, 96), (4, 64, 16, 128), (8, None, 23, 72), (8, 32, 48, 64),
          (8, 64, 33, 192)]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-10}


def _layer(bits, group_size, n, k, bias=True):
    lo = -8 if bits == 4 else -127
    q = torch.randint(lo, -lo, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // group_size) + 0.5 if group_size else torch.rand(n) + 0.5
    b = torch.randn(n) if bias else None
    return q, pack_tiles(q, bits), tile_scales(scale, k, group_size), tile_bias(b, n)


def _check(ops, bits, group_size, n, k, m, dtype, fast, bias=True):
    _, w, s, b = _layer(bits, group_size, n, k, bias)
    x = (torch.randn(m, k) * 3).to(dtype)
    y = cpu_wq_linear(x, w, s, b, bits, group_size, n, fast, ops=ops)
    ref = cpu_wq_linear_reference(x, w, s, b, bits, group_size, n, fast)
    assert y.shape == (m, n) and y.dtype == dtype
    # Relative to the largest output: fp32 summation order, plus one rounding of the output dtype.
    err = (y.double() - ref.double()).abs().max() / ref.double().abs().max()
    assert err <= TOL[dtype] * 2, (bits, group_size, n, k, m, dtype, fast, err.item())


@pytest.fixture(scope="module")
def ops():
    ops = cpu_kernels()
    if ops is None:
        pytest.skip("the CPU kernel could not be built here")
    return ops


def test_isa_is_reported(ops):
    assert ops.isa() in ("avx512-vnni", "avx2-vnni", "avx2", "generic")


@pytest.mark.parametrize("bits,group_size,n,k", SHAPES)
def test_tile_layout_round_trips(bits, group_size, n, k):
    q, w, _, _ = _layer(bits, group_size, n, k)
    assert w.dtype == torch.uint8 and w.numel() == -(-n // 16) * 16 * -(-k // 32) * 32 * bits // 8
    assert torch.equal(unpack_tiles(w, bits, n, k), q)


@pytest.mark.parametrize("bits,group_size,n,k", SHAPES)
def test_cpp_layout_conversion_matches_torch(ops, bits, group_size, n, k):
    q, w, _, _ = _layer(bits, group_size, n, k)
    official = pack_int4(q) if bits == 4 else q
    assert torch.equal(tiles_from_official(official, bits, k, ops=ops), w)
    assert torch.equal(official_from_tiles(w, bits, n, k, ops=ops), official)


def test_tile_layout_known_bytes():
    """Chunk 0 of tile 0: byte 4r + j holds k = j (low nibble) and k = 4 + j (high nibble) of row r, as q + 8."""
    q = torch.zeros(16, 32, dtype=torch.int8)
    q[0, 0], q[0, 4], q[1, 2], q[15, 7] = -8, 7, 3, -1
    w = pack_tiles(q, 4)
    assert w[0].item() == 0xF0  # row 0: k=0 -> 0, k=4 -> 15
    assert w[4 + 2].item() == 0x8B  # row 1, j=2: k=2 -> 11, k=6 -> 8
    assert w[60 + 3].item() == 0x78  # row 15, j=3: k=3 -> 8, k=7 -> 7
    q8 = torch.zeros(16, 32, dtype=torch.int8)
    q8[2, 1] = -128
    assert pack_tiles(q8, 8)[4 * 2 + 1].item() == 0 and pack_tiles(q8, 8)[0].item() == 128


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("bits,group_size,n,k", SHAPES)
def test_kernel_matches_reference(ops, bits, group_size, n, k, fast):
    for m in (1, 3, 8, 11):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            _check(ops, bits, group_size, n, k, m, dtype, fast)
    _check(ops, bits, group_size, n, k, 2, torch.float32, fast, bias=False)


def test_fast_mode_quantizes_activations_per_block_of_32(ops):
    """An outlier in x costs precision in its own block of 32 only (ggml's q8_0), not in the whole row."""
    _, w, s, b = _layer(4, None, 64, 1024)
    x = torch.randn(1, 1024)
    x[0, 5] = 1000.0
    exact = cpu_wq_linear(x, w, s, b, 4, None, 64, False, ops=ops)
    fast = cpu_wq_linear(x, w, s, b, 4, None, 64, True, ops=ops)
    ref = cpu_wq_linear_reference(x, w, s, b, 4, None, 64, True)
    # As `_check`: fp32 summation order only, relative to the largest output (about 1e4 here).
    assert (fast - ref).abs().max() <= TOL[torch.float32] * 2 * ref.abs().max()
    d = x.abs().max() / 127  # one scale for the whole row instead: every other value rounds to about 0
    per_row = cpu_wq_linear(torch.round(x / d) * d, w, s, b, 4, None, 64, False, ops=ops)
    # 31 values lose their precision instead of 1023: about sqrt(1023 / 31) = 5.7 times less noise.
    assert (fast - exact).norm() < 0.3 * (per_row - exact).norm()


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_nonfinite_inputs_give_nan_outputs(ops, fast):
    """As a float matmul: the official NaN/inf rule downstream must still see them."""
    _, w, s, b = _layer(4, None, 32, 64)
    x = torch.randn(2, 64)
    x[0, 3] = float("inf")
    y = cpu_wq_linear(x, w, s, b, 4, None, 32, fast, ops=ops)
    assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all()


def test_empty_and_bad_inputs(ops):
    _, w, s, b = _layer(4, None, 37, 200)
    assert cpu_wq_linear(torch.randn(0, 200), w, s, b, 4, None, 37, False, ops=ops).shape == (0, 37)
    with pytest.raises(RuntimeError, match="tile16 layout"):
        cpu_wq_linear(torch.randn(1, 232), w, s, b, 4, None, 37, False, ops=ops)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_wq_linear(torch.randn(1, 200), w, s, b, 4, 40, 37, False, ops=ops)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_unpack_rows(w, s, torch.tensor([37]), 4, None, 37, 200, torch.float32, ops=ops)


@pytest.mark.parametrize("bits,group_size,n,k", SHAPES)
def test_unpack_rows_matches_reference(ops, bits, group_size, n, k):
    _, w, s, _ = _layer(bits, group_size, n, k)
    rows = torch.tensor([0, n - 1, n // 2, 0])
    for dtype in (torch.float32, torch.bfloat16):
        got = cpu_unpack_rows(w, s, rows, bits, group_size, n, k, dtype, ops=ops)
        assert torch.equal(got, cpu_unpack_rows_reference(w, s, rows, bits, group_size, n, k, dtype))


@pytest.mark.parametrize("bits,group_size,n,k", SHAPES)
def test_unpack_t_matches_reference(ops, bits, group_size, n, k):
    _, w, s, _ = _layer(bits, group_size, n, k)
    for r0, r1 in ((0, n), (16, n), (0, 16)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = cpu_unpack_t(w, s, bits, group_size, n, k, r0, torch.empty(k, r1 - r0, dtype=dtype), ops=ops)
            assert torch.equal(got, cpu_unpack_t_reference(w, s, bits, group_size, n, k, r0, r1, dtype))
    with pytest.raises(RuntimeError, match="tile of 16"):
        cpu_unpack_t(w, s, bits, group_size, n, k, 3, torch.empty(k, n - 3), ops=ops)


def test_ops_compile_with_torch_compile(ops):
    _, w, s, b = _layer(8, 32, 48, 64)
    x = torch.randn(3, 64)
    f = torch.compile(lambda x: cpu_wq_linear(x, w, s, b, 8, 32, 48, False, ops=ops) * 2, backend="eager",
                      fullgraph=True)
    assert torch.allclose(f(x), 2 * cpu_wq_linear(x, w, s, b, 8, 32, 48, False, ops=ops))


@pytest.mark.slow
@pytest.mark.parametrize("arch,isa", [("haswell", "avx2"), ("alderlake", "avx2-vnni"), ("x86-64", "generic")])
def test_every_code_path(arch, isa):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 code paths")
    other = cpu_kernels(arch)
    if other is None:
        pytest.skip(f"-march={arch} could not be built here")
    assert other.isa() == isa
    for bits, group_size, n, k in SHAPES:
        for fast in (False, True):
            for m in (1, 5):
                for dtype in (torch.float32, torch.bfloat16):
                    _check(other, bits, group_size, n, k, m, dtype, fast)
        _, w, s, _ = _layer(bits, group_size, n, k)
        for dtype in (torch.float32, torch.bfloat16):
            got = cpu_unpack_t(w, s, bits, group_size, n, k, 0, torch.empty(k, n, dtype=dtype), ops=other)
            assert torch.equal(got, cpu_unpack_t_reference(w, s, bits, group_size, n, k, 0, n, dtype))
