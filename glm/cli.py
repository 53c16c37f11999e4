"""`glm-chat` (also `python -m glm`): chat with ChatGLM-6B in a terminal, or answer queries piped in or given
with `--prompt`."""

from __future__ import annotations

import argparse
import sys
import warnings

from glm.options import (
    DEFAULT_MODEL,  # noqa: F401 - part of this command's surface (tested)
    ArgumentParser,
    CLIError,
    add_model_args,
    add_sampling_args,
    check_model_args,
    describe,
    is_oom,
    isatty,
    load_from_args,
    max_length_type,
    model_name,
    repetition_penalty_type,
    seed_type,
    settings_from_args,
    temperature_type,
    top_k_type,
    top_p_type,
)

History = list[tuple[str, str]]
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

    def __init__(self, m, settings, *, out=None, err=None, prog: str = "glm-chat", name: str = "the model",
                 stream: bool | None = None):
        self.m = m
        self.s = settings  # a GenerationConfig; /set replaces it
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.prog = prog
        self.name = name  # the model's, for the banner
        # Token by token for a person watching a terminal; into a pipe or file, each reply is written once, whole,
        # so that a script reads exactly the reply (the streamed text can differ in a rare corner, see ReplyPrinter).
        self.stream = isatty(self.out) if stream is None else stream
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
            self._write(self.err, describe(self.s) + "\n")
            return
        if len(words) != 2:
            self.error("usage: /set NAME VALUE (/help lists the names)")
            return
        name, value = words[0].lower().removeprefix("--"), words[1]
        try:
            if name == "greedy":
                self.s = self.s.replace(do_sample=not _on_off(value))
            elif name in _SETTERS:
                attr, parse = _SETTERS[name]
                self.s = self.s.replace(**{attr: parse(value)})
            else:
                self.error(f"unknown setting {name!r}: use one of {', '.join(list(_SETTERS) + ['greedy'])}")
                return
        except argparse.ArgumentTypeError as e:
            self.error(f"{name}: {e}")
            return
        self._write(self.err, describe(self.s) + "\n")

    def answer(self, query: str, prefix: str = "", interactive: bool = False) -> bool:
        """Stream the reply to `query` to `out` after `prefix`; False when there was an error (already reported).

        Interactive, Ctrl+C (KeyboardInterrupt) stops the reply: what was written so far is kept in the history,
        as it is what the user saw, and the conversation goes on. Otherwise it ends the program, as usual. Any
        other failure of the turn is one error line, and the session and its history stay as they were.
        """
        from glm.chat import SettledText, fit_turn, stream_reply

        printer, reply, stream = SettledText(), "", None
        try:
            history, dropped = fit_turn(self.m, query, self.history, self.s.max_length)
            if dropped:
                rounds = "round" if dropped == 1 else "rounds"
                self._write(self.err, f"(dropped the {dropped} oldest {rounds} of the history to fit --max-length "
                                      f"{min(self.s.max_length, self.m.max_context)})\n")
            self.history = history  # dropped rounds are gone for good: the history stays bounded
            self._write(self.out, prefix)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                stream = stream_reply(self.m, query, history, self.s)
                for reply in stream:
                    if self.stream:
                        self._write(self.out, printer.update(reply))
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            if not interactive:
                self._end_line(prefix, printer)
                raise
            self._write(self.out, printer.finish(reply) + " [stopped]\n")
            if reply:
                self.history = self.history + [(query, reply)]
            return True
        except Exception as e:  # noqa: BLE001 - one failed turn is one line; the session and its history go on
            if stream is not None:
                stream.close()
            _free_cuda_cache()
            self._end_line(prefix, printer)
            if is_oom(e):
                self.error("out of memory while generating: try a smaller --max-length (or /set max-length), "
                           "or load with --quant 4")
            else:
                self.error(_one_line(e))
            return False
        self._write(self.out, printer.finish(reply) + "\n")
        self.history = self.history + [(query, reply)]
        if any("NaN" in str(w.message) for w in caught):
            self.error("the model produced NaN/inf scores, so that reply is not meaningful (float16 overflow?): "
                       "restart with --dtype bfloat16 or float32")
        return True

    def _end_line(self, prefix: str, printer) -> None:
        """End a reply line cut short, if anything of it was written."""
        if prefix or printer.sent:
            self._write(self.out, "\n")

    # -- the three modes

    def interactive(self) -> int:
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and a history of inputs
        except ImportError:  # pragma: no cover - e.g. Windows
            pass
        self._write(self.err, f"Chat with {self.name}: type a message. 'clear' starts over, 'stop' or Ctrl+D "
                              "exits, Ctrl+C stops a reply, /help for more.\n")
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


def _one_line(e: BaseException) -> str:
    """An error as one line: its message (first line), with the kind when the message is not one of ours."""
    import glm

    msg = (str(e).strip().splitlines() or [""])[0]
    return msg if isinstance(e, glm.GenerationError) else f"{type(e).__name__}: {msg} (the session goes on)"


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None, prog: str = "glm-chat") -> int:
    for f in (sys.stdout, sys.stderr):
        # A reply is Chinese more often than not: never die on a terminal or pipe that cannot encode it.
        if hasattr(f, "reconfigure"):
            f.reconfigure(errors="backslashreplace")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a crash
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # The engine warns about NaN logits for library users; here Chat.answer reports it as one line instead.
    warnings.filterwarnings("ignore", message="the model produced NaN", category=RuntimeWarning)
    check_model_args(parser, args)
    try:
        m = load_from_args(args)
        chat = Chat(m, settings_from_args(args), prog=prog, name=model_name(args.model))
        if args.prompt is not None:
            code = chat.once(args.prompt)
        elif isatty(sys.stdin):
            code = chat.interactive()
        else:
            code = chat.piped(sys.stdin)
        _leave_at_once_on_ctrl_c(code)  # in the try: a Ctrl+C before it is done is the except's below
        return code
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading, or in piped / --prompt mode
        _leave_at_once_on_ctrl_c(130)
        print(file=sys.stderr)
        return 130


def _leave_at_once_on_ctrl_c(code: int) -> None:
    """From now on Ctrl+C ends the process at once with `code`, and prints nothing.

    The session is over, but exiting takes a moment: threading's shutdown, the scheduler's atexit hook (which waits
    for its thread to finish the step it is in), torch's atexit finalizers. Ctrl+C pressed again meanwhile (by a
    user who pressed it three times quickly to stop a reply and leave) raises KeyboardInterrupt inside one of
    them, which Python reports with a traceback ("Exception ignored in atexit callback: ..."). Not set before the
    session has run, so that a process that calls `main` itself (a test) keeps its Ctrl+C on the error paths.
    """
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        return

    def leave(signum, frame):
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
                pass
        os._exit(code)

    signal.signal(signal.SIGINT, leave)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
