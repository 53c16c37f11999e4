"""LoRA factors as the trainable part: freeze the model but its `lora_A` / `lora_B`, named as PEFT names them."""

from __future__ import annotations

from torch import nn

from glm.finetune.prefix import net_of
from glm.lora import PEFT_PREFIX, lora_modules


def lora_parameters(m) -> dict[str, nn.Parameter]:
    """Freeze the whole model but its LoRA factors, which become float32 and trainable; returns PEFT key ->
    parameter (`base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight`, ...)."""
    net = net_of(m)
    mods = lora_modules(net)
    if not mods:
        raise ValueError("the model has no LoRA adapter: load one with glm.load(..., lora=DIR)")
    net.requires_grad_(False)
    out = {}
    for name, mod in sorted(mods.items()):
        for which in ("lora_A", "lora_B"):
            p = getattr(mod, which)
            p.data = p.data.float()
            p.requires_grad_(True)
            out[f"{PEFT_PREFIX}{name}.{which}.weight"] = p
    return out


__all__ = ["lora_parameters"]
