"""`glm-serve`: an OpenAI-compatible HTTP API for ChatGLM-6B, with continuous batching.

The server only translates HTTP to requests of the engine's scheduler and back: every request gets its own cache
row and settings, and joins the decode batch as soon as a row is free. Endpoints: `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). FastAPI, uvicorn and
prometheus_client are imported only here.
"""

import argparse
import asyncio
import hmac
import json
import logging
import sys
import time
import uuid

from glm.options import (
    ArgumentParser,
    CLIError,
    add_model_args,
    check_model_args,
    count_type,
    model_name,
    prepare_server,
)

log = logging.getLogger("glm.serve")
POLL_DISCONNECT = 0.5  # seconds between checks that a non-streaming client is still there
MAX_STOP = 16  # stop strings per request
# The request fields that are GenerationConfig settings of the same name, with the JSON type each must have.
SETTING_FIELDS = (("temperature", (int, float), "a number"), ("top_p", (int, float), "a number"),
                  ("top_k", int, "an integer"), ("repetition_penalty", (int, float), "a number"),
                  ("seed", int, "an integer"))


def _port(s: str) -> int:
    return count_type(1, 65535)(s)


def build_parser(prog: str = "glm-serve") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="An OpenAI-compatible API server for ChatGLM-6B (continuous batching).",
                       epilog=f"example: {prog} --quant 4 --max-batch 8   (then POST http://127.0.0.1:8000/v1/chat/"
                              "completions)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    g.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    g.add_argument("--max-batch", type=count_type(1, 256), default=8, metavar="N",
                   help="requests decoded together, one cache row each (default: 8)")
    g.add_argument("--max-waiting", type=count_type(0, 100_000), default=256, metavar="N",
                   help="requests that may wait for a row; past that the server answers 429 (default: 256)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ requests")
    g.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the checkpoint's name without "
                        "its Hub owner, e.g. chatglm-6b)")
    add_model_args(p)
    return p


# ---------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    """body[name] if present, of a JSON type in `kinds` and passing `check`; else an APIError naming it."""
    v = body.get(name)
    if v is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds) or (check and not check(v)):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:60]}", param=name)
    return v


# ---------------------------------------------------------------------------------------------------- the app


class Metrics:
    """The Prometheus metrics of one server (a registry of its own)."""

    def __init__(self, scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        Gauge("glm_requests_running", "Requests holding a cache row", registry=r).set_function(
            lambda: scheduler.running)
        Gauge("glm_requests_waiting", "Requests waiting for a cache row", registry=r).set_function(
            lambda: scheduler.n_waiting)
        self.batch = Histogram("glm_decode_batch_size", "Rows in each decode step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.generated = Counter("glm_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("glm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.ttft = Histogram("glm_time_to_first_token_seconds", "From arrival to the first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.finished = Counter("glm_requests", "Requests ended, by finish reason", ["finish_reason"], registry=r)
        scheduler.step_hooks.append(self.batch.observe)


def served_name(args: argparse.Namespace) -> str:
    """The model id clients send: --model-name, else the checkpoint's name without its Hub owner (chatglm-6b for
    THUDM/chatglm-6b, as clients written for ChatGLM-6B send it; chatglm-tiny for tests/fixtures/chatglm-tiny)."""
    return args.model_name or model_name(args.model).rpartition("/")[2]


def create_app(m, name: str, api_key: str | None = None):
    """The FastAPI app serving `m` (a loaded ChatGLM) under the model id `name`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from glm.chat import SettledText, build_prompt, process_response
    from glm.errors import GenerationError, QueueFull
    from glm.generation import CHAT_DEFAULTS, GenerationConfig
    from glm.tokenizer import StreamDecoder

    app = FastAPI(title="glm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    sched = m.scheduler
    metrics = Metrics(sched)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def _not_found(request, _):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}", "not_found").body(), 404)

    @app.exception_handler(405)
    async def _bad_method(request, _):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = _field(body, "model", str, what="a string")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        if model != name:
            raise APIError(404, f"the model '{model}' does not exist: this server serves '{name}'",
                           code="model_not_found", param="model")
        return body

    def settings(body: dict, prompt_len: int) -> tuple[GenerationConfig, bool, bool]:
        """(config, stream, include_usage) of a request, or an APIError.

        Here the fields' JSON types are checked; their values are GenerationConfig's to judge, whose message is the
        error (naming the field as the client sent it). Fields left out take the official chat's values
        (CHAT_DEFAULTS); temperature 0 is greedy, as OpenAI's.
        """
        given = {}
        for key, kinds, what in SETTING_FIELDS:
            v = _field(body, key, kinds, what=what)
            if v is not None:
                given[key] = v
        n = _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
        del n
        length_key = "max_tokens"  # or its newer name, which wins when both are sent
        max_tokens = _field(body, "max_tokens", int, what="an integer")
        if body.get("max_completion_tokens") is not None:
            length_key = "max_completion_tokens"
            max_tokens = _field(body, length_key, int, what="an integer")
        stop = body.get("stop")
        # Not a range of the setting: a bound on the work of matching each token against the stop strings.
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise APIError(400, f"'stop' may hold up to {MAX_STOP} strings, got {len(stop)}", param="stop")
        ignore_eos = _field(body, "ignore_eos", bool, False, what="true or false")  # ours: fixed-length replies
        stream = _field(body, "stream", bool, False, what="true or false")
        opts = _field(body, "stream_options", dict, {}, what="an object")
        usage = _field(opts, "include_usage", bool, False, what="true or false")
        names = {"max_new_tokens": length_key, "stop_at_eos": "ignore_eos"}  # GenerationConfig's -> the client's
        try:
            # max_length None: the length is max_tokens, within the context (CHAT_DEFAULTS' is the chat's 2048).
            config = CHAT_DEFAULTS.replace(max_length=None, max_new_tokens=max_tokens,
                                           stop=stop if stop is not None else (), stop_at_eos=not ignore_eos,
                                           **given)
        except GenerationError as e:  # "<field> must be ...": the field as the client named it, then the rest
            field, _, why = str(e).partition(" ")
            param = names.get(field, field)
            raise APIError(400, f"'{param}' {why}", param=param) from None
        limit = m.max_context
        if max_tokens is None:
            if prompt_len >= limit:
                raise APIError(400, f"the prompt is {prompt_len} tokens, over the context of {limit} tokens by "
                                    f"{prompt_len + 1 - limit}: shorten it", param="messages", code="context_length")
            config = config.replace(max_new_tokens=limit - prompt_len)
        elif prompt_len + max_tokens > limit:
            over = prompt_len + max_tokens - limit
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus {length_key} ({max_tokens}) is over the "
                                f"context of {limit} tokens by {over}: shorten the prompt or lower {length_key}",
                           param=length_key, code="context_length")
        return config, stream, usage

    def chat_prompt(body: dict) -> str:
        """The official template from OpenAI messages (see docs/serve.md for what a system message does)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        system, turns = [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}] must be an object with a role of system, user or assistant",
                               param="messages")
            content = msg.get("content")
            if isinstance(content, list):  # content parts: only text is understood
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", param="messages")
            if msg["role"] == "system":
                if turns:
                    raise APIError(400, "system messages must come first", param="messages")
                system.append(content)
            else:
                turns.append((msg["role"], content))
        roles = [r for r, _ in turns]
        if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
            raise APIError(400, "messages must alternate user and assistant turns (after any system message) and "
                                "end with a user message", param="messages")
        texts = [c for _, c in turns]
        if system:  # ChatGLM-6B has no system role: the system text opens the first user message
            texts[0] = "\n".join(system + [texts[0]])
        history = list(zip(texts[0:-1:2], texts[1:-1:2]))
        return build_prompt(texts[-1], history)

    def submit(ids: list[int], config: GenerationConfig):
        """Queue a request whose events arrive on an asyncio queue of this loop."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            req = m.submit(ids, config, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except GenerationError as e:
            raise APIError(400, str(e)) from None
        metrics.prompt.inc(len(ids))
        return req, events

    async def tokens(req, events, request: Request | None = None):
        """The new ids of a request; cancels it if the consumer goes away (or the client disconnects)."""
        first = True
        try:
            while True:
                if request is None:
                    ev = await events.get()
                else:  # nothing is being sent: look for a disconnected client from time to time
                    try:
                        ev = await asyncio.wait_for(events.get(), POLL_DISCONNECT)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                if ev is None:
                    metrics.finished.labels(req.result.finish_reason).inc()
                    return
                if isinstance(ev, BaseException):
                    log.error("generation failed: %s: %s", type(ev).__name__, ev)
                    raise APIError(500, f"generation failed: {type(ev).__name__}: {ev}", "server_error")
                if first:
                    metrics.ttft.observe(req.first_token_at - req.arrived)
                    first = False
                metrics.generated.inc()
                yield ev
        finally:
            req.cancel()  # a no-op once it has ended; frees the row at once otherwise

    def usage(req) -> dict:
        p, c = len(req.prompt), len(req.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def run(request: Request, prompt_ids: list[int], body: dict, chat: bool):
        config, stream, include_usage = settings(body, len(prompt_ids))
        req, events = submit(prompt_ids, config)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        dec = StreamDecoder(m.tokenizer)
        text = SettledText(config.stop, chat=chat)

        def reply_now() -> str:
            return process_response(dec.current) if chat else dec.current

        def choice(content: str | None, finish: str | None, delta: bool) -> dict:
            if chat:
                body_ = {"role": "assistant", "content": content} if not delta else (
                    {"content": content} if content is not None else {})
                return {"index": 0, ("delta" if delta else "message"): body_, "finish_reason": finish,
                        "logprobs": None}
            return {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}

        def envelope(choices: list, **extra) -> dict:
            return {"id": rid, "object": obj + (".chunk" if stream and chat else ""), "created": int(time.time()),
                    "model": name, "choices": choices, **extra}

        if not stream:
            async for t in tokens(req, events, request):
                dec.put(t)
            if req.result is None:  # the client went away
                return JSONResponse({}, status_code=499)
            final = text.cut(reply_now())
            return JSONResponse(envelope([choice(final, req.result.finish_reason, False)], usage=usage(req)))

        async def sse():
            def line(payload) -> str:
                return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

            if chat:
                yield line(envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None, "logprobs": None}]))
            try:
                async for t in tokens(req, events):
                    dec.put(t)
                    delta = text.update(reply_now())
                    if delta:
                        yield line(envelope([choice(delta, None, True)]))
            except APIError as e:
                yield line(e.body())
                yield "data: [DONE]\n\n"
                return
            rest = text.finish(reply_now())
            if rest:
                yield line(envelope([choice(rest, None, True)]))
            yield line(envelope([choice(None if chat else "", req.result.finish_reason, True)]))
            if include_usage:
                yield line(envelope([], usage=usage(req)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        return await run(request, m.tokenizer.encode(chat_prompt(body)), body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
        return await run(request, m.tokenizer.encode(prompt), body, chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "glm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": sched.running, "waiting": sched.n_waiting,
                "max_batch": sched.max_batch, "max_context": sched.max_context}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None, prog: str = "glm-serve") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    try:
        m = prepare_server(args, ("fastapi", "uvicorn", "prometheus_client"), "pip install 'glm[serve]'")
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    name = served_name(args)
    app = create_app(m, name, api_key=args.api_key)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(message)s")
    print(f"{prog}: serving {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, context "
          f"{m.max_context}; Ctrl+C stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
