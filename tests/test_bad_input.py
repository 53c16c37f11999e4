"""Bad input to the Python API and to glm-chat: refused in one line (a GenerationError, a ValueError, naming the
argument) or handled as documented; never a crash, never an allocation sized by a number the user typed, and the
model answers the next good request.

Checkpoints that are damaged are tests/test_loader.py's business; this file is about prompts, settings, history
and what reaches glm-chat through its options, its `/set` command and its stdin.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from glm_testutil import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glm
from glm import cli
from glm.generation import GenerationConfig, GenerationError

ROOT = Path(__file__).resolve().parent.parent
TINY = FIXTURES / "chatglm-tiny"
FIRST = json.loads((TINY / "golden.json").read_text())["chat"][0]  # 你好: the same reply at max_length 2048
CASE = json.loads((FIXTURES / "glm-tiny" / "golden.json").read_text())["cases"][0]
PROMPT, GREEDY_IDS = CASE["input_ids"], CASE["greedy_ids"]  # glm-tiny: [994, [gMASK], <sop>] and its golden ids
SMALL_CONTEXT = 64
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FIELDS = [f for f in GenerationConfig.__dataclass_fields__ if f != "stop"]

# Few examples, derandomized: the file stays fast and every run tries the same values.
FEW = settings(max_examples=40, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Setting values of every kind a caller might pass: the awkward floats, ints past int64, bools, strings, None.
ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 1e-300, 5e-324, 1e-40, 0.0, -0.0, 0.5, 1.0]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, 2**64 - 1, -(2**63) - 1, 0, 1, 2]),
    st.booleans(),
    st.text(max_size=4),
    st.none(),
)


@pytest.fixture(scope="module")
def small():
    """glm-tiny with a 64-token context: a request that asks for millions of tokens ends in a few steps."""
    return glm.load(FIXTURES / "glm-tiny", max_context=SMALL_CONTEXT)


@pytest.fixture(scope="module")
def chat64():
    """chatglm-tiny (the real tokenizer) with a 64-token context, for chats that must end fast."""
    return glm.load(TINY, max_context=SMALL_CONTEXT)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


def answers(m) -> None:
    """The model still gives glm-tiny's golden greedy ids for a good prompt."""
    assert m.generate(PROMPT, 8) == GREEDY_IDS[:8]


def cache_slots(m) -> int:
    return m.scheduler.runner.caches[0].k.shape[2]


# ---------------------------------------------------------------------------------------------------- memory


def test_huge_max_new_tokens_stops_at_the_context_limit(small):
    new = small.generate(PROMPT, 5_000_000, stop_at_eos=False)
    assert len(PROMPT) + len(new) == SMALL_CONTEXT  # ended at the limit, with reason "length"
    assert cache_slots(small) <= SMALL_CONTEXT  # the cache was sized by the limit, not by 5_000_000
    new = small.generate(PROMPT, max_length=10**20, stop_at_eos=False)
    assert len(PROMPT) + len(new) == SMALL_CONTEXT and cache_slots(small) <= SMALL_CONTEXT
    answers(small)


def test_default_context_limit_is_the_config_max_sequence_length(tiny):
    assert tiny.max_context == tiny.config.max_sequence_length == 2048
    tiny.generate(PROMPT, 5_000_000)
    assert cache_slots(tiny) <= 2048
    answers(tiny)


@pytest.mark.parametrize("bad", [0, 1, -5, 2**30, 2**70, 1.5, "64", True])
def test_bad_max_context_is_refused(bad):
    with pytest.raises(GenerationError, match="max_context must be an integer") as e:
        glm.load(FIXTURES / "glm-tiny", max_context=bad)
    one_line(e.value)


def test_prompt_longer_than_the_context_is_refused(small):
    long = [994] * SMALL_CONTEXT + PROMPT[1:]
    for call in (lambda: small.generate(long, 1), lambda: small.logits(long)):
        with pytest.raises(GenerationError, match="context limit of 64") as e:
            call()
        one_line(e.value)
    answers(small)


# ---------------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("ids, needle", [
    ([994, 1024, 1001, 1004], "id 1024, outside this model's vocabulary [0, 1024)"),
    ([-1, 1001, 1004], "id -1, outside"),
    ([10**30, 1001, 1004], "outside this model's vocabulary"),
    ([994, 1.0, 1001, 1004], "input_ids must hold ints, got float"),
    ([994, True, 1001, 1004], "input_ids must hold ints, got bool"),
    ([994, "5", 1001, 1004], "input_ids must hold ints, got str"),
    ([994, None, 1001, 1004], "input_ids must hold ints, got NoneType"),
    ([], "input_ids is empty"),
    ("hello", "input_ids must be a list of token ids"),
    (b"\x01\x02", "input_ids must be a list of token ids"),
    (None, "input_ids must be a list of token ids"),
    (5, "input_ids must be a list of token ids"),
    ([994, 995], "no <sop> token"),
    (torch.tensor([[[994, 1001, 1004]]]), "input_ids must be a 1-D integer tensor"),
    (torch.tensor(994), "input_ids must be a 1-D integer tensor"),
    (torch.tensor([994.0, 1001.0, 1004.0]), "input_ids must be a 1-D integer tensor"),
    (torch.tensor([994, 2000, 1004]), "id 2000, outside"),
    ([PROMPT, [994, 5000, 1001, 1004]], "id 5000, outside"),  # one bad row of a batch
], ids=lambda v: repr(v)[:40] if not isinstance(v, str) or len(v) > 12 else v)
def test_bad_prompt_is_one_line_and_the_model_goes_on(small, ids, needle):
    with pytest.raises(GenerationError) as e:
        small.generate(ids, 3)
    assert needle in one_line(e.value)
    assert isinstance(e.value, ValueError)
    answers(small)


def test_a_tensor_is_a_prompt_or_a_batch(small):
    one = small.generate(torch.tensor(PROMPT), 6)
    assert one == GREEDY_IDS[:6]
    assert small.generate(torch.tensor(PROMPT, dtype=torch.int32), 6) == one
    assert small.generate(torch.tensor([PROMPT, PROMPT]), 6) == [one, one]  # 2-D: a batch, each row as if alone
    assert small.generate([torch.tensor(PROMPT), PROMPT], 6) == [one, one]


# ---------------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=-1), "max_new_tokens must be a positive integer, got -1"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=None), "give max_new_tokens or max_length"),
    (dict(max_new_tokens=3, top_k=1.5), "top_k must be an integer >= 0"),
    (dict(max_new_tokens=3, top_k=-2), "top_k must be an integer >= 0"),
    (dict(max_new_tokens=3, seed="x"), "seed must be an integer in [-2**63, 2**64)"),
    (dict(max_new_tokens=3, seed=2**64), "seed must be an integer in [-2**63, 2**64)"),
    (dict(max_new_tokens=3, seed=-(2**63) - 1), "seed must be an integer"),
    (dict(max_new_tokens=3, temperature=math.nan), "temperature must be a number >= 0"),
    (dict(max_new_tokens=3, temperature=math.inf), "temperature must be a number >= 0"),
    (dict(max_new_tokens=3, temperature="0.5"), "temperature must be a number >= 0"),
    (dict(max_new_tokens=3, repetition_penalty=math.nan), "repetition_penalty must be a number > 0"),
    (dict(max_new_tokens=3, repetition_penalty=0), "repetition_penalty must be a number > 0"),
    (dict(max_new_tokens=3, top_p=0), "top_p must be a number in (0, 1]"),
    (dict(max_new_tokens=3, top_p=10**400), "top_p must be a number in (0, 1]"),
    (dict(max_new_tokens=3, do_sample="yes"), "do_sample must be True or False"),
    (dict(max_new_tokens=3, stop=[""]), "stop must be a list of non-empty strings"),
    (dict(max_new_tokens=3, stop=5), "stop must be a list of non-empty strings"),
    (dict(max_new_tokens=3, temprature=0.5), "unknown generation setting(s) temprature"),
    (dict(max_new_tokens=3, max_tokens=5, foo=1), "unknown generation setting(s) foo, max_tokens"),
], ids=lambda v: repr(v)[:48])
def test_bad_setting_is_one_line_naming_it(small, kwargs, needle):
    with pytest.raises(GenerationError) as e:
        small.generate(PROMPT, **kwargs)
    assert needle in one_line(e.value)
    answers(small)


def test_generate_minus_one_names_max_new_tokens(small):
    with pytest.raises(ValueError, match=r"^max_new_tokens must be a positive integer, got -1$"):
        small.generate(PROMPT, -1)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e300), dict(temperature=10**400), dict(repetition_penalty=1e300),
    dict(repetition_penalty=10**400), dict(repetition_penalty=1e-300), dict(top_k=10**30), dict(top_k=2**63),
    dict(temperature=2**63), dict(repetition_penalty=2**63), dict(top_p=1e-300), dict(seed=2**64 - 1), dict(seed=0),
    dict(temperature=2e-5),
], ids=lambda v: repr(v)[:40])
def test_settings_past_float32_and_int64_work(small, kwargs):
    # Valid, if extreme: each works (past float32 or int64 it is clamped), it does not fail the request.
    new = small.generate(PROMPT, 5, do_sample=True, **kwargs)
    assert len(new) == 5 and all(0 <= t < small.config.vocab_size for t in new)
    answers(small)


def test_a_temperature_below_greedy_below_is_greedy(small):
    assert small.generate(PROMPT, 8, do_sample=True, temperature=1e-40) == GREEDY_IDS[:8]


@FEW
@given(field=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_generation_config_takes_or_refuses_any_value(field, value):
    try:
        c = GenerationConfig(**{field: value})
    except GenerationError as e:
        assert one_line(e).startswith(field)  # names the argument
        return
    assert getattr(c, field) == value  # kept as given (and never NaN, which equals nothing)


@FEW
@given(field=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_generate_with_any_setting_value_works_or_is_one_line(small, field, value):
    kwargs = {"max_new_tokens": 4, "do_sample": True, field: value}
    try:
        new = small.generate(PROMPT, **kwargs)
    except GenerationError as e:
        one_line(e)
    else:
        assert 1 <= len(new) <= SMALL_CONTEXT - len(PROMPT)
    answers(small)


CHAT_FIELDS = ["max_length", "do_sample", "top_p", "temperature", "top_k", "repetition_penalty", "seed"]


@FEW
@given(field=st.sampled_from(CHAT_FIELDS), value=ANY_VALUE)
def test_chat_with_any_setting_value_works_or_is_one_line(chat64, field, value):
    try:
        reply, history = chat64.chat("你好", **{field: value})
    except GenerationError as e:
        one_line(e)
    else:
        assert isinstance(reply, str) and history == [("你好", reply)]
    assert chat64.generate(chat64.tokenizer.encode("你好"), 3, do_sample=False)  # and the model goes on


# ---------------------------------------------------------------------------------------------------- chat


@pytest.mark.parametrize("history, needle", [
    (["a", "b"], "history[0] must be a (query, reply) pair of strings, got 'a'"),
    ("ab", "history must be a list of (query, reply) pairs, got str"),
    ({"q": "r"}, "history must be a list of (query, reply) pairs, got dict"),
    ([("q", "r", "x")], "history[0] must be a (query, reply) pair"),
    ([("q", "r"), ("q", None)], "history[1] must be a (query, reply) pair of strings"),
    ([("q", 5)], "history[0] must be a (query, reply) pair of strings"),
    ([["q", b"r"]], "history[0] must be a (query, reply) pair of strings"),
], ids=lambda v: repr(v)[:30])
def test_bad_history_is_one_line(chat64, history, needle):
    for call in (lambda: chat64.chat("你好", history), lambda: list(chat64.stream_chat("你好", history))):
        with pytest.raises(GenerationError) as e:
            call()
        assert needle in one_line(e.value)
    assert chat64.chat("你好", [["q", "r"]], max_length=SMALL_CONTEXT, do_sample=False)[0]  # lists are pairs too


@pytest.mark.parametrize("query", [None, b"hi", 5, ["hi"]], ids=repr)
def test_bad_query_is_one_line(chat64, query):
    with pytest.raises(GenerationError, match="query must be a string") as e:
        chat64.chat(query)
    one_line(e.value)


def test_chat_unknown_keyword_is_a_generation_error(chat64):
    for call in (chat64.chat, chat64.stream_chat):
        with pytest.raises(GenerationError, match=r"unknown generation setting\(s\) temprature, tokens") as e:
            call("你好", temprature=0.5, tokens=3)
        one_line(e.value)
    assert chat64.chat("你好", top_k=5, seed=3, repetition_penalty=1.1, max_new_tokens=3)[0]  # every setting is known


def test_chat_past_the_context_limit_names_it(chat64):
    with pytest.raises(GenerationError, match="context limit of 64") as e:
        chat64.chat("很长的问题" * 40, max_length=2048)
    one_line(e.value)
    out, err = io.StringIO(), io.StringIO()
    chat = cli.Chat(chat64, GenerationConfig(max_length=2048), out=out, err=err)
    assert chat.answer("很长的问题" * 40) is False
    (line,) = err.getvalue().splitlines()
    assert "too long for max_context=64" in line and "raise max_context" in line


def test_chat_with_a_lone_surrogate(chatglm_tiny):
    # What os.fsdecode or a surrogateescape stream makes of bytes that are not UTF-8.
    try:
        reply, _ = chatglm_tiny.chat("\udcff bad", max_length=40, do_sample=False)
    except GenerationError as e:
        one_line(e)
    else:
        assert isinstance(reply, str)
    assert chatglm_tiny.chat(FIRST["query"], max_length=2048, do_sample=False)[0] == FIRST["response"]


# ---------------------------------------------------------------------------------------------------- glm-chat


def env(**extra) -> dict:
    return dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="xterm", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)


def glm_chat(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm", "--model", str(TINY), *args], input=input,
                          capture_output=True, cwd=ROOT, env=env(), timeout=180)


def errors(stderr: bytes) -> list[str]:
    text = stderr.decode()
    assert "Traceback" not in text, text
    return [ln for ln in text.splitlines() if ": error: " in ln]


def test_invalid_utf8_on_stdin_answers_every_line(chatglm_tiny):
    r = glm_chat("--greedy", input=b"hello\n\xff\xfe bad\nafter\n")
    assert r.returncode == 0 and errors(r.stderr) == [], r.stderr.decode()
    history = []
    for q in ("hello", "\ufffd\ufffd bad", "after"):  # each byte that is not UTF-8 reads as U+FFFD
        _, history = chatglm_tiny.chat(q, history, max_length=2048, do_sample=False)
    assert r.stdout.decode() == "".join(reply + "\n" for _, reply in history)


def test_invalid_utf8_typed_in_a_terminal_keeps_the_session(chatglm_tiny):
    pexpect = pytest.importorskip("pexpect")
    bad_reply = chatglm_tiny.chat("\ufffd\ufffd bad", [], max_length=30, do_sample=False)[0]
    good_reply = chatglm_tiny.chat(FIRST["query"], [], max_length=30, do_sample=False)[0]

    def reply() -> str:
        child.expect_exact("ChatGLM: ")
        child.expect_exact("User: ")
        return ANSI.sub("", child.before).replace("\r\n", "\n").strip()

    child = pexpect.spawn(sys.executable, ["-m", "glm", "--model", str(TINY), "--greedy", "--max-length", "30"],
                          cwd=str(ROOT), env=env(), encoding="utf-8", codec_errors="replace", timeout=60,
                          dimensions=(50, 400))
    try:
        child.expect_exact("User: ")
        os.write(child.child_fd, b"\xff\xfe bad\r")  # raw bytes, as a terminal in another encoding sends them
        assert reply() == bad_reply
        child.sendline("clear")
        child.expect_exact("(history cleared)")
        child.expect_exact("User: ")
        child.sendline(FIRST["query"])
        assert reply() == good_reply
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


PEAK_RSS = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True)
sys.stdout.buffer.write(r.stdout)
sys.stderr.buffer.write(r.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)  # KiB on Linux
sys.exit(r.returncode)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_huge_max_length_answers_within_the_context_in_little_memory():
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "glm", "--model", str(TINY), "--greedy",
                        "--max-length", "100000000", "--prompt", FIRST["query"]],
                       capture_output=True, cwd=ROOT, env=env(), timeout=180)
    *log, peak_kib = r.stderr.decode().strip().splitlines()
    assert r.returncode == 0, log
    assert r.stdout.decode() == FIRST["response"] + "\n"  # as at max_length 2048: the context limit
    assert int(peak_kib) < 1.5e9 / 1024, f"glm-chat peaked at {int(peak_kib) / 1e6:.2f} GB"


def test_options_that_pass_the_range_checks_answer():
    # --temperature 1e-40 is greedy (below GREEDY_BELOW); --max-length past int64 is capped at the context.
    r = glm_chat("--temperature", "1e-40", "--max-length", "99999999999999999999", "--prompt", FIRST["query"])
    assert r.returncode == 0 and errors(r.stderr) == []
    assert r.stdout.decode() == FIRST["response"] + "\n"


def test_set_with_extreme_values_works_or_is_one_line(chatglm_tiny):
    extreme = dict(temperature=1e300, top_k=10**30, repetition_penalty=1e300, seed=2**64 - 1)
    sampled = chatglm_tiny.chat(FIRST["query"], [], max_length=40, top_p=0.7, **extreme)[0]
    script = "\n".join([
        "/set temperature 1e-40", FIRST["query"], "clear",
        "/set max-length 99999999999999999999", FIRST["query"], "clear",
        "/set seed 99999999999999999999999",  # an error: past 2**64
        "/set max-length 40", "/set temperature 1e300", "/set top-k " + str(10**30), "/set repetition-penalty 1e300",
        f"/set seed {2**64 - 1}", FIRST["query"], "clear",
        "/set temperature nan", "/set max-length 0", "/set top-p 1e999", "/set bogus 1", "/set top-k",
        "/set repetition-penalty 1", "/set max-length 2048", "/set greedy on", FIRST["query"],
    ]) + "\n"
    r = glm_chat(input=script.encode())
    assert r.returncode == 0, r.stderr.decode()
    errs = errors(r.stderr)
    assert len(errs) == 6, errs
    assert "seed: must be an integer in [-2**63, 2**64) or None, got 99999999999999999999999" in errs[0]
    assert "temperature: must be a number >= 0 (0 is greedy), got nan" in errs[1]
    assert "usage: /set NAME VALUE" in errs[5]
    assert r.stdout.decode().splitlines() == [FIRST["response"], FIRST["response"], sampled, FIRST["response"]]


def test_a_failed_turn_is_one_line_and_keeps_the_session_and_history(chatglm_tiny):
    out, err = io.StringIO(), io.StringIO()
    chat = cli.Chat(chatglm_tiny, GenerationConfig(max_length=2048), out=out, err=err)
    assert chat.answer(FIRST["query"]) is True
    before = list(chat.history)

    # A query too long for the settings: refused before anything runs.
    chat.s = chat.s.replace(max_length=40)
    assert chat.answer("很长的问题" * 20) is False
    # A failure in the middle of generating (what the scheduler does with any error: the running request fails).
    chat.s = chat.s.replace(max_length=2048)

    def fail(rows):
        raise RuntimeError("device lost\nsecond line of detail")

    chatglm_tiny.scheduler.step_hooks.append(fail)
    try:
        assert chat.answer("再见") is False
    finally:
        chatglm_tiny.scheduler.step_hooks.remove(fail)
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and "too long for max_length=40" in lines[0]
    assert lines[1] == "glm-chat: error: RuntimeError: device lost (the session goes on)"
    assert chat.history == before

    # The session goes on, with its history.
    out.truncate(0)
    out.seek(0)
    assert chat.answer("再见") is True
    expected = chatglm_tiny.chat("再见", before, max_length=2048, do_sample=False)[0]
    assert out.getvalue() == expected + "\n" and chat.history == before + [("再见", expected)]


def test_device_mps_without_mps_is_one_line():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    r = glm_chat("--device", "mps", "--prompt", "hi")
    assert r.returncode == 1 and r.stdout == b""
    (line,) = r.stderr.decode().strip().splitlines()
    assert "mps" in line.lower() and "Traceback" not in line
