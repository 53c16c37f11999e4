#!/usr/bin/env python
"""Benchmark prefill and decode of a ChatGLM-6B-shaped model with random weights (no download needed).

Prints one JSON row per (mode, batch): device, dtype, quant, CPU kernel mode, batch, prompt length, prefill tok/s,
decode ms per step and tok/s, memory, bytes read per decode step and the fraction of the memory-bandwidth limit
(those bytes / step time / the bandwidth measured in the same run). Times are the fastest of `--repeats` runs (a
run's decode time is its median step), and the bandwidth the fastest of 8 passes: on a machine shared with other
work these are the steadiest figures. Decoding is greedy through the model's forward
and a KV cache of `batch` rows, fed `batch` random prompts of the same length (this script does not use
glm.generation). `--compile` also times a torch.compile'd step (CUDA graphs on a GPU) against the eager one.
The rows go to stdout as they are measured, and a line per phase to stderr. `--quick` is a short CPU run of 4
blocks, a 16-token prompt, 32 new tokens and one timed run per row (any of them given on the command line stays):
a few minutes on 2 cores, most of them building the random models (the embedding and head alone are 1.1B weights).

    python scripts/bench.py --quick                           # quick, CPU: fp32, bf16, int8, int4 on 4 blocks
    python scripts/bench.py --layers 4 --modes int4,int4-fast --batch 1,8 --quant-lm-head
    python scripts/bench.py --device cuda --compile           # full model on a GPU: fp16, int8, int4
    python scripts/bench.py --device cuda --kernels           # also the INT8/INT4 kernel micro-benchmarks
    python scripts/bench.py --quick --modes int4 --batch 8 --lora-adapters 4   # 4 LoRA adapters + base rows

`--lora-adapters N` times the decode step of a batch whose rows use N different random LoRA adapters (r 8 on
query_key_value, one row each) and base rows, applied per row as glm-serve does (`glm.generation.adapters`),
against the same batch with every row on the base model.

    python scripts/bench.py --quick --layers 2 --modes fp32 --tensor-parallel 2   # split over 2 ranks vs 1 process

With `--tensor-parallel N` each mode's random model is written to a temporary checkpoint and loaded twice through
`glm.load`: over N ranks (tensor_parallel=N) and in this process alone; both are timed through the scheduler's
Runner (prefill, then greedy decode steps), and the rows add the time of the model's collectives per step and
their share of the step.

    python scripts/bench.py --quick --modes int4 --batch 1,8 --grammar   # JSON-schema rows against free rows
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm.config import GLMConfig  # noqa: E402
from glm.model import GLM  # noqa: E402

_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """What the benchmark is doing, on stderr (the JSON rows alone go to stdout): a row can take minutes."""
    print(f"bench [{time.perf_counter() - _T0:6.1f} s]: {msg}", file=sys.stderr, flush=True)


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
        from glm.quant import swap_linear

        swap_linear(model, "lm_head", quant, group_size)
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
    dst.copy_(src)
    return 2 * nbytes / _fastest(lambda: dst.copy_(src), device)


def gemv_read_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s at which a float16 matrix-vector product streams its matrix: the practical read limit on a CPU,
    where a copy (read + write through the caches) understates what a decode step can read."""
    w = torch.randn(nbytes // 2 // 4096, 4096, device=device).half()
    x = torch.randn(1, 4096, device=device).half()
    x @ w.T
    return nbytes / _fastest(lambda: x @ w.T, device)


def _fastest(fn, device, n: int = 8) -> float:
    """Seconds of the fastest of `n` calls (the least disturbed on a shared machine)."""
    best = float("inf")
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


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


def glm_inputs(prompts: list[list[int]], cfg: GLMConfig, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T), position_ids (B, 2, T), mask (1, 1, T, T)) of same-length, same-layout token rows.

    Each row is a prompt ending in `[gMASK] <sop>`, possibly followed by generated tokens: tokens before `<sop>`
    see the whole prefix; from `<sop>` on attention is causal, the position freezes at `[gMASK]` and the block
    position counts 1, 2, ... (GLM's 2D positions).
    """
    first = prompts[0]
    ctx, mask_pos = first.index(cfg.bos_token_id), first.index(cfg.gmask_token_id)
    T = len(first)
    i = torch.arange(T, device=device)
    pos = torch.where(i < ctx, i, torch.full_like(i, mask_pos))
    block = torch.where(i < ctx, torch.zeros_like(i), i - ctx + 1)
    mask = ((i[None, :] < ctx) | (i[None, :] <= i[:, None]))[None, None]
    ids = torch.tensor(prompts, device=device)
    return ids, torch.stack((pos, block))[None].expand(len(prompts), 2, T), mask


class GreedyDecoder:
    """Prefill and greedy decode of same-length prompts through `model.forward` and preallocated caches.

    A prompt ends with `[gMASK] <sop>` (as `random_prompts` makes them): every token before `<sop>` sees the whole
    prefix, and a new token takes positions (index of `[gMASK]`, 1, 2, ...), GLM's 2D positions.
    """

    def __init__(self, model: GLM, batch: int, max_len: int, compile: bool = False):
        self.model, self.batch = model, batch
        self.caches = model.new_caches(batch, max_len)
        self.compiled = None
        if compile:
            for c in self.caches:  # CUDA graphs update the caches in place
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self.compiled = torch.compile(self._step, mode=mode, fullgraph=True, dynamic=False)

    def _step(self, tok, pos, slot, mask):
        return self.model(tok, pos, mask, self.caches, slot, last_only=True)[:, -1]

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds per step: the median step, which a passing hiccup does not move)."""
        model, device = self.model, self.model.device
        B, T = len(prompts), len(prompts[0])
        ids, position_ids, mask = glm_inputs(prompts, model.config, device)
        S = self.caches[0].k.shape[2]
        key_valid = torch.zeros(1, 1, 1, S, dtype=torch.bool, device=device)
        key_valid[..., :T] = True
        step_pos = torch.tensor([T - 2, 1], device=device).view(1, 2, 1).repeat(B, 1, 1)
        slot = torch.zeros(1, dtype=torch.long, device=device)
        sync(device)
        t0 = time.perf_counter()
        tok = model(ids, position_ids, mask, self.caches, torch.arange(T, device=device), last_only=True)[:, -1]
        tok = tok.argmax(-1, keepdim=True)
        sync(device)
        t1 = time.perf_counter()
        steps = []
        for i in range(new_tokens - 1):
            t_step = time.perf_counter()
            slot.fill_(T + i)
            step_pos[:, 1] = 2 + i
            if self.compiled is not None:  # fixed shapes: the mask covers every slot, unwritten ones hidden
                key_valid[..., T + i] = True
                logits = self.compiled(tok, step_pos, slot, key_valid.expand(B, 1, 1, S))
            else:  # eager: no mask, attention reads only the slots written so far
                logits = self._step(tok, step_pos, slot, None)
            tok = logits.argmax(-1, keepdim=True)
            sync(device)
            steps.append(time.perf_counter() - t_step)
        return t1 - t0, statistics.median(steps) if steps else 0.0


def current_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def stock_cpu_operators(on: bool):
    """With `on`, QuantLinear behaves as where our CPU kernel cannot be built: torch's stock operators serve."""
    import glm.quant.linear as qlinear

    saved = qlinear.cpu_kernels
    if on:
        qlinear.cpu_kernels = lambda: None
    try:
        yield
    finally:
        qlinear.cpu_kernels = saved


def bench_model(cfg, device, dtype, quant, group_size, kernels, args, bandwidth) -> list[dict]:
    """One model, timed at every batch size and (quantized, CPU) every CPU kernel mode in `kernels`."""
    if kernels == ["stock"]:
        with stock_cpu_operators(True):
            return bench_model(cfg, device, dtype, quant, group_size, [None], args, bandwidth)
    what = str(dtype).removeprefix("torch.") + (f", int{quant}" + (f"-g{group_size}" if group_size else "")
                                                 if quant else "")
    progress(f"building a random {cfg.num_layers}-block model ({what})")
    model = build_random(cfg, device, dtype, quant, group_size, quant_lm_head=args.quant_lm_head)
    gc.collect()
    if device.type == "cpu":  # the heap keeps the freed float copies of quantized weights; the loader trims too
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)
    loaded = current_memory(device)
    rows = []
    for kernel in kernels:
        if quant and kernel:
            from glm.quant import set_cpu_kernel

            set_cpu_kernel(model, kernel)
        if args.grammar:
            rows += grammar_rows(model, cfg, args, f"{what}{f', {kernel} kernel' if quant and kernel else ''}")
            continue
        for batch in args.batch:
            reset_peak(device)  # the peak of serving this model, not of building it from random float weights
            prompts = random_prompts(cfg, batch, args.prompt)
            row = f"{what}{f', {kernel} kernel' if quant and kernel else ''}, batch {batch}"
            dec = GreedyDecoder(model, batch, args.prompt + args.new, compile=args.compile)
            progress(f"{row}: warm-up" + (" and compilation" if args.compile else ""))
            dec.run(prompts, min(8, args.new))  # warm-up (and compilation)
            # The fastest of several runs: on a machine shared with other work, the least disturbed one.
            runs = []
            for i in range(args.repeats):
                progress(f"{row}: run {i + 1} of {args.repeats} ({args.prompt}-token prompt, {args.new} new tokens)")
                runs.append(dec.run(prompts, args.new))
            prefill, per_tok = min(r[0] for r in runs), min(r[1] for r in runs)
            naive_tok = None
            if args.compile and not args.no_naive:
                dec.compiled = None
                progress(f"{row}: {args.repeats} eager run(s) to compare")
                naive_tok = min(dec.run(prompts, args.new)[1] for _ in range(args.repeats))
            wbytes = weight_bytes_per_token(model)
            ctx = args.prompt + args.new // 2  # mean context during decode
            step_bytes = wbytes + kv_bytes_per_token(cfg, dtype, ctx, batch)
            rows.append({
                "device": device_name(device),
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "layers": cfg.num_layers,
                "dtype": str(dtype).removeprefix("torch."),
                "quant": f"int{quant}" + (f"-g{group_size}" if group_size else "") if quant else None,
                "cpu_kernel": (kernel or "stock") if quant and device.type == "cpu" else None,
                "quant_lm_head": bool(quant and args.quant_lm_head),
                "compile": args.compile,
                "batch": batch,
                "prompt_len": args.prompt,
                "new_tokens": args.new,
                "prefill_tok_s": round(batch * args.prompt / prefill, 2),
                "decode_tok_s": round(batch / per_tok, 2),
                "decode_ms_per_step": round(per_tok * 1000, 2),
                "eager_decode_ms_per_step": round(naive_tok * 1000, 2) if naive_tok else None,
                "speedup_vs_eager": round(naive_tok / per_tok, 2) if naive_tok else None,
                "model_mem_gb": round(loaded / 1e9, 3),  # process RSS on a CPU, allocated memory on a GPU
                "peak_mem_gb": round(peak_memory(device) / 1e9, 3),
                "weight_gb": round(wbytes / 1e9, 3),
                "bytes_per_step_gb": round(step_bytes / 1e9, 3),
                "bw_gb_s": round(bandwidth / 1e9, 1),  # GPU: copy bandwidth; CPU: max(copy, fp16 GEMV read rate)
                "bw_limit_ms_per_step": round(step_bytes / bandwidth * 1000, 1),
                "frac_of_bw_limit": round(step_bytes / per_tok / bandwidth, 3),
                "date": time.strftime("%Y-%m-%d"),
            })
            del dec
            gc.collect()
    del model
    gc.collect()
    return rows


def grammar_rows(model: GLM, cfg: GLMConfig, args, what: str) -> list[dict]:
    """The decode step of glm.generation's scheduler (sampling with the chat's settings) with every row free, and
    with every row under a JSON schema (glm.generation.grammar, llguidance), at each batch size: the cost of the
    masks. Free and constrained runs alternate, so that both see the same load; each figure is the fastest run's
    median step. `mask_ms` is the time in `allowed_tokens` (llguidance's masks, unpacked) per step, `sampling_ms`
    the time of a step's sampling (the masks included, the forward not): their difference over the free step
    (`json_sampling_overhead`) is the cost of the masks with less noise than the step times' on a busy machine.
    The tokenizer is ChatGLM-6B's own (the tiny test checkpoint's ice_text.model, the same vocabulary)."""
    import glm.generation.scheduler as scheduler
    from glm.engine import ChatGLM
    from glm.generation import CHAT_DEFAULTS
    from glm.tokenizer import Tokenizer

    tok = Tokenizer.from_config(Path(__file__).resolve().parents[1] / "tests/fixtures/chatglm-tiny/ice_text.model",
                                cfg)
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}  # long strings
    masks: list[float] = []
    allowed_tokens = scheduler.allowed_tokens

    def timed(*a):
        t0 = time.perf_counter()
        out = allowed_tokens(*a)
        masks.append(time.perf_counter() - t0)
        return out

    scheduler.allowed_tokens = timed
    rows = []
    for batch in args.batch:
        m = ChatGLM(model, tok, max_batch=batch)
        starts: list[float] = []
        m.scheduler.step_hooks.append(lambda n: starts.append(time.perf_counter()))
        samples: list[float] = []  # time of each step's sampling (masks included), the forward excluded
        sample_and_emit = m.scheduler._sample_and_emit

        def timed_sampling(*a, sample_and_emit=sample_and_emit):
            t0 = time.perf_counter()
            sample_and_emit(*a)
            samples.append(time.perf_counter() - t0)

        m.scheduler._sample_and_emit = timed_sampling
        prompts = random_prompts(cfg, batch, args.prompt)
        best = {"free": float("inf"), "json": float("inf")}
        sampling = {"free": float("inf"), "json": float("inf")}
        mask_ms = float("inf")
        for i in range(args.repeats + 1):  # the first pair warms up
            for label, sc in (("free", None), ("json", schema)):
                progress(f"{what}, batch {batch}: {label} rows, run {i} of {args.repeats}")
                config = CHAT_DEFAULTS.replace(max_length=None, max_new_tokens=args.new if i else 8, json_schema=sc,
                                               stop_at_eos=sc is not None)
                starts.clear()
                masks.clear()
                samples.clear()
                n_new = [len(list(r)) for r in [m.submit(p, config.replace(seed=j)) for j, p in enumerate(prompts)]]
                if i:
                    best[label] = min(best[label], statistics.median(b - a for a, b in zip(starts, starts[1:])))
                    sampling[label] = min(sampling[label], statistics.median(samples[1:]))  # decode steps only
                    if sc is not None:
                        mask_ms = min(mask_ms, statistics.median(masks) * 1000)
                if min(n_new) < config.max_new_tokens:
                    progress(f"warning: a row ended after {min(n_new)} tokens")
        rows.append({"device": device_name(model.device), "threads": torch.get_num_threads(),
                     "layers": cfg.num_layers, "mode": what, "batch": batch, "prompt_len": args.prompt,
                     "new_tokens": args.new, "free_ms_per_step": round(best["free"] * 1000, 2),
                     "json_ms_per_step": round(best["json"] * 1000, 2), "mask_ms_per_step": round(mask_ms, 3),
                     "free_sampling_ms": round(sampling["free"] * 1000, 3),
                     "json_sampling_ms": round(sampling["json"] * 1000, 3),
                     "json_overhead": round(best["json"] / best["free"] - 1, 3),
                     "json_sampling_overhead": round((sampling["json"] - sampling["free"]) / best["free"], 4),
                     "date": time.strftime("%Y-%m-%d")})
        progress(json.dumps(rows[-1]))  # now: the next batch size may take long
    scheduler.allowed_tokens = allowed_tokens
    return rows


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# name: (dtype or None for the activation dtype, bits, group size, CPU kernel mode)
MODES = {
    "fp32": (torch.float32, None, None, None),
    "bf16": (torch.bfloat16, None, None, None),
    "fp16": (torch.float16, None, None, None),
    "int8": (None, 8, None, "exact"),
    "int8-fast": (None, 8, None, "fast"),
    "int4": (None, 4, None, "exact"),
    "int4-fast": (None, 4, None, "fast"),
    "int4-g128": (None, 4, 128, "exact"),
    "int4-g128-fast": (None, 4, 128, "fast"),
    # torch's stock weight-only operators, as where our kernel cannot be built (and as before it existed)
    "int8-stock": (None, 8, None, "stock"),
    "int4-stock": (None, 4, None, "stock"),
}


def setup(args, cpu_modes: str) -> tuple[torch.device, GLMConfig, torch.dtype, list[str]]:
    """What --device, --threads, --layers, --act-dtype and --modes ask for (shared with bench_train.py): the device,
    the model shape, the activation dtype of quantized modes, and the modes (default: fp16,int8,int4 on CUDA,
    `cpu_modes` on a CPU). Raises ValueError with a one-line message."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GLMConfig.from_name("chatglm-6b")
    if args.layers:
        cfg.num_layers = args.layers
    modes = (args.modes or ("fp16,int8,int4" if device.type == "cuda" else cpu_modes)).split(",")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    act = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.act_dtype]
    return device, cfg, act or (torch.float16 if device.type == "cuda" else torch.bfloat16), modes


# The shape and length of a run: the default, and --quick's (whatever is given on the command line stays).
FULL = {"layers": None, "prompt": 512, "new": 256, "repeats": 3}
QUICK = {"layers": 4, "prompt": 16, "new": 32, "repeats": 1}  # docs/benchmarks.md's lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quick", action="store_true",
                   help="a quick run (a few minutes on a CPU): " + ", ".join(f"--{k} {v}" for k, v in QUICK.items())
                        + ", unless given")
    p.add_argument("--layers", type=int, default=None, help="number of blocks (default 28: the full model)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated from {','.join(MODES)} "
                        "(default: cuda fp16,int8,int4; cpu fp32,bf16,int8,int4)")
    p.add_argument("--act-dtype", default=None, help="activation dtype of quantized modes (default: fp16 cuda, "
                                                     "bf16 cpu)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,8)")
    p.add_argument("--prompt", type=int, default=None, help=f"prompt tokens (default {FULL['prompt']})")
    p.add_argument("--new", type=int, default=None, help=f"new tokens per run (default {FULL['new']})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs per row; the fastest is reported (default {FULL['repeats']})")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd decode step")
    p.add_argument("--quant-lm-head", action="store_true", help="quantized modes: quantize lm_head too")
    p.add_argument("--no-naive", action="store_true", help="with --compile: skip the eager comparison")
    p.add_argument("--kernels", action="store_true", help="also run the INT8/INT4 kernel micro-benchmarks (CUDA)")
    p.add_argument("--lora-adapters", type=int, default=0, metavar="N",
                   help="time the decode step with N LoRA adapters (r 8 on query_key_value) on N rows of the batch, "
                        "the other rows on the base, against all rows on the base")
    p.add_argument("--grammar", action="store_true",
                   help="instead of the forward alone, time the scheduler's decode step with free rows and with "
                        "rows under a JSON schema (needs llguidance)")
    p.add_argument("--memory-context", type=int, default=0,
                   help="also report peak memory of one generation filling this many tokens (e.g. 2048)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="time the model split over N ranks (glm.load's tensor_parallel) against one process")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batch = [int(b) for b in str(args.batch).split(",")]

    try:
        device, cfg, act, modes = setup(args, "fp32,bf16,int8,int4")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress(f"measuring the memory bandwidth of {device}")
    bandwidth = copy_bandwidth(device)
    if device.type == "cpu":
        bandwidth = max(bandwidth, gemv_read_bandwidth(device))
    torch.set_grad_enabled(False)
    # Modes that differ only in the CPU kernel share one model.
    builds: dict[tuple, list] = {}
    for mode in modes:
        dtype, quant, group, kernel = MODES[mode]
        builds.setdefault((dtype or act, quant, group, kernel == "stock"), []).append(kernel)
    for (dtype, quant, group, _), kernels in builds.items():
        if args.tensor_parallel:
            for row in bench_parallel(cfg, device, dtype, quant, group, args):
                print(json.dumps(row), flush=True)
            continue
        if device.type != "cpu":
            kernels = kernels[:1]
        if args.lora_adapters:
            for row in bench_lora(cfg, device, dtype, quant, group, kernels, args):
                print(json.dumps(row), flush=True)
            continue
        for row in bench_model(cfg, device, dtype, quant, group, kernels, args, bandwidth):
            print(json.dumps(row), flush=True)
        if args.memory_context:
            print(json.dumps(memory_row(cfg, device, dtype, quant, group, args)), flush=True)
    if args.kernels:
        from bench_kernels import kernel_bench  # scripts/bench_kernels.py

        for row in kernel_bench(device=str(device)):
            print(json.dumps(row), flush=True)
    return 0


def bench_lora(cfg, device, dtype, quant, group_size, kernels, args) -> list[dict]:
    """The decode step of each batch size with `--lora-adapters` random adapters on as many rows (the others on the
    base) against every row on the base; the fastest of `--repeats` runs of each, interleaved. Also the CPU time of
    the whole run (prefill included) per new token: on a machine shared with other work it moves less than the wall
    time does."""
    from glm.generation.adapters import Adapters
    from glm.lora import LoRAFactors

    n, r = args.lora_adapters, 8
    progress(f"building a random {cfg.num_layers}-block model with {n} LoRA adapters (r {r} on query_key_value)")
    model = build_random(cfg, device, dtype, quant, group_size, quant_lm_head=args.quant_lm_head)
    bank = Adapters(model)
    g = torch.Generator().manual_seed(0)
    C = cfg.hidden_size
    for k in range(n):  # A as PEFT initialises it (Kaiming-uniform), B small and random (trained, not zero)
        factors = {f"layers.{i}.attention.query_key_value": ((torch.rand(r, C, generator=g) * 2 - 1) / C**0.5,
                                                            torch.randn(3 * C, r, generator=g) * 0.01)
                   for i in range(cfg.num_layers)}
        bank.add(f"adapter{k}", LoRAFactors(factors, scaling=16 / r))
    rows = []
    for kernel, batch in [(k, b) for k in kernels for b in args.batch]:
        if quant and kernel and kernel != "stock":
            from glm.quant import set_cpu_kernel

            set_cpu_kernel(model, kernel)
        prompts = random_prompts(cfg, batch, args.prompt)
        slots = torch.tensor([k + 1 if k < n else 0 for k in range(batch)], device=device)
        dec = GreedyDecoder(model, batch, args.prompt + args.new)
        times: dict[str, list[float]] = {"base": [], "lora": []}
        cpu: dict[str, list[float]] = {"base": [], "lora": []}
        for i in range(args.repeats + 1):  # the first round warms up; the order alternates
            for what, index in (("base", None), ("lora", slots))[:: 1 if i % 2 else -1]:
                rows_are = "all rows on the base" if index is None else f"{n} adapters"
                progress(f"{kernel or ''} kernel, batch {batch}, {rows_are}: run {i}")
                c0 = time.process_time()
                with bank.use(index):
                    t = dec.run(prompts, args.new)[1]
                if i:
                    times[what].append(t)
                    cpu[what].append((time.process_time() - c0) / args.new)
        base, lora = min(times["base"]), min(times["lora"])
        base_cpu, lora_cpu = min(cpu["base"]), min(cpu["lora"])
        threads = torch.get_num_threads() if device.type == "cpu" else None
        rows.append({"device": device_name(device), "threads": threads, "layers": cfg.num_layers,
                     "dtype": str(dtype).removeprefix("torch."),
                     "quant": f"int{quant}" + (f"-g{group_size}" if group_size else "") if quant else None,
                     "cpu_kernel": kernel if quant and device.type == "cpu" else None,
                     "quant_lm_head": bool(quant and args.quant_lm_head), "batch": batch, "lora_adapters": n,
                     "lora_rows": min(n, batch), "lora_r": r, "prompt_len": args.prompt, "new_tokens": args.new,
                     "base_ms_per_step": round(base * 1000, 2), "lora_ms_per_step": round(lora * 1000, 2),
                     "ratio": round(lora / base, 3), "base_cpu_ms_per_token": round(base_cpu * 1000, 2),
                     "lora_cpu_ms_per_token": round(lora_cpu * 1000, 2), "cpu_ratio": round(lora_cpu / base_cpu, 3),
                     "date": time.strftime("%Y-%m-%d")})
    return rows




def bench_parallel(cfg, device, dtype, quant, group_size, args) -> list[dict]:
    """One mode over `--tensor-parallel` ranks and in one process, through glm.load and the scheduler's Runner."""
    import tempfile

    import glm
    from glm.loader import save_checkpoint

    what = str(dtype).removeprefix("torch.") + (f", int{quant}" + (f"-g{group_size}" if group_size else "")
                                                 if quant else "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="glm-bench-") as folder:
        progress(f"writing a random {cfg.num_layers}-block checkpoint ({str(dtype).removeprefix('torch.')})")
        model = build_random(cfg, torch.device("cpu"), dtype, None, None)
        save_checkpoint(model, folder)
        del model
        gc.collect()
        dev = "cuda" if device.type == "cuda" else "cpu"
        for n in (args.tensor_parallel, None):
            progress(f"{what}: loading " + (f"over {n} ranks" if n else "in one process"))
            m = glm.load(folder, device=dev, dtype=dtype, quant=quant, group_size=group_size,
                         max_batch=max(args.batch), tensor_parallel=n)
            world = getattr(m.scheduler.runner, "world", None)
            if world is not None:
                world.timed = True  # on GPUs: the collectives' own time, not their launch
            for batch in args.batch:
                who = f"{n} ranks" if n else "one process"
                progress(f"{what}, batch {batch}, {who}: {args.repeats} run(s)")
                runs = [_runner_run(m, world, batch, args) for _ in range(args.repeats + 1)][1:]  # the first warms up
                prefill, step, comm = min(runs, key=lambda r: r[1])
                rows.append({
                    "device": device_name(device), "threads": torch.get_num_threads() if dev == "cpu" else None,
                    "layers": cfg.num_layers, "dtype": str(dtype).removeprefix("torch."),
                    "quant": f"int{quant}" + (f"-g{group_size}" if group_size else "") if quant else None,
                    "tensor_parallel": n, "batch": batch, "prompt_len": args.prompt, "new_tokens": args.new,
                    "prefill_tok_s": round(batch * args.prompt / prefill, 2),
                    "decode_ms_per_step": round(step * 1000, 2),
                    "collective_ms_per_step": round(comm * 1000, 2) if n else None,
                    "collective_share": round(comm / step, 3) if n else None,
                    "weight_gb_per_rank": round(m.memory_bytes() / 1e9, 3), "date": time.strftime("%Y-%m-%d"),
                })
            del m
            gc.collect()
            if world is not None:
                world.close()  # the ranks stop, and this process takes all of its CPU threads back
    return rows


@torch.inference_mode()
def _runner_run(m, world, batch: int, args) -> tuple[float, float, float]:
    """(prefill s, median decode step s, the model's collectives s in that step) of `batch` rows through the Runner."""
    runner, cfg = m.scheduler.runner, m.config
    prompts = random_prompts(cfg, batch, args.prompt)
    rows = list(range(batch))
    runner.ensure(args.prompt + args.new)
    sync(m.device)
    t0 = time.perf_counter()
    toks = runner.prefill(rows, prompts).argmax(-1).tolist()
    sync(m.device)
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(args.new - 1):
        c0, t0 = world.comm_seconds if world else 0.0, time.perf_counter()
        toks = runner.decode(rows, toks).argmax(-1).tolist()
        sync(m.device)
        steps.append((time.perf_counter() - t0, (world.comm_seconds if world else 0.0) - c0))
    for i in rows:
        runner.release(i)
    steps.sort()
    step, comm = steps[len(steps) // 2]
    return prefill, step, comm


def memory_row(cfg, device, dtype, quant, group_size, args) -> dict:
    """Peak memory of one generation whose context reaches `--memory-context` tokens."""
    progress(f"peak memory of one generation of {args.memory_context} tokens")
    model = build_random(cfg, device, dtype, quant, group_size, quant_lm_head=args.quant_lm_head)
    gc.collect()
    reset_peak(device)
    n = args.memory_context
    GreedyDecoder(model, 1, n).run(random_prompts(cfg, 1, n - 16), 16)
    row = {"device": device_name(device), "layers": cfg.num_layers, "dtype": str(dtype).removeprefix("torch."),
           "quant": f"int{quant}" + (f"-g{group_size}" if group_size else "") if quant else None,
           "context": n, "peak_mem_gb": round(peak_memory(device) / 1e9, 3), "date": time.strftime("%Y-%m-%d")}
    del model
    gc.collect()
    return row


if __name__ == "__main__":
    sys.exit(main())
