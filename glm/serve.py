"""`glm-serve`: an OpenAI-compatible HTTP API for ChatGLM-6B, with continuous batching.

The server only translates HTTP to requests of the engine's scheduler and back: every request gets its own cache
row and settings, and joins the decode batch as soon as a row is free. Endpoints: `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus).
FastAPI, uvicorn and prometheus_client are imported only here.
"""

import argparse
import asyncio
import functools
import json
import logging
import sys
import time
import uuid

from glm.cluster import add_cluster_args, check_cluster_args
from glm.http_guard import HTTPGuard, Refused, add_args
from glm.openai_protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    APIError,
    chat_logprobs,
    chat_prompt,
    check_fields,
    check_model,
    completion_prompts,
    config_error,
    field,
    legacy_logprobs,
    request_settings,
    tool_call,
)
from glm.options import (
    ArgumentParser,
    CLIError,
    add_adapter_args,
    add_model_args,
    check_adapters,
    check_model_args,
    count_type,
    load_from_args,
    model_name,
    prepare_server,
)

log = logging.getLogger("glm.serve")
POLL_DISCONNECT = 0.5  # seconds between checks that a non-streaming client is still there, tokens flowing or not


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
    g.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the checkpoint's name without "
                        "its Hub owner, e.g. chatglm-6b)")
    add_args(p)
    add_adapter_args(g)
    add_model_args(p)
    add_cluster_args(p)
    return p


# ---------------------------------------------------------------------------------------------------- errors


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


def create_app(m, name: str, api_key: str | None = None, guard: HTTPGuard | None = None):
    """The FastAPI app serving `m` (a loaded ChatGLM) under the model id `name`, behind `guard` (default: a
    loopback server's, requiring `api_key` if given)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from glm.chat import SettledText, process_response
    from glm.errors import GenerationError, QueueFull
    from glm.generation import GenerationConfig
    from glm.tokenizer import StreamDecoder

    app = FastAPI(title="glm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    guard = guard or HTTPGuard(api_key=api_key)
    guard.install(app)
    sched = m.scheduler
    metrics = Metrics(sched)
    created = int(time.time())

    @app.exception_handler(APIError)
    @app.exception_handler(Refused)
    async def _api_error(_, e: APIError | Refused):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def _not_found(request, _):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}", "not_found").body(), 404)

    @app.exception_handler(405)
    async def _bad_method(request, _):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)

    async def read_body(request: Request) -> dict:
        guard.authorize(request.headers)
        body = await guard.read_json(request)
        model = field(body, "model", str, what="a string")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        check_model(model, [name, *m.adapters])
        return body

    def submit(prompts: list[list[int]], configs: list[GenerationConfig], n: int, post: bool,
               adapter: str | None, names: dict):
        """Queue n choices of each prompt, whose (choice, event) pairs arrive on an asyncio queue of this loop;
        choice j of prompt i is choice i * n + j (OpenAI's and vLLM's index). `post`: a chat reply's text, which
        stop strings match as the client gets it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs: list = []

        def arrive(j: int, ev) -> None:  # on the loop; every ending is counted here, a cancelled one too
            if ev is None or isinstance(ev, BaseException):
                metrics.finished.labels(reqs[j].result.finish_reason).inc()
            events.put_nowait((j, ev))

        try:
            for i, (ids, config) in enumerate(zip(prompts, configs)):
                # A chat's stop strings match the reply as the client gets it (process_response's text).
                reqs += m.submit(ids, config, n=n, postprocess=process_response if post else None,
                                 adapter=adapter,
                                 sink=lambda j, ev, i=i: loop.call_soon_threadsafe(arrive, i * n + j, ev))
        except (QueueFull, GenerationError) as e:
            for r in reqs:
                r.cancel()  # the prompts queued before this one
            if not isinstance(e, QueueFull):  # e.g. a schema that cannot be enforced
                raise config_error(e, names) from None
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        metrics.prompt.inc(sum(map(len, prompts)))
        return reqs, events

    async def tokens(reqs: list, events, request: Request | None = None):
        """(choice, new id or None at its end) of a request's choices until all have ended; cancels them if the
        consumer goes away (or the client disconnects)."""
        live, first, check_at = len(reqs), True, time.monotonic() + POLL_DISCONNECT
        try:
            while live:
                if request is None:
                    j, ev = await events.get()
                else:  # nothing is being sent: look for a disconnected client every POLL_DISCONNECT seconds
                    try:
                        got = await asyncio.wait_for(events.get(), max(check_at - time.monotonic(), 0.001))
                    except asyncio.TimeoutError:
                        got = None
                    if time.monotonic() >= check_at:  # whether tokens flow or not
                        if await request.is_disconnected():
                            return
                        check_at = time.monotonic() + POLL_DISCONNECT
                    if got is None:
                        continue
                    j, ev = got
                if isinstance(ev, BaseException):
                    log.error("generation failed: %s: %s", type(ev).__name__, ev)
                    raise APIError(500, f"generation failed: {type(ev).__name__}: {ev}", "server_error")
                if ev is None:
                    live -= 1
                else:
                    if first:
                        metrics.ttft.observe(reqs[j].first_token_at - reqs[j].arrived)
                        first = False
                    metrics.generated.inc()
                yield j, ev
        finally:
            for r in reqs:
                r.cancel()  # a no-op once it has ended; frees the row at once otherwise

    def usage(reqs: list, n: int) -> dict:
        """Each prompt once (one prefill for its n choices), the completion tokens of all choices."""
        p, c = sum(len(r.prompt) for r in reqs[::n]), sum(len(r.tokens) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def token_text(i: int) -> str:
        return m.tokenizer.decode([i])

    async def run(request: Request, prompts: list[list[int]], body: dict, chat: bool, prompt_texts=(),
                  call=None):
        """The reply to a chat (one prompt) or a completions request (prompts with their texts, for echo)."""
        settings = [request_settings(body, len(p), chat, max_context=m.max_context, max_batch=sched.max_batch,
                                     prompts=len(prompts), call=call)
                    for p in prompts]  # max_tokens' default: per prompt
        config, o = settings[0]
        stream, n, echo, want_lp = o["stream"], o["n"], o["echo"], config.logprobs is not None
        post = chat and config.json_schema is None  # JSON is given as generated, not post-processed
        adapter = None if body["model"] == name else body["model"]  # the base model's name: no adapter
        N = len(prompts) * n  # choices; choice j answers prompt j // n
        echoed = [prompt_texts[j // n] if echo else "" for j in range(N)]
        # The prompts' own entries under echo: one uncached forward each, off the loop.
        heads = [await asyncio.to_thread(m.prompt_logprobs, p, config.logprobs, adapter=adapter)
                 if echo and want_lp else [] for p in prompts]
        reqs, events = submit(prompts, [c for c, _ in settings], n, post, adapter, o["names"])
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        decs = [StreamDecoder(m.tokenizer) for _ in range(N)]
        texts = [SettledText(config.stop, chat=post) for _ in range(N)]
        seen = [0] * N  # tokens of each choice received here
        sent = [0] * N  # of them, those whose logprobs have been sent
        offset = [len(e) for e in echoed]  # legacy text_offset of each choice's next token

        def reply_now(j: int) -> str:
            return process_response(decs[j].current) if post else decs[j].current

        def logprobs_upto(j: int, head_: list = ()):
            """The logprobs of choice j's tokens not yet sent (after `head_`), in the endpoint's shape."""
            if not want_lp:
                return None
            r = reqs[j]
            new = [(r.tokens[i], r.logprobs[i].logprob, r.logprobs[i].top) for i in range(sent[j], seen[j])]
            sent[j] = seen[j]
            if chat:
                return chat_logprobs(new, token_text)
            out, _ = legacy_logprobs(head_, 0, token_text)  # the echoed prompt's tokens, from the start of the text
            more, offset[j] = legacy_logprobs(new, offset[j], token_text)
            return {k: out[k] + more[k] for k in out}

        def choice(j: int, content: str | None, finish: str | None, delta: bool, lp=None) -> dict:
            if call is not None:  # arguments of a function call instead of content
                body_ = call.delta(j, content, texts[j].sent) if delta else call.message(j, content)
                return {"index": j, ("delta" if delta else "message"): body_, "logprobs": lp,
                        "finish_reason": finish and call.finish_reason(finish)}
            if chat:
                body_ = {"role": "assistant", "content": content} if not delta else (
                    {"content": content} if content is not None else {})
                return {"index": j, ("delta" if delta else "message"): body_, "finish_reason": finish, "logprobs": lp}
            return {"index": j, "text": content or "", "finish_reason": finish, "logprobs": lp}

        def envelope(choices: list, **extra) -> dict:
            if stream and o["include_usage"]:  # OpenAI's: every chunk has the field, null but in the last
                extra.setdefault("usage", None)
            return {"id": rid, "object": obj + (".chunk" if stream and chat else ""), "created": int(time.time()),
                    "model": body["model"], "choices": choices, **extra}

        if not stream:
            ended = 0
            async for j, t in tokens(reqs, events, request):
                if t is None:
                    ended += 1
                else:
                    decs[j].put(t)
                    seen[j] += 1
            if ended < N:  # the client went away
                return JSONResponse({}, status_code=499)
            out = [choice(j, echoed[j] + texts[j].cut(reply_now(j)), reqs[j].result.finish_reason, False,
                          logprobs_upto(j, heads[j // n])) for j in range(N)]
            return JSONResponse(envelope(out, usage=usage(reqs, n)))

        async def sse():
            def line(payload) -> str:
                return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

            for j in range(N):
                if chat:
                    yield line(envelope([{"index": j, "delta": {"role": "assistant", "content": None if call else ""},
                                          "finish_reason": None, "logprobs": None}]))
                elif echo:
                    yield line(envelope([choice(j, echoed[j], None, True, logprobs_upto(j, heads[j // n]))]))
            try:
                async for j, t in tokens(reqs, events):
                    if t is not None:
                        decs[j].put(t)
                        seen[j] += 1
                        delta = texts[j].update(reply_now(j))
                        if delta:  # with the logprobs of the tokens received so far
                            yield line(envelope([choice(j, delta, None, True, logprobs_upto(j))]))
                        continue
                    rest = texts[j].finish(reply_now(j))
                    if rest:
                        yield line(envelope([choice(j, rest, None, True, logprobs_upto(j))]))
                    yield line(envelope([choice(j, None if chat else "", reqs[j].result.finish_reason, True,
                                                logprobs_upto(j) if sent[j] < seen[j] else None)]))
            except APIError as e:
                yield line(e.body())
                yield "data: [DONE]\n\n"
                return
            if o["include_usage"]:
                yield line(envelope([], usage=usage(reqs, n)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
        call = tool_call(body)
        ids = await asyncio.to_thread(m.tokenizer.encode, chat_prompt(body, call))  # off the loop: it may be long
        return await run(request, [ids], body, chat=True, call=call)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        check_fields(body, COMPLETION_FIELDS, "/v1/completions")
        prompts = completion_prompts(body, m.config)

        def encode():  # off the loop: a long prompt takes a while to tokenize
            ids = [p if isinstance(p, list) else m.tokenizer.encode(p) for p in prompts]
            return ids, [m.tokenizer.decode(p) if isinstance(p, list) else p for p in prompts]

        ids, texts = await asyncio.to_thread(encode)
        return await run(request, ids, body, chat=False, prompt_texts=texts)

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "glm"}

    @app.get("/v1/models")
    async def models(request: Request):
        guard.authorize(request.headers)
        return {"object": "list", "data": [model_card(x) for x in [name, *m.adapters]]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        guard.authorize(request.headers)
        check_model(model_id, [name, *m.adapters])
        return model_card(model_id)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": sched.running, "waiting": sched.n_waiting,
                "max_batch": sched.max_batch, "max_context": sched.max_context}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def replica_app(args: argparse.Namespace, guard: HTTPGuard):
    """The app of one replica on Ray Serve, in the replica's process (`guard`: made where glm-serve started, which
    has the key's file or environment)."""
    m = load_from_args(args, max_batch=args.max_batch, max_waiting=args.max_waiting)
    return create_app(m, served_name(args), guard=guard)


def main(argv: list[str] | None = None, prog: str = "glm-serve") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    check_adapters(parser, args, served_name(args))
    check_cluster_args(parser, args)
    try:
        guard = HTTPGuard.from_args(args)
        if args.replicas or args.autoscale:  # the same app, built in each replica (glm.cluster)
            from glm.cluster import serve_replicas

            return serve_replicas(args, functools.partial(replica_app, guard=guard), prog)
        m = prepare_server(args, ("fastapi", "uvicorn", "prometheus_client"), "pip install 'glm[serve]'")
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    name = served_name(args)
    app = create_app(m, name, guard=guard)
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
