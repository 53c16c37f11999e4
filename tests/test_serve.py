"""glm-serve as a real process on 127.0.0.1, driven by the official `openai` client (and raw HTTP for the edges).

Every reply is checked against the engine answering the same request alone, in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from glm_testutil import ServerProcess

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "chatglm-tiny"
TURNS = json.loads((TINY / "golden.json").read_text())["chat"]
NAME = "chatglm-tiny"
QUERIES = ["你好", "晚上睡不着应该怎么办", "Tell me more, please.", "1 + 1 = ?", "写一首诗", "hello world",
           "什么是机器学习", "How are you?"]


class Server(ServerProcess):
    """glm-serve as a real process (see ServerProcess), with the official client and its metrics."""

    def __init__(self, *args: str, log: Path, delay_ms: float = 0):
        super().__init__("glm.serve", *args, log=log, health="/health", delay_ms=delay_ms)

    def client(self, key: str = "none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server("--max-batch", "4", "--max-waiting", "64", log=tmp_path_factory.mktemp("serve") / "server.log")
    try:
        yield srv.wait()
    finally:
        srv.stop()


def solo(m, query: str, max_tokens: int, history=(), **kw) -> tuple[str, str]:
    """(reply, finish_reason) of the engine alone: what the server must answer."""
    from glm.chat import build_prompt, process_response

    ids = m.tokenizer.encode(build_prompt(query, list(history)))
    out = m.generate(ids, max_tokens, **kw)
    reason = "stop" if out and out[-1] == m.config.eos_token_id else "length"
    return process_response(m.tokenizer.decode(out)), reason


def ask(client, query: str, max_tokens: int, stream: bool, history=(), **kw) -> tuple[str, str, dict | None]:
    messages = []
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    messages.append({"role": "user", "content": query})
    if not stream:
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump()
    text, reason, usage = "", None, None
    for chunk in client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason, usage


def test_golden_turns_through_the_api(server):
    c = server.client()
    for t in TURNS[:4]:
        history = [tuple(h) for h in t["history"]]
        n = t["max_length"] - len(t["prompt_ids"])
        for stream in (False, True):
            text, reason, usage = ask(c, t["query"], n, stream, history)
            assert text == t["response"]
            assert usage["prompt_tokens"] == len(t["prompt_ids"]) and usage["total_tokens"] <= t["max_length"]


def test_sixteen_concurrent_requests_each_equal_to_alone(server, chatglm_tiny):
    jobs = [(QUERIES[i % len(QUERIES)], 20 + 7 * i, i % 2 == 1) for i in range(16)]
    expect = [solo(chatglm_tiny, q, n) for q, n, _ in jobs]
    c = server.client()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: ask(c, *j), jobs))
    for (text, reason, usage), (want, want_reason), (_, n, _) in zip(got, expect, jobs):
        assert (text, reason) == (want, want_reason)
        assert usage["completion_tokens"] <= n
    assert server.metrics()["glm_decode_batch_size_sum"] > server.metrics()["glm_decode_batch_size_count"]


def test_staggered_arrivals(server, chatglm_tiny):
    c = server.client()
    jobs = [(QUERIES[i], 60, i % 2 == 0) for i in range(6)]
    expect = [solo(chatglm_tiny, q, n)[0] for q, n, _ in jobs]

    def later(i):
        time.sleep(0.05 * i)
        return ask(c, *jobs[i])[0]

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(later, range(6))) == expect


def test_completions_and_sampling_settings(server, chatglm_tiny):
    c = server.client()
    r = c.completions.create(model=NAME, prompt="hello", max_tokens=12, temperature=0)
    ids = chatglm_tiny.tokenizer.encode("hello")
    assert r.choices[0].text == chatglm_tiny.tokenizer.decode(chatglm_tiny.generate(ids, 12))
    assert r.usage.prompt_tokens == len(ids)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=NAME, prompt="hello", max_tokens=12,
                                                                         temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    # A seeded sample is the same every time, alone or beside others; extensions top_k and repetition_penalty.
    kw = dict(model=NAME, messages=[{"role": "user", "content": "你好"}], max_tokens=16, temperature=0.9, seed=7,
              extra_body={"top_k": 20, "repetition_penalty": 1.1})
    a = c.chat.completions.create(**kw).choices[0].message.content
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: c.chat.completions.create(**kw).choices[0].message.content, range(3)))
    assert outs == [a, a, a]


def test_stop_strings(server, chatglm_tiny):
    c = server.client()
    full = ask(c, "你好", 40, False)[0]
    stop = full[10:14]
    for stream in (False, True):
        text, reason, _ = ask(c, "你好", 40, stream, stop=[stop])
        assert (text, reason) == (full[: full.index(stop)], "stop")


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == [NAME]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        health = json.load(r)
    assert health["status"] == "ok" and health["max_batch"] == 4
    m = server.metrics()
    for name in ("glm_requests_running", "glm_requests_waiting", "glm_decode_batch_size_count",
                 "glm_generated_tokens_total", "glm_time_to_first_token_seconds_count"):
        assert name in m


def _post(server, path: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


MSG = [{"role": "user", "content": "你好"}]


@pytest.mark.parametrize("body, status, needle", [
    (dict(model=NAME, messages=MSG, temperature=-1), 400, "'temperature' must be"),
    (dict(model=NAME, messages=MSG, top_p=0), 400, "'top_p' must be"),
    (dict(model=NAME, messages=MSG, top_p=1.5), 400, "'top_p' must be"),
    (dict(model=NAME, messages=MSG, max_tokens=0), 400, "'max_tokens' must be"),
    (dict(model=NAME, messages=MSG, max_tokens="many"), 400, "'max_tokens' must be"),
    (dict(model=NAME, messages=MSG, seed=2**64), 400, "'seed' must be"),
    (dict(model=NAME, messages=MSG, stop=[""]), 400, "'stop' must be"),
    (dict(model=NAME, messages=MSG, n=5), 400, "'n' must be an integer in [1, 4]"),
    (dict(model=NAME, messages=MSG, temperature="hot"), 400, "'temperature' must be a number, got \"hot\""),
    (dict(model=NAME, messages=MSG, top_k=1.5), 400, "'top_k' must be an integer, got 1.5"),
    (dict(model=NAME, messages=MSG, max_completion_tokens=0), 400, "'max_completion_tokens' must be a positive"),
    (dict(model=NAME, messages=MSG, stop=["a"] * 17), 400, "'stop' may hold up to 16 strings"),
    (dict(model=NAME, messages=[]), 400, "'messages' must be a non-empty list"),
    (dict(model=NAME), 400, "'messages' must be a non-empty list"),
    (dict(model=NAME, messages=[{"role": "assistant", "content": "hi"}]), 400, "must alternate user and assistant"),
    (dict(model=NAME, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400,
     "must alternate"),
    (dict(model=NAME, messages=[{"role": "tool", "content": "a"}]), 400,
     "tool_call_id must be the id of an earlier assistant tool call"),
    (dict(model=NAME, messages=[{"role": "function", "content": "a"}]), 400,
     "role of system, developer, user or assistant"),
    (dict(model=NAME, messages=[{"role": "user", "content": 5}]), 400, "content must be a string"),
    (dict(model=NAME, messages=MSG, max_tokens=2046), 400, "over the context of 2048 tokens by 2"),
    (dict(model="gpt-4", messages=MSG), 404, "does not exist"),
    (dict(messages=MSG), 400, "'model' is required"),
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "must be a JSON object"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_errors_are_openai_style_and_the_server_goes_on(server, body, status, needle):
    code, out = _post(server, "/v1/chat/completions", body)
    assert code == status and needle in out["error"]["message"], out
    assert set(out["error"]) >= {"message", "type", "code"}
    assert ask(server.client(), "你好", 4, False)[1] in ("stop", "length")


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
    ("repetition_penalty", 0), ("repetition_penalty", -2.5), ("seed", -2**63 - 1), ("seed", 2**64), ("stop", [""]),
    ("stop", 5), ("max_tokens", 0), ("max_tokens", -7),
])
def test_setting_errors_are_generation_config_messages(server, field, value):
    """The server checks the JSON types; the ranges are GenerationConfig's, and so is the message."""
    from glm.generation import GenerationConfig, GenerationError

    with pytest.raises(GenerationError) as e:
        GenerationConfig(**{{"max_tokens": "max_new_tokens"}.get(field, field): value})
    why = str(e.value).partition(" ")[2]
    code, out = _post(server, "/v1/chat/completions", {"model": NAME, "messages": MSG, "max_tokens": 4, field: value})
    assert code == 400 and out["error"]["message"] == f"'{field}' {why}" and out["error"]["param"] == field, out


def test_large_settings_work_and_defaults_are_the_official_chats(server, chatglm_tiny):
    """No cap of the server's own: values past it are clamped safely by the engine. A request that leaves the
    sampling settings out is sampled as the official chat samples (CHAT_DEFAULTS): a seeded one is the engine's."""
    from glm.generation import CHAT_DEFAULTS

    c = server.client()
    for kw in (dict(temperature=1000.0), dict(repetition_penalty=1000), dict(temperature=1e300, top_k=10**30)):
        r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=8, seed=1, extra_body=kw)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=24, seed=11)
    assert CHAT_DEFAULTS.do_sample
    settings = dict(do_sample=True, temperature=CHAT_DEFAULTS.temperature, top_p=CHAT_DEFAULTS.top_p,
                    top_k=CHAT_DEFAULTS.top_k, repetition_penalty=CHAT_DEFAULTS.repetition_penalty)
    assert r.choices[0].message.content == solo(chatglm_tiny, "你好", 24, seed=11, **settings)[0]


def test_prompt_over_the_context_is_400_through_the_client(server):
    with pytest.raises(openai.BadRequestError, match="over the context"):
        server.client().completions.create(model=NAME, prompt="很长的问题 " * 500, max_tokens=1000)


def test_a_dropped_stream_frees_its_row(tmp_path):
    srv = Server("--max-batch", "2", log=tmp_path / "server.log", delay_ms=20).wait()
    try:
        req = urllib.request.Request(srv.url + "/v1/chat/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps(dict(model=NAME, messages=MSG, max_tokens=2000,
                                                          temperature=0, stream=True)).encode())
        r = urllib.request.urlopen(req, timeout=30)
        for _ in range(3):
            r.readline()  # the reply has started
        assert srv.metrics()["glm_requests_running"] == 1
        r.close()  # the client goes away mid-reply
        deadline = time.monotonic() + 10
        while srv.metrics()["glm_requests_running"] != 0:
            assert time.monotonic() < deadline, "the dropped request kept its row"
            time.sleep(0.1)
        assert ask(srv.client(), "你好", 4, False)[1] in ("stop", "length")  # and the row serves the next one
    finally:
        srv.stop()


def test_api_key_and_full_queue(tmp_path):
    srv = Server("--api-key", "s3cret", "--max-batch", "1", "--max-waiting", "1", log=tmp_path / "server.log",
                 delay_ms=20).wait()
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").chat.completions.create(model=NAME, messages=MSG, max_tokens=2)
        c = srv.client("s3cret")
        assert [m.id for m in c.models.list()] == [NAME]
        # One request decodes, one waits: a third is refused at once with 429, and the first two complete.
        results, errors = [], []

        def long_one():
            try:
                results.append(ask(c, "你好", 60, False)[1])
            except openai.RateLimitError as e:
                errors.append(e)

        threads = [threading.Thread(target=long_one) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        with pytest.raises(openai.RateLimitError, match="busy"):
            c.chat.completions.create(model=NAME, messages=MSG, max_tokens=2)
        for t in threads:
            t.join(60)
        assert len(results) == 2 and not errors
    finally:
        srv.stop()


def test_load_64_requests_16_at_a_time(server, chatglm_tiny):
    """A bounded loopback load test: every request answered, nothing lost or mixed."""
    jobs = [(QUERIES[i % len(QUERIES)] + f" #{i}", 8 + i % 24, i % 3 == 0) for i in range(64)]
    expect = [solo(chatglm_tiny, q, n)[0] for q, n, _ in jobs]
    c = server.client()
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: ask(c, *j)[0], jobs))
    assert time.monotonic() - t0 < 300
    assert got == expect
    assert server.metrics()["glm_requests_running"] == 0


def readme_serving_snippets() -> tuple[list[str], str, str]:
    """README's "Serving" section: the arguments of its tiny-model glm-serve command, its curl command and its
    Python snippet, exactly as written there."""
    import shlex

    section = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    (command,) = [ln for lang, b in blocks if lang == "bash" for ln in b.splitlines()
                  if ln.startswith("glm-serve --model tests/fixtures/chatglm-tiny")]
    (curl,) = [b for lang, b in blocks if lang == "bash" and b.startswith("curl ")]
    (python,) = [b for lang, b in blocks if lang == "python"]
    return shlex.split(command, comments=True)[1:], curl, python


def test_readme_serving_snippets_work_as_written(tmp_path, capsys):
    """The README's tiny-model server answers the README's curl command and openai snippet (the model id they send
    included); only the port differs, a free one instead of 8000."""
    args, curl, python = readme_serving_snippets()
    i = args.index("--port")
    assert args[i + 1] == "8000" and "http://127.0.0.1:8000/v1" in curl and "http://127.0.0.1:8000/v1" in python
    del args[i : i + 2]
    srv = Server(*args, log=tmp_path / "server.log").wait()
    try:
        if shutil.which("curl"):
            r = subprocess.run(["bash", "-c", curl.replace("http://127.0.0.1:8000", srv.url)], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            events = [json.loads(ln[6:]) for ln in r.stdout.splitlines() if ln.startswith("data: {")]
            assert r.stdout.rstrip().endswith("data: [DONE]") and "error" not in events[-1], r.stdout
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        exec(python.replace("http://127.0.0.1:8000", srv.url), {})
        assert capsys.readouterr().out.strip()  # the reply
    finally:
        srv.stop()


def test_served_model_id_is_the_checkpoint_name_without_its_owner():
    from glm.serve import build_parser, served_name

    assert served_name(build_parser().parse_args([])) == "chatglm-6b"  # README's and docs/serve.md's snippets
    assert served_name(build_parser().parse_args(["--model", "THUDM/chatglm-6b-int4"])) == "chatglm-6b-int4"
    assert served_name(build_parser().parse_args(["--model", str(TINY)])) == NAME
    assert served_name(build_parser().parse_args(["--model-name", "x/y"])) == "x/y"


def test_bind_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "glm.serve", "--model", str(TINY), "--host", "203.0.113.7"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot listen on 203.0.113.7" in r.stderr
