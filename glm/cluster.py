"""`glm-serve --replicas N` (or `--autoscale MIN:MAX`): glm-serve's app on Ray Serve, one full engine per replica.

glm-serve hands over its app factory (this module never imports glm.serve): each replica builds the app in its own
process and is the ingress of one Ray Serve deployment, whose HTTP proxy listens on --host/--port and routes each
request to a lightly loaded replica. In front of the app, each replica adds the `x-glm-replica` header and answers
`/health` and `/metrics` for the whole deployment, from the reports every replica sends to a small named actor.
Ray is imported only inside functions, so that neither `import glm` nor plain glm-serve loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
import time

from glm.options import CLIError, bind_error, count_type

APP = "glm"  # the Serve application, and its one deployment
NAMESPACE = "glm"  # Ray namespace of the registry actor
REGISTRY = "glm-replicas"
HEARTBEAT = 1.0  # seconds between a replica's reports
STALE = 3 * HEARTBEAT  # a replica not heard from for this long is listed UNREACHABLE ...
FORGET = 30.0  # ... and after this long, not at all (Ray Serve has replaced it by then)
# Ray Serve's one way to put an ASGI middleware into its HTTP proxy: an import path in the proxy's environment.
PROXY_HOOK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Ray Serve's logs: no line per request


# ---------------------------------------------------------------------------------------------------- options


def _span(s: str) -> tuple[int, int]:
    """MIN:MAX replicas."""
    lo, sep, hi = s.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 1024):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX <= 1024, got {s!r}")
    return int(lo), int(hi)


def _delays(s: str) -> tuple[float, float]:
    """UP:DOWN seconds."""
    up, sep, down = s.partition(":")
    try:
        v = float(up), float(down)
    except ValueError:
        v = None
    if not sep or v is None or not all(0 <= x <= 86400 for x in v):
        raise argparse.ArgumentTypeError(f"expected UP:DOWN, seconds in [0, 86400], got {s!r}")
    return v


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replicas on Ray Serve (pip install 'glm[cluster]'; see docs/serve.md)")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--replicas", type=count_type(1, 1024), default=None, metavar="N",
                   help="serve through Ray Serve with N replicas, each a full engine; Ray's proxy listens on "
                        "--host/--port")
    n.add_argument("--autoscale", type=_span, default=None, metavar="MIN:MAX",
                   help="as --replicas, between MIN and MAX replicas, scaled by Ray Serve on the requests ongoing "
                        "per replica (target: --max-batch)")
    g.add_argument("--autoscale-delay", type=_delays, default=(30.0, 600.0), metavar="UP:DOWN",
                   help="seconds the load must stay above (below) the target before a replica is added (removed) "
                        "(default: 30:600, Ray Serve's)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join a running Ray cluster (auto: the one `ray start` made this machine part of); default: "
                        "start a Ray instance of this machine's own on 127.0.0.1, stopped with glm-serve")
    g.add_argument("--threads", type=count_type(1, 1024), default=None, metavar="N",
                   help="replicas on CPUs: torch threads of each (default: this machine's cores divided by the "
                        "replicas); on GPUs each replica takes one GPU")


def check_cluster_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.replicas is None and args.autoscale is None:
        given = [o for o, v in (("--ray-address", args.ray_address), ("--threads", args.threads)) if v is not None]
        if args.autoscale_delay != (30.0, 600.0):
            given.append("--autoscale-delay")
        if given:
            parser.error(f"{', '.join(given)} applies to --replicas or --autoscale only")
    elif args.device.startswith("cuda:") and args.device != "cuda:0":
        parser.error("with replicas, each takes a GPU of its own: use --device cuda (or auto), not " + args.device)


# ---------------------------------------------------------------------------------------------------- replicas


class Registry:
    """The replicas' latest reports (a named Ray actor: each replica reports every HEARTBEAT seconds)."""

    def __init__(self):
        self.seen: dict[str, tuple[float, dict]] = {}

    def report(self, rid: str, info: dict) -> None:
        self.seen[rid] = (time.monotonic(), info)

    def leave(self, rid: str) -> None:
        self.seen.pop(rid, None)

    def replicas(self) -> list[dict]:
        now = time.monotonic()
        self.seen = {r: (t, i) for r, (t, i) in self.seen.items() if now - t <= FORGET}
        return [{**i, "state": i["state"] if now - t <= STALE else "UNREACHABLE"}
                for _, (t, i) in sorted(self.seen.items())]


async def asgi_get(app, path: str) -> bytes:
    """The body of `GET path` answered by an ASGI app in this process."""
    body: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "server": ("replica", 80), "client": None}
    await app(scope, receive, send)
    return b"".join(body)


def merge_metrics(reports: list[dict]) -> bytes:
    """The Prometheus text of every replica's metrics, each sample labelled with its replica's id."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for r in reports:
        for fam in text_string_to_metric_families(r.get("metrics", "")):
            m = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            m.samples += [s._replace(labels={**s.labels, "replica": r["id"]}) for s in fam.samples]

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class Replica:
    """One replica: the app `build()` returns, behind `Routes`. Reports to the registry while it lives."""

    async def __init__(self, build, device: str, threads: int | None):
        import ray
        import torch
        from ray import serve

        if threads:
            torch.set_num_threads(threads)
        self.where = {"device": device, "threads": torch.get_num_threads()} if threads else {"device": device}
        self.id = serve.get_replica_context().replica_tag
        self.node = ray.get_runtime_context().get_node_id()[:8]
        self.state, self.requests, self.engine_app = "STARTING", 0, None
        self.registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self.beat = asyncio.create_task(self._heartbeat())
        self.engine_app = await asyncio.to_thread(build)  # the model loads while the heartbeat says STARTING
        self.state = "RUNNING"
        await self._report()

    def __serve_build_asgi_app__(self):
        return Routes(self.engine_app, self)

    async def _report(self) -> None:
        info = {"id": self.id, "state": self.state, "requests": self.requests, "node": self.node, "pid": os.getpid(),
                **self.where}
        if self.engine_app is not None:
            own = json.loads(await asgi_get(self.engine_app, "/health"))
            info.update(running=own["running"], waiting=own["waiting"],
                        metrics=(await asgi_get(self.engine_app, "/metrics")).decode())
        await self.registry.report.remote(self.id, info)

    async def _heartbeat(self) -> None:
        from ray.exceptions import RayError

        while True:
            try:
                await self._report()
            except RayError as e:  # the registry restarting (its node lost): the next report refills it
                logging.getLogger("glm.cluster").warning("replica %s: report failed: %s", self.id, e)
            await asyncio.sleep(HEARTBEAT)

    async def health(self) -> dict:
        """This replica's /health with the running and waiting requests of all, and each replica's state."""
        from ray import serve

        await self._report()
        out = json.loads(await asgi_get(self.engine_app, "/health"))
        reps = await self.registry.replicas.remote()
        out["running"] = sum(r.get("running", 0) for r in reps if r["state"] == "RUNNING")
        out["waiting"] = sum(r.get("waiting", 0) for r in reps if r["state"] == "RUNNING")
        out["replicas"] = [{k: v for k, v in r.items() if k != "metrics"} for r in reps]
        # The controller's count of replicas by state (it starts and stops them): a status call, off the loop.
        status = (await asyncio.to_thread(serve.status)).applications[APP]
        dep = status.deployments[APP]
        out["deployment"] = {"status": str(dep.status.value), "replicas": dict(dep.replica_states)}
        return out

    async def metrics(self) -> bytes:
        await self._report()
        return merge_metrics(await self.registry.replicas.remote())

    def __del__(self):  # a replica stopped by Ray Serve (scaled down, shut down) leaves the list at once
        if hasattr(self, "beat"):
            self.beat.cancel()
            self.registry.leave.remote(self.id)


class Routes:
    """ASGI, in a replica in front of glm-serve's app: every response says which replica answered (x-glm-replica);
    GET /health and /metrics answer for the whole deployment; requests to /v1/ are counted."""

    def __init__(self, app, replica: Replica):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = self.replica.id.encode()

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-glm-replica", rid)]}
            await send(message)

        path = scope["path"]
        if scope["method"] == "GET" and path in ("/health", "/metrics"):
            if path == "/health":
                body, kind = json.dumps(await self.replica.health()).encode(), b"application/json"
            else:
                from prometheus_client import CONTENT_TYPE_LATEST

                body, kind = await self.replica.metrics(), CONTENT_TYPE_LATEST.encode()
            await tagged({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
            await send({"type": "http.response.body", "body": body})
            return
        if path.startswith("/v1/"):
            self.replica.requests += 1
        await self.app(scope, receive, tagged)


# ---------------------------------------------------------------------------------------------------- the proxy


REPLICA_FAILED = {"error": {"message": "the replica serving this request stopped (Ray Serve replaces it): send the "
                                       "request again", "type": "server_error", "param": None,
                            "code": "replica_failed"}}


class ProxyErrors:
    """ASGI, in Ray Serve's HTTP proxy: a request whose replica died gets an answer in the API's shape. Nothing sent
    yet: a 503 JSON error with Retry-After (the official clients retry it); a stream cut short: an error event and
    [DONE], as glm-serve ends a stream whose generation failed. Ray's proxy alone would answer a plain-text 500 or
    drop the connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False, "sse": False, "gone": False}

        async def watched_receive():
            message = await receive()
            state["gone"] |= message["type"] == "http.disconnect"
            return message

        async def watched_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        await self.app(scope, watched_receive, watched_send)
        if state["ended"] or state["gone"]:
            return
        error = json.dumps(REPLICA_FAILED).encode()
        if not state["started"]:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": error})
        elif state["sse"]:
            await send({"type": "http.response.body", "body": b"data: " + error + b"\n\ndata: [DONE]\n\n"})


def proxy_middlewares() -> list:
    """Called by Ray Serve's proxy (PROXY_HOOK names it)."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


# ---------------------------------------------------------------------------------------------------- the driver


def _resources(args, ray) -> tuple[dict, str, int | None]:
    """(Ray actor options, device, torch threads) of each replica: a GPU of its own where the cluster has GPUs and
    --device allows, else CPU threads."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if args.device != "cpu" and (gpus or args.device.startswith("cuda")):
        if not gpus:
            raise CLIError(f"--device {args.device}: the Ray cluster has no GPU")
        return {"num_gpus": 1, "num_cpus": 1}, "cuda", None
    threads = args.threads or max(1, (os.cpu_count() or 1) // _most(args))
    return {"num_cpus": threads}, "cpu", threads


def _most(args) -> int:
    return args.autoscale[1] if args.autoscale else args.replicas


def _deployment_options(args, actor: dict) -> dict:
    opts = dict(name=APP, ray_actor_options=actor, graceful_shutdown_timeout_s=5, max_constructor_retry_count=3,
                # A replica queues for itself (up to --max-waiting, then 429), as one glm-serve does.
                max_ongoing_requests=args.max_batch + args.max_waiting)
    if args.autoscale:
        up, down = args.autoscale_delay
        opts["autoscaling_config"] = {
            "min_replicas": args.autoscale[0], "max_replicas": args.autoscale[1],
            "target_ongoing_requests": args.max_batch,  # a replica with every row busy
            "upscale_delay_s": up, "downscale_delay_s": down, "look_back_period_s": max(1.0, min(up, 30.0)),
            "metrics_interval_s": max(0.5, min(up, 10.0))}
    else:
        opts["num_replicas"] = args.replicas
    return opts


def _failure(message: str) -> str:
    """The line that says why a deployment failed: a replica's CLIError where there is one."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "CLIError: " in ln:
            return ln.partition("CLIError: ")[2]
    return lines[-1] if lines else "no reason given"


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a HOST:PORT address, as one line (Ray itself would retry for ever); None: it may."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        return f"no Ray cluster answers at {address} ({e.strerror or e}): start one with `ray start --head`"
    return None


def serve_replicas(args: argparse.Namespace, factory, prog: str = "glm-serve") -> int:
    """Deploy `factory(args)` (glm-serve's app, built in each replica) on Ray Serve and serve until Ctrl+C or
    SIGTERM; then delete the deployment, and stop the Ray instance if this started it."""
    import importlib.util

    missing = [p for p in ("ray", "fastapi", "prometheus_client") if importlib.util.find_spec(p) is None]
    local = args.ray_address is None
    why = (f"this needs {', '.join(missing)}: pip install 'glm[cluster]'" if missing
           else bind_error(args.host, args.port) if local else _unreachable(args.ray_address))
    if why:
        print(f"{prog}: error: {why}", file=sys.stderr)
        return 1
    if local:
        # Set before ray is imported (it reads it then): the node's address is 127.0.0.1, not the machine's, so
        # that the instance's own ports listen on the loopback interface. (Ray means it for single-node use.)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    started_serve = registry = None
    try:
        if local:
            cpus = max(os.cpu_count() or 1, (args.threads or 1) * _most(args))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=100 << 20,
                     namespace=NAMESPACE, logging_level=logging.WARNING)
        else:
            try:
                ray.init(address=args.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
            except ConnectionError as e:  # e.g. auto, and no cluster on this machine
                raise CLIError(f"cannot join the Ray cluster at {args.ray_address}: {e} (with an address, Ray "
                               "sends its token only with RAY_AUTH_MODE=token: see docs/serve.md)") from None
        # After ray.init, which installs a handler of its own that ends the process at once.
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl+C does
        actor, device, threads = _resources(args, ray)
        status = serve.status()
        if APP in status.applications:
            raise CLIError(f"a glm-serve deployment ('{APP}') already runs on this Ray cluster: stop it first")
        started_serve = not status.proxies
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=QUIET,
                    controller_options={"runtime_env": {"env_vars": {PROXY_HOOK: f"{__name__}.proxy_middlewares"}}})
        registry = ray.remote(num_cpus=0, max_restarts=-1)(Registry).options(
            name=REGISTRY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
        replica_args = argparse.Namespace(**{**vars(args), "device": device})
        app = serve.deployment(**_deployment_options(args, actor))(serve.ingress()(Replica))
        n = f"{args.autoscale[0]} to {args.autoscale[1]}" if args.autoscale else str(args.replicas)
        print(f"{prog}: starting {n} replica(s) on Ray Serve ({device}"
              + (f", {threads} threads each" if threads else ", one GPU each") + ")", file=sys.stderr, flush=True)
        try:
            serve.run(app.bind(functools.partial(factory, replica_args), device, threads), name=APP, route_prefix="/",
                      logging_config=QUIET)
        except RuntimeError as e:  # the deployment failed: its message holds the replicas' tracebacks
            dep = serve.status().applications.get(APP)
            why = dep.deployments[APP].message if dep and APP in dep.deployments else str(e)
            raise CLIError(f"the replicas did not start: {_failure(why)}") from None
        print(f"{prog}: serving on http://{args.host}:{args.port}/v1 through Ray Serve ({n} replica(s)); Ctrl+C "
              "stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):  # the clean-up runs to its end
            signal.signal(s, signal.SIG_IGN)
        _stop(ray, serve, started_serve, registry, local)


def _stop(ray, serve, started_serve: bool | None, registry, local: bool) -> None:
    if not ray.is_initialized():
        return
    if started_serve is not None:
        if started_serve or local:
            serve.shutdown()
        else:
            serve.delete(APP)
    if registry is not None:
        ray.kill(registry)
    ray.shutdown()
