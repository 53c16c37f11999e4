"""The training loop: data order, evaluation, checkpoints (save, find, resume) and `train`."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from glm.errors import CheckpointError
from glm.finetune.data import IGNORE
from glm.finetune.distributed import Ranks
from glm.finetune.loss import ptuning_loss
from glm.finetune.part import Part, prefix_part
from glm.finetune.prefix import net_of


@dataclass
class TrainConfig:
    """How to train. The defaults are the official `ptuning/train.sh` ones (AdamW, no weight decay, linear decay
    to 0 without warmup, gradient norm clipped at 1.0: the Hugging Face Trainer's defaults)."""

    learning_rate: float = 2e-2
    batch_size: int = 1
    gradient_accumulation_steps: int = 16
    max_steps: int = 3000
    save_steps: int = 1000
    logging_steps: int = 10
    seed: int = 42
    max_grad_norm: float = 1.0


def batch_order(n_rows: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Rows of the `index`-th micro-batch: each epoch is a fresh permutation seeded by (seed, epoch), so any
    micro-batch is known without replaying the ones before it (which makes `--resume` exact)."""
    per_epoch = math.ceil(n_rows / batch_size)
    epoch, j = divmod(index, per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[j * batch_size : (j + 1) * batch_size].tolist()


def _real_tokens(labels: Tensor) -> int:
    """Tokens of a batch up to each row's `<eop>` (the pads after it do no work)."""
    labelled = labels != IGNORE
    last = torch.where(labelled.any(1), labelled.shape[1] - 1 - labelled.flip(1).int().argmax(1), 0)
    return int((last + 1).sum())


@torch.no_grad()
def evaluate(m, input_ids: Tensor, labels: Tensor, batch_size: int) -> float:
    """Mean loss over every labelled token of a data set (eval mode: no prefix dropout). Under FSDP every rank
    runs it (each forward gathers the weights from all of them)."""
    net = net_of(m)
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    for r in range(0, len(input_ids), batch_size):
        lab = labels[r : r + batch_size]
        n = int((lab[:, 1:] != IGNORE).sum())
        total += float(ptuning_loss(net, input_ids[r : r + batch_size], lab)) * n
        count += n
    net.train(was_training)
    return total / max(count, 1)


def save_training_checkpoint(part: Part, folder: Path, step: int, optimizer: torch.optim.Optimizer,
                             log: list[dict]) -> None:
    """`checkpoint-N/`: the trained part in the official layout, plus what `--resume` needs (optimizer, step, log).
    Called on every rank (FSDP gathers its shards); rank 0 writes."""
    part.save(folder)
    opt_state = part.optimizer_state(optimizer)
    if part.ranks.main:
        torch.save(opt_state, folder / "optimizer.pt")
        state = {"global_step": step, "log_history": log}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A training checkpoint folder: `path` itself, or the latest `checkpoint-N` inside it."""
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    found = sorted(
        (int(c.name.split("-", 1)[1]), c)
        for c in (p.glob("checkpoint-*") if p.is_dir() else [])
        if c.name.split("-", 1)[1].isdigit() and (c / "trainer_state.json").is_file()
    )
    if not found:
        raise CheckpointError(f"{p} is not a glm-finetune checkpoint (no trainer_state.json) and holds none")
    return found[-1][1]


def load_training_state(folder: Path) -> tuple[int, dict, list[dict]]:
    """(step, optimizer state, log) of a checkpoint written by `save_training_checkpoint`."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        return int(state["global_step"]), opt, list(state.get("log_history", []))
    except (OSError, json.JSONDecodeError, KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {folder} ({type(e).__name__}: {e}): it is incomplete") from None


def train(
    m,
    input_ids: list[list[int]],
    labels: list[list[int]],
    cfg: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    validation: tuple[list[list[int]], list[list[int]]] | None = None,
    resume: Path | None = None,
    progress: bool = False,
    echo=None,
    part: Part | None = None,
) -> list[dict]:
    """Train the prefix of `m` (a `glm.load` model with a prefix), or another `part` of it, and save it; returns
    the log.

    Writes `output_dir/checkpoint-N/` every `save_steps` steps, and the final prefix in `output_dir` itself
    (`config.json`, `pytorch_model.bin`), with `train_log.jsonl`: one JSON object per logged step.
    `resume`: a checkpoint folder whose prefix `m` already holds (load it with `glm.load(..., ptuning=...)`).
    `echo`: a stream for one line per logged step when there is no progress bar.
    `part`: what trains (`glm.finetune.part`); default: the prefix, on the ranks torchrun started (or alone).
    """
    net = net_of(m)
    part = part or prefix_part(m)
    ranks: Ranks = part.ranks  # only rank 0 logs and writes; each rank takes its share of every step's rows
    echo, progress = (echo, progress) if ranks.main else (None, False)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = part.params
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    step, log = 0, []
    if resume is not None:
        step, opt_state, log = load_training_state(resume)
        part.load_optimizer_state(opt, opt_state)
    ids = torch.tensor(input_ids, dtype=torch.long)
    lab = torch.tensor(labels, dtype=torch.long)
    val = tuple(torch.tensor(v, dtype=torch.long) for v in validation) if validation else None
    log_file = (out / "train_log.jsonl" if ranks.main else Path(os.devnull)).open("w", encoding="utf-8")
    for entry in log:  # a resumed run's log starts with the checkpoint's history
        log_file.write(json.dumps(entry) + "\n")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)

    def record(entry: dict) -> None:
        log.append(entry)
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()
        if bar is None and echo is not None:
            print(" ".join(f"{k} {v}" for k, v in entry.items()), file=echo, flush=True)

    net.train()  # the prefix dropout; the rest of the model has no dropout
    window_loss, window_tokens, window_steps, t0 = 0.0, 0, 0, time.perf_counter()
    try:
        while step < cfg.max_steps:
            step_loss = 0.0
            for micro, index in enumerate(ranks.micro_batches(step, cfg.gradient_accumulation_steps)):
                # Seeded per micro-batch: the dropout masks are reproducible, the same after --resume and on any
                # number of ranks.
                torch.manual_seed(cfg.seed * 100_003 + index)
                rows = batch_order(len(ids), cfg.batch_size, cfg.seed, index)
                with ranks.sync(part.module, last=micro == cfg.gradient_accumulation_steps - 1):
                    loss = ptuning_loss(part.module, ids[rows], lab[rows]) / cfg.gradient_accumulation_steps
                    loss.backward()
                step_loss += loss.item()
                window_tokens += _real_tokens(lab[rows])
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            for group in opt.param_groups:  # linear decay to 0, no warmup (the Trainer's default schedule)
                group["lr"] = cfg.learning_rate * (1 - step / cfg.max_steps)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            window_loss += step_loss
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                if net.device.type == "cuda":
                    torch.cuda.synchronize(net.device)
                dt = time.perf_counter() - t0
                window_loss, window_tokens = ranks.sum(window_loss / ranks.world, window_tokens)  # over the ranks
                entry = {"step": step, "loss": round(window_loss / window_steps, 6),
                         "learning_rate": opt.param_groups[0]["lr"], "tokens_per_s": round(window_tokens / dt, 1)}
                if net.device.type == "cuda":
                    entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(net.device) / 1e9, 3)
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                record(entry)
                window_loss, window_tokens, window_steps, t0 = 0.0, 0, 0, time.perf_counter()
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                if val is not None:
                    record({"step": step, "eval_loss": round(evaluate(net, *val, cfg.batch_size), 6)})
                save_training_checkpoint(part, out / f"checkpoint-{step}", step, opt, log)
                t0 = time.perf_counter()  # saving is not training time
    finally:
        if bar is not None:
            bar.close()
        log_file.close()
        net.eval()
    part.save(out)
    return log


__all__ = ["TrainConfig", "batch_order", "evaluate", "find_checkpoint", "load_training_state",
           "save_training_checkpoint", "train"]
