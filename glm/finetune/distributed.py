"""Training on several processes (`torchrun --nproc-per-node N -m glm.finetune`): the process group, each rank's
share of the rows, the data-parallel wrapper, and who speaks.

Every rank runs every optimizer step on its share of that step's micro-batches (`Ranks.micro_batches`); gradients
are averaged across ranks once per step (DistributedDataParallel for a prefix, FSDP for `--full`: see
`glm.finetune.full`). Only rank 0 logs and writes; a one-process run is a `Ranks()` of one, with no process group
at all (P-Tuning) or a group of one (`--full`, which always runs through FSDP).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from glm.errors import DistributedError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one training (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL: the rank's GPU)

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes the output folder."""
        return self.rank == 0

    def micro_batches(self, step: int, accumulation: int) -> range:
        """This rank's micro-batches (indices into `batch_order`) of optimizer step `step`.

        A step takes world x accumulation micro-batches, and rank r the r-th run of `accumulation` of them: N ranks
        with accumulation A see the rows, in the order, that one process with accumulation N x A sees.
        """
        first = (step * self.world + self.rank) * accumulation
        return range(first, first + accumulation)

    def sync(self, module: nn.Module, last: bool):
        """The context of one micro-batch's backward: DDP all-reduces the gradients after the step's last one only
        (FSDP reduce-scatters every micro-batch: it keeps no unsharded gradients between them)."""
        if last or not isinstance(module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def sum(self, *values: float) -> list[float]:
        """`values` summed over the ranks (float64), e.g. the logged loss and token counts."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def torchrun_world() -> int:
    """The number of ranks torchrun started this process among (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def env_rank() -> int:
    """This process's rank as torchrun set it, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def start(device: str, timeout_s: float, need_group: bool = False) -> tuple[Ranks, str]:
    """Join the process group torchrun's environment describes; returns the ranks and this rank's device.

    Under torchrun each rank takes its own GPU (`cuda:LOCAL_RANK`) on CUDA; on a CPU the ranks talk over gloo.
    Alone, no group starts unless `need_group` (FSDP needs one: a group of one, on an in-memory store).
    Raises DistributedError (one line) for a port in use, ranks that do not all join within `timeout_s`, or more
    ranks on a machine than it has GPUs.
    """
    world, rank = torchrun_world(), env_rank()
    if world == 1 and not need_group:
        return Ranks(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise DistributedError("CUDA was requested but no CUDA GPU is available: use --device cpu", shared=True)
        if world > 1 or local > 0:
            if local >= torch.cuda.device_count():
                raise DistributedError(f"{os.environ.get('LOCAL_WORLD_SIZE', local + 1)} ranks on this "
                                       f"machine but it has {torch.cuda.device_count()} GPU(s): one rank a GPU, use "
                                       f"--nproc-per-node {torch.cuda.device_count()} or fewer")
            device = f"cuda:{local}"
        elif device in ("auto", "cuda"):
            device = f"cuda:{torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    where = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
        else:  # one process, not under torchrun: an in-memory store, no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e):
            raise DistributedError(f"port {where} is in use: choose another --master-port (or leave "
                                   "it out: glm-finetune --nproc-per-node then takes a free one)") from None
        raise DistributedError(f"cannot reach rank 0 at {where} within {timeout_s:g} s "
                               f"({_first_line(e)}): start every rank, or raise --dist-timeout") from None
    except dist.DistStoreError as e:
        raise DistributedError(f"not every one of the {world} ranks joined within {timeout_s:g} s "
                               f"({_first_line(e)}): a rank could not start; see its error, or raise "
                               "--dist-timeout") from None
    dev = torch.device(device if cuda else "cpu")
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=dev), device


def finish() -> None:
    """Leave the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def fingerprint(*parts: bytes | str | os.PathLike | None) -> str:
    """A short hash of what every rank must agree on: files are taken by name and size (a checkpoint's weights are
    too big to hash at each start), small JSON files and bytes by content."""
    h = hashlib.sha256()
    for p in parts:
        if p is None:
            h.update(b"\0")
        elif isinstance(p, bytes):
            h.update(p)
        else:
            folder = os.fspath(p)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                f = os.path.join(folder, name)
                if not os.path.isfile(f):
                    continue
                h.update(name.encode())
                if name.endswith(".json") and os.path.getsize(f) < 1 << 20:
                    with open(f, "rb") as fh:
                        h.update(fh.read())
                else:
                    h.update(str(os.path.getsize(f)).encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def check_agree(ranks: Ranks, what: str, value: str, fix: str) -> None:
    """Every rank must hold the same `value` (a fingerprint of `what`): else DistributedError on all of them."""
    if ranks.world == 1:
        return
    seen: list[str | None] = [None] * ranks.world
    dist.all_gather_object(seen, value)
    odd = [r for r, v in enumerate(seen) if v != seen[0]]
    if odd:
        raise DistributedError(f"ranks disagree on {what}: rank(s) {', '.join(map(str, odd))} differ from rank 0: "
                               f"{fix}", shared=True)


def data_parallel(net: nn.Module, ranks: Ranks) -> nn.Module:
    """The module the loss runs on: `net` itself alone, else `net` in DistributedDataParallel over the parameters
    that train (the frozen rest and the buffers are neither broadcast nor reduced: every rank loaded them)."""
    if ranks.world == 1:
        return net
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad] + [n for n, _ in net.named_buffers()]
    # DDP's own way to leave tensors alone; else it would broadcast the whole frozen model from rank 0 at the start.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, frozen)
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return _DDP(net, device_ids=ids)


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that answers `config` as the model does (`device` it has), so that the loss runs on it as on the model."""

    @property
    def config(self):
        return self.module.config


def checkpoint_blocks(net: nn.Module) -> None:
    """Activation checkpointing: each transformer block keeps only its input for the backward pass and runs its
    forward again there (less memory, about a third more compute). Installed on the blocks, not in the model."""
    from torch.utils.checkpoint import checkpoint

    for block in net.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def speaks(error: BaseException) -> bool:
    """Whether this process prints `error`: rank 0 always; another rank a failure of its own (starting, or once the
    group is up), not one that every rank meets alike (the options, the data, a disagreement rank 0 reports)."""
    if env_rank() == 0:
        return True
    if isinstance(error, DistributedError):
        return not error.shared
    return dist.is_available() and dist.is_initialized()


__all__ = ["Ranks", "check_agree", "checkpoint_blocks", "data_parallel", "env_rank", "fingerprint", "finish",
           "speaks", "start", "torchrun_world"]
