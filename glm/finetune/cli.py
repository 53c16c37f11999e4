"""`glm-finetune` (also `python -m glm.finetune`, `torchrun -m glm.finetune`): the command line of the trainer.

It takes the option names of the official `ptuning/` scripts (`main.py`'s `ModelArguments`,
`DataTrainingArguments` and the `Seq2SeqTrainingArguments` that train.sh, evaluate.sh and ds_train_finetune.sh
pass) as aliases of its own, so that their command lines run as they are. The one module of glm.finetune that
imports entry-point code (glm.options); the library modules import none.
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
from glm.errors import CheckpointError, ConfigError, DataError, DistributedError, TrainingError
from glm.finetune import launch
from glm.finetune.data import generation_rows, preprocess_rows, read_rows
from glm.finetune.distributed import Ranks, checkpoint_blocks, env_rank, finish, speaks, torchrun_world
from glm.finetune.full import check_full, full_part
from glm.finetune.loop import Interrupted, TrainConfig, checkpoint_step, evaluate, find_checkpoint, train
from glm.finetune.metrics import check_metric_packages, score_rows
from glm.finetune.outputs import (
    MARK,
    check_output_dir,
    clear_checkpoints,
    log_metrics,
    save_metrics,
    speed_metrics,
    write_predictions,
)
from glm.loader import resolve
from glm.lora import TARGETS as LORA_TARGETS
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

# Our option -> the official names it also answers to.
MODEL_ALIASES = {"--model": ("--model_name_or_path",), "--revision": ("--model_revision",),
                 "--quant": ("--quantization_bit",), "--ptuning": ("--ptuning_checkpoint",)}


def _positive(kind, most: float = math.inf):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        if v > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {s}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _bool(s: str) -> bool:
    """The Trainer's bool options: a bare flag, or a value (`--do_train true`)."""
    v = s.strip().lower()
    if v in ("true", "1", "yes", "y", "t"):
        return True
    if v in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser():
    p = ArgumentParser(prog="glm-finetune", description="Train a P-Tuning v2 prefix or a LoRA adapter for ChatGLM-6B "
                       "(the official ptuning recipe), evaluate and predict with it; the official ptuning/main.py "
                       "option names work too. Chat with the result: glm-chat --ptuning OUTPUT_DIR (or --lora).")
    add_model_args(p, MODEL_ALIASES)

    def opt(group, *names, flag=False, **kw):
        if flag:  # on when given bare, or `--name true`, as the Trainer's bool options
            kw = {"nargs": "?", "const": True, "default": False, "type": _bool, "metavar": "BOOL", **kw}
        return group.add_argument(*names, **kw)

    w = p.add_argument_group("what to run (none given: train)")
    opt(w, "--do-train", "--do_train", flag=True, help="train (needs --train-file)")
    opt(w, "--do-eval", "--do_eval", flag=True,
        help="after training, the validation loss, and with --predict-with-generate the official scores")
    opt(w, "--do-predict", "--do_predict", flag=True,
        help="generate for every row of --test-file: generated_predictions.txt, and the official scores")
    opt(w, "--predict-with-generate", "--predict_with_generate", flag=True,
        help="score by generating (ROUGE-1/2/L, BLEU-4): with --do-eval also at every save while training")
    d = p.add_argument_group("data")
    opt(d, "--train-file", "--train_file", metavar="FILE", help="JSON lines: one object a row")
    opt(d, "--validation-file", "--validation_file", metavar="FILE",
        help="JSON lines; its loss is logged at every save")
    opt(d, "--test-file", "--test_file", metavar="FILE", help="JSON lines, for --do-predict")
    opt(d, "--prompt-column", "--prompt_column", default="content", metavar="NAME",
        help="(default: content, ADGEN's; main.py has no default)")
    opt(d, "--response-column", "--response_column", default="summary", metavar="NAME",
        help="(default: summary, ADGEN's; main.py has no default)")
    opt(d, "--history-column", "--history_column", default=None, metavar="NAME",
        help="a column of [query, reply] rounds, rendered before the prompt as the official chat does")
    opt(d, "--source-prefix", "--source_prefix", default="", metavar="TEXT", help="text put before every prompt")
    opt(d, "--max-source-length", "--max_source_length", type=_positive(int), default=64, metavar="N",
        help="prompt tokens kept: N - 1 (default: 64, train.sh's; main.py's own is 1024)")
    opt(d, "--max-target-length", "--max_target_length", type=_positive(int), default=64, metavar="N",
        help="response tokens kept: N - 2 (default: 64, train.sh's; main.py's own is 128)")
    opt(d, "--val-max-target-length", "--val_max_target_length", type=_positive(int), default=None, metavar="N",
        help="reference tokens kept for scoring: N - 2 (default: --max-target-length)")
    for split in ("train", "eval", "predict"):
        opt(d, f"--max-{split}-samples", f"--max_{split}_samples", type=_positive(int), default=None, metavar="N",
            help=f"use the first N rows of the {split} file")
    opt(d, "--overwrite-cache", "--overwrite_cache", flag=True,
        help="accepted for the official command lines: glm-finetune keeps no cache, rows are read afresh")
    t = p.add_argument_group("training")
    opt(t, "--pre-seq-len", "--pre_seq_len", type=int, default=None, metavar="N",
        help="virtual prefix tokens (default: 128, or the --resume / --ptuning checkpoint's; without it main.py "
             "fine-tunes every weight: --full)")
    opt(t, "--prefix-projection", "--prefix_projection", flag=True,
        help="encode the prefix through an MLP (the official prefix_projection)")
    t.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train a LoRA adapter of rank R instead of a prefix (PEFT's layout)")
    t.add_argument("--lora-alpha", type=float, default=8, metavar="A",
                   help="LoRA scaling is A / R (default: 8, PEFT's)")
    t.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="(default: 0, PEFT's)")
    t.add_argument("--lora-target", default="query_key_value", metavar="NAMES",
                   help="comma-separated linears: query_key_value, dense, dense_h_to_4h, dense_4h_to_h "
                        "(default: query_key_value)")
    opt(t, "--learning-rate", "--learning_rate", type=_positive(float, 1e30), default=2e-2, metavar="LR",
        help="(default: 2e-2, train.sh's; the Trainer's own is 5e-5)")
    opt(t, "--batch-size", "--per_device_train_batch_size", type=_positive(int), default=1, metavar="N",
        help="rows per micro-batch (default: 1, train.sh's; the Trainer's own is 8)")
    opt(t, "--eval-batch-size", "--per_device_eval_batch_size", type=_positive(int), default=8, metavar="N",
        help="rows per batch of the validation loss (default: 8); generation batches by --max-batch")
    opt(t, "--gradient-accumulation-steps", "--gradient_accumulation_steps", type=_positive(int), default=16,
        metavar="N", help="micro-batches per optimizer step (default: 16, train.sh's; the Trainer's own is 1)")
    opt(t, "--max-steps", "--max_steps", type=_positive(int), default=3000, metavar="N",
        help="optimizer steps (default: 3000, train.sh's)")
    opt(t, "--save-steps", "--save_steps", type=_positive(int), default=1000, metavar="N",
        help="write OUTPUT_DIR/checkpoint-N every N steps (default: 1000, train.sh's)")
    opt(t, "--logging-steps", "--logging_steps", type=_positive(int), default=10, metavar="N",
        help="log the mean loss every N steps (default: 10, train.sh's)")
    opt(t, "--output-dir", "--output_dir", required=True, metavar="DIR",
        help="where the checkpoints, the final prefix or adapter, the logs and the results go")
    opt(t, "--overwrite-output-dir", "--overwrite_output_dir", flag=True,
        help="write into a non-empty folder; an earlier glm-finetune run's checkpoints there are removed. A folder "
             "with model weights glm-finetune did not write is refused all the same")
    opt(t, "--seed", type=int, default=42, metavar="N", help="of the data order, dropout and sampling (default: 42)")
    opt(t, "--resume", "--resume_from_checkpoint", metavar="DIR",
        help="continue from a checkpoint-N folder, or from the latest one in DIR")
    opt(t, "--fp16", flag=True, help="accepted for the official command lines: the base runs in float16 on CUDA "
        "anyway (--dtype auto) and the trained part in float32, as the Trainer's mixed precision")
    opt(t, "--deepspeed", metavar="FILE", help="accepted for ds_train_finetune.sh: not read (--full shards with FSDP)")
    launch.add_args(p)  # --full, --nproc-per-node and the other options of several processes
    g = p.add_argument_group("generation (--predict-with-generate: main.py's settings, top-p 0.7, temperature 0.95)")
    g.add_argument("--max-batch", type=_positive(int), default=16, metavar="N",
                   help="rows generated at once (continuous batching; default: 16)")
    opt(g, "--generation-max-length", "--generation_max_length", type=_positive(int), default=512, metavar="N",
        help="tokens of prompt plus prediction (default: 512, the max_length main.py passes)")
    opt(g, "--num-beams", "--num_beams", type=int, default=None, metavar="1", help="only 1: no beam search")
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
    if args.lora_rank is not None and args.lora_rank <= 0:
        parser.error(f"--lora-rank must be a positive integer, got {args.lora_rank}")
    if not (args.lora_alpha > 0 and math.isfinite(args.lora_alpha)):
        parser.error(f"--lora-alpha must be a positive number, got {args.lora_alpha:g}")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.num_beams not in (None, 1):
        parser.error("--num_beams: beam search is not offered; evaluation samples as main.py does")
    if args.compile:
        parser.error("--compile applies to decoding only; training runs eagerly")
    check_model_args(parser, args)
    launch.check_args(parser, args)
    if not (args.do_train or args.do_eval or args.do_predict):
        args.do_train = True  # our own command lines train without saying so
    need = [("do_train", "train_file"), ("do_eval", "validation_file"), ("do_predict", "test_file")]
    for flag, file in need:
        if getattr(args, flag) and not getattr(args, file):
            parser.error(f"--{flag} needs --{file}")
    if args.do_predict and not args.predict_with_generate:
        parser.error("--do_predict needs --predict_with_generate (main.py predicts by generating)")
    if args.lora_rank is not None and (args.ptuning or args.lora or args.pre_seq_len or args.prefix_projection):
        parser.error("--lora-rank trains a new LoRA adapter: drop --pre-seq-len, --prefix-projection, --ptuning, "
                     "--lora")
    if args.ptuning and args.lora:
        parser.error("--ptuning and --lora: give one trainable part")
    targets = [t.strip() for t in args.lora_target.split(",") if t.strip()]
    if not targets or any(t not in LORA_TARGETS for t in targets):
        parser.error(f"--lora-target {args.lora_target!r}: ChatGLM-6B's linears are {', '.join(LORA_TARGETS)}")
    if args.lora_rank is not None and not args.do_train:
        parser.error("--lora-rank needs --do_train")
    if args.resume and not args.do_train:
        parser.error("--resume continues training: add --do_train")
    several = args.full or (args.nproc_per_node or 1) > 1 or torchrun_world() > 1
    if args.full and args.lora_rank is not None:
        parser.error("--full trains every weight: drop --lora-rank")
    if several and args.predict_with_generate:
        parser.error("--predict-with-generate runs in one process: drop --full / --nproc-per-node, or predict "
                     "afterwards (--do_predict --model OUTPUT_DIR)")
    if several and not args.do_train:
        parser.error("--full and --nproc-per-node train: add --do_train")
    try:
        if launch.wants_launch(args):  # glm-finetune --nproc-per-node N: torchrun's launcher, in this process
            return launch.launch(args, sys.argv[1:] if argv is None else argv)
        return _run(parser, args, isatty(sys.stderr))
    except (CLIError, DataError, CheckpointError, ConfigError, DistributedError, TrainingError) as e:
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
    except Interrupted as e:
        if env_rank() != 0:
            pass
        elif e.checkpoint is None:
            print("glm-finetune: interrupted before a step completed: nothing saved", file=sys.stderr)
        else:
            print(f"glm-finetune: interrupted at step {e.step}: saved {e.checkpoint}; continue with --resume "
                  f"{e.checkpoint.parent}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if env_rank() == 0:  # every rank gets the Ctrl+C; one says it
            print("glm-finetune: interrupted", file=sys.stderr)
        return 130
    finally:
        finish()  # leave the process group, if one started


def _run(parser, args, tty: bool) -> int:
    out = Path(args.output_dir)
    scoring = args.predict_with_generate and (args.do_eval or args.do_predict)
    if scoring:
        check_metric_packages()
    resume = find_checkpoint(args.resume) if args.resume else None
    if resume is not None and args.full:  # a --full checkpoint is the whole model
        args.model = str(resume)
    elif resume is not None and (args.ptuning or args.lora):
        parser.error("--resume and --ptuning/--lora both name what to train: give one")
    local = Path(os.path.expanduser(args.model))
    protected = tuple(Path(p) for p in (args.ptuning, args.lora) if p) + \
        ((local,) if local.is_dir() and local != resume else ())
    check_output_dir(out, overwrite=args.overwrite_output_dir, training=args.do_train, resume=resume,
                     protected=protected)
    if resume is not None:
        _check_resume(resume, args.max_steps)
    files = {"train": args.train_file if args.do_train else None, "validation": args.validation_file,
             "test": args.test_file if args.do_predict else None}
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    rows = {k: read_rows(f).head(limits[k]) for k, f in files.items() if f}

    # The data is checked before the model loads (a minute for ChatGLM-6B): the checkpoint's tokenizer is enough.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    folder = resolve(args.model, args.revision)
    _check_model_folder(folder, resumed=args.full and resume is not None)
    base = GLMConfig.from_json(folder / "config.json")
    if args.max_source_length + args.max_target_length > base.max_sequence_length:
        raise DataError(f"--max-source-length + --max-target-length must be <= {base.max_sequence_length}, "
                        "the model's max_sequence_length")
    if args.full:
        check_full(base)
    if scoring and args.max_source_length >= args.generation_max_length:
        raise DataError(f"--max-source-length {args.max_source_length} leaves no room for a prediction under "
                        f"--generation-max-length {args.generation_max_length}: raise it")
    tok = Tokenizer.from_config(folder / "ice_text.model", base)
    cols = dict(prompt_column=args.prompt_column, response_column=args.response_column,
                history_column=args.history_column, source_prefix=args.source_prefix)
    lengths = dict(max_source_length=args.max_source_length, max_target_length=args.max_target_length)
    gen_lengths = dict(max_source_length=args.max_source_length,
                       max_target_length=args.val_max_target_length or args.max_target_length)
    train_data = preprocess_rows(tok, rows["train"], **lengths, **cols) if "train" in rows else None
    validation = preprocess_rows(tok, rows["validation"], **lengths, **cols) if "validation" in rows else None
    eval_gen = generation_rows(tok, rows["validation"], **gen_lengths, **cols) \
        if scoring and args.do_eval else None
    test_gen = generation_rows(tok, rows["test"], **gen_lengths, **cols) if "test" in rows else None
    if args.deepspeed and env_rank() == 0:
        print("glm-finetune: note: --deepspeed is not read: --full trains every weight (FSDP), --nproc-per-node on "
              "several processes", file=sys.stderr)

    m, part, ranks = _load(args, resume, folder, train_data[0] if train_data else [])
    if ranks.main:
        if args.do_train and args.overwrite_output_dir:
            clear_checkpoints(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARK).write_text(json.dumps(vars(args), indent=1, default=str) + "\n")
    say = sys.stderr if ranks.main else open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports for all
    name = m.config.pre_seq_len and f"pre_seq_len {m.config.pre_seq_len}" + \
        (" (prefix projection)" if m.config.prefix_projection else "")
    epoch = None

    def scores(gen, split: str) -> dict:
        from glm.finetune.predict import OFFICIAL_GENERATION, generate_rows

        prompts, refs = gen
        config = OFFICIAL_GENERATION.replace(max_length=args.generation_max_length)
        preds, seconds = generate_rows(m, prompts, config, seed=args.seed, max_batch=args.max_batch, progress=tty,
                                       desc=split)
        print(f"glm-finetune: generated {len(prompts)} {split} rows in {seconds:.1f} s "
              f"({len(prompts) / seconds:.2f} rows/s, {args.max_batch} at once)", file=sys.stderr, flush=True)
        return {"preds": preds, "refs": refs, "seconds": seconds, **score_rows(preds, refs)}

    def report(split: str, metrics: dict) -> None:
        if ranks.main:
            log_metrics(split, metrics, sys.stderr)
            save_metrics(out, split, metrics)

    if args.do_train:
        tc = TrainConfig(learning_rate=args.learning_rate, batch_size=args.batch_size,
                         gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=args.max_steps,
                         save_steps=args.save_steps, logging_steps=args.logging_steps, seed=args.seed,
                         eval_batch_size=args.eval_batch_size)
        if ranks.main:
            (out / MARK).write_text(json.dumps({**vars(args), **asdict(tc)}, indent=1, default=str) + "\n")
        what = part.kind + (f", {name}" if part.kind.startswith("P-") else "")
        if part.kind.startswith("P-") and not (args.pre_seq_len or args.ptuning or resume):
            what += " (without --pre_seq_len main.py fine-tunes every weight: add --full for that)"
        world = f" x {ranks.world} ranks" if ranks.world > 1 else ""
        print(f"glm-finetune: {len(train_data[0])} training rows, {what}, {tc.max_steps} steps of "
              f"{tc.batch_size} x {tc.gradient_accumulation_steps}{world} rows", file=say, flush=True)
        scorer = (lambda: {k: v for k, v in scores(eval_gen, "eval").items() if k in ("rouge-1", "rouge-2",
                  "rouge-l", "bleu-4")}) if eval_gen is not None else None
        log = train(m, *train_data, tc, out, validation=validation, resume=resume, progress=tty, echo=sys.stderr,
                    part=part, scorer=scorer)
        closing = log[-1] if log and "train_runtime" in log[-1] else {}
        epoch = closing.get("epoch")
        metrics = {k: v for k, v in closing.items() if k != "step"}
        metrics["train_samples"] = len(train_data[0])  # the rows kept, as the Trainer counts its dataset
        report("train", metrics)
    if args.do_eval:
        metrics = {}
        if validation is not None:  # on every rank: under FSDP each forward gathers the weights from all of them
            import torch

            ids, labels = (torch.tensor(v, dtype=torch.long) for v in validation)
            metrics["eval_loss"] = round(evaluate(m, ids, labels, args.eval_batch_size), 6)
        if eval_gen is not None:
            s = scores(eval_gen, "eval")
            metrics.update({f"eval_{k}": s[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")})
            metrics.update(speed_metrics("eval", s["seconds"], len(s["preds"]),
                                         math.ceil(len(s["preds"]) / args.eval_batch_size)))
        metrics["eval_samples"] = len(eval_gen[0]) if eval_gen is not None else len(validation[0])
        if epoch is not None:
            metrics["epoch"] = epoch
        report("eval", metrics)
    if args.do_predict:
        s = scores(test_gen, "predict")
        write_predictions(out, s["preds"], s["refs"])
        metrics = {f"predict_{k}": s[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
        metrics.update(speed_metrics("predict", s["seconds"], len(s["preds"]),
                                     math.ceil(len(s["preds"]) / args.eval_batch_size)))
        metrics["predict_samples"] = len(test_gen[0])
        report("predict", metrics)
    if args.do_train and args.full:
        print(f"glm-finetune: saved the model to {out}; chat with it: glm-chat --model {out}", file=say)
    elif args.do_train:
        lora = part.kind.startswith("LoRA")
        quant = f" --quant {args.quant}" if args.quant else ""
        print(f"glm-finetune: saved the {'LoRA adapter' if lora else 'prefix'} to {out}; chat with it: glm-chat "
              f"--model {args.model}{quant} {'--lora' if lora else '--ptuning'} {out}", file=say)
    return 0


def _check_model_folder(folder: Path, resumed: bool = False) -> None:
    """`resumed`: a --full checkpoint, which is a whole model with its trainer_state.json."""
    if (folder / "trainer_state.json").is_file() and not resumed or not (folder / "ice_text.model").is_file():
        if (folder / "trainer_state.json").is_file() and not resumed or (folder / "adapter_config.json").is_file():
            raise DataError(f"{folder} is a glm-finetune checkpoint, not a model: give the base model with "
                            f"--model_name_or_path and this folder with --ptuning_checkpoint (or --lora)")
        raise DataError(f"{folder} has no ice_text.model (the tokenizer): use a full checkpoint")


def _check_resume(resume: Path, max_steps: int) -> None:
    step = checkpoint_step(resume)
    if step >= max_steps:
        raise TrainingError(f"{resume} is at step {step}: --max-steps {max_steps} leaves nothing to train; raise "
                            "--max-steps to continue")
    if not any((resume / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise CheckpointError(f"the checkpoint {resume} has no config.json (nor adapter_config.json): it is "
                              "incomplete; resume from another checkpoint")


def _load(args, resume: Path | None, folder: Path, train_ids: list[list[int]]):
    """(model, part, ranks): the model with what trains (or what is evaluated) on it: `resume`'s part, --ptuning /
    --lora, a new LoRA adapter (--lora-rank), every weight (--full) or a new prefix; None when nothing trains."""
    from glm.finetune.lora import add_lora
    from glm.finetune.part import trainable_part
    from glm.finetune.prefix import add_prefix

    if resume is not None and not args.full:  # a --full checkpoint is the model itself (args.model)
        args.lora, args.ptuning = ((str(resume), None) if (resume / "adapter_config.json").is_file()
                                   else (None, str(resume)))
    # The ranks torchrun started (a group of one for --full alone), agreeing on model and data.
    ranks = launch.join(args, [folder, resume], train_ids) if args.do_train else Ranks()
    m = load_from_args(args, log=launch.quiet_stream())
    cfg = m.config
    if cfg.pre_seq_len:  # resuming, or --ptuning: go on with that prefix
        if args.pre_seq_len not in (None, cfg.pre_seq_len) or args.prefix_projection > cfg.prefix_projection:
            raise DataError(f"the prefix being continued has pre_seq_len {cfg.pre_seq_len} and prefix_projection "
                            f"{str(cfg.prefix_projection).lower()}: drop --pre-seq-len / --prefix-projection")
    elif args.lora_rank is not None:
        add_lora(m, args.lora_rank, args.lora_alpha, args.lora_dropout,
                 tuple(t.strip() for t in args.lora_target.split(",") if t.strip()), seed=args.seed)
    elif args.lora is None and args.do_train and not args.full:
        add_prefix(m, args.pre_seq_len or 128, args.prefix_projection, seed=args.seed)
    elif args.lora is None and args.pre_seq_len:
        raise DataError("--pre_seq_len without --ptuning_checkpoint would score an untrained prefix: give the "
                        "prefix with --ptuning_checkpoint, or drop --pre_seq_len to score the model alone")
    if not args.do_train:
        return m, None, ranks
    if args.gradient_checkpointing:
        checkpoint_blocks(m.model)
    if args.full:
        return m, full_part(m, ranks, args.compute_dtype), ranks
    return m, trainable_part(m, ranks, args.model if args.lora_rank is not None else None), ranks


__all__ = ["build_parser", "main"]
