import threading

import pytest
import torch
from glm_testutil import FIXTURES, golden

import glm
from glm.errors import GenerationError
from glm.generation.sampling import (
    GenerationConfig,
    apply_repetition_penalty,
    draw,
    next_token_probs,
    seeded_uniform,
)

G, GT = golden("sampling")


def _probs(scores, temperature=1.0, top_k=50, top_p=1.0):
    """Full-vocabulary probabilities of every row under one setting, through the batched sampler."""
    B = scores.shape[0]
    t = torch.full((B,), float(temperature))
    k = torch.full((B,), top_k, dtype=torch.long)
    q = torch.full((B,), 1 - top_p, dtype=torch.float32)
    probs, idx = next_token_probs(scores, t, k, q, top_k)
    return probs if idx is None else torch.zeros_like(scores).scatter(1, idx, probs)


@pytest.mark.parametrize("case", G["cases"], ids=lambda c: c["logits"].split(".")[0])
def test_sampling_distribution(case):
    scores = GT[case["logits"]].clone()
    penalty = torch.full((scores.shape[0],), float(case["repetition_penalty"]))
    scores = apply_repetition_penalty(scores, GT[case["prev_ids"]].long(), penalty)
    probs, ref = _probs(scores, case["temperature"], case["top_k"], case["top_p"]), GT[case["probs"]]
    assert (probs > 0).sum(-1).tolist() == case["kept"]
    assert (probs[0] - ref[0]).abs().max().item() <= 1e-6
    # Row 1 has 40 tokens tied at the top: which of them survive top-p depends on sort order, so compare sorted.
    assert (probs[1].sort().values - ref[1].sort().values).abs().max().item() <= 1e-6


def test_rows_with_different_settings_match_each_row_alone():
    case = G["cases"][0]
    scores = GT[case["logits"]].clone()
    t, k, q = torch.tensor([0.7, 1.3]), torch.tensor([5, 40]), torch.tensor([0.1, 0.0])
    both, idx = next_token_probs(scores, t, k, q, 40)
    both = torch.zeros_like(scores).scatter(1, idx, both) if idx is not None else both
    for r in range(2):
        alone = _probs(scores[r : r + 1], t[r].item(), int(k[r]), 1 - q[r].item())
        assert (both[r] - alone[0]).abs().max().item() <= 1e-6


def test_draws_land_only_on_kept_tokens():
    case = G["cases"][0]
    scores = GT[case["logits"]]
    probs = _probs(scores, case["temperature"], case["top_k"], case["top_p"])
    for i in range(200):
        u = seeded_uniform(torch.tensor([1, 2]), torch.tensor([i, i]))
        t = draw(probs, None, u)
        assert probs[0, t[0]] > 0 and probs[1, t[1]] > 0


def test_seeded_uniforms_are_uniform_and_per_seed():
    u = seeded_uniform(torch.full((20000,), 7), torch.arange(20000))
    # A statistical bound, not a numeric tolerance: the mean of 20000 uniforms has sd 0.002, so 0.01 is 5 sd.
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    a = seeded_uniform(torch.tensor([7, 8]), torch.tensor([3, 3]))
    assert a[0] == seeded_uniform(torch.tensor([7]), torch.tensor([3]))[0] and a[0] != a[1]


def test_top_k_with_ties_keeps_every_tied_token():
    scores = torch.tensor([[3.0, 3.0, 3.0, 1.0, 0.0]])
    assert (_probs(scores, top_k=2) > 0).sum().item() == 3


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                dict(repetition_penalty=0), dict(top_k=1.5), dict(seed="x"),
                                dict(temperature=float("nan")), dict(repetition_penalty=float("inf")),
                                dict(seed=2**64), dict(seed=-1), dict(max_new_tokens=0), dict(max_length=-1),
                                dict(do_sample="yes"), dict(stop=[""]), dict(stop=[3])])
def test_bad_settings_are_clear_errors(kw):
    with pytest.raises(GenerationError):
        GenerationConfig(**kw)


def test_tiny_temperature_is_greedy():
    assert GenerationConfig(do_sample=True, temperature=1e-40).greedy
    assert not GenerationConfig(do_sample=True, temperature=0.5).greedy


# ---------------------------------------------------------------------------------------------------- the pool

GM, _ = golden("glm-tiny")
GREEDY = [c for c in GM["cases"] if "greedy_ids" in c and c["kind"] != "batch"]


@pytest.fixture(scope="module")
def pooled():
    return glm.load(FIXTURES / "glm-tiny", max_batch=3)


def test_rows_join_and_leave_mid_decode_with_greedy_outputs_unchanged(pooled, tiny):
    cases = GREEDY[:5]
    solo = [tiny.generate(c["input_ids"], 24, stop_at_eos=False) for c in cases]
    # A hook that holds the first request until the others have arrived: they join a running decode.
    go = threading.Event()
    reqs = [pooled.submit(cases[0]["input_ids"], GenerationConfig(max_new_tokens=24, stop_at_eos=False),
                          logits_hook=lambda _: go.wait(5))]
    for i, c in enumerate(cases[1:], 1):
        n = 24 if i != 2 else 7  # one finishes early and frees its row for the next
        reqs.append(pooled.submit(c["input_ids"], GenerationConfig(max_new_tokens=n, stop_at_eos=False)))
    go.set()
    outs = [list(r) for r in reqs]
    assert outs[0] == solo[0] and outs[2] == solo[2][:7]
    assert outs[1] == solo[1] and outs[3:] == solo[3:]
    assert pooled.scheduler.running == 0


def test_eager_steps_run_over_the_rows_in_use(pooled, tiny, monkeypatch):
    """A lone request decodes as batch 1 in a pool of 3; with rows 0 and 2 in use the step spans 3 rows, and once
    row 0 is done, row 2 decodes alone. The outputs are the solo ones throughout."""
    model, batches = pooled.scheduler.model, []
    forward = model.forward

    def spy(ids, *a, **k):
        if ids.shape[1] == 1:  # decode steps (prefills see the whole prompt)
            batches.append(ids.shape[0])
        return forward(ids, *a, **k)

    monkeypatch.setattr(model, "forward", spy)
    a, b, c = (g["input_ids"] for g in GREEDY[:3])
    assert list(pooled.submit(a, GenerationConfig(max_new_tokens=6, stop_at_eos=False))) == \
        tiny.generate(a, 6, stop_at_eos=False)
    assert batches == [1] * 5
    batches.clear()
    go = threading.Event()
    reqs = [pooled.submit(a, GenerationConfig(max_new_tokens=12, stop_at_eos=False), logits_hook=lambda _: go.wait(5)),
            pooled.submit(b, GenerationConfig(max_new_tokens=3, stop_at_eos=False)),
            pooled.submit(c, GenerationConfig(max_new_tokens=24, stop_at_eos=False))]
    go.set()
    outs = [list(r) for r in reqs]
    assert outs == [tiny.generate(a, 12, stop_at_eos=False), tiny.generate(b, 3, stop_at_eos=False),
                    tiny.generate(c, 24, stop_at_eos=False)]
    assert batches[0] == 3 and batches[-1] == 1 and set(batches) == {3, 1}
    assert pooled.scheduler.running == 0


def test_a_cancelled_request_frees_its_row_and_the_others_are_unchanged(pooled, tiny):
    a, b = GREEDY[0]["input_ids"], GREEDY[1]["input_ids"]
    expect = tiny.generate(b, 24, stop_at_eos=False)
    stream = pooled.generate_stream(a, 1000, stop_at_eos=False)
    next(stream)
    other = pooled.submit(b, GenerationConfig(max_new_tokens=24, stop_at_eos=False))
    stream.close()  # cancels the long one mid-decode
    assert list(other) == expect
    assert pooled.scheduler.running == 0


def test_seeded_sample_is_the_same_alone_and_batched(pooled):
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=0.9, top_p=0.8, seed=1234,
                           stop_at_eos=False)
    alone = list(pooled.submit(GREEDY[0]["input_ids"], cfg))
    others = [pooled.submit(c["input_ids"], cfg.replace(seed=None)) for c in GREEDY[1:3]]
    batched = list(pooled.submit(GREEDY[0]["input_ids"], cfg))
    for r in others:
        r.wait()
    assert alone == batched
    assert list(pooled.submit(GREEDY[0]["input_ids"], cfg.replace(seed=99))) != alone


def test_ptuning_model_in_a_pool():
    g, _ = golden("glm-tiny-ptuning")
    m = glm.load(FIXTURES / "glm-tiny", ptuning=FIXTURES / "glm-tiny-ptuning", max_batch=2)
    cases = g["cases"]
    outs = m.generate([c["input_ids"] for c in cases], max(len(c["greedy_ids"]) for c in cases), stop_at_eos=False)
    for c, out in zip(cases, outs):
        assert out[: len(c["greedy_ids"])] == c["greedy_ids"]


def test_results_say_how_each_request_ended(pooled):
    eos = pooled.config.eos_token_id
    case = next(c for c in GREEDY if eos in c["greedy_ids"])
    r = pooled.submit(case["input_ids"], GenerationConfig(max_new_tokens=24))
    short = pooled.submit(GREEDY[0]["input_ids"], GenerationConfig(max_new_tokens=2, stop_at_eos=False))
    assert r.wait().finish_reason == "stop" and r.result.tokens[-1] == eos
    res = short.wait()
    assert (res.finish_reason, res.completion_tokens, res.prompt_tokens) == ("length", 2,
                                                                             len(GREEDY[0]["input_ids"]))
    assert not res.nan


def test_context_limit_caps_and_refuses_before_allocating():
    m = glm.load(FIXTURES / "glm-tiny", max_context=64)
    ids = GREEDY[0]["input_ids"]
    out = m.generate(ids, 5_000_000, stop_at_eos=False)
    assert len(ids) + len(out) == 64
    assert m.scheduler.runner.caches[0].k.shape[2] <= 256  # not 5M slots
    with pytest.raises(GenerationError, match="context limit"):
        m.generate([5] * 70 + ids, 3)


def test_prompts_admitted_together_share_one_prefill_and_match_the_goldens():
    m = glm.load(FIXTURES / "glm-tiny", max_batch=len(GREEDY))
    outs = m.generate([c["input_ids"] for c in GREEDY], 24, stop_at_eos=False)  # prompts of 3 to 35 tokens
    for c, out in zip(GREEDY, outs):
        assert out[: len(c["greedy_ids"])] == c["greedy_ids"]


def test_a_request_read_to_the_end_can_be_waited_on(tiny):
    req = tiny.submit(GREEDY[0]["input_ids"], GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    assert len(list(req)) == 3
    assert req.wait().completion_tokens == 3 and list(req) == []
