"""Tensor parallelism over NCCL where one GPU is all there is: N=1 runs the whole code path (the process group, the
collectives, the mirrored Runner) with one rank. Skipped without CUDA."""

import pytest
from glm_testutil import FIXTURES, TOL, glm_tiny_cases, golden

import glm
from glm.parallel import world as tp_world

G, GT, PROMPTS, GREEDY = glm_tiny_cases()


@pytest.fixture(scope="module")
def nccl():
    yield lambda name, **kw: glm.load(FIXTURES / name, device="cuda", tensor_parallel=1, **kw)
    if tp_world.current() is not None:
        tp_world.current().close()


@pytest.mark.gpu
def test_nccl_one_rank_float_goldens(nccl):
    m = nccl("glm-tiny", dtype="float32", max_batch=4)
    assert tp_world.current().kind == "cuda" and m.device.type == "cuda"
    for case in PROMPTS:
        lg = m.logits(case["input_ids"]).cpu()
        lg = lg[-8:] if case.get("logits_positions") == "last8" else lg
        assert (lg - GT[case["logits"]]).abs().max().item() <= TOL
    for case in GREEDY:
        assert m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False) == case["greedy_ids"]
    batch = next(c for c in G["cases"] if c["kind"] == "batch")
    assert m.generate(batch["prompts"], len(batch["greedy_ids"][0]), stop_at_eos=False) == batch["greedy_ids"]


@pytest.mark.gpu
def test_nccl_one_rank_int4_equals_one_process(nccl):
    m = nccl("glm-tiny-int4", dtype="float16")
    one = glm.load(FIXTURES / "glm-tiny-int4", device="cuda", dtype="float16")
    g, _ = golden("glm-tiny-int4")
    for case in g["cases"]:
        n = len(case["greedy_ids"])
        assert m.generate(case["input_ids"], n, stop_at_eos=False) == one.generate(case["input_ids"], n,
                                                                                   stop_at_eos=False)
