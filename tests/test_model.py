"""Parity of the model with the official reference on the tiny fixtures (float32, <= 1e-4)."""

import pytest
import torch
from glm_testutil import FIXTURES, TOL, glm_tiny_cases, golden

import glm
from glm.attention import apply_rotary_2d, rotary_cos_sin, rotary_inv_freq

G, GT, PROMPTS, GREEDY = glm_tiny_cases()


def _ref_logits(case):
    return GT[case["logits"]]


def _ours(m, case):
    lg = m.logits(case["input_ids"])
    return lg[-8:] if case.get("logits_positions") == "last8" else lg


@pytest.mark.parametrize("case", [c for c in G["cases"] if "logits" in c], ids=lambda c: c["logits"])
def test_golden_logits(tiny, case):
    ours, ref = _ours(tiny, case), _ref_logits(case)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("case", GREEDY, ids=lambda c: c["logits"])
def test_greedy_ids_and_step_logits(tiny, case):
    steps = []
    ids = tiny.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False,
                        logits_hook=lambda lg: steps.append(lg[0].clone()))
    assert ids == case["greedy_ids"]
    ref = GT[case["step_logits"]]
    assert (torch.stack(steps) - ref).abs().max().item() <= TOL












@pytest.mark.parametrize("dtype,need", [("float16", 0.99), ("bfloat16", 0.95)])
def test_half_precision_argmax_agreement(dtype, need):
    m = glm.load(FIXTURES / "glm-tiny", dtype=dtype)
    agree = total = 0
    for case in PROMPTS:
        ours, ref = _ours(m, case), _ref_logits(case)
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        agree += (ours.argmax(-1) == ref.argmax(-1)).sum().item()
        total += ref.shape[0]
    assert agree / total >= need, f"{dtype}: {agree}/{total}"


def test_rotary_frequencies_are_fp16_rounded():
    inv = rotary_inv_freq(128)
    assert inv.dtype == torch.float32 and inv.shape == (32,)
    assert torch.equal(inv, inv.half().float())
    assert not torch.equal(inv, 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)))


def test_rotary_rotates_each_half_by_its_own_position():
    x = torch.randn(1, 1, 1, 16)
    pos = torch.tensor([[[5], [0]]])  # position 5, block position 0: only the first half moves
    cos, sin = rotary_cos_sin(pos, rotary_inv_freq(16), torch.float32)
    y = apply_rotary_2d(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:]) and not torch.allclose(y[..., :8], x[..., :8])
    assert torch.allclose(y.norm(), x.norm())  # a rotation








def test_ptuning_prefix():
    g, gt = golden("glm-tiny-ptuning")
    m = glm.load(FIXTURES / "glm-tiny", ptuning=FIXTURES / "glm-tiny-ptuning")
    for case in g["cases"]:
        assert (m.logits(case["input_ids"]) - gt[case["logits"]]).abs().max().item() <= TOL
        assert m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False) == case["greedy_ids"]










