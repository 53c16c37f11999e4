"""Reading the fixture checkpoints (helpers shared by the quantization tests).

Plain cached functions rather than conftest fixtures: a second `conftest` module would shadow
`tests/conftest.py` for the suite's `from conftest import ...`.
"""

import functools
import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parents[1] / "fixtures"
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def read_checkpoint(name: str) -> dict[str, torch.Tensor]:
    """All tensors of a fixture checkpoint (sharded with an index, or one pytorch_model.bin)."""
    folder = FIXTURES / name
    index = folder / "pytorch_model.bin.index.json"
    files = ["pytorch_model.bin"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(torch.load(folder / f, weights_only=True))
    return sd


def linear_prefixes(sd: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoint prefixes of the quantized block linears, e.g. `transformer.layers.0.attention.dense`."""
    return sorted({k.rsplit(".", 1)[0] for k in sd if k.rsplit(".", 1)[0].endswith(LINEARS)})


def module_state(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}


@functools.cache
def fp16_sd() -> dict[str, torch.Tensor]:
    return read_checkpoint("glm-tiny")


@functools.cache
def int8_sd() -> dict[str, torch.Tensor]:
    return read_checkpoint("glm-tiny-int8")


@functools.cache
def int4_sd() -> dict[str, torch.Tensor]:
    return read_checkpoint("glm-tiny-int4")
