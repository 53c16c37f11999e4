"""LoRA: a low-rank update added to a linear layer, `y = base(x) + scaling * (x A^T) B^T` (PEFT's `LoraLayer`).

The base stays as it is (a float `nn.Linear` or a `QuantLinear`: nothing is requantized); `merge_lora` folds the
update into float weights. Module names and factor shapes are PEFT's: A is (r, in), B is (out, r).
`MultiLoRALinear` holds many adapters at once and applies to each row of a batch the one that row uses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # the linears of a GLM block
PEFT_PREFIX = "base_model.model.transformer."  # PEFT's key prefix of our module names, for the ChatGLM-6B model


@dataclass
class LoRAFactors:
    """A LoRA adapter as read from its folder: PEFT's factors by module name, A (r, in) and B (out, r)."""

    factors: dict[str, tuple[Tensor, Tensor]]
    scaling: float


class LoRALinear(nn.Module):
    """`base` plus a rank-r update; `scaling` is lora_alpha / r (or / sqrt(r) with rsLoRA)."""

    def __init__(self, base: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = lora_A.shape[1], lora_B.shape[0]
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


class RowAdapters(threading.local):
    """Which adapter each batch row of the forward under way uses: `index` (B,) long, 0 for none, or None when no
    row uses one. The model calls its linears without knowing of rows, so whoever runs a forward sets this around
    it; per thread, as an uncached forward of the server may run beside the scheduler's step."""

    index: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """`base` plus, on each row of the batch, the update of the adapter that row uses (`rows.index`).

    The factors of every adapter are stacked, zero-padded to the largest rank, with the scaling folded into B:
    `A` (N+1, in, r) and `B` (N+1, r, out), slot 0 all zeros ("no adapter"). A step gathers each row's pair and
    runs two batched matrix products, with no loop over rows; the base is never touched. The factors stay float32,
    as PEFT keeps them: they are small, and a CPU multiplies such thin float32 matrices faster than bfloat16 ones.
    """

    def __init__(self, base: nn.Module, rows: RowAdapters, device):
        super().__init__()
        self.base, self.rows = base, rows
        in_f, out_f = base.in_features, base.out_features
        self.in_features, self.out_features = in_f, out_f
        self.register_buffer("A", torch.zeros(1, in_f, 0, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(1, 0, out_f, device=device), persistent=False)

    def resize(self, n: int, r: int) -> None:
        """Room for slots [0, n) of rank up to r; the slots already set keep their factors."""
        n0, r0 = self.A.shape[0], self.A.shape[2]
        if n <= n0 and r <= r0:
            return
        A = self.A.new_zeros(max(n, n0), self.in_features, max(r, r0))
        B = self.B.new_zeros(max(n, n0), max(r, r0), self.out_features)
        A[:n0, :, :r0], B[:n0, :r0] = self.A, self.B
        self.A, self.B = A, B  # whole new tensors: a forward under way keeps the ones it read

    def set(self, slot: int, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Put PEFT's factors, A (r, in) and B (out, r), into `slot`."""
        r = lora_A.shape[0]
        self.resize(slot + 1, r)
        self.A[slot, :, :r] = lora_A.t().to(self.A)
        self.B[slot, :r] = (lora_B.to(self.B) * scaling).t()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        index = self.rows.index
        if index is None or self.A.shape[2] == 0:
            return y
        a, b = self.A[index], self.B[index]  # (B, in, r), (B, r, out): each row's own adapter
        return y + torch.bmm(torch.bmm(x.float(), a), b).to(y.dtype)  # x (B, T, in)

    def extra_repr(self) -> str:
        return f"adapters={self.A.shape[0] - 1}, r_max={self.A.shape[2]}"


__all__ = ["PEFT_PREFIX", "TARGETS", "LoRAFactors", "LoRALinear", "MultiLoRALinear", "RowAdapters", "lora_modules",
           "merge_lora"]
