#!/usr/bin/env python
"""Benchmark glm-serve: N concurrent streaming clients against the same requests sent one at a time.

The server runs in a child process on a model of the real ChatGLM-6B shape with random weights (`--layers` to
shorten it) and the real tokenizer; the clients stream from 127.0.0.1 only. Prints one JSON row per run:
aggregate decode tokens/s, time to first token and per-token latency (p50, p99). The one-at-a-time run is the
baseline of a serialising server, measured in the same process.

    python scripts/bench_serve.py --layers 4 --quant 4 --clients 8          # CPU goal: >= 4x the baseline
    python scripts/bench_serve.py --device cuda --dtype float16 --clients 32 --requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "tests" / "fixtures" / "chatglm-tiny" / "ice_text.model"  # the release's, 130528 ids
PROMPTS = ["晚上睡不着应该怎么办", "Write a short poem about the sea.", "什么是机器学习？请简单解释。",
           "List three uses of a paperclip.", "你好，请介绍一下你自己", "How do rockets work?"]


def serve(args) -> None:
    """The child: build the random model, then serve it until killed."""
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
    import uvicorn

    app = create_app(m, "bench")
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        serve(args)
        return 0
    import httpx

    if not args.port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    url = f"http://127.0.0.1:{args.port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child_args = [a for a in (argv if argv is not None else sys.argv[1:])] + ["--child", "--port", str(args.port)]
    child = subprocess.Popen([sys.executable, __file__, *child_args], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", "the server did not start"
        n = args.requests or args.clients
        jobs = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        with httpx.Client() as client:
            for _ in range(60):
                try:
                    client.get(url + "/health").raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.5)
            one(client, url, "warm up", 4)
            t0 = time.perf_counter()
            serial = [one(client, url, q, args.new) for q in jobs]
            rows = [summarize("one-at-a-time", serial, time.perf_counter() - t0, args)]
            with ThreadPoolExecutor(args.clients) as pool:
                t0 = time.perf_counter()
                batched = list(pool.map(lambda q: one(client, url, q, args.new), jobs))
                rows.append(summarize("concurrent", batched, time.perf_counter() - t0, args))
        rows[1]["speedup"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
        for r in rows:
            r["machine"] = platform.processor() or platform.machine()
            print(json.dumps(r))
    finally:
        child.terminate()
        child.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
