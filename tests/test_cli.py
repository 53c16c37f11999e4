"""glm-chat, run as a user runs it: in a real pseudo-terminal (pexpect), with piped stdin, and with --prompt.

Replies are compared with the golden replies of the official implementation (`chatglm-tiny/golden.json` → chat),
turn by turn. The golden turns use a different max_length each (44, 110, 168, 226, then 12), so the terminal
session changes it between turns with `/set max-length N`, as a user can; the history is the CLI's own.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from glm_testutil import entry_point

from glm import cli
from glm.chat import build_prompt, fit_history, fit_turn, reply_reserve, stream_reply
from glm.generation import CHAT_DEFAULTS, GenerationConfig, GenerationError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "chatglm-tiny"
TURNS = json.loads((TINY / "golden.json").read_text())["chat"]
FIRST = TURNS[0]  # 你好 at max_length 44; the same reply comes at 2048, where it ends with <eop>
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

pexpect = pytest.importorskip("pexpect")


# The official chat's settings, greedy (as --greedy).
GREEDY = GenerationConfig(max_length=2048, do_sample=False, top_p=0.7, temperature=0.95)


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="xterm", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
             PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def run(*args, input=None, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm", *args], input=input, capture_output=True, text=True,
                          encoding="utf-8", cwd=ROOT, env=env(**extra_env), timeout=120)


def spawn(*args, delay_ms: float = 0):
    """glm-chat in a pseudo-terminal, at its first prompt; `delay_ms`: every decode step sleeps that long."""
    python, *cmd = entry_point("glm", delay_ms)
    child = pexpect.spawn(python, [*cmd, "--model", str(TINY), *args], cwd=str(ROOT), env=env(), encoding="utf-8",
                          timeout=60, dimensions=(50, 400))
    child.expect_exact("User: ")
    return child


def send_query(child, query: str) -> None:
    """Type a query; its newlines are typed as a trailing backslash and Enter, as a user continues a message."""
    lines = query.split("\n")
    for line in lines[:-1]:
        child.sendline(line + "\\")
        child.expect_exact("... ")
    child.sendline(lines[-1])


def read_reply(child) -> str:
    """The reply printed after 'ChatGLM: ', up to the next prompt."""
    child.expect_exact("ChatGLM: ")
    child.expect_exact("User: ")
    return ANSI.sub("", child.before).replace("\r\n", "\n").rstrip("\n")


def ask(child, query: str) -> str:
    send_query(child, query)
    return read_reply(child)


def set_max_length(child, n: int) -> None:
    child.sendline(f"/set max-length {n}")
    child.expect_exact(f"max-length {n},")
    child.expect_exact("User: ")


# ---------------------------------------------------------------------------------------------------- terminal


def test_terminal_replies_equal_golden_turn_by_turn_then_clear_and_stop(chatglm_tiny):
    child = spawn("--greedy")
    try:
        assert "Chat with chatglm-tiny: type a message." in child.before  # the loaded model's name
        for turn in TURNS[:4]:  # the history carried from turn to turn is the CLI's own
            set_max_length(child, turn["max_length"])
            assert ask(child, turn["query"]) == turn["response"]

        # `clear` must really forget: with the four rounds still there, 你好 at 2048 gets another reply.
        full = [(t["query"], t["response"]) for t in TURNS[:4]]
        assert chatglm_tiny.chat(FIRST["query"], full, max_length=2048, do_sample=False)[0] != FIRST["response"]
        child.sendline("clear")
        child.expect_exact("(history cleared)")
        child.expect_exact("User: ")
        set_max_length(child, 2048)
        assert ask(child, FIRST["query"]) == FIRST["response"]

        # The last golden turn: a reply cut by max_length 12. The round above no longer fits and is dropped.
        last = TURNS[4]
        assert last["history"] == []
        set_max_length(child, last["max_length"])
        send_query(child, last["query"])
        child.expect_exact("(dropped the 1 oldest round of the history to fit --max-length 12)")
        assert read_reply(child) == last["response"]

        child.sendline("stop")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_terminal_ctrl_c_stops_the_reply_and_keeps_the_session():
    # Decode steps paced to 60 ms (tests/slow_launch.py), so that Ctrl+C lands mid-reply.
    child = spawn("--greedy", delay_ms=60)
    try:
        child.sendline(FIRST["query"])
        child.expect_exact("ChatGLM: ")
        child.expect_exact("记者了解到")  # the first words have streamed; the whole reply takes over 2 s
        child.sendintr()
        child.expect_exact(" [stopped]")
        cut = ANSI.sub("", "记者了解到" + child.before).replace("^C", "")  # the terminal echoes ^C
        assert FIRST["response"].startswith(cut) and len(cut) < len(FIRST["response"])
        child.expect_exact("User: ")

        # Still the same session: the cut reply is in the history, so `clear`, and the golden reply comes back.
        child.sendline("clear")
        child.expect_exact("(history cleared)")
        child.expect_exact("User: ")
        # Readline editing: a typo erased with Backspace.
        child.send(FIRST["query"] + "x\x7f\r")
        assert read_reply(child) == FIRST["response"]

        # Readline history: Up twice recalls 'clear' and then the query before it.
        child.sendline("clear")
        child.expect_exact("User: ")
        child.send("\x1b[A\x1b[A\r")
        assert read_reply(child) == FIRST["response"]

        # Ctrl+C at the prompt only warns; Ctrl+D exits.
        child.sendintr()
        child.expect_exact("(Ctrl+C again, 'stop' or Ctrl+D to exit)")
        child.expect_exact("User: ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_terminal_ctrl_c_pressed_quickly_to_stop_and_leave_prints_no_traceback():
    """Ctrl+C pressed again and again, quickly, while a reply streams: the first stops the reply, the next warns,
    the next exits, and those after it land while the program exits (the scheduler's thread being joined, torch's
    atexit finalizers), where none may print a traceback."""
    import time

    child = spawn("--greedy", delay_ms=60)
    try:
        child.sendline("晚上睡不着应该怎么办")  # its reply is 139 tokens: over 8 s at 60 ms a step
        child.expect_exact("ChatGLM: ")
        time.sleep(0.3)  # a few tokens have streamed
        for _ in range(8):
            child.sendintr()
            time.sleep(0.02)
        # Signals that arrive closer together than the program runs are one: press on until it has exited.
        for _ in range(10):
            if child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=3) == 0:
                break
            child.sendintr()
        out = ANSI.sub("", child.before)
    finally:
        child.close(force=True)
    assert " [stopped]" in out and "(Ctrl+C again, 'stop' or Ctrl+D to exit)" in out, out
    assert "Traceback" not in out and "Exception ignored" not in out, out
    assert child.exitstatus == 0 and child.signalstatus is None, out


# ---------------------------------------------------------------------------------------------------- pipes


def golden_script(turns) -> str:
    lines = []
    for t in turns:
        lines.append(f"/set max-length {t['max_length']}")
        lines.append(t["query"].replace("\n", "\\\n"))
    return "\n".join(lines) + "\n"


def test_piped_stdin_answers_each_line():
    r = run("--model", str(TINY), "--greedy", input=golden_script(TURNS[:4]))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(t["response"] + "\n" for t in TURNS[:4])
    assert "glm: chatglm-tiny on cpu, float32, no quant" in r.stderr


def test_piped_stdin_reports_a_query_too_long_and_goes_on():
    r = run("--model", str(TINY), "--greedy", "--max-length", "44", input="很长的问题" * 30 + "\n你好\n")
    assert r.stdout == FIRST["response"] + "\n"
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "too long for max_length=44" in errors[0]
    assert r.returncode == 1


@pytest.mark.parametrize("turn", [TURNS[0], TURNS[4]], ids=["44", "12"])
def test_prompt_answers_once(turn):
    r = run("--model", str(TINY), "--greedy", "--max-length", str(turn["max_length"]), "--prompt", turn["query"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == turn["response"] + "\n"


# ---------------------------------------------------------------------------------------------------- errors


def one_line_error(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    return lines[0]


def test_error_unknown_model_offline(tmp_path):
    r = run("--model", "nobody/no-such-model", "--prompt", "hi", HF_HOME=str(tmp_path))
    line = one_line_error(r, 1)
    assert line.startswith("python -m glm: error:") and "not in the local Hugging Face cache" in line


def test_error_no_such_folder(tmp_path):
    line = one_line_error(run("--model", str(tmp_path / "missing"), "--prompt", "hi"), 1)
    assert "no such folder" in line


def test_error_folder_without_tokenizer():
    line = one_line_error(run("--model", str(ROOT / "tests/fixtures/glm-tiny"), "--prompt", "hi"), 1)
    assert "no ice_text.model" in line


def test_error_cuda_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(run("--model", str(TINY), "--device", "cuda", "--prompt", "hi"), 1)
    assert "CUDA was requested but no CUDA GPU is available" in line


@pytest.mark.parametrize("args, needle", [
    (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]"),
    (["--top-p", "nan"], "argument --top-p: must be a number in (0, 1], got nan"),
    (["--top-p", "x"], "argument --top-p: expected a number, got 'x'"),
    (["--max-length", "0"], "argument --max-length: must be a positive"),
    (["--temperature", "-1"], "argument --temperature: must be a number >= 0"),
    (["--seed", "99999999999999999999999"], "argument --seed: must be an integer in [-2**63, 2**64)"),
    (["--seed", "x"], "argument --seed: expected an integer or none, got 'x'"),
    (["--max-context", "1"], "argument --max-context: expected an integer in [2, 1048576]"),
    (["--top-k", "x"], "argument --top-k: expected an integer"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be a number > 0"),
    (["--quant", "3"], "argument --quant: invalid choice"),
    (["--group-size", "64"], "--group-size applies to --quant 4 only"),
    (["--dtype", "float64"], "argument --dtype: invalid choice"),
    (["--cpu-kernel", "turbo"], "argument --cpu-kernel: invalid choice"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--cpu-kernel", "fast"], "cpu_kernel='fast' applies to quantized models"),
    (["--quant-lm-head"], "quantizing the output layer needs quant=4 or 8 (--quant)"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_error_bad_option_values(args, needle):
    r = run("--model", str(TINY), *args, "--prompt", "hi")
    at_load = args[0] == "--device" or args == ["--cpu-kernel", "fast"] or args == ["--quant-lm-head"]
    line = one_line_error(r, 1 if at_load else 2)  # these are checked when the model loads
    assert needle in line


@pytest.mark.parametrize("option, value", [
    ("max-length", "0"), ("max-length", "-3"), ("top-p", "0"), ("top-p", "1.5"), ("top-p", "inf"),
    ("temperature", "-1"), ("temperature", "nan"), ("top-k", "-2"), ("repetition-penalty", "0"),
    ("repetition-penalty", "-inf"), ("seed", str(-(2**63) - 1)), ("seed", str(2**64)),
])
def test_option_range_errors_are_generation_config_messages(option, value, capsys):
    """Each option's range is GenerationConfig's, and its message is the error: at the command line (argparse's
    one line) and in /set."""
    field = option.replace("-", "_")
    with pytest.raises(GenerationError) as e:
        GenerationConfig(**{field: (int if field in ("max_length", "top_k", "seed") else float)(value)})
    why = str(e.value).removeprefix(f"{field} ")
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([f"--{option}={value}"])  # "=": argparse takes "-1" alone for an option
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"glm-chat: error: argument --{option}: {why} (see --help)\n"
    out, err = io.StringIO(), io.StringIO()
    chat = cli.Chat(None, GREEDY, out=out, err=err)
    chat.command(f"/set {option} {value}")
    assert err.getvalue() == f"glm-chat: error: {option}: {why}\n" and chat.s == GREEDY


def test_defaults_are_the_official_chats():
    """Options not given take CHAT_DEFAULTS' values; --greedy only turns sampling off."""
    assert cli.settings_from_args(cli.build_parser().parse_args([])) == CHAT_DEFAULTS
    assert cli.settings_from_args(cli.build_parser().parse_args(["--greedy"])) == CHAT_DEFAULTS.replace(
        do_sample=False)
    args = cli.build_parser().parse_args(["--top-p", "0.5", "--seed", "3", "--max-length", "99"])
    assert cli.settings_from_args(args) == CHAT_DEFAULTS.replace(top_p=0.5, seed=3, max_length=99)


def test_documented_defaults_are_chat_defaults():
    table = (ROOT / "docs" / "cli.md").read_text()
    for option, field in (("--max-length N", "max_length"), ("--top-p P", "top_p"), ("--temperature T", "temperature"),
                          ("--top-k K", "top_k"), ("--repetition-penalty R", "repetition_penalty")):
        (value,) = re.findall(rf"^\| `{re.escape(option)}` \| ([^|]+) \|", table, re.M)
        assert float(value) == getattr(CHAT_DEFAULTS, field), option


def test_delay_ms_is_not_an_option():
    """Pacing the tiny model for the tests is tests/slow_launch.py's business: no entry point takes --delay-ms."""
    from glm import serve, web

    for mod in (cli, web, serve):
        with pytest.raises(SystemExit):
            mod.build_parser().parse_args(["--delay-ms", "5"])
    line = one_line_error(run("--model", str(TINY), "--delay-ms", "5", "--prompt", "hi"), 2)
    assert "unrecognized arguments: --delay-ms 5" in line


def test_error_out_of_memory_while_loading(monkeypatch, capsys):
    import torch

    import glm.engine

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 MiB")

    monkeypatch.setattr(glm.engine, "load", oom)
    assert cli.main(["--model", str(TINY), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory loading the model" in err[0] and "--quant 4" in err[0]


def test_out_of_memory_while_generating_keeps_the_session(chatglm_tiny, monkeypatch):
    import torch

    import glm.chat

    def oom(*a, **k):
        yield "partial"
        raise torch.OutOfMemoryError("CUDA out of memory")

    out, err = io.StringIO(), io.StringIO()
    chat = cli.Chat(chatglm_tiny, GREEDY, out=out, err=err)
    with monkeypatch.context() as mp:
        mp.setattr(glm.chat, "stream_reply", oom)
        assert chat.answer("你好") is False
    assert "out of memory while generating" in err.getvalue() and "--quant 4" in err.getvalue()
    assert chat.history == []
    assert chat.answer("你好") is True  # the session goes on
    assert chat.history == [("你好", FIRST["response"])]


# ---------------------------------------------------------------------------------------------------- history


def test_long_conversation_stays_within_max_length_and_drops_whole_rounds(chatglm_tiny):
    """A conversation four times longer than --max-length: every turn fits, and only whole rounds go."""
    tok, L = chatglm_tiny.tokenizer, 160
    queries = [t["query"] for t in TURNS[:4]] * 2
    reserve = reply_reserve(L)
    assert reserve == 20  # documented: max_length // 8, at most 256

    # What the CLI must do, computed here from the engine's own pieces.
    history, replies, drops = [], [], 0
    for q in queries:
        kept = fit_history(tok, q, history, L, reserve=reserve)
        assert kept == history[len(history) - len(kept):]  # a suffix: whole oldest rounds dropped
        drops += len(history) - len(kept)
        prompt = tok.encode(build_prompt(q, kept))
        assert len(prompt) + reserve <= L
        assert len(prompt) + len(chatglm_tiny.generate(prompt, max_length=L)) <= L
        reply, history = chatglm_tiny.chat(q, kept, max_length=L, do_sample=False)
        replies.append(reply)
    assert drops >= 4

    r = run("--model", str(TINY), "--greedy", "--max-length", str(L),
            input="".join(q.replace("\n", "\\\n") + "\n" for q in queries))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(reply + "\n" for reply in replies)
    notes = re.findall(r"dropped the (\d+) oldest rounds? of the history to fit --max-length 160", r.stderr)
    assert sum(map(int, notes)) == drops


def test_golden_turns_are_untouched_by_the_reserve(chatglm_tiny):
    for t in TURNS:
        history = [tuple(h) for h in t["history"]]
        assert fit_turn(chatglm_tiny, t["query"], history, t["max_length"]) == (history, 0)


def test_stream_reply_is_stream_chat_then_chat(chatglm_tiny):
    """Intermediate values are the official stream's; the last one is exactly chat's reply."""
    for t in TURNS[:4]:
        history = [tuple(h) for h in t["history"]]
        s = GREEDY.replace(max_length=t["max_length"])
        values = list(stream_reply(chatglm_tiny, t["query"], history, s))
        assert values[:-1] == t["stream"] and values[-1] == t["response"]


def test_query_too_long_is_a_message(chatglm_tiny):
    out, err = io.StringIO(), io.StringIO()
    chat = cli.Chat(chatglm_tiny, GREEDY.replace(max_length=16), out=out, err=err, prog="glm-chat")
    assert chat.answer("你好" * 40) is False
    assert err.getvalue().startswith("glm-chat: error: the message is") and "max_length=16" in err.getvalue()
    assert out.getvalue() == ""


# ---------------------------------------------------------------------------------------------------- packaging


def test_console_scripts_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["glm-chat"] == "glm.cli:main"
    assert scripts["glm-web"] == "glm.web:main"


def test_help_is_fast_and_lists_the_options():
    code = ("import sys; from glm import cli; p = cli.build_parser(); h = p.format_help(); "
            "assert 'torch' not in sys.modules and 'gradio' not in sys.modules; print(h)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env())
    assert r.returncode == 0, r.stderr
    for opt in ("--model", "--revision", "--quant", "--group-size", "--device", "--dtype", "--max-length",
                "--top-p", "--temperature", "--top-k", "--repetition-penalty", "--greedy", "--seed", "--prompt",
                "--cpu-kernel", "--quant-lm-head", "--max-context", "--ptuning"):
        assert opt in r.stdout
    from glm.loader import DEFAULT_MODEL

    assert cli.DEFAULT_MODEL == DEFAULT_MODEL


def test_summary_line():
    r = run("--model", str(TINY), "--greedy", "--prompt", "你好")
    assert re.fullmatch(r"glm: chatglm-tiny on cpu, float32, no quant, 16\.7 MB weights, loaded in \d+\.\d s\n",
                        r.stderr), r.stderr


def test_summary_line_names_the_p_tuning_prefix():
    prefix = ROOT / "tests/fixtures/chatglm-tiny-ptuning-train/prefix"
    r = run("--model", str(TINY), "--ptuning", str(prefix), "--greedy", "--max-length", "12", "--prompt", "你好")
    assert r.returncode == 0, r.stderr
    head = f"glm: chatglm-tiny on cpu, float32, no quant, P-Tuning prefix 4 from {prefix}, "
    assert re.fullmatch(re.escape(head) + r"\d+\.\d MB weights, loaded in \d+\.\d s\n", r.stderr), r.stderr


def test_summary_names_a_prefix_of_unknown_folder():
    import glm
    from glm.options import summary

    m = glm.load(ROOT / "tests/fixtures/glm-tiny", ptuning=ROOT / "tests/fixtures/glm-tiny-ptuning")
    assert ", no quant, P-Tuning prefix 6, " in summary(m, "glm-tiny")


def _quant_available() -> bool:
    try:
        from glm.quant import QuantLinear  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _quant_available(), reason="glm.quant.QuantLinear is not available yet")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_chat(bits):
    r = run("--model", str(TINY), "--greedy", "--max-length", "44", "--quant", str(bits), "--prompt", "你好")
    assert r.returncode == 0, r.stderr
    assert f"float32, int{bits}, " in r.stderr
    assert r.stdout.strip()  # a reply (quantized weights give other tokens than the golden float32 ones)


@pytest.mark.skipif(not _quant_available(), reason="glm.quant.QuantLinear is not available yet")
def test_group_size_that_does_not_fit_the_model_is_a_message():
    # chatglm-tiny's layers are 16 wide: a group of 32 cannot work, and says so in one line.
    r = run("--model", str(TINY), "--quant", "4", "--group-size", "32", "--prompt", "你好")
    line = one_line_error(r, 1)
    assert "group" in line and "32" in line


def test_nan_logits_give_one_line_and_keep_the_session():
    import glm

    m = glm.load(TINY)
    m.model.final_layernorm.weight.data.fill_(float("nan"))  # every score NaN: the official fallback fires
    out, err = io.StringIO(), io.StringIO()
    chat = cli.Chat(m, GREEDY.replace(max_length=12), out=out, err=err)
    assert chat.answer("你好") is True
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "NaN/inf" in lines[0] and "--dtype bfloat16" in lines[0]
    assert chat.history and chat.history[-1][0] == "你好"  # the session goes on


def test_lora_adapter_from_the_command_line():
    import glm

    adapter = ROOT / "tests/fixtures/chatglm-tiny-lora/adapter"
    m = glm.load(TINY, lora=adapter)
    want = m.chat("你好", max_length=24, do_sample=False)[0]
    r = run("--model", str(TINY), "--lora", str(adapter), "--greedy", "--max-length", "24", "--prompt", "你好")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n" and "LoRA r=4 on 2 linears" in r.stderr
    line = one_line_error(run("--model", str(TINY), "--lora", str(ROOT / "nope"), "--prompt", "hi"), 1)
    assert "no LoRA adapter folder" in line
