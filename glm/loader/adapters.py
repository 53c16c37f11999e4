"""Reading an adapter folder for `ChatGLM.add_adapter`: a LoRA adapter as PEFT saves it, or a P-Tuning v2 prefix as
the official ptuning scripts save it. Every tensor is checked against the model before anything is changed."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

from glm.config import GLMConfig
from glm.errors import CheckpointError
from glm.loader.building import on_meta
from glm.loader.hub import checkpoint_files
from glm.loader.lora import read_lora
from glm.loader.reading import read_tensors
from glm.lora import LoRAFactors
from glm.model import GLM, PrefixEncoder

_ENC = "transformer.prefix_encoder."


def read_adapter(model: GLM, folder: str | Path) -> LoRAFactors | list[tuple[Tensor, Tensor]]:
    """A LoRA adapter's factors, or a prefix's keys and values per layer ((1, H, P, D) each, in the model's dtype
    and on its device). Raises a one-line CheckpointError (or ConfigError) for anything that does not fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no adapter folder {folder}")
    if (folder / "adapter_config.json").is_file():
        cfg, factors = read_lora(model, folder)
        return LoRAFactors(factors, cfg["scaling"])
    if (folder / "config.json").is_file():
        return read_prefix(model, folder)
    raise CheckpointError(f"{folder} is neither a PEFT LoRA adapter (adapter_config.json) nor a P-Tuning v2 prefix "
                          "(config.json with pre_seq_len)")


def read_prefix(model: GLM, folder: Path) -> list[tuple[Tensor, Tensor]]:
    """The keys and values of a P-Tuning v2 folder's prefix on `model` (one pass of its encoder)."""
    pcfg = GLMConfig.from_json(folder / "config.json")
    if not pcfg.pre_seq_len:
        raise CheckpointError(f"{folder}/config.json has no pre_seq_len: not a P-Tuning v2 prefix")
    cfg = copy.copy(model.config)  # the encoder's shape follows the base, which is what its tensors must fit
    cfg.pre_seq_len, cfg.prefix_projection = pcfg.pre_seq_len, pcfg.prefix_projection
    with on_meta():
        enc = PrefixEncoder(cfg)
    want = {k: tuple(t.shape) for k, t in enc.state_dict().items()}
    got: dict[str, Tensor] = {}
    for path in checkpoint_files(folder):
        for key, t in read_tensors(path):
            if key.startswith(_ENC):
                name = key.removeprefix(_ENC)
                if name not in want:
                    raise CheckpointError(f"{path}: unexpected tensor {key!r} (prefix_projection is "
                                          f"{pcfg.prefix_projection} in {folder}/config.json)")
                if tuple(t.shape) != want[name]:
                    raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, expected {want[name]}: the "
                                          "prefix is for another model size")
                if not t.is_floating_point():
                    raise CheckpointError(f"{path}: {key} is {t.dtype}, not floating point: the file is corrupt")
                got[name] = t.float()
    missing = sorted(set(want) - set(got))
    if missing:
        raise CheckpointError(f"{folder} lacks {_ENC}{missing[0]}: not a P-Tuning v2 prefix of this model")
    enc.load_state_dict(got, assign=True)
    with torch.no_grad():
        return model.prefix_kv(enc.to(model.device).eval())


__all__ = ["read_adapter", "read_prefix"]
