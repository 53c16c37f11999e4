"""The training loop: data order, evaluation, checkpoints (save, find, resume) and `train`, for any trainable part
(a P-Tuning prefix, LoRA factors or every weight: `glm.finetune.part`)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from glm.errors import CheckpointError, TrainingError
from glm.finetune.data import IGNORE
from glm.finetune.distributed import Ranks
from glm.finetune.loss import training_loss
from glm.finetune.part import Part, trainable_part
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
    eval_batch_size: int = 8


class Interrupted(KeyboardInterrupt):
    """Ctrl+C during training; `checkpoint`: the folder saved at the last completed step (None: none was)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(step)
        self.step, self.checkpoint = step, checkpoint


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


class _eval_mode:
    """Every module in eval mode (no dropout) inside the block, each put back as it was after it."""

    def __init__(self, net):
        self.modes = {mod: mod.training for mod in net.modules()}
        self.net = net

    def __enter__(self):
        self.net.eval()

    def __exit__(self, *exc):
        for mod, was in self.modes.items():
            mod.training = was


@torch.no_grad()
def evaluate(m, input_ids: Tensor, labels: Tensor, batch_size: int) -> float:
    """Mean loss over every labelled token of a data set (eval mode: no dropout). Under FSDP every rank runs it
    (each forward gathers the weights from all of them)."""
    net = net_of(m)
    total, count = 0.0, 0
    with _eval_mode(net):
        for r in range(0, len(input_ids), batch_size):
            lab = labels[r : r + batch_size]
            n = int((lab[:, 1:] != IGNORE).sum())
            total += float(training_loss(net, input_ids[r : r + batch_size], lab)) * n
            count += n
    return total / max(count, 1)


def save_training_checkpoint(part: Part, folder: Path, step: int, optimizer: torch.optim.Optimizer,
                             log: list[dict]) -> None:
    """`checkpoint-N/`: the trained part in its own layout, plus what `--resume` needs (optimizer, step, log);
    trainer_state.json last, which marks the checkpoint complete. Called on every rank (FSDP gathers its shards);
    rank 0 writes."""
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


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint was saved at (its trainer_state.json)."""
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot resume from {folder} ({type(e).__name__}: {e}): its trainer_state.json is "
                              "damaged; resume from another checkpoint") from None


def load_training_state(folder: Path) -> tuple[int, dict, list[dict]]:
    """(step, optimizer state, log) of a checkpoint written by `save_training_checkpoint`."""
    step = checkpoint_step(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        return step, opt, list(state.get("log_history", []))
    except (OSError, json.JSONDecodeError, KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {folder} ({type(e).__name__}: {e}): it is incomplete") from None


def _load_optimizer(part: Part, opt: torch.optim.Optimizer, state: dict, folder: Path) -> None:
    try:
        part.load_optimizer_state(opt, state)
        for p, st in opt.state.items():  # load_state_dict checks the counts only, not the shapes
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                    raise ValueError(f"its {k} of shape {tuple(v.shape)} is for a parameter of another shape, "
                                     f"{tuple(p.shape)}")
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{folder}/optimizer.pt does not fit this run's trainable parameters ({e}): resume "
                              "with the settings the checkpoint was trained with") from None


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
    scorer: Callable[[], dict[str, float]] | None = None,
) -> list[dict]:
    """Train the trainable part of `m` (a prefix or LoRA factors, see `trainable_part`,
    or every weight: `glm.finetune.full.full_part`) and save it; returns the log.

    Writes `output_dir/checkpoint-N/` every `save_steps` steps, and the final part in `output_dir` itself, with
    `train_log.jsonl`: one JSON object per logged step or evaluation, as the Hugging Face Trainer logs them
    (`loss`, `learning_rate` after the step, `epoch`, `step`), and a closing entry with the run's totals.
    `resume`: a checkpoint folder whose part `m` already holds (load it with `glm.load(..., ptuning=...)`).
    `validation`: rows whose loss is computed at every save; `scorer`: called then too (eval mode), its scores
    logged with an `eval_` prefix. `echo`: a stream for one line per logged entry.
    A loss or gradient norm that is NaN or inf stops the run (TrainingError) before it touches the part: the last
    checkpoint stays the last good one. Ctrl+C saves a checkpoint of the last completed step and raises
    `Interrupted`. On several ranks (`part.ranks`) each takes its share of every step's rows; rank 0 logs and writes.
    """
    net = net_of(m)
    part = part or trainable_part(m)
    ranks: Ranks = part.ranks
    echo, progress = (echo, progress) if ranks.main else (None, False)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = part.params
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    step, log = 0, []
    if resume is not None:
        step, opt_state, log = load_training_state(resume)
        _load_optimizer(part, opt, opt_state, resume)
        if step >= cfg.max_steps:
            raise TrainingError(f"{resume} is at step {step}: --max-steps {cfg.max_steps} leaves nothing to train; "
                                "raise --max-steps to continue")
    ids = torch.tensor(input_ids, dtype=torch.long)
    lab = torch.tensor(labels, dtype=torch.long)
    val = tuple(torch.tensor(v, dtype=torch.long) for v in validation) if validation else None
    per_epoch = math.ceil(len(ids) / cfg.batch_size)  # micro-batches of an epoch, as the Trainer's dataloader
    rows_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * ranks.world
    epoch = lambda s: round(s * cfg.gradient_accumulation_steps * ranks.world / per_epoch, 2)  # noqa: E731
    log_file = (out / "train_log.jsonl" if ranks.main else Path(os.devnull)).open("w", encoding="utf-8")
    for entry in log:  # a resumed run's log starts with the checkpoint's history
        log_file.write(json.dumps(entry) + "\n")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)

    def record(entry: dict, show: bool = False) -> None:
        log.append(entry)
        log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        log_file.flush()
        line = " ".join(f"{k} {v}" for k, v in entry.items())
        if bar is not None and show:
            bar.write(line)  # evaluations stay on the terminal above the bar
        elif bar is None and echo is not None:
            print(line, file=echo, flush=True)

    first, saved = step, resume
    for mod in part.modules:
        mod.train()  # dropout of the trainable part; the frozen model has none
    window_loss, window_tokens, window_steps, t0 = 0.0, 0, 0, time.perf_counter()
    run_loss, started = 0.0, time.perf_counter()
    try:
        while step < cfg.max_steps:
            step_loss = 0.0
            for micro, index in enumerate(ranks.micro_batches(step, cfg.gradient_accumulation_steps)):
                # Seeded per micro-batch: the dropout masks are reproducible, the same after --resume and on any
                # number of ranks.
                torch.manual_seed(cfg.seed * 100_003 + index)
                rows = batch_order(len(ids), cfg.batch_size, cfg.seed, index)
                with ranks.sync(part.module, last=micro == cfg.gradient_accumulation_steps - 1):
                    loss = training_loss(part.module, ids[rows], lab[rows]) / cfg.gradient_accumulation_steps
                    loss.backward()
                step_loss += loss.item()
                window_tokens += _real_tokens(lab[rows])
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
            if not (math.isfinite(step_loss) and math.isfinite(norm)):
                opt.zero_grad(set_to_none=True)
                what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {norm}"
                kept = f"the last good checkpoint is {saved}" if saved is not None else "no checkpoint was saved"
                raise TrainingError(f"the {what} at step {step + 1}: training diverged and stopped; {kept}. "
                                    "Lower --learning-rate (and --resume from that checkpoint)")
            for group in opt.param_groups:  # linear decay to 0, no warmup (the Trainer's default schedule)
                group["lr"] = cfg.learning_rate * (1 - step / cfg.max_steps)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            window_loss += step_loss
            run_loss += step_loss
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                if net.device.type == "cuda":
                    torch.cuda.synchronize(net.device)
                dt = time.perf_counter() - t0
                window_loss, window_tokens = ranks.sum(window_loss / ranks.world, window_tokens)  # over the ranks
                # The Trainer logs the rate its scheduler has set for the next step.
                entry = {"step": step, "loss": round(window_loss / window_steps, 6),
                         "learning_rate": cfg.learning_rate * (1 - step / cfg.max_steps), "epoch": epoch(step),
                         "tokens_per_s": round(window_tokens / dt, 1)}
                if net.device.type == "cuda":
                    entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(net.device) / 1e9, 3)
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                record(entry)
                window_loss, window_tokens, window_steps, t0 = 0.0, 0, 0, time.perf_counter()
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                if val is not None or scorer is not None:
                    entry = {"step": step, "epoch": epoch(step)}
                    if val is not None:
                        entry["eval_loss"] = round(evaluate(net, *val, cfg.eval_batch_size), 6)
                    if scorer is not None:
                        with _eval_mode(net):
                            entry.update({f"eval_{k}": v for k, v in scorer().items()})
                    record(entry, show=True)
                save_training_checkpoint(part, out / f"checkpoint-{step}", step, opt, log)
                saved = out / f"checkpoint-{step}"
                t0 = time.perf_counter()  # saving is not training time
    except KeyboardInterrupt:
        opt.zero_grad(set_to_none=True)  # a half-accumulated step is dropped: the checkpoint is at a step boundary
        if step > first and saved != out / f"checkpoint-{step}":
            saved = out / f"checkpoint-{step}"
            save_training_checkpoint(part, saved, step, opt, log)
        raise Interrupted(step, saved if step > first else None) from None
    finally:
        if bar is not None:
            bar.close()
        for mod in part.modules:
            mod.eval()
        runtime = time.perf_counter() - started
        if step > first and step == cfg.max_steps:
            # The Trainer's closing entry: the totals of this run.
            n = step - first
            record({"step": step, "epoch": epoch(step), "train_runtime": round(runtime, 4),
                    "train_samples_per_second": round(n * rows_per_step / runtime, 3),
                    "train_steps_per_second": round(n / runtime, 3), "train_loss": run_loss / n})
        log_file.close()
    part.save(out)
    return log


__all__ = ["Interrupted", "TrainConfig", "batch_order", "checkpoint_step", "evaluate", "find_checkpoint",
           "load_training_state", "save_training_checkpoint", "train"]
