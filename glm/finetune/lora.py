"""LoRA factors as the trainable part: fresh factors initialised as PEFT does, freezing the model but its `lora_A` /
`lora_B` (named as PEFT names them), and saving them in PEFT's adapter layout."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from glm.errors import DataError
from glm.finetune.prefix import net_of
from glm.lora import PEFT_PREFIX, TARGETS, LoRALinear, lora_modules

_BLOCK = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}


def add_lora(m, r: int, alpha: float = 8, dropout: float = 0.0, targets=("query_key_value",), seed: int = 0) -> None:
    """Wrap the `targets` linears of every layer with fresh LoRA factors, as PEFT's `LoraConfig(r, lora_alpha,
    lora_dropout, target_modules)` creates them: A Kaiming-uniform (a = sqrt(5), nn.Linear's init), B zero (the
    update starts at 0); float32; seeded. The defaults are PEFT's (lora_alpha 8, no dropout)."""
    net = net_of(m)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise DataError(f"--lora-rank must be a positive integer, got {r!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise DataError(f"--lora-alpha must be a positive number, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise DataError(f"--lora-dropout must be in [0, 1), got {dropout!r}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise DataError(f"--lora-target {','.join(bad or targets)!r}: ChatGLM-6B's linears are {', '.join(TARGETS)}")
    if lora_modules(net):
        raise DataError("the model already has a LoRA adapter: continue it instead of adding another")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(net.config.num_layers):
            for t in TARGETS:  # a fixed order, whatever the order of `targets`
                if t not in targets:
                    continue
                name = f"layers.{i}.{_BLOCK[t]}.{t}"
                base = net.get_submodule(name)
                dev = next(base.parameters()).device
                a = torch.empty(r, base.in_features, device=dev)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b = torch.zeros(base.out_features, r, device=dev)
                parent, _, leaf = name.rpartition(".")
                lora = LoRALinear(base, a, b, alpha / r, dropout).train(base.training)  # dropout off until training
                setattr(net.get_submodule(parent), leaf, lora)


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


def save_adapter(m, folder: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the model's LoRA factors as PEFT's `save_pretrained` does: `adapter_model.safetensors` (PEFT's keys,
    float32) and `adapter_config.json`; each file written whole, then renamed."""
    from safetensors.torch import save_file

    net = net_of(m)
    mods = lora_modules(net)
    if not mods:
        raise ValueError("the model has no LoRA adapter to save")
    first = next(iter(mods.values()))
    r = first.lora_A.shape[0]
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    targets = [t for t in TARGETS if any(n.endswith("." + t) for n in mods)]
    state = {f"{PEFT_PREFIX}{n}.{w}.weight": getattr(mod, w).detach().float().cpu().contiguous()
             for n, mod in sorted(mods.items()) for w in ("lora_A", "lora_B")}
    config = {  # the fields PEFT (0.6) writes, with the values a LoRA of ChatGLM-6B has
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": _number(first.scaling * r), "lora_dropout": dropout,
        "modules_to_save": None, "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None,
        "target_modules": targets, "task_type": "CAUSAL_LM",
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "adapter_model.safetensors.tmp", out / "adapter_model.safetensors")
    (out / "adapter_config.json.tmp").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(out / "adapter_config.json.tmp", out / "adapter_config.json")
    return out


def _number(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


__all__ = ["add_lora", "lora_parameters", "save_adapter"]
