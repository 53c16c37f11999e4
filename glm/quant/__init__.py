"""Weight-only int8/int4 quantization as a module swap: `quantize_(model, bits=4)`.

Three layers, after torchao's `quantize_`:
    `glm.quant.primitives`  pure quantize / pack / dequantize functions, each naming the scheme it mirrors;
    `glm.quant.linear`      `QuantLinear`, which holds the packed weight, its scales and the bias, and
                            dispatches to the fastest kernel for the device;
    this module             `quantize_`, and which linears of the model get quantized.

Importing this package does not import triton: the CUDA kernel is looked up at the first CUDA forward.
"""

from __future__ import annotations

from torch import nn

from glm.quant.linear import QuantLinear
from glm.quant.primitives import dequantize, pack_int4, quantize_grouped, quantize_per_channel, sqnr, unpack_int4

__all__ = [
    "QuantLinear",
    "dequantize",
    "is_quantized_linear_name",
    "pack_int4",
    "quantize_",
    "quantize_grouped",
    "quantize_per_channel",
    "quantized_linear_names",
    "sqnr",
    "unpack_int4",
]

# The four linears of every block, as the official int8/int4 releases quantize them (never the embedding).
_BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_HEAD = "lm_head"
_TENSOR_SUFFIXES = (".weight_scale", ".weight", ".bias")


def quantized_linear_names(include_lm_head: bool = False) -> tuple[str, ...]:
    """Name suffixes of the linears that get quantized.

    Args:
        include_lm_head: add `lm_head` (ours; the official releases keep it in fp16).

    Returns:
        Suffixes such as `"attention.query_key_value"`; a module matches when its dotted name ends with one.
    """
    return _BLOCK_LINEARS + ((_HEAD,) if include_lm_head else ())


def is_quantized_linear_name(name: str, include_lm_head: bool = False) -> bool:
    """Whether the module (or checkpoint tensor) `name` is a linear that gets quantized.

    Matches on whole dotted components, so both `"layers.3.mlp.dense_h_to_4h"` and
    `"transformer.layers.3.mlp.dense_h_to_4h.weight"` match, and `"word_embeddings"` never does.

    Args:
        name: a module name, or a tensor name ending in `.weight`, `.weight_scale` or `.bias`.
        include_lm_head: whether `lm_head` counts.

    Returns:
        True for the four block linears (and `lm_head` if asked).
    """
    for suffix in _TENSOR_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return any(name == s or name.endswith("." + s) for s in quantized_linear_names(include_lm_head))


def quantize_(
    model: nn.Module,
    bits: int,
    group_size: int | None = None,
    include_lm_head: bool = False,
    progress: bool = False,
) -> nn.Module:
    """Swap the model's block linears for `QuantLinear` in place (weight-only, official scheme).

    Each float weight is quantized in fp32 arithmetic and released as soon as its layer is swapped, so peak
    memory grows by one layer's fp32 copy at most.

    Args:
        model: a GLM (or any module whose linears are named like the checkpoint).
        bits: 8 or 4.
        group_size: None for per-channel scales (the official releases), else e.g. 128 for grouped int4.
        include_lm_head: quantize `lm_head` too.
        progress: show a tqdm bar.

    Returns:
        `model`, modified in place.
    """
    targets = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and is_quantized_linear_name(name, include_lm_head)
    ]
    if progress:
        from tqdm.auto import tqdm

        targets = tqdm(targets, desc=f"int{bits}", unit="linear")
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear.from_linear(getattr(parent, attr), bits, group_size))
    return model
