"""Find a checkpoint (Hugging Face Hub repo id or local folder), read its shards, build the model, save it.

    hub        `resolve` (a local folder or a Hub download) and `checkpoint_files` (the weight files, shard index)
    reading    `WEIGHT_MAP` (checkpoint names), `read_tensors` (one file) and the checks on each tensor
    building   `build_model`: meta-device construction, then every tensor assigned as it is read
    quantizing quantize-on-load and checkpoints stored quantized (the one part that imports glm.quant)
    saving     `save_checkpoint` and `save_prefix`, under the checkpoint's own names

The model is built on the meta device and every tensor is assigned as it is read, so peak host memory stays
about one copy of the weights (less with `quant`, which quantizes each block as soon as it is complete).
Only safetensors and `torch.load(weights_only=True)` are used: a checkpoint cannot run code.
"""

from __future__ import annotations

from glm.errors import CheckpointError, ConfigError, one_line
from glm.loader.building import build_model
from glm.loader.hub import DEFAULT_MODEL, HUB_PATTERNS, MAX_INDEX_BYTES, checkpoint_files, resolve
from glm.loader.reading import WEIGHT_MAP, checkpoint_to_module, module_to_checkpoint, read_tensors
from glm.loader.saving import TOKENIZER_FILES, save_checkpoint, save_prefix

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DEFAULT_MODEL",
    "HUB_PATTERNS",
    "MAX_INDEX_BYTES",
    "TOKENIZER_FILES",
    "WEIGHT_MAP",
    "build_model",
    "checkpoint_files",
    "checkpoint_to_module",
    "module_to_checkpoint",
    "one_line",
    "read_tensors",
    "resolve",
    "save_checkpoint",
    "save_prefix",
]
