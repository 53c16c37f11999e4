"""QuantLinear: a weight-only int8/int4 linear layer that stores the official ChatGLM-6B layout.

State dict (exactly what the official int8/int4 checkpoints hold, so they load by `load_state_dict(assign=True)`):
    weight        int8 `[out, in * bits / 8]` (int4: two values a byte, first in the high nibble)
    weight_scale  `[out]` or `[out, in // group_size]`, in the dtype it was stored in (never rounded down)
    bias          `[out]`

On a CPU, `prepare()` (called by `quantize_` and the loader) rewrites the weight into the layout of our CPU kernel
(`glm.kernels.cpu_wq`, "tile16") and drops the official tensor, so memory holds one copy; `state_dict()` and
`packed_weight()` rebuild the official tensor exactly, and moving the module (`.to`) or loading a state dict
restores it.

Forward dispatch (`last_path` names the one taken):
    "triton"      CUDA with triton: `glm.kernels.wq_linear`, the fused dequantize-matmul (imported lazily).
    "cpu_exact"   CPU, `cpu_kernel == "exact"` (the default), up to `exact_max_rows` rows: our kernel with float
                  activations, `F.linear(x, q * scale, b)` in fp32 up to summation order, whatever x's dtype.
    "cpu_fast"    CPU, `cpu_kernel == "fast"`, up to `fast_max_rows` rows: our kernel with x quantized to int8 per
                  block of 32 (ggml's q8_0) and integer dot products (VNNI). Faster, and its cost grows little
                  with the rows; not exact.
    "dequant"     everything else: dequantize ~2 MiB of rows at a time and matmul them (fp32 input in fp32, half
                  input in bf16). Long prompts take it in both modes: there one bf16 GEMM beats the kernels.
    "int8_stock", "int4_stock"
                  CPU where our kernel cannot be built (no compiler): torch's `_weight_int8pack_mm` and
                  `_weight_int4pack_mm_for_cpu`, bf16, few rows. The int4 one keeps its own repacked copy besides
                  the official tensor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm.config import CPU_KERNELS
from glm.kernels.cpu_wq import (
    BLOCK_K,
    TILE_N,
    cpu_kernels,
    cpu_unpack_rows,
    cpu_unpack_t,
    cpu_wq_linear,
    official_from_tiles,
    tile_bias,
    tile_scales,
    tiles_from_official,
)
from glm.kernels.reference import dequantize, pack_int4, unpack_int4
from glm.quant.primitives import quantize_grouped, quantize_per_channel

__all__ = ["CPU_KERNELS", "QuantEmbedding", "QuantLinear"]

# Dequantized rows per matmul in the "dequant" path: about 2 MiB of fp32 weight, so it stays in cache.
_DEQUANT_CHUNK_BYTES = 2 << 20
# Rows quantized at a time in `from_linear`, to bound the fp32 temporaries (16 MiB of fp32 at K = 16384).
_QUANTIZE_ROWS = 256
# Group sizes `_weight_int4pack_mm_for_cpu` accepts (torch 2.13 checks exactly these).
_STOCK_INT4_GROUPS = (256, 128, 64, 32)
# Up to this many rows torch's stock weight-only kernels beat dequantize + bf16 GEMM (their cost grows per row).
_STOCK_MAX_ROWS = {8: 48, 4: 96}
# Dequantized bytes (fp32) per matmul of `grad_input`: it sums over the slice's rows, so longer slices pay on a CPU
# too (8 MiB: 1.5x faster than 2 MiB at 4096 -> 16384, 128 rows of bf16, one thread); on a GPU launches dominate.
_GRAD_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 64 << 20}



_UNRESOLVED = object()
_cuda_kernel_fn: Callable | None | object = _UNRESOLVED


def _cuda_kernel() -> Callable | None:
    """`glm.kernels.wq_linear`, or None where triton or the kernel is missing (then we dequantize).

    Resolved once into a module global (a plain global read is what torch.compile traces best).
    """
    global _cuda_kernel_fn
    if _cuda_kernel_fn is _UNRESOLVED:
        _cuda_kernel_fn = None
        if importlib.util.find_spec("triton") is not None:
            try:
                from glm.kernels import wq_linear

                _cuda_kernel_fn = wq_linear
            except (ImportError, AttributeError):
                pass
    return _cuda_kernel_fn  # type: ignore[return-value]


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

    # The CPU kernel mode: "exact" (float activations) or "fast" (int8 activations); see `glm.quant.set_cpu_kernel`.
    cpu_kernel: str = "exact"
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
        self.last_path: str | None = None  # which implementation the last forward used (see module docstring)

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

        The official tensor is then dropped; `state_dict()` and `packed_weight()` rebuild it exactly. Does nothing
        on other devices, for group sizes the kernel does not take, or where the kernel cannot be built.

        Returns:
            self.
        """
        self._cpu_tiles()
        return self

    def _cpu_tiles(self) -> bool:
        """Whether the CPU kernel serves this layer, converting the weight on first use."""
        if self._tiles is not None:
            return True
        if (
            self.weight is None
            or self.weight.device.type != "cpu"  # meta (not loaded yet) too
            or (self.group_size is not None and self.group_size % BLOCK_K)
            or cpu_kernels() is None
        ):
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

    def _apply(self, fn, recurse=True):
        self._clear_cache()
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:  # model.half() / .to(dtype): move the scale, keep its dtype
            self.weight_scale = scale.to(device=self.weight_scale.device)
        return self

    # -------------------------------------------------------------------------------------------------- forward

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
        rows = max(64, budget // (4 * k) // 64 * 64)  # whole 64-row blocks, as in `_forward_dequant_chunked`
        out = torch.zeros(g2.shape[0], k, dtype=acc, device=g.device)
        for r in range(0, n, rows):
            w = self._dequant_rows(r, min(r + rows, n)).to(cdt)
            out.add_(g2[:, r : r + rows].to(cdt) @ w)
        return out.to(g.dtype).reshape(*g.shape[:-1], k)

    def _linear(self, x: Tensor) -> Tensor:
        if x.is_cuda and (kernel := _cuda_kernel()) is not None:
            self._mark("triton")
            return kernel(x, self.packed_weight(), self.weight_scale, self.bias, self.bits, self.group_size)
        x2 = x.reshape(-1, self.in_features)
        if x.device.type != "cpu":
            self._mark("dequant")
            w = self.dequantized_weight(x.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        elif x.dtype in (torch.float32, torch.bfloat16, torch.float16) and self._cpu_tiles():
            y = self._forward_tiles(x2)
        elif x.dtype in (torch.bfloat16, torch.float16) and x2.shape[0] <= _STOCK_MAX_ROWS[self.bits] and (
            stock := self._stock_kernel()
        ):
            y = stock(x2)
        else:
            y = self._forward_dequant(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _mark(self, path: str) -> None:
        if not torch.compiler.is_compiling():  # a Python side effect that a compiled graph need not replay
            self.last_path = path

    def _forward_tiles(self, x2: Tensor) -> Tensor:
        fast = self.cpu_kernel == "fast"
        if x2.shape[0] > (self.fast_max_rows if fast else self.exact_max_rows):
            return self._forward_dequant(x2)
        self._mark("cpu_fast" if fast else "cpu_exact")
        return cpu_wq_linear(x2, self._tiles, self._tile_scale, self._tile_bias, self.bits, self.group_size,
                             self.out_features, fast)

    def _forward_dequant(self, x2: Tensor) -> Tensor:
        self._mark("dequant")
        # fp32 and fp64 stay as they are (exact); half inputs compute in bf16, the dtype the x86 GEMMs are fast in.
        cdt = torch.bfloat16 if x2.dtype in (torch.float16, torch.bfloat16) else x2.dtype
        xc = x2.to(cdt)
        n, k = self.out_features, self.in_features
        rows = max(TILE_N, _DEQUANT_CHUNK_BYTES // (4 * k) // TILE_N * TILE_N)
        out = torch.empty(x2.shape[0], n, dtype=cdt, device=x2.device)
        buf = torch.empty(k, rows, dtype=cdt) if self._tiles is not None else None
        for r in range(0, n, rows):
            r1 = min(r + rows, n)
            if buf is not None:  # the kernel layout gives the slice transposed, [K, r1 - r]
                wt = buf if r1 - r == rows else torch.empty(k, r1 - r, dtype=cdt)
                w = cpu_unpack_t(self._tiles, self._tile_scale, self.bits, self.group_size, n, k, r, wt).t()
            else:
                s = self.weight_scale[r:r1]
                w = dequantize(self.weight[r:r1], s, self.bits, self.group_size, dtype=cdt)
            b = None if self.bias is None else self.bias[r:r1].to(cdt)
            out[:, r:r1] = F.linear(xc, w, b)
        return out.to(x2.dtype)

    # ------------------------------------------------------------------------- torch's stock kernels (fallback)

    def _stock_kernel(self) -> Callable[[Tensor], Tensor] | None:
        """torch's weight-only CPU operator for this layer where it takes the shape, else None."""
        n, k = self.out_features, self.in_features
        if self.bits == 8:
            # Per-channel only. With K not a multiple of 16 it returns garbage (even crashes) in torch 2.13.
            if self.group_size is None and k % 32 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                return self._stock_int8
            return None
        span = self.group_size or k  # the kernel's group must divide ours: per-channel repeats one scale
        group = next((g for g in _STOCK_INT4_GROUPS if span % g == 0), None)
        if n % 16 or group is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return None
        if self._stock_int4 is None:
            with torch.no_grad(), torch.inference_mode(False):
                # In slices of rows, to bound the int32 temporary the converter takes (2 GB for lm_head at once):
                # its layout packs blocks of 16 to 64 rows, which a multiple of 1024 never splits.
                convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
                w = torch.cat([convert(unpack_int4(self.weight[r : r + 1024]).to(torch.int32) + 8, 1)
                               for r in range(0, n, 1024)])
                if self.group_size is None:  # unit scales: the per-channel scale is applied in fp32 afterwards
                    scale = torch.ones(k // group, n, dtype=torch.bfloat16)
                else:
                    scale = self.weight_scale.to(torch.bfloat16).repeat_interleave(self.group_size // group, 1).t()
                # [K/g, N, 2]: (scale, zero) per group; the kernel computes (u - 8) * scale + zero.
                self._stock_int4 = w
                self._stock_scales = (torch.stack([scale, torch.zeros_like(scale)], -1).contiguous(), group)
        return self._stock_int4_mm

    def _stock_int8(self, x2: Tensor) -> Tensor:
        self._mark("int8_stock")
        ones = torch.ones(self.out_features, dtype=torch.bfloat16)
        return self._stock_finish(torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, ones), x2)

    def _stock_int4_mm(self, x2: Tensor) -> Tensor:
        self._mark("int4_stock")
        scales, group = self._stock_scales
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self._stock_int4, group, scales)
        return self._stock_finish(y, x2)

    def _stock_finish(self, y: Tensor, x2: Tensor) -> Tensor:
        y = y.float()
        if self.group_size is None:
            y = y * self.weight_scale.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x2.dtype)


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
