"""What the P-Tuning v2 tests share: the golden fixture, the command in its own process, random rows and a short
prefix training (a plain module rather than a conftest, whose name would shadow `tests/conftest.py`)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from glm_testutil import FIXTURES, golden

from glm.finetune import add_prefix, prefix_parameters, ptuning_loss, read_rows

ROOT = Path(__file__).parents[2]
TRAIN = FIXTURES / "chatglm-tiny-ptuning-train"
BASE = FIXTURES / "chatglm-tiny"
G, GT = golden("chatglm-tiny-ptuning-train")
LOSS_TOL, GRAD_RTOL = 1e-5, 1e-4
OPTS = dict(max_source_length=G["max_source_length"], max_target_length=G["max_target_length"],
            prompt_column=G["prompt_column"], response_column=G["response_column"],
            history_column=G["history_column"])


def golden_rows() -> list[dict]:
    return read_rows(TRAIN / "train.json")


def finetune(*args, timeout=120, cwd=ROOT):
    """`glm-finetune ARGS` as a user runs it (the console script calls the same `main`), in its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "glm.finetune", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def random_rows(cfg, lengths, target=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + target + 3
    ids, labels = [], []
    for n in lengths:
        a, b = (torch.randint(10, 900, (k,), generator=g).tolist() for k in (n, target))
        row = a + [cfg.gmask_token_id, cfg.bos_token_id] + b + [cfg.eos_token_id]
        pad = T - len(row)
        ids.append(row + [cfg.pad_token_id] * pad)
        labels.append([-100] * (n + 1) + row[n + 1 :] + [-100] * pad)
    return ids, labels


def train_prefix(m, steps: int = 12) -> list[float]:
    """A 6-token prefix trained for `steps` AdamW steps on two random rows; the loss of each step."""
    add_prefix(m, 6, seed=0)
    opt = torch.optim.AdamW(prefix_parameters(m), lr=0.1, weight_decay=0.0)
    ids, labels = random_rows(m.config, (12, 20))
    losses = []
    for _ in range(steps):
        loss = ptuning_loss(m, ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
