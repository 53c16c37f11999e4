"""Many adapters, one batch: LoRA adapters and P-Tuning prefixes added by name (`add_adapter`), each row of a decode
batch with its own adapter or none, and every request equal to an engine with only its adapter loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from glm_testutil import FIXTURES, TOL, golden

import glm
from glm.errors import CheckpointError
from glm.generation import GenerationConfig, GenerationError

TINY = FIXTURES / "chatglm-tiny"
LORA = FIXTURES / "chatglm-tiny-lora" / "adapter"
PREFIX = FIXTURES / "chatglm-tiny-ptuning-train" / "prefix"
G = json.loads((FIXTURES / "chatglm-tiny-lora" / "golden.json").read_text())
PROMPTS = [c["ids"] for c in G["prompts"]]  # 4, 14 and 35 tokens


def with_adapters(folders, names, **kw):
    m = glm.load(TINY, **kw)
    for n in names:
        m.add_adapter(n, folders[n])
    return m


@pytest.fixture(scope="module")
def mixed(adapter_folders):
    """chatglm-tiny serving all five adapters in 5 rows."""
    return with_adapters(adapter_folders, list(adapter_folders), max_batch=5)


GREEDY = dict(do_sample=False)


def sampled(seed):
    return dict(do_sample=True, temperature=0.9, top_p=0.9, seed=seed)


# (adapter, prompt, new tokens, settings): each adapter greedy and seeded, on prompts where it changes the reply.
REQUESTS = [(None, 1, 20, GREEDY), ("a", 2, 24, GREEDY), ("b", 1, 16, GREEDY), ("c", 2, 18, GREEDY),
            ("p", 1, 22, GREEDY), ("q", 0, 20, GREEDY), (None, 2, 14, sampled(1)), ("a", 1, 20, sampled(2)),
            ("b", 0, 22, sampled(3)), ("c", 1, 16, sampled(4)), ("p", 2, 18, sampled(5)), ("q", 1, 24, sampled(6))]


def test_a_mixed_batch_equals_each_adapter_alone(mixed, adapter_alone):
    m = mixed

    def submit(k):
        name, p, n, s = REQUESTS[k]
        return m.submit(PROMPTS[p], GenerationConfig.from_settings(max_new_tokens=n, stop_at_eos=False, **s),
                        adapter=name)

    # Staggered: four arrive together (one prefill of four prompts, four adapters), the rest while those decode,
    # and more than the 5 rows, so that some wait and join the running batch as rows free up.
    with m.scheduler.between_steps():
        reqs = [submit(k) for k in range(4)]
    for k in range(4, len(REQUESTS)):
        it = iter(reqs[k - 4])
        next(it)
        reqs.append(submit(k))
    for (name, p, n, s), r in zip(REQUESTS, reqs):
        got = r.wait().tokens
        assert got == adapter_alone[name].generate(PROMPTS[p], n, stop_at_eos=False, adapter=name, **s), (name, p, s)
        if name is not None and s is GREEDY:  # the adapter matters: ignoring it would fail
            assert got != adapter_alone[None].generate(PROMPTS[p], n, stop_at_eos=False, **s), (name, p, s)


def test_per_row_adapters_match_the_goldens(mixed):
    # PEFT's own adapter, applied per row beside other adapters and prefixes, gives PEFT's logits and greedy ids.
    cases, gl = G["prompts"], golden("chatglm-tiny-lora")[1]
    with mixed.scheduler.between_steps():
        others = [mixed.submit(PROMPTS[1], GenerationConfig.from_settings(max_new_tokens=8), adapter=n)
                  for n in ("b", "q")]
        outs = [mixed.submit(c["ids"], GenerationConfig.from_settings(max_new_tokens=8, stop_at_eos=False),
                             adapter="a") for c in cases]
    assert [r.wait().tokens for r in outs] == [c["greedy_new_ids"] for c in cases]
    for r in others:
        r.wait()
    for c in cases:
        assert (mixed.logits(c["ids"], adapter="a")[-2:] - gl[c["logits_last2"]]).abs().max().item() <= TOL
    # A P-Tuning folder added as an adapter of glm-tiny gives the reference's logits and greedy ids with that
    # prefix, in a batch with the base.
    g, gt = golden("glm-tiny-ptuning")
    tiny = glm.load(FIXTURES / "glm-tiny", max_batch=4)
    tiny.add_adapter("pt", FIXTURES / "glm-tiny-ptuning")
    for case in g["cases"][:2]:
        ids, want, ref = case["input_ids"], case["greedy_ids"], gt[case["logits"]]
        assert (tiny.logits(ids, adapter="pt") - ref).abs().max().item() <= TOL
        assert (tiny.logits(ids) - ref).abs().max().item() > 10 * TOL  # without the prefix
        base = tiny.submit(ids, GenerationConfig.from_settings(max_new_tokens=len(want), stop_at_eos=False))
        assert tiny.generate(ids, len(want), stop_at_eos=False, adapter="pt") == want
        base.wait()


def test_cached_decoding_equals_the_uncached_forward_per_adapter(mixed):
    m = mixed
    names, steps = ["b", "p", None, "q"], {}
    cfg = GenerationConfig.from_settings(max_new_tokens=8, stop_at_eos=False)
    with m.scheduler.between_steps():
        reqs = [m.submit(PROMPTS[k % 3], cfg, adapter=n,
                         logits_hook=lambda lg, n=n: steps.setdefault(n, []).append(lg[0].clone()))
                for k, n in enumerate(names)]
    for k, (n, r) in enumerate(zip(names, reqs)):
        new = r.wait().tokens
        for i, step in enumerate(steps[n]):
            full = m.logits(PROMPTS[k % 3] + new[:i], adapter=n)[-1]
            assert (step - full).abs().max().item() <= TOL, (n, i)


def test_chat_and_stream_chat_take_the_adapter(mixed, adapter_alone):
    m = mixed
    for name in ("b", "q"):
        want = adapter_alone[name].chat("你好", max_length=40, do_sample=False, adapter=name)
        assert m.chat("你好", max_length=40, do_sample=False, adapter=name) == want
        assert list(m.stream_chat("你好", max_length=40, do_sample=False, final=True, adapter=name))[-1] == want
        assert want != m.chat("你好", max_length=40, do_sample=False)


def test_a_quantized_base_keeps_its_weights_and_serves_adapters_per_row(adapter_folders):
    m = glm.load(TINY, quant=4, max_batch=3)
    qkv = m.model.layers[0].attention.query_key_value
    before = {k: v.clone() for k, v in qkv.state_dict().items()}
    for n in ("a", "b"):
        m.add_adapter(n, adapter_folders[n])
    assert all(torch.equal(v, qkv.state_dict()[k]) for k, v in before.items())
    assert type(m.model.layers[0].attention.query_key_value.base).__name__ == "QuantLinear"
    solo = glm.load(TINY, quant=4)
    solo.add_adapter("b", adapter_folders["b"])
    outs = m.generate(PROMPTS, 16, stop_at_eos=False, adapter="b")
    assert outs == [solo.generate(p, 16, stop_at_eos=False, adapter="b") for p in PROMPTS]
    assert outs != m.generate(PROMPTS, 16, stop_at_eos=False)


def test_a_longer_prefix_added_while_a_row_decodes(adapter_folders, adapter_alone):
    # The prefix slots grow from 4 to 7 under a running row, whose keys then move: it goes on as if alone.
    m = with_adapters(adapter_folders, ["p"], max_batch=2)
    steps, second = [], []

    def hook(_):  # in the scheduler's thread, between two steps of the first request
        steps.append(1)
        if len(steps) == 5:
            m.add_adapter("q", adapter_folders["q"])
            second.append(m.submit(PROMPTS[2], GenerationConfig.from_settings(max_new_tokens=20, stop_at_eos=False),
                                   adapter="q"))

    first = m.submit(PROMPTS[1], GenerationConfig.from_settings(max_new_tokens=40, stop_at_eos=False), adapter="p",
                     logits_hook=hook)
    assert first.wait().tokens == adapter_alone["p"].generate(PROMPTS[1], 40, stop_at_eos=False, adapter="p")
    assert second[0].wait().tokens == adapter_alone["q"].generate(PROMPTS[2], 20, stop_at_eos=False, adapter="q")
    assert m.scheduler.runner.P == 7


def _copy(src, dst, **changes):
    shutil.copytree(src, dst)
    if changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(changes)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_adapters_are_one_line_errors_and_change_nothing(tmp_path, adapter_folders):
    m = glm.load(TINY)
    m.add_adapter("a", LORA)
    tiny = glm.load(FIXTURES / "glm-tiny")
    (tmp_path / "empty").mkdir()
    corrupt = _copy(LORA, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    bad_prefix = _copy(PREFIX, tmp_path / "bad_prefix")
    (bad_prefix / "pytorch_model.bin").write_bytes(b"garbage")
    cases = [
        (tiny, "x", LORA, CheckpointError, r"lora_A.weight has shape \(4, 16\), expected \(4, 128\)"),
        (tiny, "x", PREFIX, CheckpointError, r"prefix_encoder.embedding.weight has shape \(4, 64\).*another model"),
        (m, "x", tmp_path / "nope", CheckpointError, "no adapter folder"),
        (m, "x", tmp_path / "empty", CheckpointError, "neither a PEFT LoRA adapter"),
        (m, "x", corrupt, CheckpointError, "corrupt"),
        (m, "x", bad_prefix, CheckpointError, "corrupt"),
        (m, "x", _copy(LORA, tmp_path / "r0", r=0), CheckpointError, "r must be a positive number"),
        (m, "x", _copy(LORA, tmp_path / "alpha", lora_alpha=-8), CheckpointError, "lora_alpha must be a positive"),
        (m, "a", adapter_folders["b"], ValueError, "already added"),
        (m, "", adapter_folders["b"], ValueError, "non-empty string"),
    ]
    for model, name, folder, kind, needle in cases:
        with pytest.raises(kind, match=needle) as e:
            model.add_adapter(name, folder)
        assert "\n" not in str(e.value)
    assert m.adapters == ["a"] and tiny.adapters == []
    assert m.generate(PROMPTS[0], 8, stop_at_eos=False, adapter="a") == G["prompts"][0]["greedy_new_ids"]
    with pytest.raises(GenerationError, match="'zz' is not one of this model's: its adapters are a"):
        m.generate(PROMPTS[0], 4, adapter="zz")
    with pytest.raises(GenerationError, match="has none"):
        tiny.generate([5, 1001, 1004], 4, adapter="a")
    with pytest.raises(ValueError, match="compile=True"):
        glm.load(FIXTURES / "glm-tiny", compile=True).add_adapter("a", LORA)
    with pytest.raises(ValueError, match="add_adapter"):
        m.save(tmp_path / "out")
