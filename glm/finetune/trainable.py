"""What trains: a P-Tuning v2 prefix or LoRA factors, behind one interface that the loop uses (its parameters, the
modules whose dropout is on in training, how it is saved), so that there is one loop for both."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn

from glm.finetune.lora import LoRAPart
from glm.finetune.prefix import PrefixPart, net_of
from glm.lora import lora_modules


class Trainable(Protocol):
    kind: str  # what it is, in words ("P-Tuning prefix", "LoRA adapter")
    parameters: list[nn.Parameter]  # float32, requiring grad; everything else of the model is frozen
    modules: list[nn.Module]  # switched to train mode while training (their dropout)

    def save(self, folder: Path) -> None: ...


def trainable_part(m) -> Trainable:
    """The part of `m` that trains: its LoRA factors when it has an adapter, else its P-Tuning prefix. Freezes the
    rest of the model."""
    return LoRAPart(m) if lora_modules(net_of(m)) else PrefixPart(m)


__all__ = ["Trainable", "trainable_part"]
