"""QuantLinear: a weight-only int8/int4 linear layer that stores the official ChatGLM-6B layout.

State dict (exactly what the official int8/int4 checkpoints hold, so they load by `load_state_dict(assign=True)`):
    weight        int8 `[out, in * bits / 8]` (int4: two values a byte, first in the high nibble)
    weight_scale  `[out]` or `[out, in // group_size]`, in the dtype it was stored in (never rounded down)
    bias          `[out]`

On a CPU, `prepare()` (called by `quantize_` and the loader) rewrites the weight into the layout of our CPU kernel
(`glm.kernels.cpu_wq`, "tile16") and drops the official tensor, so memory holds one copy; `state_dict()` and
`packed_weight()` rebuild the official tensor exactly, and moving the module (`.to`) or loading a state dict
restores it.

Forward: chosen once, when the layer is built, prepared (`prepare()`, which the loader calls after assigning
its tensors), moved (`.to`, `.half()`), loaded (`load_state_dict`) or its `cpu_kernel` mode set, and stored;
`forward_path` names the choice. A forward hands a call to "dequant" where the input needs it: past its row limit
(there one bf16 GEMM beats the kernels), or an input dtype it does not take.
    "triton"      CUDA with triton: `glm.kernels.wq_linear`, the fused dequantize-matmul (looked up when a layer
                  is first placed on a CUDA device: importing glm.quant does not import triton).
    "cpu_exact"   CPU, `cpu_kernel == "exact"` (the default), up to `exact_max_rows` rows: our kernel with float
                  activations, `F.linear(x, q * scale, b)` in fp32 up to summation order, whatever x's dtype
                  (fp32, bf16, fp16; fp64 dequantizes).
    "cpu_fast"    CPU, `cpu_kernel == "fast"`, up to `fast_max_rows` rows: our kernel with x quantized to int8 per
                  block of 32 (ggml's q8_0) and integer dot products (VNNI). Faster, and its cost grows little
                  with the rows; not exact.
    "int8_stock", "int4_stock"
                  CPU where our kernel cannot be built (no compiler): torch's `_weight_int8pack_mm` and
                  `_weight_int4pack_mm_for_cpu` (glm.quant.stock), bf16, half inputs of few rows. The int4 one
                  keeps its own repacked copy besides the official tensor.
    "dequant"     everything else: on a CPU, dequantize ~2 MiB of rows at a time and matmul them (fp32 input in
                  fp32, half input in bf16); elsewhere (CUDA without triton, MPS) the whole weight at once.
The forwards themselves live in glm.quant.paths and glm.quant.stock.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from glm.config import CPU_KERNELS
from glm.kernels.cpu_wq import (
    BLOCK_K,
    cpu_kernels,
    cpu_unpack_rows,
    official_from_tiles,
    tile_bias,
    tile_scales,
    tiles_from_official,
)
from glm.kernels.reference import dequantize, pack_int4
from glm.quant import paths
from glm.quant.paths import _DEQUANT_CHUNK_BYTES
from glm.quant.primitives import quantize_grouped, quantize_per_channel
from glm.quant.stock import stock_forward

__all__ = ["QuantEmbedding", "QuantLinear"]

# Rows quantized at a time in `from_linear`, to bound the fp32 temporaries (16 MiB of fp32 at K = 16384).
_QUANTIZE_ROWS = 256
# Dequantized bytes (fp32) per matmul of `grad_input`: it sums over the slice's rows, so longer slices pay on a CPU
# too (8 MiB: 1.5x faster than 2 MiB at 4096 -> 16384, 128 rows of bf16, one thread); on a GPU launches dominate.
_GRAD_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 64 << 20}


class QuantLinear(nn.Module):
    """Weight-only quantized `nn.Linear` holding the official ChatGLM packed weight, its scales and the bias.

    Args:
        in_features: K.
        out_features: N.
        bits: 8 or 4.
        group_size: None for one scale per output channel (the official releases), else the number of
            consecutive inputs sharing a scale (must divide K).
        bias: whether there is a bias.
        dtype: dtype of `weight_scale` and `bias` until a checkpoint is assigned (the stored dtypes then win).
        device: where to allocate (works with "meta" for construct-then-assign loading).
    """

    # Up to this many rows the CPU kernels beat dequantizing slices and one bf16 GEMM each (docs/benchmarks.md):
    # their cost grows with the rows, a GEMM's hardly does. Tuning knobs: assign to the class or to one module.
    exact_max_rows: int = 32
    fast_max_rows: int = 128

    weight: Tensor | None
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 packs two inputs a byte: in_features must be even, got {in_features}")
        if group_size is not None and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer(
            "weight", torch.empty(out_features, in_features * bits // 8, dtype=torch.int8, device=device)
        )
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # The CPU kernel's copies (non-persistent, so they count as the module's memory but are never saved).
        for name in ("_tiles", "_tile_scale", "_tile_bias", "_stock_int4"):
            self.register_buffer(name, None, persistent=False)
        self._stock_scales: tuple[Tensor, int] | None = None
        self._cpu_kernel = "exact"
        self._choose_forward()

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> QuantLinear:
        """Quantize an `nn.Linear` with the official scheme, in fp32 arithmetic like the reference CPU quantizer.

        The float weight is released: `linear.weight` is set to None, so its memory goes as soon as nothing
        else refers to it. The bias is kept as is (same tensor, same dtype); the scales are fp32.

        Args:
            linear: the layer, weight `[N, K]`.
            bits: 8 or 4.
            group_size: None for per-channel scales, else the group length along K.

        Returns:
            A QuantLinear on the linear's device, in the official layout (`prepare()` converts it for the CPU).
        """
        w = linear.weight.detach()
        n, k = w.shape
        mod = cls(k, n, bits, group_size, bias=linear.bias is not None, dtype=torch.float32, device="meta")
        mod.weight = torch.empty(n, k * bits // 8, dtype=torch.int8, device=w.device)
        scales = []
        # Rows are independent, so quantizing a slice at a time is exact and bounds the fp32 temporary.
        for r in range(0, n, _QUANTIZE_ROWS):
            wf = w[r : r + _QUANTIZE_ROWS].float()
            q, s = quantize_per_channel(wf, bits) if group_size is None else quantize_grouped(wf, bits, group_size)
            mod.weight[r : r + _QUANTIZE_ROWS] = pack_int4(q) if bits == 4 else q
            scales.append(s)
        mod.weight_scale = torch.cat(scales)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        linear.weight = None
        mod._choose_forward()  # for the device its tensors now have (it was built on meta)
        return mod

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )

    # -------------------------------------------------------------------------------------------- packed weight

    def packed_weight(self) -> Tensor:
        """The weight in the official layout, int8 `[out, in * bits / 8]`, rebuilt if the CPU layout replaced it."""
        if self.weight is not None:
            return self.weight
        return official_from_tiles(self._tiles, self.bits, self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """`q * scale` as float `[out, in]` (fp32 unless `dtype` is given)."""
        return dequantize(self.packed_weight(), self.weight_scale, self.bits, self.group_size, dtype=dtype)

    def rows(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows `idx` of `q * scale` as `[len(idx), in]` in `dtype`: the lookup of a tied, quantized embedding."""
        idx = idx.reshape(-1)
        if self._cpu_tiles():
            n, k = self.out_features, self.in_features
            return cpu_unpack_rows(self._tiles, self._tile_scale, idx, self.bits, self.group_size, n, k, dtype)
        return dequantize(self.packed_weight()[idx], self.weight_scale[idx], self.bits, self.group_size, dtype=dtype)

    def prepare(self) -> QuantLinear:
        """On a CPU, rewrite the weight into the kernel's layout now (building the kernel if need be).

        The official tensor is then dropped; `state_dict()` and `packed_weight()` rebuild it exactly. No rewrite on
        other devices, for group sizes the kernel does not take, or where the kernel cannot be built. Everywhere, the
        forward is chosen anew for the tensors the layer now holds (the loader assigns them directly, then calls this).

        Returns:
            self.
        """
        self._cpu_tiles()
        self._choose_forward()  # the loader assigns tensors directly: here they are all in place
        return self

    def _kernel_serves(self) -> bool:
        """Whether our CPU kernel serves this layer: on a CPU, a group size it takes, and a compiler at hand to build
        it (`cpu_kernels()` builds it at its first call)."""
        if self._tiles is not None:
            return True
        return not (
            self.weight is None
            or self.weight.device.type != "cpu"  # meta (not loaded yet) too
            or (self.group_size is not None and self.group_size % BLOCK_K)
            or cpu_kernels() is None
        )

    def _cpu_tiles(self) -> bool:
        """Whether the CPU kernel serves this layer, converting the weight on first use."""
        if self._tiles is not None:
            return True
        if not self._kernel_serves():
            return False
        n, k = self.out_features, self.in_features
        with torch.no_grad(), torch.inference_mode(False):
            self._tiles = tiles_from_official(self.weight, self.bits, k)
            self._tile_scale = tile_scales(self.weight_scale.float(), k, self.group_size)
            self._tile_bias = tile_bias(None if self.bias is None else self.bias.float(), n)
            self.weight = None  # one copy of the weight: `packed_weight` rebuilds the official one
        return True

    def _clear_cache(self) -> None:
        if self.weight is None:
            self.weight = self.packed_weight()
        self._tiles = self._tile_scale = self._tile_bias = self._stock_int4 = None
        self._stock_scales = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:
            destination[prefix + "weight"] = self.packed_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.weight is None and prefix + "weight" in state_dict:  # about to be replaced: no need to rebuild it
            shape = (self.out_features, self.in_features * self.bits // 8)
            self.weight = torch.empty(shape, dtype=torch.int8, device=self.weight_scale.device)
        self._clear_cache()
        incoming = state_dict.get(prefix + "weight_scale")
        if isinstance(incoming, Tensor) and incoming.dtype != self.weight_scale.dtype:
            # Copying into our buffer would convert the scale; take the stored dtype instead (never round down).
            self.weight_scale = torch.empty_like(self.weight_scale, dtype=incoming.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._choose_forward()  # the tensors are in place now (assign=True may have moved them off meta)

    def _apply(self, fn, recurse=True):
        self._clear_cache()
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:  # model.half() / .to(dtype): move the scale, keep its dtype
            self.weight_scale = scale.to(device=self.weight_scale.device)
        self._choose_forward()
        return self

    # -------------------------------------------------------------------------------------------------- forward

    @property
    def cpu_kernel(self) -> str:
        """The CPU kernel mode: "exact" (float activations) or "fast" (int8 activations); see
        `glm.quant.set_cpu_kernel`."""
        return self._cpu_kernel

    @cpu_kernel.setter
    def cpu_kernel(self, mode: str) -> None:
        if mode not in CPU_KERNELS:
            raise ValueError(f"cpu_kernel must be one of {', '.join(CPU_KERNELS)}, got {mode!r}")
        self._cpu_kernel = mode
        self._choose_forward()

    @property
    def forward_path(self) -> str:
        """The forward this layer runs, as the module docstring's table names it (e.g. "cpu_exact")."""
        return self._forward_path

    def _choose_forward(self) -> None:
        """Choose the forward for where the tensors now are and the CPU kernel mode, and store it."""
        device = self.weight_scale.device.type
        choice: tuple[str, Callable[..., Tensor]]
        if device == "cuda" and paths.cuda_kernel() is not None:
            choice = "triton", paths.forward_triton
        elif device != "cpu":
            choice = "dequant", paths.forward_dequant_whole
        elif self._kernel_serves():
            fast = self._cpu_kernel == "fast"
            choice = ("cpu_fast", paths.forward_cpu_fast) if fast else ("cpu_exact", paths.forward_cpu_exact)
        else:
            choice = stock_forward(self) or ("dequant", paths.forward_dequant)
        # A plain function, not a bound method: a module holding a method of itself would be a reference cycle,
        # and its weights would wait for the garbage collector.
        self._forward_path, self._forward_impl = choice

    def forward(self, x: Tensor) -> Tensor:
        """`F.linear(x, q * scale, bias)` without materialising the float weight.

        When `x` requires a gradient (training a P-Tuning prefix through a frozen quantized model), the backward
        gives `x` its gradient and the frozen weight, scales and bias none (see `grad_input`).

        Args:
            x: `[..., in_features]`, fp32, bf16 or fp16.

        Returns:
            `[..., out_features]` in x's dtype.
        """
        if x.requires_grad and torch.is_grad_enabled():
            return _QuantLinearFunction.apply(x, self)
        return self._linear(x)

    def grad_input(self, g: Tensor) -> Tensor:
        """dL/dx = g @ (q * scale), `[..., in_features]` from g `[..., out_features]`, in g's dtype.

        The float weight is built a slice of rows at a time (~8 MiB on a CPU, ~64 MiB on a GPU), so no float copy
        of the layer, let alone of the model, is ever held. Half inputs multiply in their own dtype on a GPU and in
        bf16 on a CPU (as the forward does); slices accumulate in fp32.
        """
        g2 = g.reshape(-1, self.out_features)
        n, k = self.out_features, self.in_features
        acc = torch.promote_types(g.dtype, torch.float32)
        cdt = g.dtype if g.dtype == acc or g.is_cuda else torch.bfloat16
        budget = _GRAD_CHUNK_BYTES.get(g.device.type, _DEQUANT_CHUNK_BYTES)
        rows = max(64, budget // (4 * k) // 64 * 64)  # whole 64-row blocks
        out = torch.zeros(g2.shape[0], k, dtype=acc, device=g.device)
        for r in range(0, n, rows):
            w = self._dequant_rows(r, min(r + rows, n)).to(cdt)
            out.add_(g2[:, r : r + rows].to(cdt) @ w)
        return out.to(g.dtype).reshape(*g.shape[:-1], k)

    def _linear(self, x: Tensor) -> Tensor:
        y = self._forward_impl(self, x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dequant_rows(self, r0: int, r1: int) -> Tensor:
        """fp32 `q * scale` of output rows [r0, r1), from whichever layout holds the weight."""
        return self.rows(torch.arange(r0, r1, device=self.weight_scale.device), torch.float32)


class _QuantLinearFunction(torch.autograd.Function):
    """`QuantLinear` with a backward to its input only: the weight is frozen and quantized, it gets no gradient."""

    @staticmethod
    def forward(x: Tensor, module: QuantLinear) -> Tensor:
        return module._linear(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.module = inputs[1]  # nothing is saved but the module: its packed weight is all the backward needs

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return ctx.module.grad_input(grad_out), None


class QuantEmbedding(nn.Module):
    """The word embedding of a model whose `lm_head` is quantized and tied to it: rows of the head's weight.

    ChatGLM-6B ties `word_embeddings` to `lm_head`, so with a quantized head the table is the quantized weight, and
    the 1 GB float table is not kept. The head is not a submodule: its tensors are saved once, as `lm_head.*`.

    Args:
        head: the quantized `lm_head`, `[vocab, hidden]`.
        dtype: dtype of the looked-up rows (the model's).
    """

    def __init__(self, head: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.__dict__["head"] = head  # a plain attribute, not a registered submodule
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: Tensor) -> Tensor:
        """Rows of `q * scale` for token ids of any shape: `[..., hidden]` in `self.dtype`."""
        return self.head.rows(ids, self.dtype).view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follow model.half() / .to(dtype)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized lm_head"
