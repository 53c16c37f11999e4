#!/usr/bin/env python
"""Benchmark prefill and decode of a ChatGLM-6B-shaped model with random weights (no download needed).

Prints one JSON row per mode: device, dtype, quant, batch, prompt length, prefill tok/s, decode tok/s, peak
memory, bytes read per decoded token and the fraction of the memory-bandwidth limit (those bytes / time / the
copy bandwidth measured in the same run). Each mode also runs a naive eager decode (no compiled step, fresh
caches per call) so that speed-ups are ratios measured on the same machine.

    python scripts/bench.py --layers 4                        # quick, CPU: fp32, bf16, int8, int4
    python scripts/bench.py --device cuda --compile           # full model on a GPU: fp16, int8, int4
    python scripts/bench.py --device cuda --kernels           # also the INT8/INT4 kernel micro-benchmarks
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm.config import GLMConfig  # noqa: E402
from glm.generation import GenerationConfig, Scheduler  # noqa: E402
from glm.model import GLM  # noqa: E402


def build_random(cfg: GLMConfig, device, dtype, quant: int | None, group_size: int | None, seed: int = 0,
                 quant_lm_head: bool = False) -> GLM:
    """A GLM with N(0, 0.02) weights, built block by block so that peak memory stays near the final size.

    Every mode built with the same seed has the same underlying float weights (cast or quantized).
    """
    with torch.device("meta"):
        model = GLM(cfg).to(dtype)  # free on the meta device; storage comes block by block below

    def fill(module: torch.nn.Module, gen_seed: int):
        module.to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(gen_seed)  # on the device: fast, same weights every mode
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.LayerNorm):
                p.data.fill_(1.0 if name == "weight" else 0.0)
            else:  # in slices of rows, so that the float32 temporary stays small (the head is 130528 rows)
                for r in range(0, p.shape[0], 4096):
                    rows = p.data[r : r + 4096]
                    rows.copy_((torch.randn(rows.shape, generator=g, device=device) * 0.02).to(dtype))

    fill(model.word_embeddings, seed)
    fill(model.final_layernorm, seed + 1)
    fill(model.lm_head, seed + 2)
    for i, layer in enumerate(model.layers):
        for j, m in enumerate(layer.modules()):
            if any(True for _ in m.parameters(recurse=False)):
                fill(m, seed + 1000 * (i + 1) + j)
        if quant:
            from glm.quant import quantize_

            quantize_(layer, quant, group_size)
    if quant and quant_lm_head:
        from glm.quant import QuantLinear

        model.lm_head = QuantLinear.from_linear(model.lm_head, quant, group_size=group_size)
    model.init_buffers(device)
    return model.eval().requires_grad_(False)


def weight_bytes_per_token(model: GLM) -> int:
    """Bytes a decode step reads from weights: every linear and norm, and one row of the embedding table.

    Quantized linears count their packed size (in * out * bits / 8) plus scales and bias, whatever private copy a
    CPU kernel keeps instead of the official tensor.
    """
    from glm.quant import QuantLinear

    total = model.config.hidden_size * model.dtype.itemsize  # the embedding row
    for name, mod in model.named_modules():
        if name == "word_embeddings":
            continue
        if isinstance(mod, QuantLinear):
            total += mod.in_features * mod.out_features * mod.bits // 8
            total += sum(t.numel() * t.element_size() for n, t in mod.named_buffers() if n in ("weight_scale", "bias"))
            total += sum(t.numel() * t.element_size() for n, t in mod.named_parameters() if n == "bias")
        else:
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False) if p is not None)
    return total


def kv_bytes_per_token(cfg: GLMConfig, dtype: torch.dtype, context: int, batch: int) -> int:
    return cfg.num_layers * 2 * cfg.hidden_size * dtype.itemsize * context * batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    n, t0 = 5, time.perf_counter()
    for _ in range(n):
        dst.copy_(src)
    sync(device)
    dt = (time.perf_counter() - t0) / n
    del src, dst
    return 2 * nbytes / dt


def gemv_read_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s at which a float16 matrix-vector product streams its matrix: the practical read limit on a CPU,
    where a copy (read + write through the caches) understates what a decode step can read."""
    w = torch.randn(nbytes // 2 // 4096, 4096, device=device).half()
    x = torch.randn(1, 4096, device=device).half()
    for _ in range(2):
        x @ w.T
    n, t0 = 5, time.perf_counter()
    for _ in range(n):
        x @ w.T
    sync(device)
    dt = (time.perf_counter() - t0) / n
    del w
    return nbytes / dt


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: reset VmHWM so that each mode reports its own peak
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_prompts(cfg: GLMConfig, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    hi = min(cfg.mask_token_id, cfg.vocab_size) - 1
    return [torch.randint(20, hi, (length - 2,), generator=g).tolist() + [cfg.gmask_token_id, cfg.bos_token_id]
            for _ in range(batch)]


def timed_generate(model, prompts, new_tokens, sched=None) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of one greedy generation of every prompt as one batch.

    `sched` carries caches (and a compiled step) from one call to the next; None: fresh caches (the naive run).
    """
    sched = sched or Scheduler(model, max_batch=len(prompts), max_context=max(map(len, prompts)) + new_tokens)
    config = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    sync(model.device)
    t0 = time.perf_counter()
    reqs = [sched.submit(p, config) for p in prompts]
    stamps = []
    for _ in reqs[-1]:  # the last one admitted: its first token comes once every prompt is prefilled
        stamps.append(time.perf_counter())  # (each token is read back from the device: no sync needed)
    for r in reqs:
        r.wait()
    prefill = stamps[0] - t0
    per_token = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return prefill, per_token


def current_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_mode(cfg, device, dtype, quant, group_size, args, bandwidth) -> dict:
    model = build_random(cfg, device, dtype, quant, group_size, quant_lm_head=args.quant_lm_head)
    gc.collect()
    loaded = current_memory(device)
    reset_peak(device)  # the peak of serving this model, not of building it from random float weights
    prompts = random_prompts(cfg, args.batch, args.prompt)
    dec = Scheduler(model, max_batch=args.batch, max_context=args.prompt + args.new, compile=args.compile)
    warm = min(8, args.new)
    timed_generate(model, prompts, warm, dec)  # warm-up (and compilation)
    prefill, per_tok = timed_generate(model, prompts, args.new, dec)
    naive_prefill, naive_tok = (None, None)
    if not args.no_naive:
        timed_generate(model, prompts, warm)
        naive_prefill, naive_tok = timed_generate(model, prompts, args.new)  # eager, fresh caches
    wbytes = weight_bytes_per_token(model)
    ctx = args.prompt + args.new // 2  # mean context during decode
    step_bytes = wbytes + kv_bytes_per_token(cfg, dtype, ctx, args.batch)
    row = {
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "layers": cfg.num_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "quant": f"int{quant}" + (f"-g{group_size}" if group_size else "") if quant else None,
        "quant_lm_head": bool(quant and args.quant_lm_head),
        "compile": args.compile,
        "batch": args.batch,
        "prompt_len": args.prompt,
        "new_tokens": args.new,
        "prefill_tok_s": round(args.batch * args.prompt / prefill, 2),
        "decode_tok_s": round(args.batch / per_tok, 2),
        "decode_ms_per_step": round(per_tok * 1000, 2),
        "naive_decode_tok_s": round(args.batch / naive_tok, 2) if naive_tok else None,
        "speedup_vs_naive": round(naive_tok / per_tok, 2) if naive_tok else None,
        "model_mem_gb": round(loaded / 1e9, 3),  # process RSS on a CPU, allocated memory on a GPU
        "peak_mem_gb": round(peak_memory(device) / 1e9, 3),
        "weight_gb": round(wbytes / 1e9, 3),
        "bytes_per_step_gb": round(step_bytes / 1e9, 3),
        "bw_gb_s": round(bandwidth / 1e9, 1),  # GPU: copy bandwidth; CPU: max(copy, fp16 GEMV read rate)
        "bw_limit_tok_s": round(args.batch * bandwidth / step_bytes, 1),
        "frac_of_bw_limit": round(step_bytes / per_tok / bandwidth, 3),
        "date": time.strftime("%Y-%m-%d"),
    }
    del model, dec
    gc.collect()
    return row


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


MODES = {
    "fp32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, None, None),
    "fp16": (torch.float16, None, None),
    "int8": (None, 8, None),
    "int4": (None, 4, None),
    "int4-g128": (None, 4, 128),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--layers", type=int, default=None, help="number of blocks (default 28: the full model)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated from {','.join(MODES)} "
                        "(default: cuda fp16,int8,int4; cpu fp32,bf16,int8,int4)")
    p.add_argument("--act-dtype", default=None, help="activation dtype of quantized modes (default: fp16 cuda, "
                                                     "bf16 cpu)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile (CUDA graphs on a GPU)")
    p.add_argument("--quant-lm-head", action="store_true", help="quantized modes: quantize lm_head too")
    p.add_argument("--no-naive", action="store_true", help="skip the naive eager baseline")
    p.add_argument("--kernels", action="store_true", help="also run the INT8/INT4 kernel micro-benchmarks (CUDA)")
    p.add_argument("--memory-context", type=int, default=0,
                   help="also report peak memory of one generation filling this many tokens (e.g. 2048)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GLMConfig.from_name("chatglm-6b")
    if args.layers:
        cfg.num_layers = args.layers
    modes = (args.modes or ("fp16,int8,int4" if device.type == "cuda" else "fp32,bf16,int8,int4")).split(",")
    act = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.act_dtype]
    act = act or (torch.float16 if device.type == "cuda" else torch.bfloat16)
    bandwidth = copy_bandwidth(device)
    if device.type == "cpu":
        bandwidth = max(bandwidth, gemv_read_bandwidth(device))
    torch.set_grad_enabled(False)
    for mode in modes:
        if mode not in MODES:
            print(f"error: unknown mode {mode!r}; choose from {', '.join(MODES)}", file=sys.stderr)
            return 2
        dtype, quant, group = MODES[mode]
        row = bench_mode(cfg, device, dtype or act, quant, group, args, bandwidth)
        print(json.dumps(row), flush=True)
        if args.memory_context:
            print(json.dumps(memory_row(cfg, device, dtype or act, quant, group, args)), flush=True)
    if args.kernels:
        from bench_kernels import kernel_bench  # scripts/bench_kernels.py

        for row in kernel_bench(device=str(device)):
            print(json.dumps(row), flush=True)
    return 0


def memory_row(cfg, device, dtype, quant, group_size, args) -> dict:
    """Peak memory of one generation whose context reaches `--memory-context` tokens."""
    model = build_random(cfg, device, dtype, quant, group_size, quant_lm_head=args.quant_lm_head)
    gc.collect()
    reset_peak(device)
    n = args.memory_context
    prompts = random_prompts(cfg, 1, n - 16)
    timed_generate(model, prompts, 16)
    row = {"device": device_name(device), "layers": cfg.num_layers, "dtype": str(dtype).removeprefix("torch."),
           "quant": f"int{quant}" + (f"-g{group_size}" if group_size else "") if quant else None,
           "context": n, "peak_mem_gb": round(peak_memory(device) / 1e9, 3), "date": time.strftime("%Y-%m-%d")}
    del model
    gc.collect()
    return row


if __name__ == "__main__":
    sys.exit(main())
