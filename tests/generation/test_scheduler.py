"""The scheduler: rows join and leave a running decode, cancellation, finish reasons, the context limit; each
request's output equals the same request alone."""

import threading

import pytest
from glm_testutil import FIXTURES, glm_tiny_cases, golden

import glm
from glm.errors import GenerationError
from glm.generation.sampling import GenerationConfig

GM, _, _, GREEDY = glm_tiny_cases()


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


def test_stop_at_eos(tiny):
    case = next(c for c in GREEDY if tiny.config.eos_token_id in c["greedy_ids"])
    out = tiny.generate(case["input_ids"], 24)
    assert out == case["greedy_ids"][: case["greedy_ids"].index(tiny.config.eos_token_id) + 1]




def test_max_waiting_is_a_load_option_and_a_full_queue_is_queue_full():
    m = glm.load(FIXTURES / "glm-tiny", max_waiting=1)
    go = threading.Event()
    ids = GREEDY[0]["input_ids"]
    first = m.submit(ids, GenerationConfig(max_new_tokens=4), logits_hook=lambda _: go.wait(5))
    try:
        import time

        while m.scheduler.running == 0:  # the first holds the only row; the second waits
            time.sleep(0.01)
        second = m.submit(ids, GenerationConfig(max_new_tokens=4))
        with pytest.raises(glm.QueueFull, match="busy"):
            m.submit(ids, GenerationConfig(max_new_tokens=4))
    finally:
        go.set()
    assert list(first) == list(second)
    with pytest.raises(GenerationError, match="max_waiting"):
        glm.load(FIXTURES / "glm-tiny", max_waiting=-1)


def test_stop_strings_without_a_tokenizer_are_refused():
    m = glm.load(FIXTURES / "glm-tiny")  # a bare weights folder: no ice_text.model
    with pytest.raises(GenerationError, match="tokenizer"):
        m.generate(GREEDY[0]["input_ids"], 4, stop=["x"])


@pytest.mark.parametrize("sample", [False, True])
def test_logprobs_are_the_log_softmax_of_the_logits_along_the_generated_path(tiny, sample):
    ids = GREEDY[0]["input_ids"]
    settings = dict(max_new_tokens=10, stop_at_eos=False, do_sample=sample, temperature=0.7, top_p=0.8, seed=3,
                    repetition_penalty=1.3, logprobs=5)
    req = tiny.submit(ids, GenerationConfig(**settings))
    out = list(req)
    assert out == tiny.generate(ids, **{k: v for k, v in settings.items() if k != "logprobs"})  # nothing changed
    assert len(req.logprobs) == len(out)
    for i, (tok, lp) in enumerate(zip(out, req.logprobs)):
        ref = tiny.logits(ids + out[:i])[-1].float().log_softmax(-1)  # the uncached forward along the path
        assert abs(lp.logprob - ref[tok].item()) <= 1e-4
        vals, top = ref.topk(5)
        assert [t for t, _ in lp.top] == top.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, vals.tolist())) <= 1e-4
    zero = tiny.submit(ids, GenerationConfig(max_new_tokens=3, logprobs=0))
    list(zero)
    assert all(lp.top == [] for lp in zero.logprobs) and len(zero.logprobs) == 3
    with pytest.raises(GenerationError, match="logprobs"):
        GenerationConfig(logprobs=21)


def test_n_choices_share_one_prefill_and_each_equals_its_seed_alone(pooled, tiny, monkeypatch):
    ids = GREEDY[1]["input_ids"]
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False, do_sample=True, temperature=1.0, top_k=0, seed=5)
    alone = [tiny.generate(ids, **{**cfg.__dict__, "seed": 5 + j}) for j in range(3)]
    prefills = []
    model = pooled.scheduler.model
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, *a, **k: (prefills.append(x.shape) if x.shape[1] > 1 else None)
                        or forward(x, *a, **k))
    reqs = pooled.submit(ids, cfg, n=3)
    assert [list(r) for r in reqs] == alone and len(set(map(tuple, alone))) > 1
    assert prefills == [(1, len(ids))]  # one prefill of one row for the three choices
    assert [r.result.finish_reason for r in reqs] == ["length"] * 3
    greedy = pooled.submit(ids, GenerationConfig(max_new_tokens=8, stop_at_eos=False), n=2)
    assert [list(r) for r in greedy] == [tiny.generate(ids, 8, stop_at_eos=False)] * 2


def test_n_choices_wait_for_rows_together_and_one_can_be_cancelled(pooled, tiny):
    a, b = GREEDY[0]["input_ids"], GREEDY[2]["input_ids"]
    go = threading.Event()
    first = pooled.submit(a, GenerationConfig(max_new_tokens=6, stop_at_eos=False), logits_hook=lambda _: go.wait(5))
    group = pooled.submit(b, GenerationConfig(max_new_tokens=20, stop_at_eos=False), n=3)  # needs all 3 rows
    group[1].cancel()
    go.set()
    assert list(first) == tiny.generate(a, 6, stop_at_eos=False)
    outs = [list(r) for r in group]
    solo = tiny.generate(b, 20, stop_at_eos=False)
    assert outs[0] == solo and outs[2] == solo and group[1].result.finish_reason == "cancelled"
    assert pooled.scheduler.running == 0
    with pytest.raises(GenerationError, match=r"n must be an integer in \[1, 3\]"):
        pooled.submit(b, GenerationConfig(max_new_tokens=2), n=4)


def test_n_choices_with_a_sink_are_told_apart_by_index(pooled):
    events = []
    reqs = pooled.submit(GREEDY[0]["input_ids"], GenerationConfig(max_new_tokens=3, stop_at_eos=False), n=2,
                         sink=lambda j, ev: events.append((j, ev)))
    while any(r.result is None for r in reqs):
        threading.Event().wait(0.01)
    for j, r in enumerate(reqs):
        assert [ev for i, ev in events if i == j] == r.tokens + [None]
