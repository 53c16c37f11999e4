"""The pure primitives: official scheme reproduced byte for byte, packing, dequantization, SQNR."""

import math

import pytest
import torch
from quant_ckpt import fp16_sd, int4_sd, int8_sd, linear_prefixes

from glm.quant import dequantize, pack_int4, quantize_grouped, quantize_per_channel, sqnr, unpack_int4


def test_pack_int4_layout_first_value_in_high_nibble():
    q = torch.tensor([[1, -2, -8, 7, 0, -1]], dtype=torch.int8)
    packed = pack_int4(q)
    # 0x1E, 0x87, 0x0F as signed bytes
    assert packed.tolist() == [[0x1E, 0x87 - 256, 0x0F]]
    assert packed.dtype == torch.int8


def test_pack_unpack_round_trip_every_value():
    q = torch.randint(-8, 8, (37, 64), dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)
    assert pack_int4(q).shape == (37, 32)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    every_byte = torch.arange(-128, 128, dtype=torch.int8).reshape(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_pack_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits", [8, 4])
def test_reproduces_the_official_quantized_checkpoints(bits):
    """glm-tiny's fp16 weights, cast to fp32, give the reference's int8/int4 tensors byte for byte."""
    ref = int8_sd() if bits == 8 else int4_sd()
    prefixes = linear_prefixes(ref)
    assert len(prefixes) == 12
    for p in prefixes:
        q, scale = quantize_per_channel(fp16_sd()[p + ".weight"].float(), bits)
        stored = pack_int4(q) if bits == 4 else q
        assert scale.dtype == ref[p + ".weight_scale"].dtype == torch.float32
        assert torch.equal(scale, ref[p + ".weight_scale"]), p
        assert stored.dtype == torch.int8 and torch.equal(stored, ref[p + ".weight"]), p


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_values_stay_in_the_symmetric_range(bits):
    w = torch.randn(64, 256)
    q, scale = quantize_per_channel(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max().item() == qmax
    assert scale.shape == (64,)
    # the row's largest magnitude maps to exactly +-qmax
    assert torch.equal(q.abs().amax(1), torch.full((64,), qmax, dtype=torch.int8))


def test_quantizes_in_the_dtype_given():
    """fp16 in, fp16 scales out: the arithmetic of the GPU quantizer that made the released files."""
    w = torch.randn(16, 32).half()
    q, scale = quantize_per_channel(w, 8)
    assert scale.dtype == torch.float16
    s_ref = w.abs().amax(-1) / 127
    assert torch.equal(scale, s_ref) and torch.equal(q, torch.round(w / s_ref[:, None]).to(torch.int8))


@pytest.mark.parametrize("bits", [8, 4])
def test_all_zero_rows_and_groups_give_zeros_not_nan(bits):
    w = torch.randn(4, 64)
    w[1] = 0
    w[2, :32] = 0
    q, s = quantize_per_channel(w, bits)
    assert not torch.isnan(s).any() and s[1] == 0 and (q[1] == 0).all()
    assert torch.equal(dequantize(q, s, bits, packed=False)[1], torch.zeros(64))
    qg, sg = quantize_grouped(w, bits, group_size=32)
    assert not torch.isnan(sg).any() and sg[2, 0] == 0 and (qg[2, :32] == 0).all()
    assert torch.equal(dequantize(qg, sg, bits, 32, packed=False)[2, :32], torch.zeros(32))


@pytest.mark.parametrize("bits", [8, 4])
def test_grouped_applies_the_same_formula_per_group(bits):
    w = torch.randn(8, 128)
    q, s = quantize_grouped(w, bits, group_size=32)
    assert q.shape == (8, 128) and s.shape == (8, 4)
    for g in range(4):
        qg, sg = quantize_per_channel(w[:, 32 * g : 32 * (g + 1)], bits)
        assert torch.equal(q[:, 32 * g : 32 * (g + 1)], qg) and torch.equal(s[:, g], sg)
    # one group spanning the row is per-channel quantization
    q1, s1 = quantize_grouped(w, bits, group_size=128)
    qc, sc = quantize_per_channel(w, bits)
    assert torch.equal(q1, qc) and torch.equal(s1[:, 0], sc)


def test_grouped_rejects_a_group_that_does_not_divide_k():
    with pytest.raises(ValueError):
        quantize_grouped(torch.randn(4, 100), 4, group_size=32)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 32), (8, 128)])
def test_grouped_beats_per_channel_on_random_weights(bits, group_size):
    w = torch.randn(256, 1024) * 0.02
    qc, sc = quantize_per_channel(w, bits)
    qg, sg = quantize_grouped(w, bits, group_size)
    per_channel = sqnr(w, dequantize(qc, sc, bits, packed=False))
    grouped = sqnr(w, dequantize(qg, sg, bits, group_size, packed=False))
    assert grouped > per_channel + 1.0, (grouped, per_channel)
    # sanity of the magnitudes: about 6 dB per bit
    assert per_channel > (12 if bits == 4 else 36)


def test_dequantize_is_q_times_scale_with_the_scale_upcast():
    q = torch.randint(-7, 8, (16, 64), dtype=torch.int8)
    s32 = torch.rand(16) / 7
    s16 = s32.half()
    assert torch.equal(dequantize(q, s32, 8), q.float() * s32[:, None])
    # fp16 scales are upcast, never the product rounded to fp16
    assert dequantize(q, s16, 8).dtype == torch.float32
    assert torch.equal(dequantize(q, s16, 8), q.float() * s16.float()[:, None])
    # int4 defaults to the packed (stored) layout
    assert torch.equal(dequantize(pack_int4(q), s32, 4), q.float() * s32[:, None])
    assert torch.equal(dequantize(q, s32, 4, packed=False), q.float() * s32[:, None])
    sg = torch.rand(16, 2)
    expect = (q.float().view(16, 2, 32) * sg[:, :, None]).view(16, 64)
    assert torch.equal(dequantize(pack_int4(q), sg, 4, 32), expect)
    assert dequantize(q, s32, 8, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sqnr():
    x = torch.randn(1000)
    assert sqnr(x, x) == math.inf
    assert sqnr(x, 1.1 * x) == pytest.approx(20.0)
    assert sqnr(x, x + 0.01 * x.norm() / math.sqrt(1000) * torch.randn(1000)) > 30
