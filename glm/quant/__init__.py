"""Weight-only int8/int4 quantization as a module swap: `quantize_(model, bits=4)`.

Three layers, after torchao's `quantize_`:
    `glm.quant.primitives`  pure quantize / pack / dequantize functions, each naming the scheme it mirrors;
    `glm.quant.linear`      `QuantLinear`, which holds the packed weight, its scales and the bias, and
                            chooses its forward for the device: `glm.quant.paths` (the kernels of
                            `glm.kernels`, or dequantizing) or `glm.quant.stock` (torch's own operators);
    this module             `quantize_`, `swap_linear` (the one place a linear becomes a QuantLinear), which
                            linears of the model get quantized, the tied quantized embedding, the CPU kernel mode.

glm.quant uses glm.kernels, never the reverse. Importing this package does not import triton (the CUDA kernel is
looked up when a layer is first placed on a CUDA device) nor build the CPU kernel (built when a layer is first
placed on a CPU).
"""

from __future__ import annotations

from torch import nn

from glm.config import CPU_KERNELS
from glm.quant.linear import QuantEmbedding, QuantLinear
from glm.quant.primitives import dequantize, pack_int4, quantize_grouped, quantize_per_channel, sqnr, unpack_int4

__all__ = [
    "CPU_KERNELS",
    "QuantEmbedding",
    "QuantLinear",
    "dequantize",
    "is_quantized_linear_name",
    "pack_int4",
    "quantize_",
    "quantize_grouped",
    "quantize_per_channel",
    "quantized_linear_names",
    "set_cpu_kernel",
    "sqnr",
    "swap_linear",
    "tie_quantized_embedding",
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


def swap_linear(model: nn.Module, name: str, bits: int, group_size: int | None = None, *,
                empty: bool = False) -> QuantLinear:
    """Replace the `nn.Linear` called `name` in `model` by a QuantLinear.

    Args:
        model: the parent module.
        name: dotted module name, e.g. `"layers.0.mlp.dense_h_to_4h"` or `"lm_head"`.
        bits: 8 or 4.
        group_size: None for per-channel scales, else the group length along K.
        empty: build it empty on the meta device (its tensors then come from a checkpoint stored quantized);
            otherwise quantize the linear's weight, release it and, on a CPU, convert to the kernel's layout.

    Returns:
        The new module.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    lin = getattr(parent, attr)
    if empty:
        mod = QuantLinear(lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None,
                          dtype=lin.weight.dtype, device="meta")
    else:
        mod = QuantLinear.from_linear(lin, bits, group_size).prepare()
    setattr(parent, attr, mod)
    return mod


def tie_quantized_embedding(model: nn.Module) -> None:
    """Make `model.word_embeddings` look its rows up in the quantized `model.lm_head` (ChatGLM-6B ties them).

    The float table is released. Only for a model whose config ties the embedding to the head.
    """
    head = model.lm_head
    if not isinstance(head, QuantLinear):
        raise TypeError("tie_quantized_embedding needs a quantized lm_head")
    emb = model.word_embeddings
    dtype = emb.dtype if isinstance(emb, QuantEmbedding) else emb.weight.dtype
    model.word_embeddings = QuantEmbedding(head, dtype)


def set_cpu_kernel(model, mode: str):
    """Choose the CPU kernel of every QuantLinear in `model`.

    Args:
        model: what `glm.load` returns (a ChatGLM: its `.model` is changed), or any module.
        mode: "exact" (the default: float activations, `F.linear(x, q * scale, b)` up to summation order) or
            "fast" (activations quantized to int8 per block of 32, integer dot products: faster, above all for
            batches, and not exact; see docs/quantization.md).

    Returns:
        `model`, as given.
    """
    if mode not in CPU_KERNELS:
        raise ValueError(f"cpu_kernel must be one of {', '.join(CPU_KERNELS)}, got {mode!r}")
    # A ChatGLM is recognised by its `.model` (glm.engine sits above glm.quant, which must not import it).
    net = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(net, nn.Module):
        raise TypeError(f"set_cpu_kernel takes a loaded model (glm.load) or an nn.Module, not {type(model).__name__}")
    for mod in net.modules():
        if isinstance(mod, QuantLinear):
            mod.cpu_kernel = mode
    return model


def quantize_(
    model: nn.Module,
    bits: int,
    group_size: int | None = None,
    include_lm_head: bool = False,
    progress: bool = False,
    cpu_kernel: str = "exact",
) -> nn.Module:
    """Swap the model's block linears for `QuantLinear` in place (weight-only, official scheme).

    Each float weight is quantized in fp32 arithmetic and released as soon as its layer is swapped, so peak
    memory grows by one layer's fp32 copy at most.

    Args:
        model: a GLM (or any module whose linears are named like the checkpoint).
        bits: 8 or 4.
        group_size: None for per-channel scales (the official releases), else e.g. 128 for grouped int4.
        include_lm_head: quantize `lm_head` too (the embedding stays as it is; see `tie_quantized_embedding`).
        progress: show a tqdm bar.
        cpu_kernel: "exact" or "fast", see `set_cpu_kernel`.

    Returns:
        `model`, modified in place.
    """
    if cpu_kernel not in CPU_KERNELS:
        raise ValueError(f"cpu_kernel must be one of {', '.join(CPU_KERNELS)}, got {cpu_kernel!r}")
    targets = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and is_quantized_linear_name(name, include_lm_head)
    ]
    if progress:
        from tqdm.auto import tqdm

        targets = tqdm(targets, desc=f"int{bits}", unit="linear")
    for name in targets:
        swap_linear(model, name, bits, group_size).cpu_kernel = cpu_kernel
    return model
