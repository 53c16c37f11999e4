"""`glm-finetune` (also `python -m glm.finetune`, `torchrun -m glm.finetune`): the command line of the trainer.

The one module of glm.finetune that imports entry-point code (glm.options); the library modules import none.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from glm.config import GLMConfig
from glm.errors import CheckpointError, ConfigError, DataError, DistributedError
from glm.finetune import launch
from glm.finetune.data import preprocess_rows, read_rows
from glm.finetune.distributed import checkpoint_blocks, env_rank, finish, speaks
from glm.finetune.full import check_full, full_part
from glm.finetune.loop import TrainConfig, find_checkpoint, train
from glm.finetune.part import prefix_part
from glm.finetune.prefix import add_prefix
from glm.loader import resolve
from glm.options import (
    ArgumentParser,
    CLIError,
    add_model_args,
    check_model_args,
    is_oom,
    isatty,
    load_from_args,
    oom_message,
)
from glm.tokenizer import Tokenizer


def _positive(kind):
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
    launch.add_args(p)  # --full, --nproc-per-node and the other options of several processes
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # one that comes while an error is reported (on several ranks, every rank gets it)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pre_seq_len is not None and args.pre_seq_len <= 0:
        parser.error(f"--pre-seq-len must be a positive number of virtual tokens, got {args.pre_seq_len}")
    if args.compile:
        parser.error("--compile applies to decoding only; training runs eagerly")
    check_model_args(parser, args)
    launch.check_args(parser, args)
    try:
        if launch.wants_launch(args):  # glm-finetune --nproc-per-node N: torchrun's launcher, in this process
            return launch.launch(args, sys.argv[1:] if argv is None else argv)
        return _run(parser, args, isatty(sys.stderr))
    except (CLIError, DataError, CheckpointError, ConfigError, DistributedError) as e:
        if speaks(e):  # on several ranks: rank 0 reports what they all meet, each rank its own failure
            print(f"glm-finetune: error: {launch.error_prefix()}{e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if is_oom(e):
            print(f"glm-finetune: error: {oom_message('training', args)} or smaller --batch-size / lengths",
                  file=sys.stderr)
            return 1
        if launch.lost_rank(e):  # a collective whose other side went away: that rank says why
            return 1
        raise
    except KeyboardInterrupt:
        if env_rank() == 0:  # every rank gets the Ctrl+C; one says it
            print("glm-finetune: interrupted; continue with --resume OUTPUT_DIR", file=sys.stderr)
        return 130
    finally:
        finish()  # leave the process group, if one started


def _run(parser, args, tty: bool) -> int:
    out = Path(args.output_dir)
    resume = find_checkpoint(args.resume) if args.resume else None
    if resume is None and out.is_dir() and any(out.glob("checkpoint-*")):
        raise DataError(f"{out} holds checkpoints of an earlier run: continue it with --resume {out}, "
                        "or choose another --output-dir")
    if resume is not None and args.ptuning:
        parser.error("--resume and --ptuning both name a prefix: give one")
    if resume is not None and args.full:  # a --full checkpoint is the whole model
        args.model = str(resume)
    train_rows = read_rows(args.train_file)
    val_rows = read_rows(args.validation_file) if args.validation_file else None

    # The data is checked before the model loads (a minute for ChatGLM-6B): the checkpoint's tokenizer is enough.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    folder = resolve(args.model, args.revision)
    base = GLMConfig.from_json(folder / "config.json")
    if args.max_source_length + args.max_target_length > base.max_sequence_length:
        raise DataError(f"--max-source-length + --max-target-length must be <= {base.max_sequence_length}, "
                        "the model's max_sequence_length")
    if args.full:
        check_full(base)
    if not (folder / "ice_text.model").is_file():
        raise DataError(f"{folder} has no ice_text.model (the tokenizer): use a full checkpoint")
    tok = Tokenizer.from_config(folder / "ice_text.model", base)
    opts = dict(max_source_length=args.max_source_length, max_target_length=args.max_target_length,
                prompt_column=args.prompt_column, response_column=args.response_column,
                history_column=args.history_column)
    input_ids, labels = preprocess_rows(tok, train_rows, **opts)
    validation = preprocess_rows(tok, val_rows, **opts) if val_rows else None

    ranks = launch.join(args, [folder, resume], input_ids)  # the ranks torchrun started, agreeing on model and data
    if resume is not None and not args.full:
        args.ptuning = str(resume)
    m = load_from_args(args, log=launch.quiet_stream())
    cfg = m.config
    if cfg.pre_seq_len:  # resuming, or --ptuning: go on with that prefix
        if args.pre_seq_len not in (None, cfg.pre_seq_len) or args.prefix_projection > cfg.prefix_projection:
            raise DataError(f"the prefix being continued has pre_seq_len {cfg.pre_seq_len} and prefix_projection "
                            f"{str(cfg.prefix_projection).lower()}: drop --pre-seq-len / --prefix-projection")
    elif not args.full:
        add_prefix(m, args.pre_seq_len or 128, args.prefix_projection, seed=args.seed)
    if args.gradient_checkpointing:
        checkpoint_blocks(m.model)
    part = full_part(m, ranks, args.compute_dtype) if args.full else prefix_part(m, ranks)
    tc = TrainConfig(learning_rate=args.learning_rate, batch_size=args.batch_size,
                     gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=args.max_steps,
                     save_steps=args.save_steps, logging_steps=args.logging_steps, seed=args.seed)
    if not ranks.main:  # rank 0 writes and reports for all
        train(m, input_ids, labels, tc, out, validation=validation, resume=resume, part=part)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_args.json").write_text(json.dumps({**vars(args), **asdict(tc)}, indent=1, default=str) + "\n")
    what = "every weight" if args.full else (f"pre_seq_len {cfg.pre_seq_len}"
                                             f"{' (prefix projection)' if cfg.prefix_projection else ''}")
    print(f"glm-finetune: {len(input_ids)} training rows, {what}, {tc.max_steps} steps of {tc.batch_size} x "
          f"{tc.gradient_accumulation_steps}{f' x {ranks.world} ranks' if ranks.world > 1 else ''} rows",
          file=sys.stderr, flush=True)
    log = train(m, input_ids, labels, tc, out, validation=validation, resume=resume, progress=tty, echo=sys.stderr,
                part=part)
    losses = [e["loss"] for e in log if "loss" in e]
    last = f", last loss {losses[-1]:.4f}" if losses else ""
    if args.full:
        print(f"glm-finetune: saved the model to {out}{last}; chat with it: glm-chat --model {out}", file=sys.stderr)
        return 0
    print(f"glm-finetune: saved the prefix to {out}{last}; chat with it: glm-chat --model {args.model} "
          f"--ptuning {out}", file=sys.stderr)
    return 0


__all__ = ["build_parser", "main"]
