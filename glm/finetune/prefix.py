"""The part that trains: a fresh P-Tuning v2 prefix encoder, and freezing everything else."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glm.errors import DataError
from glm.loader import save_prefix
from glm.model import GLM, PrefixEncoder


def net_of(m) -> GLM:
    """The `GLM` of a `glm.load` model (a `GLM` itself is returned as it is)."""
    return m.model if hasattr(m, "model") else m


def add_prefix(m, pre_seq_len: int, prefix_projection: bool = False, seed: int = 0) -> None:
    """Give a loaded model a fresh P-Tuning v2 prefix encoder (float32, PyTorch's default initialisation, as the
    official code leaves it)."""
    net = net_of(m)
    cfg = net.config
    if not 0 < pre_seq_len <= cfg.max_sequence_length:
        raise DataError(f"--pre-seq-len must be in 1..{cfg.max_sequence_length}, got {pre_seq_len}")
    cfg.pre_seq_len, cfg.prefix_projection = pre_seq_len, prefix_projection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.prefix_encoder = PrefixEncoder(cfg).to(net.device).eval()


def prefix_parameters(m) -> list[nn.Parameter]:
    """Freeze the whole model but its prefix encoder, which becomes float32 and trainable; returns its parameters."""
    net = net_of(m)
    if not net.config.pre_seq_len:
        raise DataError("the model has no P-Tuning prefix: add one with add_prefix")
    net.requires_grad_(False)
    enc = net.prefix_encoder.float().requires_grad_(True)
    return list(enc.parameters())


class PrefixPart:
    """The prefix encoder as the trainable part; saved in the official ptuning layout (`save_prefix`)."""

    kind = "P-Tuning prefix"

    def __init__(self, m):
        self.net = net_of(m)
        self.base_folder = getattr(m, "path", None)
        self.parameters = prefix_parameters(self.net)
        self.modules = [self.net.prefix_encoder]

    def save(self, folder: Path) -> None:
        save_prefix(self.net, folder, base_folder=self.base_folder)


__all__ = ["PrefixPart", "add_prefix", "net_of", "prefix_parameters"]
