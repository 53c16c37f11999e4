"""The adapters one model serves side by side: LoRA adapters and P-Tuning v2 prefixes, by name.

Adapter 0 is the base (no adapter); the others are numbered in the order they are added, and a cache row uses one of
them for its whole request (see `Runner`). LoRA adapters share one stack of factors per targeted linear
(`glm.lora.MultiLoRALinear`), so that the rows of one step may each use another; a prefix is written into the slots
in front of its row's tokens. The files are read by `glm.loader.adapters`; this module holds tensors only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from glm.errors import GenerationError
from glm.lora import LoRAFactors, MultiLoRALinear, RowAdapters

PrefixKV = list[tuple[Tensor, Tensor]]  # per layer: key and value, each (1, H, P, D)


class Adapters:
    """Named adapters of one model, numbered from 1 (0: none); each a LoRA adapter or a P-Tuning prefix."""

    def __init__(self, model):
        self.model = model
        self.rows = RowAdapters()
        self.names: list[str] = []  # of adapters 1, 2, ...
        self._lora: list[int] = [0]  # by adapter: its slot in the LoRA stacks (0: none)
        self._prefix: list[PrefixKV | None] = [None]  # by adapter: its own prefix (None: the base's, if any)
        self._base_prefix: PrefixKV | None = None
        self._n_lora = 0

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str | None) -> int:
        """The number of adapter `name` (None: 0, the base); a GenerationError listing the names if unknown."""
        if name is None:
            return 0
        if isinstance(name, str) and name in self.names:
            return self.names.index(name) + 1
        have = f"its adapters are {', '.join(self.names)}" if self.names else "it has none (add one with add_adapter)"
        raise GenerationError(f"adapter {str(name)[:60]!r} is not one of this model's: {have}")

    def add(self, name: str, adapter: LoRAFactors | PrefixKV) -> int:
        """Add a LoRA adapter or a prefix (as `glm.loader.adapters.read_adapter` returns it) as `name`."""
        if isinstance(adapter, LoRAFactors):
            self._n_lora += 1
            slot = self._n_lora
            for name_, (a, b) in adapter.factors.items():
                self._multi(name_).set(slot, a, b, adapter.scaling)
            for m in self.model.modules():  # every stack gets the slot, zero where this adapter does not apply
                if isinstance(m, MultiLoRALinear):
                    m.resize(slot + 1, 0)
            self._lora.append(slot)
            self._prefix.append(None)
        else:
            self._lora.append(0)
            self._prefix.append(adapter)
        self.names.append(name)
        return len(self.names)

    def _multi(self, name: str) -> MultiLoRALinear:
        """The per-row LoRA wrapper of linear `name`, put in place the first time an adapter targets it."""
        mod = self.model.get_submodule(name)
        if not isinstance(mod, MultiLoRALinear):
            mod = MultiLoRALinear(mod, self.rows, self.model.device)
            mod.resize(self._n_lora, 0)
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, mod)
        return mod

    # -- what the runner asks

    def prefix(self, adapter: int) -> PrefixKV | None:
        """The prefix a row of `adapter` starts with: its own, else the base model's P-Tuning prefix, if any."""
        if self._prefix[adapter] is not None:
            return self._prefix[adapter]
        if not self.model.config.pre_seq_len:
            return None
        if self._base_prefix is None:  # one encoder pass, the first time a row needs it
            with torch.no_grad():
                self._base_prefix = self.model.prefix_kv()
        return self._base_prefix

    def prefix_len(self, adapter: int) -> int:
        kv = self._prefix[adapter]
        return kv[0][0].shape[2] if kv is not None else (self.model.config.pre_seq_len or 0)

    @property
    def max_prefix(self) -> int:
        """Prefix slots in front of every row: room for the longest prefix."""
        return max(self.prefix_len(a) for a in range(len(self._prefix)))

    def lora_slots(self, adapters: list[int]) -> list[int]:
        return [self._lora[a] for a in adapters]

    @contextlib.contextmanager
    def use(self, slots: Tensor | None):
        """Rows of the forward inside use LoRA slots `slots` (B,) (None: all the base)."""
        self.rows.index = slots
        try:
            yield
        finally:
            self.rows.index = None


__all__ = ["Adapters", "PrefixKV"]
