#!/usr/bin/env python
"""Per-rank memory of full fine-tuning (`glm-finetune --full`, FSDP2): measured, and computed for ChatGLM-6B.

Measured: N ranks (gloo on a CPU, NCCL on GPUs) shard the tiny checkpoint (or `--model`), take one AdamW step, and
each reports the bytes it holds of float32 master weights, float32 gradients and Adam's two moments (and the CUDA
peak on a GPU). Computed: the same accounting for ChatGLM-6B at N = 1, 2, 4, 8, plus the bfloat16 working copy of
the units FSDP gathers (the root unit: embedding, final layernorm, head; and two blocks, one prefetched).

    python scripts/full_memory.py                    # tiny checkpoint, N = 1, 2, 4 on the CPU
    python scripts/full_memory.py --device cuda --nproc 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glm.config import GLMConfig  # noqa: E402


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def rank_main(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import glm
    from glm.finetune import training_loss
    from glm.finetune.distributed import finish, start
    from glm.finetune.full import full_part

    ranks, device = start(args.device, 120, need_group=True)
    try:
        m = glm.load(args.model, device="cpu", dtype="float32")
        part = full_part(m, ranks, torch.bfloat16 if ranks.device.type == "cuda" else torch.float32)
        opt = torch.optim.AdamW(part.params, lr=1e-4, weight_decay=0.0)
        cfg = m.config
        ids = [[5 + i for i in range(60)] + [cfg.gmask_token_id, cfg.bos_token_id] + [7] * 60 + [cfg.eos_token_id]]
        labels = [[-100] * 61 + ids[0][61:]]
        training_loss(part.module, ids * 4, labels * 4).backward()
        opt.step()
        row = {"rank": rank, "world": world,
               "weights_mb": sum(_local_bytes(p) for p in part.params) / 1e6,
               "grads_mb": sum(_local_bytes(p.grad) for p in part.params) / 1e6,
               "adam_mb": sum(_local_bytes(v) for s in opt.state.values() for k, v in s.items()
                              if k in ("exp_avg", "exp_avg_sq")) / 1e6}
        if ranks.device.type == "cuda":
            row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
        queue.put(row)
    finally:
        finish()


def computed(cfg: GLMConfig, world: int) -> dict:
    """ChatGLM-6B's per-rank bytes (GB) under FSDP2 with bfloat16 compute and float32 master state."""
    h, f, v, n = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size, cfg.num_layers
    block = 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h + 4 * h
    root = v * h * (1 if cfg.tie_word_embeddings else 2) + 2 * h
    p = n * block + root
    gb = 1e9
    return {"params_b": round(p / 1e9, 3), "world": world, "fp32_weights_gb": round(4 * p / world / gb, 2),
            "fp32_grads_gb": round(4 * p / world / gb, 2), "adam_gb": round(8 * p / world / gb, 2),
            "sharded_total_gb": round(16 * p / world / gb, 2),
            "bf16_working_copy_gb": round(2 * (root + 2 * block) / gb, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "chatglm-tiny"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    for world in args.nproc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        mp.start_processes(rank_main, args=(world, port, args, queue), nprocs=world, start_method="spawn")
        for row in sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"]):
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    six_b = GLMConfig(vocab_size=130528, bos_token_id=130004, eos_token_id=130005, mask_token_id=130000,
                      gmask_token_id=130001, pad_token_id=3)  # the release's config.json (head tied)
    for world in (1, 2, 4, 8):
        print(json.dumps({"model": "chatglm-6b (computed)", **computed(six_b, world)}))


if __name__ == "__main__":
    main()
