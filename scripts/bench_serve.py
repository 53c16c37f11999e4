#!/usr/bin/env python
"""Benchmark glm-serve: N concurrent streaming clients against the same requests sent one at a time.

The server runs in a child process on a model of the real ChatGLM-6B shape with random weights (`--layers` to
shorten it) and the real tokenizer; the clients stream from 127.0.0.1 only. Prints one JSON row per run:
aggregate decode tokens/s, time to first token and per-token latency (p50, p99). The one-at-a-time run is the
baseline of a serialising server, measured in the same process.

    python scripts/bench_serve.py --layers 4 --quant 4 --clients 8          # CPU goal: >= 4x the baseline
    python scripts/bench_serve.py --device cuda --dtype float16 --clients 32 --requests 64

With `--replicas N` it compares servers instead (glm-serve --replicas on Ray Serve, a local Ray instance): plain
glm-serve against Ray Serve with one replica, one client (the cost of the Ray hop per request), then the aggregate
tokens/s of 1 and N replicas at 8 and 16 clients (each replica with --threads / N torch threads):

    python scripts/bench_serve.py --layers 4 --quant 4 --replicas 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "tests" / "fixtures" / "chatglm-tiny" / "ice_text.model"  # the release's, 130528 ids
PROMPTS = ["晚上睡不着应该怎么办", "Write a short poem about the sea.", "什么是机器学习？请简单解释。",
           "List three uses of a paperclip.", "你好，请介绍一下你自己", "How do rockets work?"]


def serve(args) -> None:
    """The child: build the random model, then serve it until killed (with --replicas, on Ray Serve)."""
    if args.replicas:
        from glm.cluster import serve_replicas

        ns = argparse.Namespace(**vars(args), host="127.0.0.1", autoscale=None, autoscale_delay=(30.0, 600.0),
                                ray_address=None, max_batch=args.clients, max_waiting=256)
        ns.threads = max(1, (args.threads or os.cpu_count() or 1) // args.replicas)
        sys.exit(serve_replicas(ns, random_app))
    import uvicorn

    app = random_app(args)
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def random_app(args):
    """glm-serve's app on the random model (in a Ray Serve replica: built there)."""
    import torch

    import glm.engine
    from glm.config import GLMConfig
    from glm.serve import create_app
    from glm.tokenizer import Tokenizer

    build_random = _bench().build_random

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GLMConfig.from_name("chatglm-6b")
    if args.layers:
        cfg.num_layers = args.layers
    device = glm.engine.resolve_device(args.device)
    dtype = glm.engine.resolve_dtype(args.dtype, device, 6_000_000_000)
    model = build_random(cfg, device, dtype, args.quant, None, quant_lm_head=bool(args.quant))
    if args.quant:
        from glm.quant import set_cpu_kernel

        set_cpu_kernel(model, args.cpu_kernel)
    m = glm.engine.ChatGLM(model, Tokenizer.from_config(TOKENIZER, cfg), compile=args.compile,
                           max_batch=args.clients)
    return create_app(m, "bench")


def _bench():
    """scripts/bench.py as a module (scripts/ is not a package): its random-weight model builder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one(client, url: str, prompt: str, new: int) -> dict:
    """Stream one completion; returns its token count, time to first token and inter-token gaps."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"tokens": tokens, "ttft": (times[0] - t0) if times else float("nan"), "gaps": gaps,
            "start": t0, "end": time.perf_counter()}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(name: str, runs: list[dict], wall: float, args) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    gaps = [g for r in runs for g in r["gaps"]]
    return {"run": name, "clients": 1 if name == "one-at-a-time" else args.clients, "requests": len(runs),
            "layers": args.layers or 28, "quant": args.quant, "device": args.device, "new_tokens": args.new,
            "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1000 * pct([r["ttft"] for r in runs], 0.5), 1),
            "ttft_p99_ms": round(1000 * pct([r["ttft"] for r in runs], 0.99), 1),
            "token_latency_p50_ms": round(1000 * pct(gaps, 0.5), 1),
            "token_latency_p99_ms": round(1000 * pct(gaps, 0.99), 1)}


@contextlib.contextmanager
def running(client, argv: list[str], port: int, timeout: float = 900):
    """This script as the server child (`argv`: its options) on `port`, until the block ends; SIGTERM then."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, __file__, *argv, "--child", "--port", str(port)], env=env,
                             stdout=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert child.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                client.get(url + "/health").raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        one(client, url, "warm up", 4)
        yield url
    finally:
        child.terminate()
        child.wait(120)


def concurrent(client, url: str, name: str, clients: int, requests: int, args) -> dict:
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    with ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        runs = list(pool.map(lambda q: one(client, url, q, args.new), jobs))
        row = summarize(name, runs, time.perf_counter() - t0, args)
    row["clients"] = clients
    return row


def latency(client, url: str, name: str, args) -> dict:
    """One client: the wall time of a request of --new tokens and of one token, each the median of several."""
    full = [one(client, url, PROMPTS[i % len(PROMPTS)], args.new) for i in range(6)]
    short = [one(client, url, PROMPTS[i % len(PROMPTS)], 1) for i in range(20)]
    return {"run": name, "clients": 1, "layers": args.layers or 28, "quant": args.quant, "new_tokens": args.new,
            "request_ms_p50": round(1000 * pct([r["end"] - r["start"] for r in full], 0.5), 1),
            "one_token_request_ms_p50": round(1000 * pct([r["end"] - r["start"] for r in short], 0.5), 1)}


def compare(client, args, argv: list[str]) -> list[dict]:
    """Plain glm-serve against Ray Serve with 1 and --replicas replicas (see the module's docstring)."""
    argv = [a for i, a in enumerate(argv) if not a.startswith("--replicas") and argv[i - 1] != "--replicas"]
    argv += ["--clients", "16"]  # cache rows of every server; the runs below choose their clients
    rows = []
    for replicas in (0, 1, args.replicas):
        name = f"ray-{replicas}" if replicas else "plain"
        with running(client, argv + (["--replicas", str(replicas)] if replicas else []), free_port()) as url:
            if replicas <= 1:
                rows.append(report(latency(client, url, name, args)))
            for clients in (8, 16):
                rows.append(report(concurrent(client, url, name, clients, clients, args)))
    return rows


def report(row: dict) -> dict:
    row["machine"] = platform.processor() or platform.machine()
    print(json.dumps(row), flush=True)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--layers", type=int, default=None, help="blocks (default 28: the full model)")
    p.add_argument("--quant", type=int, choices=(4, 8), default=None)
    p.add_argument("--cpu-kernel", choices=("exact", "fast"), default="exact", help="with --quant, on a CPU")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (and cache rows)")
    p.add_argument("--requests", type=int, default=None, help="requests in each run (default: --clients)")
    p.add_argument("--new", type=int, default=32, help="tokens per reply")
    p.add_argument("--threads", type=int, default=None, help="torch threads (with --replicas: of all replicas)")
    p.add_argument("--replicas", type=int, default=None, help="compare Ray Serve with 1 and N replicas (see above)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        serve(args)
        return 0
    argv = list(argv if argv is not None else sys.argv[1:])
    with httpx.Client(timeout=3600) as client:
        if args.replicas:
            compare(client, args, argv)
            return 0
        with running(client, argv, args.port or free_port()) as url:
            n = args.requests or args.clients
            jobs = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
            t0 = time.perf_counter()
            serial = [one(client, url, q, args.new) for q in jobs]
            rows = [summarize("one-at-a-time", serial, time.perf_counter() - t0, args),
                    concurrent(client, url, "concurrent", args.clients, n, args)]
        rows[1]["speedup"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    for r in rows:
        report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
