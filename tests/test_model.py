"""Parity of the model with the official reference on the tiny fixtures (float32, <= 1e-4)."""

import pytest
import torch
from glm_testutil import FIXTURES, golden

import glm
from glm.attention import apply_rotary_2d, rotary_cos_sin, rotary_inv_freq
from glm.generation import prompt_positions

TOL = 1e-4  # float32 parity with the reference, as the fixtures' README states
G, GT = golden("glm-tiny")
PROMPTS = [c for c in G["cases"] if c["kind"] == "prompt"]
GREEDY = [c for c in G["cases"] if "greedy_ids" in c and c["kind"] != "batch"]


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


def test_mask_infill_positions_follow_the_mask():
    case = next(c for c in G["cases"] if c["kind"] == "mask_infill")
    cfg = glm.GLMConfig.from_json(FIXTURES / "glm-tiny" / "config.json")
    pos, block = prompt_positions(case["input_ids"], cfg)
    mask_at = case["input_ids"].index(cfg.mask_token_id)
    assert pos[-1] == mask_at and block[-1] == 1 and block[0] == 0


def test_left_padded_batch(tiny):
    case = next(c for c in G["cases"] if c["kind"] == "batch")
    from glm.generation import Batch

    b = Batch.from_prompts(case["prompts"], tiny.config)
    assert b.ids.tolist() == case["padded_input_ids"]
    assert tiny.generate(case["prompts"], 24, stop_at_eos=False) == case["greedy_ids"]


def test_batched_decode_equals_one_by_one(tiny):
    case = next(c for c in G["cases"] if c["kind"] == "batch")
    singles = [tiny.generate(p, 24, stop_at_eos=False) for p in case["prompts"]]
    assert singles == tiny.generate(case["prompts"], 24, stop_at_eos=False)


@pytest.mark.parametrize("name", ["prompt2.logits", "prompt5.logits"])  # 9 and 302 prompt tokens
def test_cached_decoding_equals_uncached_forward(tiny, name):
    case = next(c for c in PROMPTS if c["logits"] == name)
    steps = []
    new = tiny.generate(case["input_ids"], 10, stop_at_eos=False, logits_hook=lambda lg: steps.append(lg[0].clone()))
    for i, step in enumerate(steps):
        full = tiny.logits(case["input_ids"] + new[:i])[-1]
        assert (step - full).abs().max().item() <= TOL, f"step {i}"


def test_stop_at_eos(tiny):
    case = next(c for c in GREEDY if tiny.config.eos_token_id in c["greedy_ids"])
    out = tiny.generate(case["input_ids"], 24)
    assert out == case["greedy_ids"][: case["greedy_ids"].index(tiny.config.eos_token_id) + 1]


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


def test_invalid_scores_rule():
    from glm.generation.sampling import fix_invalid_scores

    s = torch.tensor([[1.0, float("nan"), 2.0, 0, 0, 0, 0]])
    fixed, bad = fix_invalid_scores(s)
    assert bool(bad) and fixed[0, 5] == 5e4 and fixed.sum() == 5e4
    fine, bad = fix_invalid_scores(torch.ones(1, 7))
    assert not bool(bad) and torch.equal(fine, torch.ones(1, 7))


def test_prompt_without_sop_is_a_clear_error(tiny):
    with pytest.raises(glm.GenerationError, match="<sop>"):
        tiny.generate([5, 6, 7], 3)


def test_prompt_over_max_length_is_a_clear_error(tiny):
    with pytest.raises(glm.GenerationError, match="max_length"):
        tiny.generate([5, 6, 1001, 1004], max_length=4)


def test_ptuning_prefix():
    g, gt = golden("glm-tiny-ptuning")
    m = glm.load(FIXTURES / "glm-tiny", ptuning=FIXTURES / "glm-tiny-ptuning")
    for case in g["cases"]:
        assert (m.logits(case["input_ids"]) - gt[case["logits"]]).abs().max().item() <= TOL
        assert m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False) == case["greedy_ids"]


def test_caches_are_reused_across_calls(tiny):
    case = GREEDY[0]
    tiny.generate(case["input_ids"], 24, stop_at_eos=False)
    first = tiny.scheduler.runner.caches
    assert tiny.generate(GREEDY[1]["input_ids"], 8, stop_at_eos=False) == GREEDY[1]["greedy_ids"][:8]
    assert tiny.scheduler.runner.caches is first  # no new allocation for a turn that fits


def test_interleaved_generations_do_not_share_caches(tiny):
    a, b = GREEDY[0], GREEDY[1]
    sa = tiny.generate_stream(a["input_ids"], 24, stop_at_eos=False)
    sb = tiny.generate_stream(b["input_ids"], 24, stop_at_eos=False)
    out_a, out_b = [], []
    for ta, tb in zip(sa, sb):
        out_a.append(ta)
        out_b.append(tb)
    assert out_a == a["greedy_ids"] and out_b == b["greedy_ids"]


def test_compiled_static_decode_matches_golden():
    # torch.compile(mode="reduce-overhead") with fixed shapes: CUDA graphs on a GPU, inductor's C++ on a CPU.
    m = glm.load(FIXTURES / "glm-tiny", compile=True)
    for case in GREEDY[:2]:
        assert m.generate(case["input_ids"], 24, stop_at_eos=False) == case["greedy_ids"]
    batch = next(c for c in G["cases"] if c["kind"] == "batch")
    assert m.generate(batch["prompts"], 24, stop_at_eos=False) == batch["greedy_ids"]


@pytest.mark.gpu
def test_cuda_graph_decode_matches_golden_on_gpu():
    m = glm.load(FIXTURES / "glm-tiny", device="cuda", dtype="float32", compile=True)
    for case in GREEDY[:3]:
        assert m.generate(case["input_ids"], 24, stop_at_eos=False) == case["greedy_ids"]
        assert (m.logits(case["input_ids"]).cpu() - _ref_logits(case)).abs().max().item() <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["glm-tiny-int8", "glm-tiny-int4"])
def test_cuda_graph_decode_with_quantized_kernels_equals_eager(fixture):
    # fp16 activations go through the Triton kernels; the graph replay must give the eager path's tokens.
    eager = glm.load(FIXTURES / fixture, device="cuda", dtype="float16")
    graphs = glm.load(FIXTURES / fixture, device="cuda", dtype="float16", compile=True)
    g, _ = golden(fixture)
    for case in g["cases"]:
        n = len(case["greedy_ids"])
        assert graphs.generate(case["input_ids"], n, stop_at_eos=False) == eager.generate(case["input_ids"], n,
                                                                                           stop_at_eos=False)
