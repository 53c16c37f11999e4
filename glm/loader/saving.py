"""Writing checkpoints under the release's own names: a whole model (safetensors) or a P-Tuning v2 prefix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from glm.errors import CheckpointError
from glm.loader.reading import module_to_checkpoint
from glm.model import GLM

TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json", "MODEL_LICENSE")


def save_checkpoint(model: GLM, folder: str | os.PathLike, tokenizer_folder: Path | None = None,
                    state: dict | None = None) -> Path:
    """Write `model` as `model.safetensors` + `config.json` under the checkpoint's own names.

    `state`: the model's state dict when `model` does not hold it whole (gathered from FSDP shards).
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {}
    for name, t in (model.state_dict() if state is None else state).items():
        if name == "inv_freq" or (cfg.tie_word_embeddings and name == "lm_head.weight" and t.is_floating_point()):
            continue  # a float head tied to the embedding is saved once, as the embedding
        tensors[module_to_checkpoint(name)] = t.detach().contiguous().cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    if tokenizer_folder is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_folder) / f
            if src.is_file() and src.resolve() != (out / f).resolve():
                shutil.copyfile(src, out / f)
    return out


def save_prefix(model: GLM, folder: str | os.PathLike, base_folder: Path | None = None) -> Path:
    """Write a P-Tuning v2 prefix as the official ptuning scripts save it.

    `config.json`: the base's (read from `base_folder` when given) with `pre_seq_len` and `prefix_projection`;
    `pytorch_model.bin`: only `transformer.prefix_encoder.*`, float32. Each file is written whole, then renamed.
    """
    cfg = model.config
    if not cfg.pre_seq_len:
        raise CheckpointError("the model has no P-Tuning prefix to save")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(base_folder) / "config.json" if base_folder is not None else None
    d = json.loads(base.read_text(encoding="utf-8")) if base is not None and base.is_file() else cfg.to_dict()
    d.update(pre_seq_len=cfg.pre_seq_len, prefix_projection=cfg.prefix_projection)
    state = {
        module_to_checkpoint(f"prefix_encoder.{name}"): t.detach().float().cpu().contiguous()
        for name, t in model.prefix_encoder.state_dict().items()
    }
    torch.save(state, out / "pytorch_model.bin.tmp")
    os.replace(out / "pytorch_model.bin.tmp", out / "pytorch_model.bin")
    (out / "config.json.tmp").write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(out / "config.json.tmp", out / "config.json")
    return out


__all__ = ["TOKENIZER_FILES", "save_checkpoint", "save_prefix"]
