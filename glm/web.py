"""`glm-web`: a Gradio chat page for ChatGLM-6B.

Each browser session keeps its own history (server-side `gr.State`); all sessions share one model, and the
chat event runs one reply at a time (a queue with concurrency 1), so conversations never mix. Stop cancels the
running reply; what it had written stays, in the page and in the history.

Gradio is imported only here (and only when the app is built), so `import glm` never pulls it in.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import replace

from glm.cli import fit_turn, stream_reply
from glm.options import (
    ArgumentParser,
    CLIError,
    Sampling,
    add_model_args,
    add_sampling_args,
    check_model_args,
    is_oom,
    load_from_args,
    model_name,
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


class ChatBackend:
    """The model side of the page, independent of Gradio so that it can be tested as plain Python.

    Per session there are two lists: `history`, what the model is shown (oldest rounds dropped to fit
    max_length), and `transcript`, everything the page shows.
    """

    def __init__(self, m, sampling: Sampling, delay_ms: int = 0):
        self.m = m
        self.defaults = sampling
        self.delay = delay_ms / 1000
        # The chat event's concurrency limit already runs one reply at a time; this lock also covers a reply that
        # Stop abandoned while one of its steps was still running in a worker thread.
        self.lock = threading.Lock()

    def sampling(self, max_length, top_p, temperature) -> Sampling:
        return replace(self.defaults, max_length=int(max_length), top_p=float(top_p), temperature=float(temperature))

    def respond(self, query: str, history: History, transcript: History, max_length, top_p, temperature,
                notify=None):
        """Yield (history, transcript) as the reply grows. Raises glm.GenerationError for a query too long."""
        history, transcript = list(history or []), list(transcript or [])
        s = self.sampling(max_length, top_p, temperature)
        kept, dropped = fit_turn(self.m.tokenizer, query, history, s.max_length)
        if dropped and notify is not None:
            what = "The oldest round of this conversation no longer fits" if dropped == 1 else (
                f"The {dropped} oldest rounds of this conversation no longer fit")
            notify(f"{what} max length {s.max_length}: the model does not see {'it' if dropped == 1 else 'them'} "
                   "any more (the page still shows everything).")
        # The page shows the question at once, before the first token, which can take a while on a big model.
        yield history, transcript + [(query, None)]
        stream = stream_reply(self.m, query, kept, s)
        try:
            while True:
                with self.lock:
                    reply = next(stream, None)
                if reply is None:
                    return
                yield kept + [(query, reply)], transcript + [(query, reply)]
                if self.delay:
                    time.sleep(self.delay)
        finally:
            stream.close()


def build_app(backend: ChatBackend, title: str = "ChatGLM-6B", subtitle: str = ""):
    import gradio as gr

    import glm

    d = backend.defaults

    def chat(query, max_length, top_p, temperature, history, transcript):
        if not query or not query.strip():
            yield _messages(transcript or []), history, transcript
            return
        try:
            for history, transcript in backend.respond(query, history, transcript, max_length, top_p, temperature,
                                                       notify=gr.Info):
                yield _messages(transcript), history, transcript
        except glm.GenerationError as e:
            raise gr.Error(str(e)) from None
        except (MemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            raise gr.Error("Out of memory: lower the maximum length, or restart glm-web with --quant 4.") from None

    def clear():  # the conversation, not a message being typed
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
            stop = gr.Button("Stop", scale=1, elem_id="stop")
            clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Row():
            max_length = gr.Slider(1, max(4096, d.max_length), value=d.max_length, step=1,
                                   label="Maximum length (prompt + reply, tokens)", elem_id="max_length")
            top_p = gr.Slider(0.01, 1.0, value=d.top_p, step=0.01, label="Top P", elem_id="top_p")
            temperature = gr.Slider(0.0, max(1.0, d.temperature), value=d.temperature, step=0.01,
                                    label="Temperature (0: greedy)", elem_id="temperature")
        history = gr.State([])  # what the model sees, per browser session
        transcript = gr.State([])  # what the page shows, per browser session

        pending = gr.State("")  # the message just sent, between the two steps below
        api_query = gr.Textbox(visible=False)  # the message of the /chat API, whose clients have no box to empty

        # Step 1, at once and outside the queue: take the message out of the box, so that the box is free for the
        # next one while the reply streams. (Gradio runs the listeners of one trigger one after another, so this
        # cannot be a second listener beside the chat: it would run only once the reply is complete.)
        take = gr.on([msg.submit, send.click], lambda q: ("", q), [msg], [msg, pending], queue=False,
                     api_name=False, show_progress="hidden")
        # Step 2, queued: the reply. Every chat event shares one concurrency slot ("model"): one reply at a time,
        # across all sessions and the API.
        run = take.then(chat, [pending, max_length, top_p, temperature, history, transcript],
                        [chatbot, history, transcript], api_name=False, concurrency_limit=1, concurrency_id="model",
                        show_progress="minimal")
        api_query.submit(chat, [api_query, max_length, top_p, temperature, history, transcript],
                         [chatbot, history, transcript], api_name="chat", concurrency_limit=1,
                         concurrency_id="model")
        stop.click(None, None, None, cancels=[run], api_name=False)
        clear_btn.click(clear, None, [chatbot, history, transcript], cancels=[run], api_name="clear")
    return demo


def main(argv: list[str] | None = None, prog: str = "glm-web") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # found without importing it: importing takes seconds
        print(f"{prog}: error: the web page needs Gradio: pip install 'gradio>=6,<7' (or: pip install 'glm[web]')",
              file=sys.stderr)
        return 1
    try:
        m = load_from_args(args)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    backend = ChatBackend(m, Sampling.from_args(args), delay_ms=args.delay_ms)
    demo = build_app(backend, subtitle=summary(m, model_name(args.model)).removeprefix("glm: "))
    # max_size bounds the waiting line: past it a new request is refused at once instead of waiting for minutes.
    demo.queue(default_concurrency_limit=1, max_size=64)
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
