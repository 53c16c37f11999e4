"""What trains, as the one training loop sees it: its parameters, the module the loss runs on, the modules whose
dropout is on while training, and how it and its optimizer state are saved.

A P-Tuning prefix (`prefix_part`, the default) or LoRA factors (`lora_part`, when the model has an adapter) train
under DistributedDataParallel on several ranks; every weight (`glm.finetune.full.full_part`, `--full`) under FSDP.
`trainable_part` picks the prefix or the LoRA factors of a model. The loop calls `save` and the optimizer-state
functions on every rank (FSDP gathers the shards there); only rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glm.finetune.distributed import Ranks, data_parallel
from glm.finetune.lora import lora_parameters, save_adapter
from glm.finetune.prefix import net_of, prefix_parameters
from glm.loader import save_prefix
from glm.lora import lora_modules


@dataclass
class Part:
    """The trainable part of a model.

    kind: what it is, in words ("P-Tuning prefix", "LoRA adapter", "every weight"). params: what the optimizer
    updates (float32, requiring grad). module: what the loss runs on (the model, or its DDP / FSDP form). modules:
    switched to train mode while training (their dropout). save(folder): writes the part (rank 0) in the layout
    `glm.load` reads. optimizer_state(opt): the optimizer's whole state on rank 0, the same at any number of ranks;
    load_optimizer_state(opt, state) takes it back.
    """

    kind: str
    params: list[nn.Parameter]
    module: nn.Module
    modules: list[nn.Module]
    save: Callable[[Path], None]
    optimizer_state: Callable[[torch.optim.Optimizer], dict]
    load_optimizer_state: Callable[[torch.optim.Optimizer, dict], None]
    ranks: Ranks


def _replicated(kind: str, net, params: list[nn.Parameter], modules: list[nn.Module], ranks: Ranks,
                write: Callable[[Path], object]) -> Part:
    """A part whose parameters every rank holds whole (DDP): rank 0 saves them and the optimizer state as they are."""

    def save(folder: Path) -> None:
        if ranks.main:
            write(folder)

    return Part(kind, params, data_parallel(net, ranks), modules, save, lambda opt: opt.state_dict(),
                lambda opt, state: opt.load_state_dict(state), ranks)


def prefix_part(m, ranks: Ranks | None = None) -> Part:
    """The P-Tuning v2 prefix encoder of `m` (everything else frozen), saved in the official ptuning layout."""
    net = net_of(m)
    base = getattr(m, "path", None)
    return _replicated("P-Tuning prefix", net, prefix_parameters(net), [net.prefix_encoder], ranks or Ranks(),
                       lambda folder: save_prefix(net, folder, base_folder=base))


def lora_part(m, ranks: Ranks | None = None, base_model: str | None = None) -> Part:
    """The LoRA factors of `m` (everything else frozen), saved in PEFT's layout; `base_model`: the name its
    adapter_config.json gives the base (default: the folder `m` was loaded from)."""
    net = net_of(m)
    if base_model is None:
        base_model = str(getattr(m, "path", "") or "") or None
    params = list(lora_parameters(net).values())
    return _replicated("LoRA adapter", net, params, list(lora_modules(net).values()), ranks or Ranks(),
                       lambda folder: save_adapter(net, folder, base_model))


def trainable_part(m, ranks: Ranks | None = None, base_model: str | None = None) -> Part:
    """The part of `m` that trains: its LoRA factors when it has an adapter, else its P-Tuning prefix. Freezes the
    rest of the model."""
    return lora_part(m, ranks, base_model) if lora_modules(net_of(m)) else prefix_part(m, ranks)


__all__ = ["Part", "lora_part", "prefix_part", "trainable_part"]
