"""Read a LoRA adapter as PEFT saves it (`adapter_config.json` + `adapter_model.safetensors` / `.bin`) and wrap
the targeted linears of a GLM with it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from glm.config import read_json
from glm.errors import CheckpointError
from glm.loader.reading import read_tensors
from glm.lora import PEFT_PREFIX as PREFIX
from glm.lora import TARGETS, LoRALinear

_KEY = re.compile(r"layers\.(\d+)\.(attention|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight")
_MODULE = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}


def read_adapter_config(folder: Path) -> dict:
    """PEFT's adapter_config.json, checked for what we support; anything else is a one-line CheckpointError."""
    if not folder.is_dir():
        raise CheckpointError(f"no LoRA adapter folder {folder}")
    try:
        cfg = read_json(folder / "adapter_config.json", 1 << 20, CheckpointError, "re-save the adapter with PEFT")
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no adapter_config.json: not a PEFT LoRA adapter") from None
    fix = f"in {folder}/adapter_config.json"
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"peft_type {cfg.get('peft_type')!r} is not supported, only LORA ({fix})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    for name, v in (("r", r), ("lora_alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise CheckpointError(f"{name} must be a positive number, got {v!r} ({fix})")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"bias {cfg['bias']!r} is not supported, only 'none' ({fix})")
    if cfg.get("modules_to_save"):
        raise CheckpointError(f"modules_to_save {cfg['modules_to_save']!r} is not supported ({fix})")
    if cfg.get("use_dora"):
        raise CheckpointError(f"use_dora (DoRA) is not supported ({fix})")
    if cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"fan_in_fan_out is for GPT-2-style Conv1D layers, not ChatGLM-6B ({fix})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"rank_pattern / alpha_pattern are not supported ({fix})")
    targets = cfg.get("target_modules") or ["query_key_value"]
    if isinstance(targets, str):  # a regex over full module names, as PEFT matches it
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise CheckpointError(f"target_modules {targets!r} is not a valid regex ({e}) ({fix})") from None
        targets = [t for t in TARGETS if pattern.fullmatch(f"transformer.layers.0.{_MODULE[t]}.{t}")]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise CheckpointError(f"target_modules {bad or targets!r}: ChatGLM-6B's linears are {', '.join(TARGETS)} "
                              f"({fix}; is this an adapter for another model?)")
    base = cfg.get("base_model_name_or_path") or ""
    if re.search(r"chatglm[23]|glm-4", str(base), re.IGNORECASE):
        raise CheckpointError(f"this adapter is for {base}, not ChatGLM-6B v1 ({fix})")
    scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return {"r": int(r), "scaling": float(scaling), "targets": list(targets),
            "dropout": float(cfg.get("lora_dropout") or 0.0)}


def adapter_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")


def read_lora(model: nn.Module, folder: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter's settings and its factors by module name, A (r, in) and B (out, r), each checked against the
    linear of `model` it targets: a one-line CheckpointError (naming the tensor) for anything wrong."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    path = adapter_file(folder)
    for key, t in read_tensors(path):
        rest = key.removeprefix(PREFIX)
        m = _KEY.fullmatch(rest)
        if rest == key or m is None:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}: not a LoRA factor of ChatGLM-6B "
                                  "(base_model.model.transformer.layers.N.<module>.lora_A/B.weight)")
        layer, block, leaf, which = m.groups()
        factors.setdefault(f"layers.{layer}.{block}.{leaf}", {})[which] = t
    if not factors:
        raise CheckpointError(f"{path} holds no LoRA factors")
    out = {}
    for name, ab in sorted(factors.items()):
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: {name} does not exist in this model (is the adapter for a model with "
                                  "more layers?)") from None
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        a, b = ab["A"], ab["B"]
        out_f, in_f = getattr(base, "out_features", None), getattr(base, "in_features", None)
        for which, t, want in (("A", a, (cfg["r"], in_f)), ("B", b, (out_f, cfg["r"]))):
            if tuple(t.shape) != want:
                raise CheckpointError(f"{path}: {PREFIX}{name}.lora_{which}.weight has shape {tuple(t.shape)}, "
                                      f"expected {want}: the adapter is for another model size (or another r)")
            if not t.is_floating_point():
                raise CheckpointError(f"{path}: {PREFIX}{name}.lora_{which}.weight is {t.dtype}, not floating "
                                      "point: the file is corrupt")
        if not (a.isfinite().all() and b.isfinite().all()):
            raise CheckpointError(f"{path}: {PREFIX}{name} holds NaN or inf values: the adapter is broken (saved by "
                                  "a training run that diverged?); use an earlier checkpoint or train it again")
        # The factors stay float32 (as PEFT keeps them), whatever the base's dtype: they are small.
        out[name] = (a.float(), b.float())
    return cfg, out


def apply_lora(model: nn.Module, folder: str | Path) -> dict:
    """Wrap the linears an adapter targets in `LoRALinear`, with its factors; returns its settings."""
    cfg, factors = read_lora(model, folder)
    for name, (a, b) in factors.items():
        base = model.get_submodule(name)
        dev = next(base.parameters()).device
        wrapped = LoRALinear(base, a.to(dev, torch.float32), b.to(dev, torch.float32), cfg["scaling"], cfg["dropout"])
        wrapped.train(base.training)  # a new module is in training mode: its dropout would be on at inference
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, wrapped)
    return cfg


__all__ = ["apply_lora", "read_adapter_config", "read_lora"]
