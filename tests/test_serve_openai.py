"""glm-serve's OpenAI request fields beyond the basics (penalties, logit_bias, min_p, logprobs, echo, n, the allow-list
of fields), through the official `openai` client against a real server process; each checked against the engine in
this process, so that a field the server ignored would fail."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from test_serve import NAME, Server, _post

openai = pytest.importorskip("openai")

MSG = [{"role": "user", "content": "你好"}]
SEMI, HAO = 27, 63882  # the tiny model's ";" and "好"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server("--max-batch", "4", log=tmp_path_factory.mktemp("serve") / "server.log")
    try:
        yield srv.wait()
    finally:
        srv.stop()


def chat_ids(m, query: str = "你好") -> list[int]:
    from glm.chat import build_prompt

    return m.tokenizer.encode(build_prompt(query, []))


def engine_reply(m, ids, n: int, **kw) -> str:
    from glm.chat import process_response

    return process_response(m.tokenizer.decode(m.generate(ids, n, **kw)))


def chat(c, **kw):
    return c.chat.completions.create(model=NAME, messages=kw.pop("messages", MSG), **kw)


def test_logit_bias_penalties_and_min_p(server, chatglm_tiny):
    m, c = chatglm_tiny, server.client()
    ids = chat_ids(m)
    greedy = m.generate(ids, 12)
    plain = engine_reply(m, ids, 12)
    assert chat(c, max_tokens=12, temperature=0).choices[0].message.content == plain
    # +100 forces a token; -100 on the greedy first token changes the reply.
    forced = chat(c, max_tokens=5, temperature=0, logit_bias={str(SEMI): 100}).choices[0].message.content
    assert forced == ";" * 5
    banned = chat(c, max_tokens=12, temperature=0, logit_bias={str(greedy[0]): -100}).choices[0].message.content
    assert banned == engine_reply(m, ids, 12, logit_bias={greedy[0]: -100}) != plain
    for kw in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        want = engine_reply(m, ids, 40, **kw)
        assert want != engine_reply(m, ids, 40)
        assert chat(c, max_tokens=40, temperature=0, **kw).choices[0].message.content == want
    sampled = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=5)
    want = engine_reply(m, ids, 24, min_p=0.3, **sampled)
    assert want != engine_reply(m, ids, 24, **sampled)
    got = chat(c, max_tokens=24, temperature=1.0, top_p=1.0, seed=5, extra_body={"top_k": -1, "min_p": 0.3})
    assert got.choices[0].message.content == want


@pytest.mark.parametrize("bias, needle", [({"abc": 1}, "keys must be token ids"), ({"5": 101}, "[-100, 100]"),
                                          ({"5": "x"}, "[-100, 100]"), ({"99999999": 1}, "outside")])
def test_bad_logit_bias_is_400_naming_it(server, bias, needle):
    code, out = _post(server, "/v1/chat/completions", {"model": NAME, "messages": MSG, "max_tokens": 2,
                                                       "logit_bias": bias})
    assert code == 400 and out["error"]["param"] == "logit_bias" and needle in out["error"]["message"], out


def want_logprobs(m, prompt: list[int], gen: list[int]) -> list[float]:
    """Each generated token's log-probability under the model, one uncached forward per position."""
    import torch

    out = []
    with torch.inference_mode():
        for i, t in enumerate(gen):
            out.append(m.logits(prompt + gen[:i]).float().log_softmax(-1)[-1, t].item())
    return out


def test_chat_logprobs_plain_and_streamed(server, chatglm_tiny):
    m, c = chatglm_tiny, server.client()
    ids = chat_ids(m)
    gen = m.generate(ids, 10)
    want = want_logprobs(m, ids, gen)
    r = chat(c, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [m.tokenizer.decode([t]) for t in gen]
    assert all(e.bytes == list(e.token.encode()) for e in content)
    assert [e.logprob for e in content] == pytest.approx(want, abs=1e-4)
    for e in content:  # greedy: the chosen token is the likeliest
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
    streamed = []
    for chunk in chat(c, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2, stream=True):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                streamed += ch.logprobs.content
    assert [e.logprob for e in streamed] == pytest.approx(want, abs=1e-4)
    assert chat(c, max_tokens=4, temperature=0).choices[0].logprobs is None


def test_completions_logprobs_and_echo(server, chatglm_tiny):
    import torch

    m, c = chatglm_tiny, server.client()
    ids = m.tokenizer.encode("hello")
    gen = m.generate(ids, 8)
    want = want_logprobs(m, ids, gen)
    r = c.completions.create(model=NAME, prompt="hello", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4) and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)
    e = c.completions.create(model=NAME, prompt="hello", max_tokens=8, temperature=0, logprobs=1, echo=True)
    ch = e.choices[0]
    assert ch.text == "hello" + r.choices[0].text
    with torch.inference_mode():
        head = m.logits(ids).float().log_softmax(-1)
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    assert ch.logprobs.token_logprobs[1:len(ids)] == pytest.approx([head[i - 1, ids[i]].item()
                                                                    for i in range(1, len(ids))], abs=1e-4)
    assert ch.logprobs.token_logprobs[len(ids):] == pytest.approx(want, abs=1e-4)
    assert ch.logprobs.text_offset[len(ids)] == len("hello")
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model=NAME, prompt="hello", max_tokens=8, temperature=0, echo=True, stream=True) if x.choices)
    assert streamed == ch.text
    lps, offsets = [], []  # streamed: the entries of all chunks add up to the non-streamed ones
    for x in c.completions.create(model=NAME, prompt="hello", max_tokens=8, temperature=0, logprobs=1, echo=True,
                                  stream=True):
        if x.choices and x.choices[0].logprobs is not None:
            lps += x.choices[0].logprobs.token_logprobs
            offsets += x.choices[0].logprobs.text_offset
    assert lps == ch.logprobs.token_logprobs and offsets == ch.logprobs.text_offset
    with pytest.raises(openai.BadRequestError, match="'logprobs' must be an integer in \\[0, 5\\]"):
        c.completions.create(model=NAME, prompt="hello", max_tokens=2, logprobs=6)


def test_n_choices_are_the_seeded_requests(server):
    c = server.client()
    kw = dict(max_tokens=16, temperature=0.9)
    alone = [chat(c, seed=41 + j, **kw) for j in range(3)]
    r = chat(c, n=3, seed=41, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == [a.choices[0].message.content for a in alone]
    assert [ch.finish_reason for ch in r.choices] == [a.choices[0].finish_reason for a in alone]
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert len({ch.message.content for ch in r.choices}) > 1
    texts, reasons = ["", "", ""], [None] * 3
    for chunk in chat(c, n=3, seed=41, stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert texts == [ch.message.content for ch in r.choices] and reasons == [ch.finish_reason for ch in r.choices]
    comp = c.completions.create(model=NAME, prompt="hello", n=2, seed=3, max_tokens=8, temperature=0.9)
    assert [ch.index for ch in comp.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="'best_of' is not supported"):
        c.completions.create(model=NAME, prompt="hello", best_of=2, max_tokens=2)


def test_small_ones(server, chatglm_tiny):
    c = server.client()
    assert c.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("gpt-4")
    sys_ = [{"role": "system", "content": "你是助手"}, *MSG]
    dev = [{"role": "developer", "content": "你是助手"}, *MSG]
    a = chat(c, messages=sys_, max_tokens=12, temperature=0).choices[0].message.content
    assert chat(c, messages=dev, max_tokens=12, temperature=0).choices[0].message.content == a
    assert a != chat(c, max_tokens=12, temperature=0).choices[0].message.content
    # include_usage: every chunk has "usage", null but in the last.
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps(dict(model=NAME, messages=MSG, max_tokens=6, stream=True,
                                                      stream_options={"include_usage": True})).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        chunks = [json.loads(ln[6:]) for ln in r.read().decode().splitlines()
                  if ln.startswith("data: {")]
    assert all("usage" in ch for ch in chunks) and all(ch["usage"] is None for ch in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    # A chat's stop string matches the reply as the client gets it: process_response makes "好;" "好；".
    bias = {str(SEMI): 100, str(HAO): 100}
    full = chat(c, max_tokens=12, temperature=0, logit_bias=bias)
    raw = chatglm_tiny.tokenizer.decode(chatglm_tiny.generate(chat_ids(chatglm_tiny), 12,
                                                              logit_bias={SEMI: 100, HAO: 100}))
    assert "；" in full.choices[0].message.content and "；" not in raw
    r = chat(c, max_tokens=12, temperature=0, logit_bias=bias, stop=["；"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("好", "stop")
    assert r.usage.completion_tokens < 12


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}], "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "strin"}}}}, "response_format"),
    ("/v1/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"audio": {}}, "audio"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"best_of": 1}, "best_of"),
    ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
])
def test_unimplemented_fields_are_400_naming_them(server, path, extra, param):
    body = {"model": NAME, "max_tokens": 2, **({"messages": MSG} if "chat" in path else {"prompt": "hi"}), **extra}
    code, out = _post(server, path, body)
    assert code == 400 and out["error"]["param"] == param and f"'{param}'" in out["error"]["message"], out


def test_fields_that_change_nothing_are_accepted(server):
    c = server.client()
    r = chat(c, max_tokens=3, temperature=0, user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
             parallel_tool_calls=False, response_format={"type": "text"}, stream_options=None, tools=None)
    assert r.choices[0].finish_reason in ("stop", "length")
    code, _ = _post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2, "user": "u",
                                                "suffix": None, "stream_options": None})
    assert code == 200


def test_retry_after_and_cancelled_count(tmp_path):
    srv = Server("--max-batch", "1", "--max-waiting", "1", log=tmp_path / "server.log", delay_ms=20).wait()
    try:
        def start():
            req = urllib.request.Request(srv.url + "/v1/chat/completions", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps(dict(model=NAME, messages=MSG, max_tokens=2000,
                                                              temperature=0, ignore_eos=True,
                                                              stream=True)).encode())
            return urllib.request.urlopen(req, timeout=30)

        first = start()
        first.readline()  # the first holds the row
        second = start()  # and the second waits for it
        with pytest.raises(urllib.error.HTTPError) as e:
            start()
        assert e.value.code == 429 and e.value.headers["Retry-After"] == "1"
        for r in (first, second):
            r.close()  # both clients go away
        key = 'glm_requests_total{finish_reason="cancelled"}'
        deadline = time.monotonic() + 15
        while srv.metrics().get(key) != 2:
            assert time.monotonic() < deadline, srv.metrics()
            time.sleep(0.1)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------- JSON, tools

POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "label": {"enum": ["a", "b"]}},
         "required": ["x", "label"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "locate", "description": "Find a point", "parameters": POINT}},
         {"type": "function", "function": {"name": "ping", "parameters": {
             "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}}}]


def engine_json(m, prompt: str, schema: dict, **kw) -> str:
    return m.tokenizer.decode(m.generate(m.tokenizer.encode(prompt), 40, json_schema=schema, do_sample=True,
                                         top_p=0.7, temperature=0.95, **kw))


def streamed(c, **kw) -> tuple[str, list, str]:
    """(content, tool call deltas, finish_reason) of a streamed chat."""
    content, calls, finish = "", [], None
    for ch in chat(c, stream=True, **kw):
        d = ch.choices[0].delta
        content += d.content or ""
        calls += d.tool_calls or []
        finish = ch.choices[0].finish_reason or finish
    return content, calls, finish


def test_response_format(server, chatglm_tiny):
    m, c = chatglm_tiny, server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}
    r = chat(c, max_tokens=40, seed=5, response_format=fmt)
    text = r.choices[0].message.content
    assert json.loads(text)["label"] in ("a", "b") and r.choices[0].finish_reason == "stop"
    assert text == engine_json(m, "你好", POINT, seed=5)  # not post-processed: as generated
    assert streamed(c, max_tokens=40, seed=5, response_format=fmt) == (text, [], "stop")
    two = chat(c, max_tokens=40, seed=5, n=2, response_format=fmt).choices  # a grammar state per choice
    assert two[0].message.content == text and json.loads(two[1].message.content)["x"] in range(100)
    obj = chat(c, max_tokens=40, seed=5, response_format={"type": "json_object"})
    assert obj.choices[0].message.content == engine_json(m, "你好", {"type": "object"}, seed=5)
    raw = c.completions.create(model=NAME, prompt="hi", max_tokens=40, seed=5, extra_body={"response_format": fmt})
    assert json.loads(raw.choices[0].text)["x"] in range(100)


def test_tool_calls(server, chatglm_tiny):
    from glm.openai_protocol import chat_prompt, tool_call

    m, c = chatglm_tiny, server.client()
    named = {"type": "function", "function": {"name": "locate"}}
    r = chat(c, max_tokens=40, seed=7, tools=TOOLS, tool_choice=named)
    (call,), choice = r.choices[0].message.tool_calls, r.choices[0]
    assert (choice.finish_reason, choice.message.content, call.type, call.function.name) == \
        ("tool_calls", None, "function", "locate")
    body = {"messages": MSG, "tools": TOOLS, "tool_choice": named}
    assert "Function locate: Find a point Parameters:" in chat_prompt(body, tool_call(body))
    assert call.function.arguments == engine_json(m, chat_prompt(body, tool_call(body)), POINT, seed=7)
    _, deltas, finish = streamed(c, max_tokens=40, seed=7, tools=TOOLS, tool_choice=named)
    assert finish == "tool_calls" and deltas[0].function.name == "locate" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    # "required": the model picks the function too; the call comes whole at the end of a stream
    r = chat(c, max_tokens=60, seed=3, tools=TOOLS, tool_choice="required")
    (call,) = r.choices[0].message.tool_calls
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    assert json.loads(call.function.arguments).keys() == set(schema["required"])
    _, deltas, finish = streamed(c, max_tokens=60, seed=3, tools=TOOLS, tool_choice="required")
    assert len(deltas) == 1 and deltas[0].function.model_dump() == call.function.model_dump()
    with pytest.raises(openai.BadRequestError, match="required"):
        chat(c, max_tokens=4, tools=TOOLS)  # "auto": ChatGLM-6B cannot decide when to call
    plain = chat(c, max_tokens=4, temperature=0, tools=TOOLS, tool_choice="none").choices[0].message
    assert plain.tool_calls is None and plain.content == engine_reply(m, chat_ids(m), 4, do_sample=False)


def test_tool_messages_in_history(server, chatglm_tiny):
    from glm.openai_protocol import chat_prompt

    m, c = chatglm_tiny, server.client()
    args = '{"x": 3, "label": "a"}'
    history = [{"role": "user", "content": "where?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "locate", "arguments": args}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "found"},
               {"role": "user", "content": "and?"}]
    prompt = chat_prompt({"messages": history})
    assert prompt == ('[Round 0]\n问：where?\n答：{"name":"locate","arguments":{"x":3,"label":"a"}}\n'
                      '[Round 1]\n问：Result of locate: found\nand?\n答：')
    reply = chat(c, messages=history, max_tokens=6, temperature=0).choices[0].message.content
    assert reply == engine_reply(m, m.tokenizer.encode(prompt), 6, do_sample=False)
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        chat(c, messages=history[:2] + [{"role": "tool", "tool_call_id": "zz", "content": "x"}], max_tokens=2)
