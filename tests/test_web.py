"""glm-web as a real server on 127.0.0.1, driven by gradio_client: golden replies, separate sessions, Stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from glm_testutil import ServerProcess

from glm import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "chatglm-tiny"
TURNS = json.loads((TINY / "golden.json").read_text())["chat"]
FIRST = TURNS[0]

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")


class WebServer(ServerProcess):
    """glm-web as a real process (see ServerProcess); its page is the health check."""

    def __init__(self, *args: str, log: Path, delay_ms: float = 0):
        super().__init__("glm.web", *args, log=log, url_suffix="/", delay_ms=delay_ms)


def client(server):
    return gradio_client.Client(server.url, verbose=False)


def text(message) -> str:
    """The text of a chatbot message, whichever of Gradio's message shapes the client returns."""
    c = message["content"]
    if isinstance(c, str):
        return c
    return "".join(part["text"] for part in c if part.get("type") == "text")


def chat(c, query: str, max_length: int) -> list[dict]:
    return c.predict(query, max_length, 0.7, 0.95, api_name="/chat")


def test_golden_replies_turn_by_turn(server):
    c = client(server)
    for i, turn in enumerate(TURNS[:4]):  # the history is the page's own, per session, carried turn to turn
        messages = chat(c, turn["query"], turn["max_length"])
        assert [m["role"] for m in messages] == ["user", "assistant"] * (i + 1)
        assert text(messages[-2]) == turn["query"]
        assert text(messages[-1]) == turn["response"]
    # Clear, then the last golden turn (no history, cut at max_length 12).
    c.predict(api_name="/clear")
    messages = chat(c, TURNS[4]["query"], TURNS[4]["max_length"])
    assert [text(m) for m in messages] == [TURNS[4]["query"], TURNS[4]["response"]]


def test_docs_gradio_client_snippet_prints_the_reply(server, capsys):
    """docs/cli.md's gradio_client snippet, run as written against the real page (its URL aside): it prints the
    reply's text (its max length, top-p and temperature on this --greedy server: the golden reply)."""
    import re

    docs = (ROOT / "docs" / "cli.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "gradio_client" in b]
    assert 'Client("http://127.0.0.1:7860/")' in snippet
    exec(snippet.replace("http://127.0.0.1:7860/", server.url), {})
    out = capsys.readouterr().out
    assert out.endswith("\n" + FIRST["response"] + "\n"), out  # after gradio_client's "Loaded as API: ..."


def test_concurrent_sessions_keep_their_own_histories(server, chatglm_tiny):
    # Session A follows the golden turns; session B has another conversation, whose replies the engine gives here.
    a_turns = [(t["query"], t["max_length"], t["response"]) for t in TURNS[:2]]
    b_turns, history = [], []
    for q, L in (("Tell me more, please.", 168), ("晚上睡不着应该怎么办", 226), ("你好", 300)):
        reply, history = chatglm_tiny.chat(q, history, max_length=L, do_sample=False)
        b_turns.append((q, L, reply))
    assert b_turns[1][2] != TURNS[1]["response"]  # the same query gets another reply in B's conversation

    def converse(turns):
        c = client(server)
        for q, L, _ in turns:
            messages = chat(c, q, L)
        return [text(m) for m in messages]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(converse, [a_turns, b_turns])
    assert a == [x for q, _, r in a_turns for x in (q, r)]
    assert b == [x for q, _, r in b_turns for x in (q, r)]


def test_cancel_stops_the_reply_and_keeps_the_session(server, chatglm_tiny):
    query = "晚上睡不着应该怎么办"  # its reply alone is 139 tokens: 3.5 s at 25 ms a token
    full = chatglm_tiny.chat(query, [], max_length=2048, do_sample=False)[0]
    c = client(server)
    job = c.submit(query, 2048, 0.7, 0.95, api_name="/chat")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the reply has started to stream
        outs = job.outputs()
        if outs and len(outs[-1]) == 2 and text(outs[-1][1]):
            break
        time.sleep(0.02)
    job.cancel()
    # The session goes on; the stopped reply stays in its history as it was, cut short.
    messages = chat(c, "再见", 60)
    cut = text(messages[1])
    assert text(messages[0]) == query
    assert cut and full.startswith(cut) and len(cut) < len(full) / 2
    assert text(messages[2]) == "再见" and len(messages) == 4


def test_query_too_long_is_an_error_not_a_crash(server):
    c = client(server)
    with pytest.raises(Exception, match="too long for max_length=16"):
        chat(c, "很长的问题" * 20, 16)
    assert text(chat(c, FIRST["query"], 44)[-1]) == FIRST["response"]  # and the server goes on


def test_page_renders_markdown_and_keeps_html_sanitized(server):
    with urllib.request.urlopen(server.url + "config", timeout=10) as r:
        config = json.load(r)
    (bot,) = [c for c in config["components"] if c.get("type") == "chatbot"]
    assert bot["props"]["render_markdown"] is True
    assert bot["props"]["sanitize_html"] is True


def test_page_title_is_the_model_name(server):
    with urllib.request.urlopen(server.url + "config", timeout=10) as r:
        config = json.load(r)
    assert config["title"] == "chatglm-tiny"
    (heading,) = [c["props"]["value"] for c in config["components"] if c.get("type") == "markdown"
                  and c["props"]["value"].startswith("## ")]
    assert heading.startswith("## chatglm-tiny\nchatglm-tiny on cpu, float32, no quant, ")


def test_server_log(server):
    log = server.log.read_text()
    assert "glm: chatglm-tiny on cpu, float32, no quant" in log
    assert f"glm-web: serving on http://127.0.0.1:{server.port}/" in log


def test_defaults_are_local_and_private():
    from glm import web

    args = web.build_parser().parse_args([])
    assert (args.host, args.share, args.model) == ("127.0.0.1", False, cli.DEFAULT_MODEL)
    code = "import sys, glm, glm.web; assert 'gradio' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_web_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "glm.web", "--model", str(tmp_path / "missing")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"glm-web: error: no such folder '{tmp_path / 'missing'}', and it is "
                                             "not a Hub repo id like 'THUDM/chatglm-6b'"]


def test_backend_drops_old_rounds_but_the_page_keeps_them(chatglm_tiny):
    from glm.web import ChatBackend

    backend = ChatBackend(chatglm_tiny, cli.settings_from_args(cli.build_parser().parse_args(["--greedy"])))
    notes, history, transcript = [], [], []
    for t in TURNS[:4]:
        for history, transcript in backend.respond(t["query"], history, transcript, 120, 0.7, 0.95,
                                                   notify=notes.append):
            pass
    assert len(transcript) == 4 and [q for q, _ in transcript] == [t["query"] for t in TURNS[:4]]
    assert len(history) < 4 and history == transcript[len(transcript) - len(history):]
    assert notes and "max length 120: the model does not see" in notes[0]


# ---------------------------------------------------------------------------------------------------- bad input


def test_expected_error_is_one_line_in_the_server_log(server):
    c = client(server)
    with pytest.raises(Exception, match="too long for max_length=17"):
        chat(c, "很长的问题" * 20, 17)
    assert text(chat(c, FIRST["query"], 44)[-1]) == FIRST["response"]  # the session answers the next query
    log = server.log.read_text()
    assert [ln for ln in log.splitlines() if "max_length=17" in ln] == [
        "the message is 43 tokens, too long for max_length=17 (it needs room for at least 2 reply tokens): "
        "shorten it or raise max_length"]
    assert "Traceback" not in log, log


def generation_config_error(**settings) -> str:
    from glm.generation import GenerationConfig, GenerationError

    with pytest.raises(GenerationError) as e:
        GenerationConfig(**settings)
    return str(e.value)


def test_slider_values_out_of_range_are_refused_and_the_session_goes_on(server):
    """The sliders' values are judged by GenerationConfig, whose message the page shows; a maximum length over
    the context limit (2048) is refused too, not taken and quietly capped."""
    c = client(server)
    for args, message in (
        ((10**9, 0.7, 0.95), "max_length 1000000000 is over this model's context limit of 2048 tokens: lower it"),
        ((2049, 0.7, 0.95), "max_length 2049 is over this model's context limit of 2048 tokens: lower it"),
        ((0, 0.7, 0.95), generation_config_error(max_length=0)),
        ((44.5, 0.7, 0.95), generation_config_error(max_length=44.5)),
        ((44, 0.0, 0.95), generation_config_error(top_p=0.0)),
        ((44, 2.0, 0.95), generation_config_error(top_p=2.0)),
        ((44, 0.7, -1.0), generation_config_error(temperature=-1.0)),
    ):
        with pytest.raises(Exception) as e:
            c.predict(FIRST["query"], *args, api_name="/chat")
        assert str(e.value) == message
    assert text(chat(c, FIRST["query"], 2048)[-1]) == FIRST["response"]  # the limit itself is fine


def test_sliders_start_at_the_option_defaults_within_the_context(server):
    from glm.generation import CHAT_DEFAULTS

    with urllib.request.urlopen(server.url + "config", timeout=10) as r:
        config = json.load(r)
    sliders = {c["props"]["elem_id"]: c["props"] for c in config["components"] if c.get("type") == "slider"}
    assert (sliders["max_length"]["maximum"], sliders["max_length"]["value"]) == (2048, CHAT_DEFAULTS.max_length)
    assert sliders["top_p"]["value"] == CHAT_DEFAULTS.top_p
    assert sliders["temperature"]["value"] == CHAT_DEFAULTS.temperature


def test_backend_bounds_max_length_by_the_context(chatglm_tiny):
    import glm
    from glm.web import ChatBackend

    small = glm.load(TINY, max_context=64)
    backend = ChatBackend(small, cli.settings_from_args(cli.build_parser().parse_args(["--max-length", "4096"])))
    assert backend.max_length == 64
    assert backend.settings(64.0, 0.7, 0.95).max_length == 64
    with pytest.raises(glm.GenerationError, match=r"^max_length 65 is over this model's context limit of 64 tokens"):
        backend.settings(65, 0.7, 0.95)


def test_host_not_on_this_machine_is_one_line():
    # 203.0.113.7 is TEST-NET-3 (RFC 5737), never an address of this machine: binding fails at once, and
    # nothing is sent anywhere.
    r = subprocess.run([sys.executable, "-m", "glm.web", "--model", str(TINY), "--host", "203.0.113.7"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("glm-web: error: cannot listen on 203.0.113.7: ") and "taken" not in line


def test_port_taken_is_one_line(server):
    r = subprocess.run([sys.executable, "-m", "glm.web", "--model", str(TINY), "--port", str(server.port)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"glm-web: error: port {server.port} on 127.0.0.1 is taken: choose "
                                             "another with --port"]


def test_inbox_keeps_order_and_is_bounded(chatglm_tiny):
    from glm.web import ChatBackend

    backend = ChatBackend(chatglm_tiny, cli.settings_from_args(cli.build_parser().parse_args(["--greedy"])))
    sent = [f"message {i}" for i in range(backend.MAX_QUEUED)]
    assert all(backend.enqueue("a", q) for q in sent)
    assert backend.enqueue("a", "one too many") is False  # refused: the page keeps it in the box
    assert backend.enqueue("b", "another session") is True
    assert backend.waiting("a") == sent
    assert [backend.next_message("a") for _ in sent] == sent and backend.next_message("a") is None
    backend.forget("b")
    assert backend.next_message("b") is None
