"""Reading a checkpoint's tensors: the checkpoint's names (`WEIGHT_MAP`), one file's tensors, and their checks.

Only safetensors and `torch.load(weights_only=True)` are used: a checkpoint cannot run code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from glm.errors import CheckpointError

# Checkpoint name -> module name; "{}" is the layer index. None: present in the checkpoint, deliberately unused.
WEIGHT_MAP: dict[str, str | None] = {
    "transformer.word_embeddings.weight": "word_embeddings.weight",
    "transformer.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "transformer.layers.{}.input_layernorm.bias": "layers.{}.input_layernorm.bias",
    "transformer.layers.{}.attention.query_key_value.weight": "layers.{}.attention.query_key_value.weight",
    "transformer.layers.{}.attention.query_key_value.bias": "layers.{}.attention.query_key_value.bias",
    "transformer.layers.{}.attention.query_key_value.weight_scale": "layers.{}.attention.query_key_value.weight_scale",
    "transformer.layers.{}.attention.dense.weight": "layers.{}.attention.dense.weight",
    "transformer.layers.{}.attention.dense.bias": "layers.{}.attention.dense.bias",
    "transformer.layers.{}.attention.dense.weight_scale": "layers.{}.attention.dense.weight_scale",
    "transformer.layers.{}.attention.rotary_emb.inv_freq": None,  # recomputed: see glm.attention.rotary_inv_freq
    "transformer.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "transformer.layers.{}.post_attention_layernorm.bias": "layers.{}.post_attention_layernorm.bias",
    "transformer.layers.{}.mlp.dense_h_to_4h.weight": "layers.{}.mlp.dense_h_to_4h.weight",
    "transformer.layers.{}.mlp.dense_h_to_4h.bias": "layers.{}.mlp.dense_h_to_4h.bias",
    "transformer.layers.{}.mlp.dense_h_to_4h.weight_scale": "layers.{}.mlp.dense_h_to_4h.weight_scale",
    "transformer.layers.{}.mlp.dense_4h_to_h.weight": "layers.{}.mlp.dense_4h_to_h.weight",
    "transformer.layers.{}.mlp.dense_4h_to_h.bias": "layers.{}.mlp.dense_4h_to_h.bias",
    "transformer.layers.{}.mlp.dense_4h_to_h.weight_scale": "layers.{}.mlp.dense_4h_to_h.weight_scale",
    "transformer.final_layernorm.weight": "final_layernorm.weight",
    "transformer.final_layernorm.bias": "final_layernorm.bias",
    "transformer.prefix_encoder.embedding.weight": "prefix_encoder.embedding.weight",  # P-Tuning v2
    "transformer.prefix_encoder.trans.{}.weight": "prefix_encoder.trans.{}.weight",  # with prefix_projection
    "transformer.prefix_encoder.trans.{}.bias": "prefix_encoder.trans.{}.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.weight_scale": "lm_head.weight_scale",  # ours, with quantize_lm_head
}
_INVERSE_MAP = {v: k for k, v in WEIGHT_MAP.items() if v is not None}
_LAYER_RE = re.compile(r"\.(\d+)\.")


def _translate(name: str, table: dict[str, str | None]) -> str | None:
    m = _LAYER_RE.search(name)
    key = _LAYER_RE.sub(".{}.", name, count=1) if m else name
    if key not in table:
        raise KeyError(name)
    target = table[key]
    return target.format(m.group(1)) if (target is not None and m) else target


def checkpoint_to_module(name: str) -> str | None:
    """Module name of a checkpoint tensor (None for tensors we deliberately skip)."""
    try:
        return _translate(name, WEIGHT_MAP)
    except KeyError:
        raise CheckpointError(f"unexpected tensor {name!r}: this does not look like a ChatGLM-6B checkpoint") from None


def module_to_checkpoint(name: str) -> str:
    return _translate(name, _INVERSE_MAP)


def read_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs of one weight file, memory-mapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a state dict: re-download the checkpoint")
            for name, t in state.items():
                if not isinstance(name, str) or not isinstance(t, Tensor):
                    raise CheckpointError(f"{path.name} holds a {type(t).__name__} under {str(name)[:80]!r} "
                                          "where a named tensor belongs: the file is corrupt, re-download it")
                yield name, t
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file surfaces in many ways
        raise CheckpointError(f"cannot read {path.name} ({type(e).__name__}: {e}): the file is corrupt, re-download it")


def check_tensor(ck_name: str, t: Tensor, expect: Tensor, stored_quant: int) -> None:
    """Refuse a tensor whose shape or kind of dtype is not what the model holds there (a one-line error)."""
    if tuple(t.shape) != tuple(expect.shape):
        raise CheckpointError(
            f"{ck_name} has shape {tuple(t.shape)} but config.json implies {tuple(expect.shape)}: "
            "the weights and config.json do not belong together"
        )
    if t.layout != torch.strided or t.is_meta:
        raise CheckpointError(f"{ck_name} is not a dense tensor with data ({t.layout}, {t.device.type}): "
                              "the file is corrupt, re-download it")
    if expect.is_floating_point():
        if not t.is_floating_point():
            hint = ("its config.json lacks quantization_bit" if t.dtype == torch.int8 and not stored_quant
                    else "the checkpoint is corrupt")
            raise CheckpointError(f"{ck_name} is {t.dtype} but must be floating point: {hint}; re-download it")
    elif t.dtype != expect.dtype:
        raise CheckpointError(f"{ck_name} is {t.dtype} but this int{stored_quant} checkpoint stores it as "
                              f"{expect.dtype}: the weights and config.json do not belong together")


__all__ = ["WEIGHT_MAP", "check_tensor", "checkpoint_to_module", "module_to_checkpoint", "read_tensors"]
