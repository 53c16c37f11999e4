#!/usr/bin/env python
"""Benchmark a P-Tuning v2 (or LoRA) training step of a ChatGLM-6B-shaped model with random weights (no download).

One JSON row per mode: tokens/s of a training step (forward, backward to the prefix, AdamW step) and peak memory,
on rows of the official shape (`--source` prompt tokens with `[gMASK] <sop>`, `--target` response tokens with
`<eop>`, no padding), a float32 prefix of `--pre-seq-len` tokens, and a frozen base in fp16/bf16, INT8 or INT4.

    python scripts/bench_train.py --layers 2                  # quick, CPU: bf16, int8, int4
    python scripts/bench_train.py --device cuda               # the full model on a GPU: fp16, int8, int4
    python scripts/bench_train.py --modes int4 --lora-rank 8  # LoRA r=8 on query_key_value instead of a prefix
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402
    MODES,
    build_random,
    current_memory,
    device_name,
    peak_memory,
    reset_peak,
    setup,
    stock_cpu_operators,
    sync,
)

from glm.config import GLMConfig  # noqa: E402
from glm.finetune import add_lora, add_prefix, trainable_part, training_loss  # noqa: E402


def random_rows(cfg: GLMConfig, batch: int, source: int, target: int, seed: int = 0):
    """(input_ids, labels) of `batch` full-length rows: source - 1 + 2 + target - 2 + 1 = source + target tokens."""
    g = torch.Generator().manual_seed(seed)
    hi = min(cfg.mask_token_id, cfg.vocab_size) - 1
    ids, labels = [], []
    for _ in range(batch):
        a = torch.randint(20, hi, (source - 1,), generator=g).tolist()
        b = torch.randint(20, hi, (target - 2,), generator=g).tolist()
        row = a + [cfg.gmask_token_id, cfg.bos_token_id] + b + [cfg.eos_token_id]
        ids.append(row)
        labels.append([-100] * source + row[source:])
    return torch.tensor(ids), torch.tensor(labels)


def bench_mode(cfg, device, dtype, quant, group_size, kernel, args) -> dict:
    model = build_random(cfg, device, dtype, quant, group_size)
    if quant and kernel in ("exact", "fast"):  # the forward's CPU kernel; the backward dequantizes either way
        from glm.quant import set_cpu_kernel

        set_cpu_kernel(model, kernel)
    if cfg.tie_word_embeddings:  # as the release loads: one table for the embedding and the head
        model.lm_head.weight = model.word_embeddings.weight
    if args.lora_rank:  # LoRA factors on query_key_value (PEFT's usual target for ChatGLM-6B) instead of a prefix
        add_lora(model, args.lora_rank, alpha=2 * args.lora_rank, seed=0)
    else:
        add_prefix(model, args.pre_seq_len, args.prefix_projection, seed=0)
    part = trainable_part(model)
    params = part.params
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    ids, labels = random_rows(cfg, args.batch, args.source, args.target)
    ids, labels = ids.to(device), labels.to(device)
    gc.collect()
    loaded = current_memory(device)
    reset_peak(device)  # the peak of training, not of building the model from random float weights
    for mod in part.modules:
        mod.train()

    def step():
        loss = training_loss(model, ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # The warm-up step also counts the bytes autograd keeps for backward (parameters and buffers excluded).
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    row = {
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "layers": cfg.num_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "quant": f"int{quant}" + (f"-g{group_size}" if group_size else "") if quant else None,
        "cpu_kernel": kernel if quant and device.type == "cpu" else None,
        "batch": args.batch,
        "source": args.source,
        "target": args.target,
        "pre_seq_len": None if args.lora_rank else args.pre_seq_len,
        "prefix_projection": None if args.lora_rank else args.prefix_projection,
        "lora_rank": args.lora_rank,
        "trainable_params": sum(p.numel() for p in params),
        "step_s": round(dt, 3),
        "train_tok_s": round(args.batch * (args.source + args.target) / dt, 1),
        "loss": round(loss.item(), 3),
        "model_mem_gb": round(loaded / 1e9, 3),  # process RSS on a CPU, allocated memory on a GPU
        "peak_mem_gb": round(peak_memory(device) / 1e9, 3),
        "saved_activations_mb": round(sum(kept.values()) / 1e6, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":  # what nvidia-smi shows, less the CUDA context
        row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--layers", type=int, default=None, help="number of blocks (default 28: the full model)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated from {','.join(MODES)} (default: cuda fp16,int8,int4; cpu bf16,int8,int4)")
    p.add_argument("--act-dtype", default=None, help="activation dtype of quantized modes (default: fp16 cuda, "
                                                     "bf16 cpu)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--source", type=int, default=64, help="prompt tokens, [gMASK] included (official: 64)")
    p.add_argument("--target", type=int, default=64, help="response tokens, <sop> and <eop> included (official: 64)")
    p.add_argument("--pre-seq-len", type=int, default=128, help="prefix tokens (official: 128)")
    p.add_argument("--prefix-projection", action="store_true")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA factors of this rank instead of a prefix")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)

    try:
        device, cfg, act, modes = setup(args, "bf16,int8,int4")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for mode in modes:
        dtype, quant, group, kernel = MODES[mode]
        with stock_cpu_operators(kernel == "stock"):
            row = bench_mode(cfg, device, dtype or act, quant, group, kernel, args)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
