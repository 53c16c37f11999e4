"""The command line of training on several processes: `--nproc-per-node`, `--full` and their options, joining the
ranks before the model loads, and `glm-finetune --nproc-per-node N`, which starts torchrun's launcher itself.

Part of `glm-finetune` (imported by glm.finetune.cli only); the work itself is glm.finetune.distributed and
glm.finetune.full.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

from glm.errors import DistributedError

FULL_LEARNING_RATE = 1e-4  # the official ds_train_finetune.sh's


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes, full fine-tuning")
    g.add_argument("--full", action="store_true",
                   help="train every weight, with no prefix, as the official ds_train_finetune.sh (default learning "
                        "rate then 1e-4); sharded with FSDP over the ranks; bfloat16 compute on a GPU, float32 "
                        "master weights and Adam state. Saves a whole checkpoint")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each block's input for the backward pass (less memory, about 1/3 more compute)")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="train on N processes of this machine (one GPU each; on a CPU, N processes): starts "
                        "torchrun itself. Each optimizer step takes N x --gradient-accumulation-steps micro-batches")
    g.add_argument("--master-port", type=int, default=None, metavar="PORT",
                   help="with --nproc-per-node: the port of rank 0 on 127.0.0.1 (default: a free one)")
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="S",
                   help="seconds the ranks wait for each other to start and at each step (default: 1800)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option errors (argparse's one line, exit code 2), before anything loads."""
    if args.nproc_per_node is not None and not 1 <= args.nproc_per_node <= 1024:
        parser.error(f"--nproc-per-node must be from 1 to 1024, got {args.nproc_per_node}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        parser.error(f"--master-port must be a port number from 1 to 65535, got {args.master_port}")
    if not (args.dist_timeout > 0 and math.isfinite(args.dist_timeout)):
        parser.error(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.full:
        for opt, given in [("--pre-seq-len", args.pre_seq_len is not None), ("--prefix-projection",
                           args.prefix_projection), ("--ptuning", args.ptuning), ("--lora", args.lora),
                           ("--quant", args.quant)]:
            if given:
                parser.error(f"--full trains every float weight, with no prefix: drop {opt}")
        if args.dtype == "float16":
            parser.error("--full computes in bfloat16 or float32 (float16 would need loss scaling): "
                         "use --dtype bfloat16")
        if args.learning_rate == parser.get_default("learning_rate"):  # P-Tuning's 2e-2 would wreck the weights
            args.learning_rate = FULL_LEARNING_RATE


def wants_launch(args: argparse.Namespace) -> bool:
    """`glm-finetune --nproc-per-node N` with N > 1, not already one of torchrun's ranks."""
    return (args.nproc_per_node or 1) > 1 and "RANK" not in os.environ


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run `python -m glm.finetune ARGV` on `--nproc-per-node` ranks under torchrun's launcher, in this process.

    The ranks print their own errors (one line, rank 0 for what they all meet); a rank that stops makes the launcher
    stop the others. Returns the exit code.
    """
    from glm.engine import resolve_device

    n = args.nproc_per_node
    try:
        dev = resolve_device(args.device)
    except ValueError as e:
        raise DistributedError(str(e)) from None
    if dev.type == "cuda":
        import torch

        if n > torch.cuda.device_count():
            raise DistributedError(f"--nproc-per-node {n} but this machine has {torch.cuda.device_count()} GPU(s): "
                                   f"one rank a GPU, use --nproc-per-node {torch.cuda.device_count()} or fewer")
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks share the cores (torchrun would give each one thread)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's own log lines (a banner, a report of each failure) repeat what the ranks print in one line.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    port = ["--master-addr", "127.0.0.1", "--master-port", str(args.master_port)] if args.master_port else []
    try:
        run(parse_args(["--nproc-per-node", str(n), *port, "-m", "glm.finetune", *argv]))
    except SignalException:  # Ctrl+C (or a kill): the launcher stopped the ranks, and rank 0 said so
        return 130
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the others were stopped by the launcher after it
        if failure.exitcode > 0:  # a rank that exits with a code has printed why
            return failure.exitcode
        raise DistributedError(f"rank {rank} was killed by signal {-failure.exitcode} (out of memory?)") from None
    except dist.DistNetworkError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e):
            raise DistributedError(f"port {args.master_port} is in use: choose another --master-port, or leave it "
                                   "out to take a free one") from None
        raise DistributedError(f"the ranks could not start: {str(e).splitlines()[0][:200]}") from None
    return 0


def join(args: argparse.Namespace, folders: list, input_ids: list[list[int]]):
    """Join the ranks torchrun started (a group of one for `--full` alone), after the data is read and before the
    model loads; returns the ranks. Every rank must hold the same checkpoint `folders` and data (compared by
    fingerprint), and there must be a micro-batch of rows for each rank."""
    import torch

    from glm.finetune.distributed import check_agree, fingerprint, start, torchrun_world

    if "RANK" in os.environ and args.nproc_per_node not in (None, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))):
        raise DistributedError(f"--nproc-per-node {args.nproc_per_node} but torchrun started "
                               f"{os.environ.get('LOCAL_WORLD_SIZE')} ranks here: drop --nproc-per-node",
                               shared=True)
    per_epoch = math.ceil(len(input_ids) / args.batch_size)
    if torchrun_world() > per_epoch:  # some ranks would only ever repeat rows of the next epoch
        raise DistributedError(f"{torchrun_world()} ranks but the data makes only {per_epoch} micro-batch(es) of "
                               f"--batch-size {args.batch_size}: use --nproc-per-node {per_epoch} or fewer",
                               shared=True)
    compute = args.dtype
    ranks, args.device = start(args.device, args.dist_timeout, need_group=args.full)
    if ranks.world > 1:
        check_agree(ranks, "the checkpoint", fingerprint(*folders),
                    "give every rank the same --model (and --resume) files (compared: config.json, file sizes)")
        check_agree(ranks, "the training data", fingerprint(torch.tensor(input_ids).numpy().tobytes()),
                    "give every rank the same --train-file and options")
    if args.full:
        # Loaded on the CPU as stored (mapped from the file, shared by the ranks); FSDP moves each rank's shards to
        # its device in float32. Compute: bfloat16 on a GPU unless --dtype float32.
        gpu = ranks.device.type == "cuda"
        args.compute_dtype = torch.float32 if compute == "float32" or (compute == "auto" and not gpu) \
            else torch.bfloat16
        args.device, args.dtype = "cpu", "float32" if not gpu else _stored_dtype(folders[0])
    return ranks


def _stored_dtype(folder) -> str:
    from glm.config import GLMConfig

    d = GLMConfig.from_json(os.path.join(folder, "config.json")).torch_dtype
    return d if d in ("float32", "float16", "bfloat16") else "float32"


def lost_rank(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank went away (while the group is up), and not
    a failure of this rank's own. It prints one line unless the launcher stops this rank first (it does at once:
    the rank that went away is the one whose error or signal tells why)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if not (isinstance(e, dist.DistError) or any(s in str(e) for s in ("by peer", "gloo", "NCCL"))):
        return False
    time.sleep(3)  # torchrun's launcher ends this rank within this, when there is one
    print(f"glm-finetune: error: {error_prefix()}lost another rank ({str(e).splitlines()[0][:160]}): see its "
          "error", file=sys.stderr)
    return True


def error_prefix() -> str:
    """`rank N: ` on ranks other than 0, so that a rank's own failure says whose it is."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"rank {rank}: "


def quiet_stream():
    """Where the ranks other than 0 send what rank 0 alone prints (the load summary)."""
    from glm.finetune.distributed import env_rank

    return sys.stderr if env_rank() == 0 else open(os.devnull, "w")  # noqa: SIM115 - lives as long as the run


__all__ = ["add_args", "check_args", "error_prefix", "join", "launch", "lost_rank", "quiet_stream", "wants_launch"]
