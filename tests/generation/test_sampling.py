"""The sampling pipeline against transformers' warpers, GenerationConfig's checks, the per-row sampler."""


import pytest
import torch
from glm_testutil import golden

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


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                dict(repetition_penalty=0), dict(top_k=1.5), dict(seed="x"),
                                dict(temperature=float("nan")), dict(repetition_penalty=float("inf")),
                                dict(seed=2**64), dict(seed=-(2**63) - 1), dict(max_new_tokens=0), dict(max_length=-1),
                                dict(do_sample="yes"), dict(stop=[""]), dict(stop=[3])])
def test_bad_settings_are_clear_errors(kw):
    with pytest.raises(GenerationError):
        GenerationConfig(**kw)


def test_tiny_temperature_is_greedy():
    assert GenerationConfig(do_sample=True, temperature=1e-40).greedy
    assert not GenerationConfig(do_sample=True, temperature=0.5).greedy



def test_invalid_scores_rule():
    from glm.generation.sampling import fix_invalid_scores

    s = torch.tensor([[1.0, float("nan"), 2.0, 0, 0, 0, 0]])
    fixed, bad = fix_invalid_scores(s)
    assert bool(bad) and fixed[0, 5] == 5e4 and fixed.sum() == 5e4
    fine, bad = fix_invalid_scores(torch.ones(1, 7))
    assert not bool(bad) and torch.equal(fine, torch.ones(1, 7))




def test_repetition_history_grows_with_the_row_own_padding():
    # Slots added when the history grows repeat the row's first id, so a penalty never reaches id 0 by accident.
    from glm.generation.sampling import Sampler

    s = Sampler(2, vocab_size=10, device=torch.device("cpu"))
    s.reserve(4)
    s.set_row(0, GenerationConfig(repetition_penalty=2.0), [7, 8])
    s.reserve(8)
    assert s.seen[0].tolist() == [7, 8, 7, 7, 7, 7, 7, 7] and s.n_seen[0] == 2
    logits = torch.tensor([[1.0] * 10, [1.0] * 10])
    logits[0, 0] = logits[0, 7] = 4.0
    toks, bad = s.sample([0], logits[:1])
    assert toks == [0] and bad == [False]  # 7 was halved to 2.0, id 0 was not: it wins
    assert s.seen[0, 2].item() == 0 and s.n_seen[0] == 3


def _counts_reference(scores, generated, presence, frequency):
    """OpenAI's documented formula, one row at a time."""
    out = scores.clone()
    for tok in set(generated):
        c = generated.count(tok)
        out[tok] -= c * frequency + presence
    return out


def test_presence_and_frequency_penalties_follow_openai_formula():
    from glm.generation.sampling import apply_count_penalties

    torch.manual_seed(0)
    scores = torch.randn(2, 12)
    gen = [[3, 3, 5], [1]]
    counts = torch.zeros(2, 12)
    for r, ids in enumerate(gen):
        for t in ids:
            counts[r, t] += 1
    out = apply_count_penalties(scores, counts, torch.tensor([0.5, -1.0]), torch.tensor([1.5, 0.25]))
    for r in range(2):
        ref = _counts_reference(scores[r], gen[r], [0.5, -1.0][r], [1.5, 0.25][r])
        assert torch.allclose(out[r], ref, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(presence_penalty=2.5), dict(frequency_penalty=-2.01), dict(min_p=1.5),
                                dict(logit_bias={1: 101}), dict(logit_bias={-1: 5}), dict(logit_bias={"7": 5}),
                                dict(logit_bias={i: 1 for i in range(301)}), dict(presence_penalty=float("nan"))],
                         ids=repr)
def test_openai_fields_out_of_range_are_clear_errors(kw):
    with pytest.raises(GenerationError, match=next(iter(kw))):
        GenerationConfig(**kw)


def test_openai_fields_at_zero_change_nothing_and_each_one_changes_the_output(chatglm_tiny):
    m = chatglm_tiny
    ids = m.tokenizer.encode("你好")
    base = dict(do_sample=True, temperature=0.9, top_k=0, seed=11, stop_at_eos=False)
    plain = m.generate(ids, 24, **base)
    assert m.generate(ids, 24, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0, logit_bias={}, **base) == plain
    assert m.generate(ids, 24, **base, min_p=0.3) != plain
    # A bias of 8 makes id 812 win every greedy step; the penalties then push it back, by OpenAI's formula.
    biased = m.generate(ids, 12, stop_at_eos=False, logit_bias={812: 8.0})
    assert biased == [812] * 12
    assert m.generate(ids, 5, stop_at_eos=False, logit_bias={812: -100, 1234: 100}) == [1234] * 5
    for pres, freq in ((2.0, 0.0), (1.0, 2.0)):
        raw = []
        out = m.generate(ids, 12, stop_at_eos=False, logit_bias={812: 8.0}, presence_penalty=pres,
                         frequency_penalty=freq, logits_hook=lambda lg: raw.append(lg[0].clone()))
        assert out != biased
        for i, lg in enumerate(raw):  # replay each greedy step from the model's own logits
            lg = lg.clone()
            lg[812] += 8.0
            assert out[i] == int(_counts_reference(lg, out[:i], pres, freq).argmax())


def test_penalised_rows_in_a_batch_equal_each_row_alone():
    from glm_testutil import FIXTURES

    import glm

    m = glm.load(FIXTURES / "chatglm-tiny", max_batch=3)
    ids = m.tokenizer.encode("晚上睡不着")
    settings = [dict(frequency_penalty=1.0), dict(), dict(presence_penalty=-1.0, logit_bias={5: 3.0}, min_p=0.1,
                                                         do_sample=True, seed=4)]
    alone = [m.generate(ids, 20, stop_at_eos=False, **s) for s in settings]
    reqs = [m.submit(ids, GenerationConfig(max_new_tokens=20, stop_at_eos=False, **s)) for s in settings]
    assert [list(r) for r in reqs] == alone


def test_a_negative_seed_is_its_unsigned_twin(tiny):
    ids = [5, 6, 7, tiny.config.gmask_token_id, tiny.config.bos_token_id]
    kw = dict(do_sample=True, top_k=0, stop_at_eos=False)
    assert tiny.generate(ids, 8, seed=-1, **kw) == tiny.generate(ids, 8, seed=2**64 - 1, **kw)
    assert tiny.generate(ids, 8, seed=-(2**63), **kw) == tiny.generate(ids, 8, seed=2**63, **kw)


def test_top_k_minus_one_is_off():
    assert GenerationConfig(top_k=-1) == GenerationConfig(top_k=0)
