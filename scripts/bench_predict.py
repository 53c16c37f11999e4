#!/usr/bin/env python
"""Benchmark glm-finetune's prediction (`--do_predict --predict_with_generate`): rows per second generating for a
whole test file through the scheduler, all rows submitted at once and `--max-batch` of them decoded together,
against one row at a time. A ChatGLM-6B-shaped model with random weights (no download), the real tokenizer.

    python scripts/bench_predict.py                       # CPU: 4 layers, INT4 (head too), 64 rows
    python scripts/bench_predict.py --layers 28 --device cuda --batches 1,16,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_random, device_name  # noqa: E402

from glm.config import GLMConfig  # noqa: E402
from glm.engine import ChatGLM  # noqa: E402
from glm.finetune import OFFICIAL_GENERATION, generate_rows  # noqa: E402
from glm.tokenizer import Tokenizer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quant", type=int, choices=(0, 4, 8), default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens a row (ADGEN's are about 30)")
    p.add_argument("--new", type=int, default=16, help="tokens generated a row (random weights never stop early)")
    p.add_argument("--batches", default="1,64", help="--max-batch values to time; 1 is one row at a time")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = GLMConfig.from_name("chatglm-6b")
    cfg.num_layers = args.layers
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_random(cfg, device, dtype, args.quant or None, None, quant_lm_head=bool(args.quant))
    tok = Tokenizer.from_config(ROOT / "tests/fixtures/chatglm-tiny/ice_text.model", cfg)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(20, 60000, (args.prompt - 2,), generator=g).tolist() + [tok.gmask_id, tok.bos_id]
               for _ in range(args.rows)]
    config = OFFICIAL_GENERATION.replace(max_length=None, max_new_tokens=args.new)
    m = ChatGLM(model, tok)
    generate_rows(m, prompts[:2], config, max_batch=2)  # warm-up: caches, kernels
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        t0 = time.perf_counter()
        preds, _ = generate_rows(m, prompts, config, max_batch=b)
        dt = time.perf_counter() - t0
        rows.append({"device": device_name(device), "layers": args.layers, "quant": args.quant, "rows": args.rows,
                     "prompt_tokens": args.prompt, "new_tokens": args.new, "max_batch": b, "seconds": round(dt, 2),
                     "rows_per_s": round(args.rows / dt, 3)})
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        print(json.dumps({"speedup": round(rows[-1]["rows_per_s"] / rows[0]["rows_per_s"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
