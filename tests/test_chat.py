import pytest
from glm_testutil import golden

import glm
from glm.chat import SettledText, build_prompt, fit_history, process_response

G, GT = golden("chatglm-tiny")
TURNS = G["chat"]


def test_logits_of_real_vocab_model(chatglm_tiny):
    for case in G["logits"]:
        assert (chatglm_tiny.logits(case["input_ids"]) - GT[case["logits"]]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("i", range(len(TURNS)))
def test_chat_turns(chatglm_tiny, i):
    case = TURNS[i]
    history = [tuple(h) for h in case["history"]]
    if "prompt" in case:
        assert build_prompt(case["query"], history) == case["prompt"]
        assert chatglm_tiny.tokenizer.encode(case["prompt"]) == case["prompt_ids"]
    reply, new_history = chatglm_tiny.chat(case["query"], history, max_length=case["max_length"], do_sample=False)
    assert reply == case["response"]
    assert new_history == history + [(case["query"], reply)]


@pytest.mark.parametrize("i", [i for i, c in enumerate(TURNS) if "stream" in c])
def test_stream_chat_turns(chatglm_tiny, i):
    case = TURNS[i]
    history = [tuple(h) for h in case["history"]]
    values = list(chatglm_tiny.stream_chat(case["query"], history, max_length=case["max_length"], do_sample=False))
    assert [r for r, _ in values] == case["stream"]
    assert all(h == history + [(case["query"], r)] for r, h in values)


def test_history_of_chat_feeds_the_next_turn(chatglm_tiny):
    history = []
    for case in TURNS[:4]:
        assert [list(h) for h in history] == case["history"]
        _, history = chatglm_tiny.chat(case["query"], history, max_length=case["max_length"], do_sample=False)


@pytest.mark.parametrize("case", G["process_response"], ids=lambda c: c["raw"])
def test_process_response(case):
    assert process_response(case["raw"]) == case["processed"]


def test_chat_defaults_are_official(chatglm_tiny):
    from glm.generation import CHAT_DEFAULTS

    c = CHAT_DEFAULTS
    assert (c.max_length, c.do_sample, c.top_p, c.temperature, c.top_k, c.repetition_penalty) == \
        (2048, True, 0.7, 0.95, 50, 1.0)
    seen = []
    chatglm_tiny.submit = lambda ids, config, **kw: seen.append(config) or glm.ChatGLM.submit(chatglm_tiny, ids,
                                                                                               config, **kw)
    try:
        chatglm_tiny.chat("你好", max_length=30, seed=1)
        list(chatglm_tiny.stream_chat("你好", max_length=30, seed=1))
    finally:
        del chatglm_tiny.submit
    assert seen == [c.replace(max_length=30, seed=1)] * 2  # chat and stream_chat start from the constant


def test_sampled_chat_is_reproducible_with_a_seed(chatglm_tiny):
    a = chatglm_tiny.chat("你好", max_length=30, seed=7)[0]
    b = chatglm_tiny.chat("你好", max_length=30, seed=7)[0]
    assert a == b


def test_fit_history_drops_whole_oldest_rounds(chatglm_tiny):
    tok = chatglm_tiny.tokenizer
    history = [(c["query"], c["response"]) for c in TURNS[:3]]
    kept = fit_history(tok, "hi", history, max_length=150, reserve=20)
    assert kept == history[len(history) - len(kept):] and len(kept) < len(history)
    assert len(tok.encode(build_prompt("hi", kept))) + 20 <= 150
    assert fit_history(tok, "hi", history, max_length=4096) == history
    with pytest.raises(glm.GenerationError, match="too long"):
        fit_history(tok, "很长" * 200, [], max_length=64)


def test_reply_printer_holds_back_unsettled_tail():
    p = SettledText()
    out = p.update("你好,")  # the ',' may still become '，'
    out += p.update("你好，世界")
    out += p.finish("你好，世界")
    assert out == "你好，世界"


@pytest.mark.parametrize("i", [i for i, c in enumerate(TURNS) if "stream" in c])
def test_stream_chat_final_ends_on_the_chat_reply(chatglm_tiny, i):
    case = TURNS[i]
    history = [tuple(h) for h in case["history"]]
    values = [r for r, _ in chatglm_tiny.stream_chat(case["query"], history, max_length=case["max_length"],
                                                     do_sample=False, final=True)]
    assert values[:-1] == case["stream"] and values[-1] == case["response"]


def test_a_slow_reader_of_the_official_stream_gets_every_value(chatglm_tiny):
    """The scheduler runs ahead of a reader that takes its time; the official stream (which skips the last token's
    value) must still end where it ends for a fast reader."""
    import time

    kw = dict(max_length=30, do_sample=False)
    fast = list(chatglm_tiny.stream_chat("你好", **kw))
    slow = []
    for value in chatglm_tiny.stream_chat("你好", **kw):
        slow.append(value)
        time.sleep(0.02)
    assert slow == fast and len(fast) > 1
