"""LoRA: a low-rank update added to a linear layer, `y = base(x) + scaling * (x A^T) B^T` (PEFT's `LoraLayer`).

The base stays as it is (a float `nn.Linear` or a `QuantLinear`: nothing is requantized); `merge_lora` folds the
update into float weights. Module names and factor shapes are PEFT's: A is (r, in), B is (out, r).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # the linears of a GLM block
PEFT_PREFIX = "base_model.model.transformer."  # PEFT's key prefix of our module names, for the ChatGLM-6B model


class LoRALinear(nn.Module):
    """`base` plus a rank-r update; `scaling` is lora_alpha / r (or / sqrt(r) with rsLoRA)."""

    def __init__(self, base: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)  # (r, in)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)  # (out, r)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.t() @ b.t() * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its float base weight and put the base back in its place."""
    for name, m in lora_modules(model).items():
        if not isinstance(m.base, nn.Linear):
            raise ValueError(f"{name}: a LoRA update on a quantized layer cannot be merged without requantizing: "
                             "load the float checkpoint to merge")
        w = m.base.weight
        with torch.no_grad():
            delta = (m.lora_B.float() @ m.lora_A.float()) * m.scaling  # (out, in)
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m.base)
    return model


__all__ = ["PEFT_PREFIX", "TARGETS", "LoRALinear", "lora_modules", "merge_lora"]
