"""What trains, as the training loop sees it: its parameters, the module the loss runs on, and how it is saved.

A P-Tuning prefix (`prefix_part`, the default) trains under DistributedDataParallel on several ranks; every weight
(`glm.finetune.full.full_part`, `--full`) under FSDP. The loop calls `save` and the optimizer-state functions on
every rank (FSDP gathers the shards there); only rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glm.finetune.distributed import Ranks, data_parallel
from glm.finetune.prefix import net_of, prefix_parameters
from glm.loader import save_prefix


@dataclass
class Part:
    """The trainable part of a model.

    params: what the optimizer updates. module: what the loss runs on (the model, or its DDP / FSDP form).
    save(folder): writes the part (rank 0) in the layout `glm.load` reads. optimizer_state(opt): the optimizer's
    whole state on rank 0, the same at any number of ranks; load_optimizer_state(opt, state) takes it back.
    """

    params: list[nn.Parameter]
    module: nn.Module
    save: Callable[[Path], None]
    optimizer_state: Callable[[torch.optim.Optimizer], dict]
    load_optimizer_state: Callable[[torch.optim.Optimizer, dict], None]
    ranks: Ranks


def prefix_part(m, ranks: Ranks | None = None) -> Part:
    """The P-Tuning v2 prefix encoder of `m` (everything else frozen), replicated on every rank: its optimizer
    state is whole on each one, so rank 0 saves it as it is."""
    ranks = ranks or Ranks()
    net = net_of(m)
    base = getattr(m, "path", None)

    def save(folder: Path) -> None:
        if ranks.main:
            save_prefix(net, folder, base_folder=base)

    return Part(prefix_parameters(net), data_parallel(net, ranks), save, lambda opt: opt.state_dict(),
                lambda opt, state: opt.load_state_dict(state), ranks)


__all__ = ["Part", "prefix_part"]
