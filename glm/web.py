"""`glm-web`: a Gradio chat page for ChatGLM-6B.

Each browser session keeps its own history (server-side `gr.State`); all sessions share one model, whose
scheduler decodes their replies together in one batch (`--max-batch` rows), each as if alone. Messages sent while
a reply streams wait in the session's inbox and are answered in order. Stop cancels the running reply (and what
waits behind it); what it had written stays, in the page and in the history.

Gradio is imported only here (and only when the app is built), so `import glm` never pulls it in.
"""

# No `from __future__ import annotations` here: Gradio finds the `request: gr.Request` parameters of the event
# functions by evaluating their annotations, which it cannot do for a string naming `gr`, imported inside build_app
# (the request then arrives as None).
import argparse
import logging
import os
import sys
import threading
from collections import deque

from glm.options import (
    ArgumentParser,
    CLIError,
    add_model_args,
    add_sampling_args,
    check_model_args,
    count_type,
    is_oom,
    model_name,
    prepare_server,
    settings_from_args,
    summary,
)

# Set before gradio is imported: it reads these at import time. No usage statistics leave the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

History = list[tuple[str, str]]


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {s!r}")
    return v


def build_parser(prog: str = "glm-web") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="A web page to chat with ChatGLM-6B (Gradio).",
                       epilog=f"example: {prog} --quant 4 --port 7860   (then open http://127.0.0.1:7860)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    g.add_argument("--port", type=_port, default=None, help="port (default: 7860, or the next free one)")
    g.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (off by default)")
    g.add_argument("--max-batch", type=count_type(1, 256), default=4, metavar="N",
                   help="replies decoded together, one cache row each (default: 4)")
    add_model_args(p)
    add_sampling_args(p)
    return p


def _messages(transcript: History) -> list[dict]:
    """The chatbot's value: alternating user / assistant messages (markdown, rendered by the page)."""
    out: list[dict] = []
    for query, reply in transcript:
        out.append({"role": "user", "content": query})
        if reply is not None:
            out.append({"role": "assistant", "content": reply})
    return out


log = logging.getLogger("glm.web")


class ChatBackend:
    """The model side of the page, independent of Gradio so that it can be tested as plain Python.

    Per session there are two lists: `history`, what the model is shown (oldest rounds dropped to fit
    max_length), and `transcript`, everything the page shows; and an inbox of messages sent while a reply streams.
    """

    MAX_QUEUED = 8  # messages a session may have waiting behind its running reply

    def __init__(self, m, settings):
        self.m = m
        self.defaults = settings  # a GenerationConfig: the option defaults, of which the page sets three
        self._inbox: dict[str, deque[str]] = {}
        self._lock = threading.Lock()

    @property
    def max_length(self) -> int:
        """The largest maximum length the page offers: the model's context limit."""
        return self.m.max_context

    def settings(self, max_length, top_p, temperature):
        """The GenerationConfig of the three sliders' values (the options give the rest). A value GenerationConfig
        refuses is its GenerationError; so is a maximum length over the context limit, which would otherwise be
        taken without a word and answered within the limit."""
        from glm.errors import GenerationError

        if isinstance(max_length, float) and max_length.is_integer():
            max_length = int(max_length)  # the page sends numbers as floats
        s = self.defaults.replace(max_length=max_length, top_p=top_p, temperature=temperature)
        if s.max_length > self.max_length:
            raise GenerationError(f"max_length {s.max_length} is over this model's context limit of "
                                  f"{self.max_length} tokens: lower it")
        return s

    # -- the inbox of each session

    def enqueue(self, session: str, query: str) -> bool:
        """Queue a message; False when the session already has MAX_QUEUED waiting."""
        with self._lock:
            box = self._inbox.setdefault(session, deque())
            if len(box) >= self.MAX_QUEUED:
                return False
            box.append(query)
            return True

    def next_message(self, session: str) -> str | None:
        with self._lock:
            box = self._inbox.get(session)
            if not box:
                self._inbox.pop(session, None)
                return None
            return box.popleft()

    def waiting(self, session: str) -> list[str]:
        with self._lock:
            return list(self._inbox.get(session, ()))

    def forget(self, session: str) -> None:
        with self._lock:
            self._inbox.pop(session, None)

    # -- replies

    def respond(self, query: str, history: History, transcript: History, max_length, top_p, temperature,
                notify=None):
        """Yield (history, transcript) as the reply grows. Raises glm.GenerationError for a query too long."""
        from glm.chat import fit_turn, stream_reply

        history, transcript = list(history or []), list(transcript or [])
        s = self.settings(max_length, top_p, temperature)
        kept, dropped = fit_turn(self.m, query, history, s.max_length)
        if dropped and notify is not None:
            what = "The oldest round of this conversation no longer fits" if dropped == 1 else (
                f"The {dropped} oldest rounds of this conversation no longer fit")
            notify(f"{what} max length {s.max_length}: the model does not see "
                   f"{'it' if dropped == 1 else 'them'} any more (the page still shows everything).")
        # The page shows the question at once, before the first token, which can take a while on a big model.
        yield history, transcript + [(query, None)]
        stream = stream_reply(self.m, query, kept, s)
        try:
            for reply in stream:
                yield kept + [(query, reply)], transcript + [(query, reply)]
        finally:
            stream.close()


def build_app(backend: ChatBackend, title: str, subtitle: str = ""):
    """The page; `title`: the model's name, `subtitle`: a line under it."""
    import gradio as gr

    import glm

    d = backend.defaults

    def error(msg: str):
        log.warning("%s", msg)  # one line in the server's log, not a traceback: an expected error
        return gr.Error(msg, print_exception=False)

    def reply(query, settings, history, transcript, waiting=list):
        """(chatbot, history, transcript) as the reply to one message grows; messages waiting are shown too
        (`waiting()` is asked at every token, so that a message sent mid-reply shows at once)."""
        try:
            for history, transcript in backend.respond(query, history, transcript, *settings, notify=gr.Info):
                yield _messages(transcript + [(q, None) for q in waiting()]), history, transcript
        except glm.GenerationError as e:
            raise error(str(e)) from None
        except (MemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            raise error("Out of memory: lower the maximum length, or restart glm-web with --quant 4.") from None

    def chat(query, max_length, top_p, temperature, history, transcript):
        """The /chat API: one message, one reply."""
        if not isinstance(query, str):  # unprocessed input (preprocess=False below): any JSON value
            raise error(f"the message must be a string, got {type(query).__name__}")
        if not query.strip():
            yield _messages(transcript or []), history, transcript
            return
        yield from reply(query, (max_length, top_p, temperature), history, transcript)

    def take(query, request: gr.Request):
        """Out of the box and into the session's inbox, at once, also while a reply streams."""
        if not query or not query.strip():
            return ""
        if not backend.enqueue(request.session_hash, query):
            gr.Warning(f"{backend.MAX_QUEUED} messages are already waiting for this reply: send this one later.")
            return query  # stays in the box, nothing is lost
        return ""

    def answer_inbox(max_length, top_p, temperature, history, transcript, request: gr.Request):
        """Answer the session's messages in the order they were sent, each once."""
        session = request.session_hash
        answered = False
        while (query := backend.next_message(session)) is not None:
            out = None
            try:
                for out in reply(query, (max_length, top_p, temperature), history, transcript,
                                 lambda: backend.waiting(session)):
                    answered = True
                    yield out
            except gr.Error as e:
                gr.Warning(e.message)  # this message fails; the ones behind it are still answered
            if out is not None:
                _, history, transcript = out
        if not answered:
            # Nothing to show (the run "always_last" kept pending found its messages answered by the run before, or
            # the only message was refused): leave the page and the states as they are. A generator that yields
            # nothing would set the chat and both states to None, and the conversation would be gone.
            yield gr.skip(), gr.skip(), gr.skip()

    def stop(request: gr.Request):
        backend.forget(request.session_hash)  # Stop also drops what waits behind the reply

    def clear(request: gr.Request):  # the conversation, not a message being typed
        backend.forget(request.session_hash)
        return [], [], []

    with gr.Blocks(title=title, fill_height=True) as demo:
        gr.Markdown(f"## {title}" + (f"\n{subtitle}" if subtitle else ""))
        chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=520, render_markdown=True, buttons=["copy"],
                             placeholder="Ask anything: replies stream here, with markdown and code rendered.")
        with gr.Row():
            # lines=1: Gradio sends on Enter only for one-line boxes; Shift+Enter still adds a line (it grows).
            msg = gr.Textbox(show_label=False, placeholder="Message (Enter sends, Shift+Enter adds a line)", lines=1,
                             max_lines=10, scale=8, elem_id="msg", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
        with gr.Row():
            stop_btn = gr.Button("Stop", scale=1, elem_id="stop")
            clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Row():
            # The sliders' ranges are the page's, for dragging; which values are valid is GenerationConfig's to
            # say (see `settings`): the events below take the values unprocessed, so that Gradio's own range
            # check does not answer first with another message. A --max-length over the context starts at it.
            max_length = gr.Slider(1, backend.max_length, value=min(d.max_length, backend.max_length), step=1,
                                   label="Maximum length (prompt + reply, tokens)", elem_id="max_length")
            top_p = gr.Slider(0.01, 1.0, value=d.top_p, step=0.01, label="Top P", elem_id="top_p")
            temperature = gr.Slider(0.0, max(1.0, d.temperature), value=d.temperature, step=0.01,
                                    label="Temperature (0: greedy)", elem_id="temperature")
        history = gr.State([])  # what the model sees, per browser session
        transcript = gr.State([])  # what the page shows, per browser session

        api_query = gr.Textbox(visible=False)  # the message of the /chat API, whose clients have no box to empty

        # Step 1, at once and outside the queue: the message goes from the box to the session's inbox, so that the
        # box is free for the next one while a reply streams.
        take_ev = gr.on([msg.submit, send.click], take, [msg], [msg], queue=False, api_name=False,
                        show_progress="hidden")
        # Step 2, queued: answer the inbox. A message sent while this runs is answered by this run or, sent as it
        # ends, by the one run "always_last" keeps pending: every message is answered once, in order.
        run = take_ev.then(answer_inbox, [max_length, top_p, temperature, history, transcript],
                           [chatbot, history, transcript], api_name=False, trigger_mode="always_last",
                           concurrency_id="model", show_progress="minimal", preprocess=False)
        api_query.submit(chat, [api_query, max_length, top_p, temperature, history, transcript],
                         [chatbot, history, transcript], api_name="chat", concurrency_id="model", preprocess=False)
        stop_btn.click(stop, None, None, cancels=[run], api_name=False, queue=False)
        clear_btn.click(clear, None, [chatbot, history, transcript], cancels=[run], api_name="clear")
    return demo


def main(argv: list[str] | None = None, prog: str = "glm-web") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    try:
        m = prepare_server(args, ("gradio",), "pip install 'gradio>=6,<7' (or: pip install 'glm[web]')")
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    backend = ChatBackend(m, settings_from_args(args))
    name = model_name(args.model)
    demo = build_app(backend, name, subtitle=summary(m, name, args.ptuning).removeprefix("glm: "))
    # One reply per cache row at a time (the scheduler batches them); max_size bounds the waiting line: past it a
    # new request is refused at once instead of waiting for minutes.
    demo.queue(default_concurrency_limit=args.max_batch, max_size=64)
    try:
        # quiet: Gradio's own banner tells users to edit launch(); ours names the options of this command.
        _, local_url, share_url = demo.launch(
            server_name=args.host, server_port=args.port, share=args.share, inbrowser=False, show_error=True,
            ssr_mode=False, mcp_server=False, footer_links=["api"], quiet=True, prevent_thread_lock=True)
    except OSError as e:  # port in use, address not available
        why = "the port is taken: choose another with --port" if "empty port" in str(e) else str(e)
        print(f"{prog}: error: cannot serve on {args.host}:{args.port or '7860-7959'}: {why}", file=sys.stderr)
        return 1
    print(f"{prog}: serving on {local_url}" + (f" and {share_url}" if share_url else "") + " (Ctrl+C stops)",
          file=sys.stderr, flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
