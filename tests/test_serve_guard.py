"""glm-serve at the HTTP edge (glm/http_guard.py) and completions with several prompts, against one real server
process on 127.0.0.1: Host and Origin checks, Content-Type, the body limit, bad bodies, the API key from the
environment, disconnects noticed while tokens flow, tokenizing off the event loop."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slow_launch import SLOW_ENCODE, SLOW_ENCODE_S
from test_serve import NAME, Server

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

KEY = "env-key"
MSG = [{"role": "user", "content": "你好"}]
LIMIT = 65536


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLM_API_KEY", KEY)  # the key from the environment, not the command line
        srv = Server("--max-batch", "4", "--max-body-bytes", str(LIMIT), "--allowed-hosts", "api.example.test",
                     "--cors-origins", "http://app.example.test", log=tmp_path_factory.mktemp("guard") / "s.log",
                     delay_ms=10)
    srv.http = httpx.Client(timeout=60)  # one client: a new one per request costs tens of ms (its SSL context)
    try:
        yield srv.wait()
    finally:
        srv.http.close()
        srv.stop()


def post(srv, path: str, body=None, *, content: bytes | None = None, headers=None, timeout: float = 60):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    return srv.http.post(srv.url + path, json=body if content is None else None, content=content, headers=h,
                         timeout=timeout)


def completion(srv, **kw) -> dict:
    r = post(srv, "/v1/completions", {"model": NAME, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def refused(r, status: int, needle: str) -> None:
    assert r.status_code == status and needle in r.json()["error"]["message"], (r.status_code, r.text)


def test_host_origin_content_type_and_key(server):
    u = server.url
    assert server.http.get(u + "/health", headers={"Host": "api.example.test"}).status_code == 200  # --allowed-hosts
    assert server.http.get(u + "/health", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    for host in ("evil.example", "sub.api.example.test", "127.0.0.1.evil.example"):  # DNS rebinding's names
        r = server.http.get(u + "/health", headers={"Host": host})
        refused(r, 400, "--allowed-hosts")
        assert r.json()["error"]["code"] == "invalid_host"
    body = {"model": NAME, "prompt": "hi", "max_tokens": 1}
    refused(post(server, "/v1/completions", body, headers={"Origin": "http://evil.example"}), 403, "--cors-origins")
    r = post(server, "/v1/completions", body, headers={"Origin": "http://app.example.test"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example.test"
    pre = {"Origin": "http://app.example.test", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = server.http.options(u + "/v1/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example.test"
    evil = server.http.options(u + "/v1/completions", headers={**pre, "Origin": "http://evil.example"})
    refused(evil, 403, "refused")
    # Same-origin is not cross-origin.
    assert post(server, "/v1/completions", body, headers={"Origin": server.url}).status_code == 200
    # A form or text/plain post needs no preflight, so it could come from any page: refused.
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        refused(post(server, "/v1/completions", content=json.dumps(body).encode(), headers={"Content-Type": ctype}),
                415, "application/json")
    ok = post(server, "/v1/completions", content=json.dumps(body).encode(),
              headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200
    # GLM_API_KEY is the key.
    refused(server.http.post(u + "/v1/completions", json=body), 401, "API key")
    assert openai.OpenAI(base_url=u + "/v1", api_key=KEY, max_retries=0).models.list().data[0].id == NAME


def test_body_limit_and_bad_bodies(server):
    big = {"model": NAME, "prompt": "x" * LIMIT}
    r = post(server, "/v1/completions", big)
    refused(r, 413, "--max-body-bytes")
    data = json.dumps(big).encode()
    chunked = (data[i : i + 4096] for i in range(0, len(data), 4096))  # no Content-Length: counted as it comes
    refused(post(server, "/v1/completions", content=chunked), 413, "--max-body-bytes")
    cases = [
        (b'{"model": "\\ud800", "prompt": "hi"}', "lone UTF-16 surrogate"),  # was a plain-text 500
        (b'{"model": "chatglm-tiny", "prompt": "a\\udfffb"}', "lone UTF-16 surrogate"),
        (b'{"model": "chatglm-tiny", "prompt": "hi", "stop": ["\\ud800"]}', "lone UTF-16 surrogate"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),  # was a RecursionError 500
        (b'{"model": ' + b"[" * 100 + b"]" * 100 + b"}", "nested too deeply"),
        (b'{"model": "chatglm-tiny", "prompt": "hi", "temperature": NaN}', "not valid JSON"),
        (b'{"model": "chatglm-tiny", "prompt": "\xff"}', "not valid JSON"),
    ]
    for raw, needle in cases:
        refused(post(server, "/v1/completions", content=raw), 400, needle)
    # A surrogate pair is a valid character, echoed as such.
    r = post(server, "/v1/completions", content=b'{"model": "chatglm-tiny", "prompt": "\\ud83d\\ude00", "echo": true, '
                                                  b'"max_tokens": 1}')
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("\U0001f600"), r.text


# Strings from pieces that have broken servers: lone surrogates, a surrogate pair, NUL, quotes, CJK.
TEXT = st.lists(st.sampled_from(["a", "好", "\ud800", "\udfff", "\ud83d\ude00", "\x00", '"', "\\", "<n>"]),
                max_size=6).map("".join)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4), max_leaves=12)


@settings(max_examples=20, deadline=None)
@given(model=JSON, prompt=JSON, extra=st.dictionaries(st.sampled_from(["n", "stop", "echo", "logprobs", "seed",
                                                                       "max_tokens", "logit_bias"]), JSON))
def test_any_json_body_gets_json_back(server, model, prompt, extra):
    """Whatever the values (lone surrogates, nesting, wrong types), the answer is JSON: 200 or a 4xx naming why."""
    raw = json.dumps({"model": model, "prompt": prompt, **extra, "max_tokens": 1}).encode()  # \ud800 stays escaped
    r = post(server, "/v1/completions", content=raw)
    assert r.status_code in (200, 400, 404), r.text
    assert r.status_code == 200 or r.json()["error"]["message"]


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=40) | JSON.map(lambda v: json.dumps(v).encode()), host=st.text(max_size=12),
       origin=st.none() | st.text(max_size=12), ctype=st.text(max_size=12))
def test_the_guard_answers_any_input_in_one_of_its_ways(raw, host, origin, ctype):
    """No header or body makes the guard raise anything but Refused (a JSON 4xx)."""
    from glm.http_guard import HTTPGuard, Refused, parse_json

    guard = HTTPGuard("0.0.0.0", ["api.example.test"], ["http://app.example.test"])
    r = guard.refusal("POST", {"host": host, "content-type": ctype, **({"origin": origin} if origin else {})})
    assert r is None or (400 <= r.status < 500 and json.dumps(r.body()))
    try:
        assert isinstance(parse_json(raw), dict)
    except Refused as e:
        assert e.status == 400


def test_a_disconnected_client_frees_its_row_while_tokens_flow(server):
    """A non-streamed client that gives up is noticed within POLL_DISCONNECT seconds even though tokens keep coming
    (the reply would take 2000 decode steps of 10+ ms)."""
    before = server.metrics().get('glm_requests_total{finish_reason="cancelled"}', 0)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", {"model": NAME, "messages": MSG, "max_tokens": 2000, "temperature": 0,
                                              "ignore_eos": True}, timeout=1.0)
    deadline = time.monotonic() + 8  # the whole reply would need 20 s or more
    while server.metrics()["glm_requests_running"] != 0:
        assert time.monotonic() < deadline, "the disconnected client kept its row"
        time.sleep(0.1)
    assert server.metrics()['glm_requests_total{finish_reason="cancelled"}'] == before + 1


def test_tokenizing_runs_off_the_event_loop(server):
    """/health answers while a prompt is being tokenized (tests/slow_launch.py makes this one take 2 s)."""
    slow = threading.Thread(target=post, args=(server, "/v1/completions", {"model": NAME, "prompt": SLOW_ENCODE,
                                                                           "max_tokens": 1}))
    slow.start()
    time.sleep(0.3)
    assert server.http.get(server.url + "/health", timeout=SLOW_ENCODE_S * 0.75).status_code == 200
    assert slow.is_alive()  # still tokenizing
    slow.join(30)


def test_completions_with_several_prompts_and_token_ids(server, chatglm_tiny):
    tok = chatglm_tiny.tokenizer
    prompts = ["hello", "你好", "1 + 1 ="]
    alone = [completion(server, prompt=p, max_tokens=6, n=2, seed=3, temperature=0.9) for p in prompts]
    r = completion(server, prompt=prompts, max_tokens=6, n=2, seed=3, temperature=0.9)
    assert [c["index"] for c in r["choices"]] == list(range(6))  # prompt i, choice j: i * n + j
    assert [c["text"] for c in r["choices"]] == [c["text"] for a in alone for c in a["choices"]]
    assert r["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    assert r["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    greedy = [completion(server, prompt=p, max_tokens=6)["choices"][0]["text"] for p in prompts]
    ids = [tok.encode(p) for p in prompts]
    assert [c["text"] for c in completion(server, prompt=ids, max_tokens=6)["choices"]] == greedy
    one = completion(server, prompt=ids[0], max_tokens=6, echo=True)
    assert one["choices"][0]["text"] == tok.decode(ids[0]) + greedy[0]
    streamed = ["", "", ""]
    with server.http.stream("POST", server.url + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                      json={"model": NAME, "prompt": prompts, "max_tokens": 6, "temperature": 0,
                            "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    streamed[c["index"]] += c["text"]
    assert streamed == greedy
    cfg = chatglm_tiny.config
    for prompt, needle in [([1, "a"], "'prompt' must be"), ([[]], "'prompt' must be"), ([], "'prompt' must be"),
                           ([True, 5], "'prompt' must be"), ([[5, cfg.vocab_size, 6]], "outside this model's vocab"),
                           ([5, 6, 7], "[gMASK] and <sop>"), (["a"] * 65, "over 64 per request")]:
        refused(post(server, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 1}), 400, needle)
    refused(post(server, "/v1/completions", {"model": NAME, "prompt": ["a"] * 33, "n": 2, "max_tokens": 1}), 400,
            "66 choices")


def test_echo_logprobs_in_chunks_equal_the_full_log_softmax(chatglm_tiny):
    from glm_testutil import TOL

    m = chatglm_tiny
    ids = m.tokenizer.encode("晚上睡不着应该怎么办 hello")
    lp = m.logits(ids).log_softmax(-1)
    for chunk in (2, 64):
        got = m.prompt_logprobs(ids, k=3, chunk=chunk)
        assert [t for t, _, _ in got] == ids and got[0][1:] == (None, [])
        assert [x for _, x, _ in got[1:]] == pytest.approx([lp[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                          abs=TOL)
        for i, (_, _, top) in enumerate(got[1:], 1):
            v, j = lp[i - 1].topk(3)
            assert [a for a, _ in top] == j.tolist()
            assert [b for _, b in top] == pytest.approx(v.tolist(), abs=TOL)


def test_api_key_sources(tmp_path, capsys):
    import argparse

    from glm.http_guard import api_key_from
    from glm.serve import main

    ns = lambda key=None, file=None: argparse.Namespace(api_key=key, api_key_file=file)  # noqa: E731
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert api_key_from(ns(file=str(f)), {"GLM_API_KEY": "env"}) == "from-file"
    assert api_key_from(ns(key="flag"), {"GLM_API_KEY": "env"}) == "flag"
    assert api_key_from(ns(), {"GLM_API_KEY": "env"}) == "env"
    assert api_key_from(ns(), {"GLM_API_KEY": ""}) is None and api_key_from(ns(), {}) is None
    for args, needle in [(["--api-key", "a", "--api-key-file", str(f)], "not both"),
                         (["--api-key-file", str(tmp_path / "missing")], "cannot read the API key"),
                         (["--api-key", " "], "--api-key is empty")]:
        assert main(args) == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "two").write_text("a\nb\n")
    assert main(["--api-key-file", str(tmp_path / "two")]) == 1
    assert "alone, on one line" in capsys.readouterr().err
