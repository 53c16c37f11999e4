"""`glm-chat` (also `python -m glm`): chat with ChatGLM-6B in a terminal, or answer queries piped in or given
with `--prompt`.

`glm-web` shares the pieces that are not about terminals: the model and sampling options (`add_model_args`,
`add_sampling_args`), loading with one-line errors (`load_from_args`), fitting the history into the context
(`fit_turn`) and the reply stream (`stream_reply`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

# torch (through glm.engine) is imported only once the options have parsed, so that `--help` and option errors
# answer at once instead of after a second or two of imports.

DEFAULT_MODEL = "THUDM/chatglm-6b"  # glm.loader.DEFAULT_MODEL, repeated so that --help needs no torch (tested)
MAX_RESERVE = 256

History = list[tuple[str, str]]


class CLIError(Exception):
    """A problem to report as one line (`glm-chat: error: ...`), never as a traceback."""


# ---------------------------------------------------------------------------------------------------- options


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the usage block argparse prints first buries the actual message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, s: str, what: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return v


def max_length_type(s: str) -> int:
    v = _number(int, s, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {v}")
    return v


def _sampling_type(field: str, kind, what: str):
    """An argparse type for one SamplingConfig field: parsed here, judged by SamplingConfig's own rules."""

    def parse(s: str):
        from glm.generation import GenerationError, SamplingConfig

        v = _number(kind, s, what)
        try:
            SamplingConfig(**{field: v})
        except GenerationError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{field} ")) from None
        return v

    parse.__name__ = field  # argparse names the type in some messages
    return parse


top_p_type = _sampling_type("top_p", float, "a number in (0, 1]")
temperature_type = _sampling_type("temperature", float, "a number >= 0")
top_k_type = _sampling_type("top_k", int, "an integer >= 0")
repetition_penalty_type = _sampling_type("repetition_penalty", float, "a number > 0")


def seed_type(s: str) -> int | None:
    if s.lower() in ("none", "off", ""):
        return None
    return _number(int, s, "an integer")


def delay_type(s: str) -> int:
    v = _number(int, s, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint to load and how: shared by glm-chat and glm-web."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="REPO_OR_FOLDER",
                   help=f"Hugging Face repo id or a local checkpoint folder (default: {DEFAULT_MODEL})")
    g.add_argument("--revision", default=None, metavar="REV",
                   help="Hub branch, tag or commit (default: the main branch)")
    g.add_argument("--quant", type=int, choices=(4, 8), default=None,
                   help="quantize the weights to int4 or int8 while loading (int4: about 4 GB for ChatGLM-6B)")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="int4 only: one scale per GROUP_SIZE inputs instead of one per output row")
    g.add_argument("--quant-lm-head", action="store_true",
                   help="with --quant: quantize the output layer too (1 GB in fp16; faster decoding on a CPU)")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile with CUDA graphs (fastest on a GPU; the first reply "
                        "waits for compilation)")
    g.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto: float16 on CUDA; on CPU bfloat16 for ChatGLM-6B, float32 for small models "
                        "(default: auto)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """How replies are generated: shared by glm-chat and glm-web (where the first three are slider defaults)."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-length", type=max_length_type, default=2048, metavar="N",
                   help="tokens of prompt (history included) plus reply, per turn, as chat(max_length=...) "
                        "(default: 2048)")
    g.add_argument("--top-p", type=top_p_type, default=0.7, metavar="P",
                   help="nucleus sampling threshold (default: 0.7)")
    g.add_argument("--temperature", type=temperature_type, default=0.95, metavar="T",
                   help="sampling temperature; 0 is greedy (default: 0.95)")
    g.add_argument("--top-k", type=top_k_type, default=50, metavar="K",
                   help="sample among the K likeliest tokens; 0: all (default: 50, as the official chat)")
    g.add_argument("--repetition-penalty", type=repetition_penalty_type, default=1.0, metavar="R",
                   help="> 1 discourages repeating tokens (default: 1.0, none)")
    g.add_argument("--greedy", action="store_true", help="always pick the likeliest token (deterministic)")
    g.add_argument("--seed", type=seed_type, default=None, metavar="N",
                   help="seed every reply's sampling (reproducible)")
    # Test hook, hidden from --help: sleeps between streamed tokens (the replies themselves are unchanged) so
    # that a test can press Ctrl+C or Stop in the middle of a reply of the tiny, very fast test model.
    g.add_argument("--delay-ms", type=delay_type, default=0, help=argparse.SUPPRESS)


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.group_size is not None and args.quant != 4:
        parser.error("--group-size applies to --quant 4 only")


def build_parser(prog: str = "glm-chat") -> ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Chat with ChatGLM-6B in the terminal. Type a message; 'clear' starts a new conversation,\n"
                    "'stop' or Ctrl+D exits, Ctrl+C stops the reply being written, /help lists more.\n"
                    "With stdin not a terminal, each line is a query and each reply is printed.",
        epilog="examples:\n"
               f"  {prog} --quant 4\n"
               f"  {prog} --prompt '你好' --greedy\n"
               f"  printf '你好\\n晚上睡不着应该怎么办\\n' | {prog} --device cpu\n"
               f"  {prog} --model tests/fixtures/chatglm-tiny   # offline, tiny random test model\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", metavar="TEXT", default=None, help="answer TEXT once, print the reply and exit")
    return p


# ---------------------------------------------------------------------------------------------------- loading


def model_name(model: str) -> str:
    p = Path(os.path.expanduser(model))
    return p.resolve().name if p.is_dir() else model


def _human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def is_oom(e: BaseException) -> bool:
    """Out of memory, whether CUDA's (torch.OutOfMemoryError), Python's, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


def oom_message(doing: str, args) -> str:
    hint = "--quant 4" if not getattr(args, "quant", None) else "--quant 4 and a smaller --max-length"
    return f"out of memory {doing} on {getattr(args, 'device', '?')}: try {hint}, or another --device"


def summary(m, name: str) -> str:
    """The one line printed after loading: what runs where, and how big it is."""
    q = m.config.quantization_bit
    gs = getattr(m.config, "quantization_group_size", None)
    quant = f"int{q}" + (f" (group size {gs})" if gs else "") if q else "no quant"
    dtype = str(m.dtype).removeprefix("torch.")
    return (f"glm: {name} on {m.device}, {dtype}, {quant}, {_human_bytes(m.memory_bytes())} weights, "
            f"loaded in {m.load_seconds:.1f} s")


def load_from_args(args: argparse.Namespace, log=None):
    """`glm.load` with the parsed model options; prints the summary line to `log` (stderr).

    Every expected failure (unknown model, offline without a cached copy, no CUDA, bad checkpoint, out of
    memory) becomes a CLIError with a one-line message.
    """
    log = log if log is not None else sys.stderr
    import torch  # noqa: F401 - import errors here are real installation problems, not the user's

    import glm

    # huggingface_hub logs a warning for every retry when the Hub cannot be reached; the one-line error below
    # says it all. (Read when huggingface_hub is imported; its download progress bars are not logging.)
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        m = glm.load(args.model, revision=args.revision, device=args.device, dtype=args.dtype, quant=args.quant,
                     group_size=args.group_size, quantize_lm_head=args.quant_lm_head and bool(args.quant),
                     compile=args.compile, progress=_isatty(log))
    except (glm.CheckpointError, glm.ConfigError, glm.GenerationError, ValueError) as e:
        raise CLIError(str(e)) from None
    except ImportError as e:  # e.g. --quant before glm.quant is available, or a missing optional package
        raise CLIError(f"cannot load {args.model}: {e}") from None
    except OSError as e:  # unreadable folder, missing tokenizer file, ...
        raise CLIError(f"cannot load {args.model}: {e}") from None
    except (MemoryError, RuntimeError) as e:
        if is_oom(e):
            raise CLIError(oom_message("loading the model", args)) from None
        raise
    if m.tokenizer is None:
        raise CLIError(f"{m.path} has no ice_text.model (the tokenizer), so it cannot chat: use a full checkpoint")
    print(summary(m, model_name(args.model)), file=log, flush=True)
    return m


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------- replies


@dataclass
class Sampling:
    """Per-turn generation settings; the defaults are the official chat's."""

    max_length: int = 2048
    greedy: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sampling:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def describe(self) -> str:
        return (f"max-length {self.max_length}, top-p {self.top_p}, temperature {self.temperature}, "
                f"top-k {self.top_k}, repetition-penalty {self.repetition_penalty}, "
                f"greedy {'on' if self.greedy else 'off'}, seed {'none' if self.seed is None else self.seed}")


def reply_reserve(max_length: int) -> int:
    """Tokens kept free for the reply when old rounds are dropped: an eighth of max_length, at most 256.

    256 of the default 2048 leaves most of the context to the conversation while a reply still gets a useful
    length; small max_lengths keep the same proportion (the golden test turns, which leave exactly 40 tokens for
    their replies, fit untouched up to max_length 320).
    """
    return max(1, min(MAX_RESERVE, max_length // 8))


def fit_turn(tokenizer, query: str, history: History, max_length: int) -> tuple[History, int]:
    """The history to send with `query`: oldest whole rounds dropped until prompt + reserve fits max_length.

    Returns (history, rounds dropped). Raises glm.GenerationError when the query alone is too long.
    """
    from glm.chat import fit_history

    kept = fit_history(tokenizer, query, history, max_length, reserve=reply_reserve(max_length))
    return kept, len(history) - len(kept)


def stream_reply(m, query: str, history: History, s: Sampling) -> Iterator[str]:
    """Yield the reply so far after every token; the last value is exactly what `m.chat` returns.

    `m.stream_chat` (the official stream) never yields the token that reaches max_length, so its last value
    can be one token short of `chat`'s reply; a terminal and a web page should show, and remember, the reply
    that `chat` gives, which `stream_chat(final=True)` ends on.
    """
    replies = m.stream_chat(query, history, max_length=s.max_length, do_sample=not s.greedy, top_p=s.top_p,
                            temperature=s.temperature, top_k=s.top_k, repetition_penalty=s.repetition_penalty,
                            seed=s.seed, final=True)
    try:
        for reply, _ in replies:
            yield reply
    finally:
        replies.close()  # a stopped reply frees the caches for the next one now, not at garbage collection


# ---------------------------------------------------------------------------------------------------- the chat


HELP = """\
Type a message and press Enter; end a line with \\ to continue the message on the next line.
  clear             start a new conversation (forget the history)
  stop              exit (so does Ctrl+D); Ctrl+C stops the reply being written
  /set              show the generation settings
  /set NAME VALUE   change one: max-length, top-p, temperature, top-k, repetition-penalty, greedy on|off,
                    seed N|none
  /help             this text"""

_SETTERS = {
    "max-length": ("max_length", max_length_type),
    "top-p": ("top_p", top_p_type),
    "temperature": ("temperature", temperature_type),
    "top-k": ("top_k", top_k_type),
    "repetition-penalty": ("repetition_penalty", repetition_penalty_type),
    "seed": ("seed", seed_type),
}


def _on_off(s: str) -> bool:
    if s.lower() in ("on", "true", "yes", "1"):
        return True
    if s.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {s!r}")


class Chat:
    """One conversation on a loaded model: reads queries, streams replies, keeps the history within bounds."""

    def __init__(self, m, sampling: Sampling, *, out=None, err=None, prog: str = "glm-chat", delay_ms: int = 0,
                 stream: bool | None = None):
        self.m = m
        self.s = sampling
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.prog = prog
        self.delay = delay_ms / 1000
        # Token by token for a person watching a terminal; into a pipe or file, each reply is written once, whole,
        # so that a script reads exactly the reply (the streamed text can differ in a rare corner, see ReplyPrinter).
        self.stream = _isatty(self.out) if stream is None else stream
        self.history: History = []

    def _write(self, f, text: str) -> None:
        if text:
            f.write(text)
            f.flush()

    def error(self, msg: str) -> None:
        self._write(self.err, f"{self.prog}: error: {msg}\n")

    def command(self, line: str) -> str | None:
        """Handle a command line: 'stop' / 'clear' / /help / /set. Returns 'stop', 'done', or None (a query)."""
        words = line.split()
        if not words:
            return "done"  # an empty line is not a query
        head = words[0].lower()
        if len(words) == 1 and head in ("stop", "/stop", "/exit", "/quit"):
            return "stop"
        if len(words) == 1 and head in ("clear", "/clear"):
            self.history = []
            self._write(self.err, "(history cleared)\n")
            return "done"
        if head == "/help" and len(words) == 1:
            self._write(self.err, HELP + "\n")
            return "done"
        if head == "/set":
            self._set(words[1:])
            return "done"
        return None

    def _set(self, words: list[str]) -> None:
        if not words:
            self._write(self.err, self.s.describe() + "\n")
            return
        if len(words) != 2:
            self.error("usage: /set NAME VALUE (/help lists the names)")
            return
        name, value = words[0].lower().removeprefix("--"), words[1]
        try:
            if name == "greedy":
                self.s.greedy = _on_off(value)
            elif name in _SETTERS:
                attr, parse = _SETTERS[name]
                setattr(self.s, attr, parse(value))
            else:
                self.error(f"unknown setting {name!r}: use one of {', '.join(list(_SETTERS) + ['greedy'])}")
                return
        except argparse.ArgumentTypeError as e:
            self.error(f"{name}: {e}")
            return
        self._write(self.err, self.s.describe() + "\n")

    def answer(self, query: str, prefix: str = "", interactive: bool = False) -> bool:
        """Stream the reply to `query` to `out` after `prefix`; False when there was an error (already reported).

        Interactive, Ctrl+C (KeyboardInterrupt) stops the reply: what was written so far is kept in the history,
        as it is what the user saw, and the conversation goes on. Otherwise it ends the program, as usual.
        """
        import glm

        try:
            history, dropped = fit_turn(self.m.tokenizer, query, self.history, self.s.max_length)
        except glm.GenerationError as e:
            self.error(str(e))
            return False
        if dropped:
            rounds = "round" if dropped == 1 else "rounds"
            self._write(self.err, f"(dropped the {dropped} oldest {rounds} of the history to fit --max-length "
                                  f"{self.s.max_length})\n")
        self.history = history  # dropped rounds are gone for good: the history stays bounded
        from glm.chat import ReplyPrinter

        printer = ReplyPrinter()
        reply = ""
        self._write(self.out, prefix)
        stream = stream_reply(self.m, query, history, self.s)
        try:
            for reply in stream:
                if self.stream:
                    self._write(self.out, printer.update(reply))
                if self.delay:
                    time.sleep(self.delay)
        except KeyboardInterrupt:
            stream.close()
            if not interactive:
                self._end_line(prefix, printer)
                raise
            self._write(self.out, printer.finish(reply) + " [stopped]\n")
            if reply:
                self.history = history + [(query, reply)]
            return True
        except (MemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            stream.close()
            _free_cuda_cache()
            self._end_line(prefix, printer)
            self.error("out of memory while generating: try a smaller --max-length (or /set max-length), "
                       "or load with --quant 4")
            return False
        self._write(self.out, printer.finish(reply) + "\n")
        self.history = history + [(query, reply)]
        if getattr(self.m.decoder, "nan_seen", False):
            self.error("the model produced NaN/inf scores, so that reply is not meaningful (float16 overflow?): "
                       "restart with --dtype bfloat16 or float32")
        return True

    def _end_line(self, prefix: str, printer) -> None:
        """End a reply line cut short, if anything of it was written."""
        if prefix or printer.printed:
            self._write(self.out, "\n")

    # -- the three modes

    def interactive(self) -> int:
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and a history of inputs
        except ImportError:  # pragma: no cover - e.g. Windows
            pass
        self._write(self.err, "Chat with ChatGLM-6B: type a message. 'clear' starts over, 'stop' or Ctrl+D exits, "
                              "Ctrl+C stops a reply, /help for more.\n")
        interrupted = False
        while True:
            try:
                query = self._read_query(input, "\nUser: ", "... ")
            except EOFError:
                self._write(self.out, "\n")
                return 0
            except KeyboardInterrupt:
                # A Ctrl+C meant for a reply that just ended must not end the session: exit on the second one.
                if interrupted:
                    self._write(self.out, "\n")
                    return 0
                interrupted = True
                self._write(self.out, "\n(Ctrl+C again, 'stop' or Ctrl+D to exit)\n")
                continue
            interrupted = False
            action = self.command(query)
            if action == "stop":
                return 0
            if action is None:
                try:
                    self.answer(query, prefix="ChatGLM: ", interactive=True)
                except KeyboardInterrupt:  # in the instant before the reply started: nothing to keep
                    self._write(self.out, " [stopped]\n")

    @staticmethod
    def _read_query(read, prompt: str, more: str) -> str:
        """One message; a line ending in a backslash continues on the next line (joined with a newline)."""
        lines = [read(prompt)]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(read(more))
        return "\n".join(lines)

    def piped(self, lines) -> int:
        """One query per line (with the same backslash continuation and commands); each reply on stdout."""
        ok = True
        it = iter(lines)
        for line in it:
            parts = [line.rstrip("\r\n")]
            while parts[-1].endswith("\\"):
                parts[-1] = parts[-1][:-1]
                nxt = next(it, None)
                if nxt is None:
                    break
                parts.append(nxt.rstrip("\r\n"))
            query = "\n".join(parts)
            action = self.command(query)
            if action == "stop":
                break
            if action is None:
                ok = self.answer(query) and ok
        return 0 if ok else 1

    def once(self, query: str) -> int:
        if not query.strip():
            self.error("--prompt is empty")
            return 1
        return 0 if self.answer(query) else 1


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None, prog: str = "glm-chat") -> int:
    for f in (sys.stdout, sys.stderr):
        # A reply is Chinese more often than not: never die on a terminal or pipe that cannot encode it.
        if hasattr(f, "reconfigure"):
            f.reconfigure(errors="backslashreplace")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # The engine warns about NaN logits for library users; here Chat.answer reports it as one line instead.
    warnings.filterwarnings("ignore", message="the model produced NaN", category=RuntimeWarning)
    check_model_args(parser, args)
    try:
        m = load_from_args(args)
        chat = Chat(m, Sampling.from_args(args), prog=prog, delay_ms=args.delay_ms)
        if args.prompt is not None:
            return chat.once(args.prompt)
        if _isatty(sys.stdin):
            return chat.interactive()
        return chat.piped(sys.stdin)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading, or in piped / --prompt mode
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
