"""P-Tuning v2 training (`glm-finetune`): a small prefix learns, the whole model stays frozen.

Mirrors the official `ptuning/` scripts of ChatGLM-6B: the same data preprocessing, loss, optimizer (AdamW,
linear decay, gradient clipping at 1.0), prefix dropout and checkpoint layout, on a float, INT8 or INT4 base.

    input_ids, labels = preprocess_rows(tok, rows, max_source_length=64, max_target_length=64,
                                        prompt_column="content", response_column="summary")
    loss = ptuning_loss(m, input_ids, labels)   # gradients reach m.model.prefix_encoder only
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm.attention import attention_mask
from glm.config import ConfigError, GLMConfig
from glm.loader import CheckpointError, save_prefix
from glm.model import GLM, PrefixEncoder

IGNORE = -100  # label of the positions the loss skips (the prompt, the pads): PyTorch's ignore_index


class DataError(ValueError):
    """Training data the preprocessing cannot use; the message is one line that says what to do."""


# ---------------------------------------------------------------------------------------------------- data


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (one JSON object a line; blank lines are skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no such file {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg}): the file must hold one JSON object a line") \
                from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n} is not a JSON object: the file must hold one JSON object a line")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} is empty: it must hold one JSON object a line")
    return rows


def _prompt(query: str, history, history_column: str | None, line: int) -> str:
    """The official prompt: the query alone, or the history rounds then the query (`[Round i]\\n问：...\\n答：...`)."""
    if history_column is None or history is None:
        return query
    if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
        raise DataError(f"row {line}: column {history_column!r} must be a list of [query, reply] pairs")
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return rounds + f"[Round {len(history)}]\n问：{query}\n答："


def preprocess_rows(
    tokenizer,
    rows: Sequence[dict],
    *,
    max_source_length: int,
    max_target_length: int,
    prompt_column: str,
    response_column: str,
    history_column: str | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Training rows exactly as the official `preprocess_function_train` builds them.

    Each row becomes `prompt + [gMASK] <sop> + response + <eop>`, the prompt ids cut to max_source_length - 1 and
    the response ids to max_target_length - 2, right-padded to max_source_length + max_target_length. Labels are
    -100 before `<sop>`, then the ids from `<sop>` on; pads are -100. Rows whose prompt or response is empty are
    skipped, as the official code skips them.

    Args:
        tokenizer: a `glm.Tokenizer`.
        rows: dicts with the prompt, response and optionally history columns.
        max_source_length, max_target_length: the official length limits.
        prompt_column, response_column: the column names.
        history_column: a column of [query, reply] rounds rendered before the prompt; None: no history.
    Returns:
        (input_ids, labels): lists of lists of ints, each row max_source_length + max_target_length long.
    """
    if max_source_length < 1 or max_target_length < 2:
        raise DataError("max_source_length must be >= 1 and max_target_length >= 2 (room for [gMASK] <sop> <eop>)")
    for col in (prompt_column, response_column):
        if not any(col in r for r in rows):
            have = sorted({k for r in rows for k in r})
            raise DataError(f"no row has the column {col!r} (the rows have {', '.join(map(repr, have))}): "
                            "name the right one with --prompt-column / --response-column")
    seq_len = max_source_length + max_target_length
    pad = tokenizer.pad_id
    input_ids, labels, prompt_tokens = [], [], 0
    for n, row in enumerate(rows, 1):
        query, answer = row.get(prompt_column), row.get(response_column)
        if not query or not answer:
            continue
        if not isinstance(query, str) or not isinstance(answer, str):
            raise DataError(f"row {n}: columns {prompt_column!r} and {response_column!r} must hold text")
        prompt = _prompt(query, row.get(history_column) if history_column else None, history_column, n)
        a = tokenizer.encode(prompt, add_special_tokens=False)[: max_source_length - 1]
        b = tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]
        prompt_tokens += len(a)
        ids = a + [tokenizer.gmask_id, tokenizer.bos_id] + b + [tokenizer.eos_id]
        ctx = len(a) + 1  # the index of <sop>
        lab = [IGNORE] * ctx + ids[ctx:]
        # The official code pads the labels with the pad id, then ignores every label equal to it.
        lab = [IGNORE if t == pad else t for t in lab] + [IGNORE] * (seq_len - len(ids))
        input_ids.append(ids + [pad] * (seq_len - len(ids)))
        labels.append(lab)
    if not input_ids:
        raise DataError(f"no row has both a non-empty {prompt_column!r} and a non-empty {response_column!r}")
    if prompt_tokens == 0:
        raise DataError(f"every prompt of column {prompt_column!r} is cut to nothing "
                        f"(max_source_length {max_source_length} keeps {max_source_length - 1} tokens): "
                        "raise --max-source-length")
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------- loss


def training_inputs(input_ids: Tensor, cfg: GLMConfig, prefix: int = 0) -> tuple[Tensor, Tensor]:
    """Positions and mask of right-padded training rows, as the official code computes them over the whole row.

    The pads after `<eop>` are just more causal tokens (nothing before them sees them): position frozen at the
    mask's index, block position counting on.

    Args:
        input_ids: (B, T) long, each row holding `[gMASK]` (else `[MASK]`) and `<sop>`.
        cfg: the model config (special ids).
        prefix: P-Tuning slots in front of the keys, seen by every query.
    Returns:
        position_ids (B, 2, T) long, mask (B, 1, T, prefix + T) bool.
    """
    B, T = input_ids.shape
    dev = input_ids.device
    is_sop = input_ids == cfg.bos_token_id
    has_gmask = (input_ids == cfg.gmask_token_id).any(dim=1, keepdim=True)
    is_mask = input_ids == torch.where(has_gmask, cfg.gmask_token_id, cfg.mask_token_id)
    if not bool(is_sop.any(dim=1).all() and is_mask.any(dim=1).all()):
        raise DataError("every training row needs [gMASK] (or [MASK]) and <sop>: build rows with preprocess_rows")
    ctx = is_sop.int().argmax(dim=1)  # (B,) the first <sop>
    mask_pos = is_mask.int().argmax(dim=1)  # (B,) the first [gMASK]
    i = torch.arange(T, device=dev)[None]  # (1, T)
    after = i >= ctx[:, None]
    pos = torch.where(after, mask_pos[:, None], i)
    block = torch.where(after, i - ctx[:, None] + 1, 0)
    key_valid = torch.ones(B, prefix + T, dtype=torch.bool, device=dev)
    mask = attention_mask(key_valid, ctx + prefix, torch.arange(prefix, prefix + T, device=dev), prefix + T)
    return torch.stack((pos, block), dim=1), mask


def _net(m) -> GLM:
    return m.model if hasattr(m, "model") else m


def ptuning_loss(m, input_ids, labels) -> Tensor:
    """The official P-Tuning v2 loss: shifted cross-entropy over float32 logits, mean over the non-ignored tokens.

    Columns after the last labelled token of every row are dropped first: they are causal pads that no labelled
    position sees, so the loss and its gradients are exactly those of the full rows. Logits are computed only
    where a label counts.

    Args:
        m: a `glm.load` model (or its `GLM`); only the parameters that require grad (the prefix encoder, see
            `prefix_parameters`) get gradients.
        input_ids, labels: (B, T) tensors or lists of lists, as `preprocess_rows` returns them.
    Returns:
        The scalar loss.
    """
    net = _net(m)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=net.device)
    lab = torch.as_tensor(labels, dtype=torch.long, device=net.device)
    labelled = (lab != IGNORE).any(dim=0).nonzero()
    T = int(labelled[-1]) + 1 if len(labelled) else ids.shape[1]
    ids, lab = ids[:, :T], lab[:, :T]
    position_ids, mask = training_inputs(ids, net.config, net.config.pre_seq_len or 0)
    target = lab[:, 1:]  # position t predicts token t + 1
    counted = F.pad(target != IGNORE, (0, 1))  # (B, T): the positions whose prediction the loss counts
    # Logits of the counted positions only: the same mean as cross-entropy with ignore_index over all of them.
    logits = net(ids, position_ids, mask, logits_at=counted)  # (N, V) float32
    return F.cross_entropy(logits, target[target != IGNORE])


# ---------------------------------------------------------------------------------------------------- the prefix


def add_prefix(m, pre_seq_len: int, prefix_projection: bool = False, seed: int = 0) -> None:
    """Give a loaded model a fresh P-Tuning v2 prefix encoder (float32, PyTorch's default initialisation, as the
    official code leaves it)."""
    net = _net(m)
    cfg = net.config
    if not 0 < pre_seq_len <= cfg.max_sequence_length:
        raise DataError(f"--pre-seq-len must be in 1..{cfg.max_sequence_length}, got {pre_seq_len}")
    cfg.pre_seq_len, cfg.prefix_projection = pre_seq_len, prefix_projection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.prefix_encoder = PrefixEncoder(cfg).to(net.device).eval()


def prefix_parameters(m) -> list[nn.Parameter]:
    """Freeze the whole model but its prefix encoder, which becomes float32 and trainable; returns its parameters."""
    net = _net(m)
    if not net.config.pre_seq_len:
        raise DataError("the model has no P-Tuning prefix: add one with add_prefix")
    net.requires_grad_(False)
    enc = net.prefix_encoder.float().requires_grad_(True)
    return list(enc.parameters())


# ---------------------------------------------------------------------------------------------------- training


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
    """Mean loss over every labelled token of a data set (eval mode: no prefix dropout)."""
    net = _net(m)
    was_training = net.prefix_encoder.training
    net.prefix_encoder.eval()
    total, count = 0.0, 0
    for r in range(0, len(input_ids), batch_size):
        lab = labels[r : r + batch_size]
        n = int((lab[:, 1:] != IGNORE).sum())
        total += float(ptuning_loss(net, input_ids[r : r + batch_size], lab)) * n
        count += n
    net.prefix_encoder.train(was_training)
    return total / max(count, 1)


def save_training_checkpoint(m, folder: Path, step: int, optimizer: torch.optim.Optimizer, log: list[dict]) -> None:
    """`checkpoint-N/`: the prefix in the official layout, plus what `--resume` needs (optimizer, step, log)."""
    save_prefix(_net(m), folder, base_folder=getattr(m, "path", None))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
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
) -> list[dict]:
    """Train the prefix of `m` (a `glm.load` model with a prefix) and save it; returns the log.

    Writes `output_dir/checkpoint-N/` every `save_steps` steps, and the final prefix in `output_dir` itself
    (`config.json`, `pytorch_model.bin`), with `train_log.jsonl`: one JSON object per logged step.
    `resume`: a checkpoint folder whose prefix `m` already holds (load it with `glm.load(..., ptuning=...)`).
    `echo`: a stream for one line per logged step when there is no progress bar.
    """
    net = _net(m)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = prefix_parameters(net)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    step, log = 0, []
    if resume is not None:
        step, opt_state, log = load_training_state(resume)
        opt.load_state_dict(opt_state)
    ids = torch.tensor(input_ids, dtype=torch.long)
    lab = torch.tensor(labels, dtype=torch.long)
    val = tuple(torch.tensor(v, dtype=torch.long) for v in validation) if validation else None
    log_file = (out / "train_log.jsonl").open("w", encoding="utf-8")
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

    net.prefix_encoder.train()  # the prefix dropout; the rest of the model has no dropout
    window_loss, window_tokens, window_steps, t0 = 0.0, 0, 0, time.perf_counter()
    try:
        while step < cfg.max_steps:
            # Seeded per step: the dropout masks are reproducible, and the same after --resume.
            torch.manual_seed(cfg.seed * 100_003 + step)
            step_loss = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                rows = batch_order(len(ids), cfg.batch_size, cfg.seed, step * cfg.gradient_accumulation_steps + micro)
                loss = ptuning_loss(net, ids[rows], lab[rows]) / cfg.gradient_accumulation_steps
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
                save_training_checkpoint(m, out / f"checkpoint-{step}", step, opt, log)
                t0 = time.perf_counter()  # saving is not training time
    finally:
        if bar is not None:
            bar.close()
        log_file.close()
        net.prefix_encoder.eval()
    save_prefix(net, out, base_folder=getattr(m, "path", None))
    return log


# ---------------------------------------------------------------------------------------------------- command line


def _positive(kind):
    import argparse

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v

    parse.__name__ = kind.__name__
    return parse


def build_parser():
    from glm.options import ArgumentParser, add_model_args

    p = ArgumentParser(prog="glm-finetune", description="Train a P-Tuning v2 prefix for ChatGLM-6B (the official "
                       "ptuning recipe); chat with the result: glm-chat --ptuning OUTPUT_DIR.")
    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--train-file", required=True, metavar="FILE", help="JSON lines: one object a row")
    d.add_argument("--validation-file", metavar="FILE", help="JSON lines; its loss is logged at every save")
    d.add_argument("--prompt-column", default="content", metavar="NAME", help="(default: content)")
    d.add_argument("--response-column", default="summary", metavar="NAME", help="(default: summary)")
    d.add_argument("--history-column", default=None, metavar="NAME",
                   help="a column of [query, reply] rounds, rendered before the prompt as the official chat does")
    d.add_argument("--max-source-length", type=_positive(int), default=64, metavar="N",
                   help="prompt tokens kept: N - 1 (default: 64)")
    d.add_argument("--max-target-length", type=_positive(int), default=64, metavar="N",
                   help="response tokens kept: N - 2 (default: 64)")
    t = p.add_argument_group("training")
    t.add_argument("--pre-seq-len", type=int, default=None, metavar="N",
                   help="virtual prefix tokens (default: 128, or the --resume checkpoint's)")
    t.add_argument("--prefix-projection", action="store_true",
                   help="encode the prefix through an MLP (the official prefix_projection)")
    t.add_argument("--learning-rate", type=_positive(float), default=2e-2, metavar="LR", help="(default: 2e-2)")
    t.add_argument("--batch-size", type=_positive(int), default=1, metavar="N",
                   help="rows per micro-batch (default: 1)")
    t.add_argument("--gradient-accumulation-steps", type=_positive(int), default=16, metavar="N",
                   help="micro-batches per optimizer step (default: 16)")
    t.add_argument("--max-steps", type=_positive(int), default=3000, metavar="N",
                   help="optimizer steps (default: 3000)")
    t.add_argument("--save-steps", type=_positive(int), default=1000, metavar="N",
                   help="write OUTPUT_DIR/checkpoint-N every N steps (default: 1000)")
    t.add_argument("--logging-steps", type=_positive(int), default=10, metavar="N",
                   help="log the mean loss every N steps (default: 10)")
    t.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where the checkpoints, the final prefix and train_log.jsonl go")
    t.add_argument("--seed", type=int, default=42, metavar="N", help="(default: 42)")
    t.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint-N folder, or from the latest one in DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pre_seq_len is not None and args.pre_seq_len <= 0:
        parser.error(f"--pre-seq-len must be a positive number of virtual tokens, got {args.pre_seq_len}")
    if args.compile:
        parser.error("--compile applies to decoding only; training runs eagerly")
    from glm.options import CLIError, check_model_args, is_oom, isatty, oom_message

    check_model_args(parser, args)
    try:
        return _run(parser, args, isatty(sys.stderr))
    except (CLIError, DataError, CheckpointError, ConfigError) as e:
        print(f"glm-finetune: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if is_oom(e):
            print(f"glm-finetune: error: {oom_message('training', args)} or smaller --batch-size / lengths",
                  file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("glm-finetune: interrupted; continue with --resume OUTPUT_DIR", file=sys.stderr)
        return 130


def _run(parser, args, tty: bool) -> int:
    from glm.loader import resolve
    from glm.options import load_from_args
    from glm.tokenizer import Tokenizer

    out = Path(args.output_dir)
    resume = find_checkpoint(args.resume) if args.resume else None
    if resume is None and out.is_dir() and any(out.glob("checkpoint-*")):
        raise DataError(f"{out} holds checkpoints of an earlier run: continue it with --resume {out}, "
                        "or choose another --output-dir")
    if resume is not None and args.ptuning:
        parser.error("--resume and --ptuning both name a prefix: give one")
    train_rows = read_rows(args.train_file)
    val_rows = read_rows(args.validation_file) if args.validation_file else None

    # The data is checked before the model loads (a minute for ChatGLM-6B): the checkpoint's tokenizer is enough.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    folder = resolve(args.model, args.revision)
    base = GLMConfig.from_json(folder / "config.json")
    if args.max_source_length + args.max_target_length > base.max_sequence_length:
        raise DataError(f"--max-source-length + --max-target-length must be <= {base.max_sequence_length}, "
                        "the model's max_sequence_length")
    if not (folder / "ice_text.model").is_file():
        raise DataError(f"{folder} has no ice_text.model (the tokenizer): use a full checkpoint")
    tok = Tokenizer.from_config(folder / "ice_text.model", base)
    opts = dict(max_source_length=args.max_source_length, max_target_length=args.max_target_length,
                prompt_column=args.prompt_column, response_column=args.response_column,
                history_column=args.history_column)
    input_ids, labels = preprocess_rows(tok, train_rows, **opts)
    validation = preprocess_rows(tok, val_rows, **opts) if val_rows else None

    if resume is not None:
        args.ptuning = str(resume)
    m = load_from_args(args)
    cfg = m.config
    if cfg.pre_seq_len:  # resuming, or --ptuning: go on with that prefix
        if args.pre_seq_len not in (None, cfg.pre_seq_len) or args.prefix_projection > cfg.prefix_projection:
            raise DataError(f"the prefix being continued has pre_seq_len {cfg.pre_seq_len} and prefix_projection "
                            f"{str(cfg.prefix_projection).lower()}: drop --pre-seq-len / --prefix-projection")
    else:
        add_prefix(m, args.pre_seq_len or 128, args.prefix_projection, seed=args.seed)
    tc = TrainConfig(learning_rate=args.learning_rate, batch_size=args.batch_size,
                     gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=args.max_steps,
                     save_steps=args.save_steps, logging_steps=args.logging_steps, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_args.json").write_text(json.dumps({**vars(args), **asdict(tc)}, indent=1, default=str) + "\n")
    print(f"glm-finetune: {len(input_ids)} training rows, pre_seq_len {cfg.pre_seq_len}"
          f"{' (prefix projection)' if cfg.prefix_projection else ''}, {tc.max_steps} steps of "
          f"{tc.batch_size} x {tc.gradient_accumulation_steps} rows", file=sys.stderr, flush=True)
    log = train(m, input_ids, labels, tc, out, validation=validation, resume=resume, progress=tty, echo=sys.stderr)
    losses = [e["loss"] for e in log if "loss" in e]
    last = f", last loss {losses[-1]:.4f}" if losses else ""
    print(f"glm-finetune: saved the prefix to {out}{last}; chat with it: glm-chat --model {args.model} "
          f"--ptuning {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
