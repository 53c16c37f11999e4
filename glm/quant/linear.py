"""QuantLinear: a weight-only int8/int4 linear layer that stores the official ChatGLM-6B layout.

State dict (exactly what the official int8/int4 checkpoints hold, so they load by `load_state_dict(assign=True)`):
    weight        int8 `[out, in * bits / 8]` (int4: two values a byte, first in the high nibble)
    weight_scale  `[out]` or `[out, in // group_size]`, in the dtype it was stored in (never rounded down)
    bias          `[out]`

Forward dispatch (`last_path` names the one taken):
    "triton"           CUDA with triton: `glm.kernels.wq_linear`, the fused dequantize-matmul (imported lazily).
    "int8_cpu_kernel"  CPU, bf16/fp16 input, few rows, int8 per-channel: `aten._weight_int8pack_mm` on the
                       official tensor itself.
    "int4_cpu_kernel"  CPU, bf16/fp16 input, few rows, int4: `aten._weight_int4pack_mm_for_cpu` on a copy repacked
                       once by `_convert_weight_to_int4pack_for_cpu`, which then replaces the official tensor.
    "dequant"          everything else: dequantize ~2 MiB of rows at a time in fp32 and matmul them. In fp32 this
                       is `F.linear(x, q * scale, b)` up to summation order (the golden tests need 1e-4), and no
                       slower than the kernels in fp32 (one row at 4096 -> 16384: int8 ~21 ms against ~24 ms,
                       int4 ~44 ms against ~54 ms), whose cost grows with every row.
On x86 the CPU kernels are fast only in bf16 (fp16 is 30-50x slower), so half inputs compute in bf16 on CPU: fp16
models get bf16 rounding in these layers, still far below the weight quantization noise.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm.quant.primitives import dequantize, pack_int4, quantize_grouped, quantize_per_channel, unpack_int4

__all__ = ["QuantLinear"]

# Group sizes `_weight_int4pack_mm_for_cpu` accepts (torch 2.13 checks exactly these).
_INT4_KERNEL_GROUPS = (256, 128, 64, 32)
# Rows converted per call when repacking int4 for the CPU kernel: bounds the int32 temporary the converter
# needs (16 MiB at K = 4096) and is a multiple of every block height the converter uses (16 to 64 rows).
_REPACK_ROWS = 1024
# Dequantized rows per matmul in the "dequant" path: about 2 MiB of fp32 weight, so it stays in cache.
_DEQUANT_CHUNK_BYTES = 2 << 20
# Rows quantized at a time in `from_linear`, to bound the fp32 copy of an fp16 weight.
_QUANTIZE_ROWS = 1024
# Dequantized bytes (fp32) per matmul of `grad_input`: it sums over the slice's rows, so longer slices pay on a CPU
# too (8 MiB: 1.5x faster than 2 MiB at 4096 -> 16384, 128 rows of bf16, one thread); on a GPU launches dominate.
_GRAD_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 64 << 20}


def _aten(name: str) -> Callable | None:
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


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


# ------------------------------------------------------------------ the CPU int4 kernel's private weight layout
# `_convert_weight_to_int4pack_for_cpu` takes unsigned nibbles u = q + 8 as int32 [N, K] and returns uint8 [N, K/2]
# in a blocked layout that depends on the CPU build (AVX512: blocks of 64 rows, AVX2: 32). To save the official
# layout after dropping it we must invert that layout, so we recognise it on a small probe at first use rather
# than trust one build: each block of `block_n` rows is stored as [K, block_n/2] bytes; a full block puts rows
# 0..block_n/2-1 in the low nibbles and the rest in the high ones ("halves"), or row pairs in one byte ("pairs");
# a last, shorter block always uses pairs.


def _untangle_int4_cpu(p: Tensor, kind: str, block_n: int, out: Tensor | None = None) -> Tensor:
    """Unsigned nibbles u = q + 8 `[N, K]` of a CPU-kernel weight `p` `[N, K/2]`, written into `out` (any dtype)."""
    n, k = p.shape[0], p.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.uint8, device=p.device) if out is None else out
    full = n // block_n * block_n
    segments = [(0, full, block_n, kind)] if full else []
    if n > full:
        segments.append((full, n, n - full, "pairs"))
    for r0, r1, bn, how in segments:
        nb = (r1 - r0) // bn
        b = p[r0:r1].view(nb, k, bn // 2)  # each block: K rows of bn/2 bytes
        lo, hi = (b & 0xF).transpose(1, 2), (b >> 4).transpose(1, 2)  # (NB, bn/2, K)
        dst = out[r0:r1].view(nb, bn, k)
        if how == "halves":
            dst[:, : bn // 2].copy_(lo)
            dst[:, bn // 2 :].copy_(hi)
        else:
            pairs = dst.view(nb, bn // 2, 2, k)
            pairs[:, :, 0].copy_(lo)
            pairs[:, :, 1].copy_(hi)
    return out


def _repack_int4_cpu(packed: Tensor) -> Tensor:
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    chunks = []
    for r in range(0, packed.shape[0], _REPACK_ROWS):
        u = unpack_int4(packed[r : r + _REPACK_ROWS]).to(torch.int32) + 8
        chunks.append(convert(u, 1))  # innerKTiles only matters on CUDA
    return torch.cat(chunks)


@functools.cache
def _int4_cpu_layout() -> tuple[str, int] | None:
    """(kind, block_n) of this build's CPU int4 layout, or None if the kernel is absent or the layout unknown."""
    if _aten("_convert_weight_to_int4pack_for_cpu") is None or _aten("_weight_int4pack_mm_for_cpu") is None:
        return None
    gen = torch.Generator().manual_seed(0)
    # 176 = 64 + 64 + 48 and 112 = 64 + 48 exercise full and short blocks for both block heights.
    probes = [torch.randint(-8, 8, (n, 64), generator=gen, dtype=torch.int8) for n in (16, 48, 112, 176)]
    try:
        whole = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1) for q in probes]
        # Our repacking converts 1024-row slices separately; check on 64-row slices that blocks are independent.
        sliced = [torch.cat([_repack_int4_cpu(pack_int4(q[r : r + 64])) for r in range(0, len(q), 64)]) for q in probes]
    except RuntimeError:
        return None
    if not all(torch.equal(a, b) for a, b in zip(whole, sliced)):
        return None
    for layout in (("halves", 64), ("halves", 32), ("pairs", 64), ("pairs", 32)):
        if all(torch.equal(_untangle_int4_cpu(p, *layout), (q + 8).to(torch.uint8)) for p, q in zip(whole, probes)):
            return layout
    return None


def _known_int4_cpu_layout() -> tuple[str, int]:
    layout = _int4_cpu_layout()
    assert layout is not None, "the official int4 tensor is only dropped once the CPU layout is known"
    return layout


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

    # Up to this many activation rows (by bits) the CPU weight-only kernels win; beyond, dequantize + bf16 GEMM
    # does, because the kernels' cost grows linearly with the rows (about 0.8 ms a row at 4096 -> 16384 on 2 cores)
    # while dequantizing costs the same for any row count (about 45 ms for int8, 70 ms for int4 at that size).
    cpu_kernel_max_rows: dict[int, int] = {8: 48, 4: 96}  # a tuning table: assign a new dict to retune

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
        self.last_path: str | None = None  # which implementation the last forward used (see module docstring)
        self._clear_cache()

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
            A QuantLinear on the linear's device.
        """
        w = linear.weight.detach()
        n, k = w.shape
        mod = cls(k, n, bits, group_size, bias=linear.bias is not None, dtype=torch.float32, device="meta")
        qs, scales = [], []
        # Rows are independent, so quantizing a slice at a time is exact and bounds the fp32 temporary.
        for r in range(0, n, _QUANTIZE_ROWS):
            wf = w[r : r + _QUANTIZE_ROWS].float()
            q, s = quantize_per_channel(wf, bits) if group_size is None else quantize_grouped(wf, bits, group_size)
            qs.append(pack_int4(q) if bits == 4 else q)
            scales.append(s)
        mod.weight = torch.cat(qs)
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
        """The weight in the official layout, int8 `[out, in * bits / 8]`, rebuilt if the CPU path dropped it."""
        if self.weight is not None:
            return self.weight
        assert self._cpu_int4 is not None  # the official tensor is only dropped once the CPU copy exists
        u = _untangle_int4_cpu(self._cpu_int4, *_known_int4_cpu_layout())
        return pack_int4(u.to(torch.int8) - 8)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """`q * scale` as float `[out, in]` (fp32 unless `dtype` is given)."""
        return dequantize(self.packed_weight(), self.weight_scale, self.bits, self.group_size, dtype=dtype)

    def prepare(self) -> QuantLinear:
        """Build the CPU kernel's repacked int4 weight now instead of at the first bf16/fp16 forward.

        Where this torch build's layout is recognised, the official int4 tensor is then dropped, so memory stays
        one packed copy; `state_dict()` and `packed_weight()` rebuild it exactly. Moving the module (`.to`),
        or loading a state dict, restores the official tensor and drops the repacked one.

        Returns:
            self.
        """
        if self.weight_scale.device.type == "cpu" and self._cpu_kernel_ok():
            self._cpu_weight()
        return self

    def _clear_cache(self) -> None:
        self._cpu_int4: Tensor | None = None  # the int4 weight repacked for the CPU kernel
        self._cpu_scales: Tensor | None = None  # the kernel's scale argument (bf16)
        self._cpu_ok: bool | None = None

    def _restore_official(self) -> None:
        if self.weight is None:
            self.weight = self.packed_weight()
        self._clear_cache()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:
            destination[prefix + "weight"] = self.packed_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.weight is None and prefix + "weight" in state_dict:  # about to be replaced: no need to rebuild it
            shape = (self.out_features, self.in_features * self.bits // 8)
            self.weight = torch.empty(shape, dtype=torch.int8, device=self.weight_scale.device)
        self._restore_official()
        incoming = state_dict.get(prefix + "weight_scale")
        if isinstance(incoming, Tensor) and incoming.dtype != self.weight_scale.dtype:
            # Copying into our buffer would convert the scale; take the stored dtype instead (never round down).
            self.weight_scale = torch.empty_like(self.weight_scale, dtype=incoming.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        self._restore_official()
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
        if (
            x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16)
            and x2.shape[0] <= self.cpu_kernel_max_rows[self.bits]
            and self._cpu_kernel_ok()
        ):
            y = self._forward_cpu_kernel(x2)
        elif x.device.type == "cpu":
            y = self._forward_dequant_chunked(x2)
        else:
            self._mark("dequant")
            w = self.dequantized_weight(x.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _mark(self, path: str) -> None:
        if not torch.compiler.is_compiling():  # a Python side effect that a compiled graph need not replay
            self.last_path = path

    def _cpu_kernel_ok(self) -> bool:
        """Whether an aten CPU kernel takes this layer's shape (they misbehave or reject shapes outside these)."""
        if self._cpu_ok is None:
            n, k = self.out_features, self.in_features
            if self.bits == 8:
                # Per-channel only. With K not a multiple of 16 it returns garbage (even crashes) in torch 2.13.
                ok = self.group_size is None and k % 32 == 0 and _aten("_weight_int8pack_mm") is not None
            else:
                ok = n % 16 == 0 and self._int4_kernel_group() is not None and _int4_cpu_layout() is not None
            self._cpu_ok = ok
        return self._cpu_ok

    def _int4_kernel_group(self) -> int | None:
        # The kernel's group must divide ours: per-channel (one group of K) and large groups repeat the scale.
        span = self.group_size or self.in_features
        return next((g for g in _INT4_KERNEL_GROUPS if span % g == 0), None)

    def _cpu_weight(self) -> tuple[Tensor, Tensor]:
        """(weight operand, scale operand) of the CPU kernel, built once."""
        if self._cpu_scales is None:
            n, k = self.out_features, self.in_features
            with torch.no_grad(), torch.inference_mode(False):
                if self.bits == 8:
                    # Unit scales: the per-channel scale factors out of the dot product and is applied afterwards
                    # in fp32, exactly as stored, instead of being rounded to bf16 for the kernel.
                    self._cpu_scales = torch.ones(n, dtype=torch.bfloat16)
                else:
                    g = self._int4_kernel_group()
                    if self.group_size is None:
                        scale = torch.ones(k // g, n, dtype=torch.bfloat16)  # factored out as for int8
                    else:  # grouped scales cannot factor out: the kernel takes them in bf16
                        rep = self.group_size // g
                        scale = self.weight_scale.to(torch.bfloat16).repeat_interleave(rep, dim=1).t()
                    # [K/g, N, 2]: (scale, zero) per group; the kernel computes (u - 8) * scale + zero.
                    self._cpu_scales = torch.stack([scale, torch.zeros_like(scale)], -1).contiguous()
                    self._cpu_int4 = _repack_int4_cpu(self.weight)
                    # One copy of the weight: drop the official tensor, which `packed_weight` can rebuild.
                    self.weight = None
        return (self.weight if self.bits == 8 else self._cpu_int4), self._cpu_scales

    def _forward_cpu_kernel(self, x2: Tensor) -> Tensor:
        w, scales = self._cpu_weight()
        xb = x2.to(torch.bfloat16).contiguous()  # fp16 too: the x86 kernels are ~30x slower in fp16 than bf16
        if self.bits == 8:
            self._mark("int8_cpu_kernel")
            y = torch.ops.aten._weight_int8pack_mm(xb, w, scales)
        else:
            self._mark("int4_cpu_kernel")
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, self._int4_kernel_group(), scales)
        y = y.float()
        if self.group_size is None:
            y = y * self.weight_scale.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x2.dtype)

    def _forward_dequant_chunked(self, x2: Tensor) -> Tensor:
        self._mark("dequant")
        # fp32 stays fp32 (exact); half inputs compute in bf16, the dtype the x86 GEMMs are fast in.
        cdt = torch.bfloat16 if x2.dtype in (torch.float16, torch.bfloat16) else x2.dtype
        xc = x2.to(cdt)
        n, k = self.out_features, self.in_features
        # A multiple of 64 rows, so that slices of the CPU int4 layout hold whole blocks.
        rows = max(64, _DEQUANT_CHUNK_BYTES // (4 * k) // 64 * 64)
        out = torch.empty(x2.shape[0], n, dtype=cdt, device=x2.device)
        for r in range(0, n, rows):
            w = self._dequant_rows(r, min(r + rows, n))
            b = None if self.bias is None else self.bias[r : r + rows].to(cdt)
            out[:, r : r + rows] = F.linear(xc, w.to(cdt), b)
        return out.to(x2.dtype)

    def _dequant_rows(self, r0: int, r1: int) -> Tensor:
        """fp32 `q * scale` of output rows [r0, r1): `dequantize`, with fewer passes over memory."""
        k = self.in_features
        w = torch.empty(r1 - r0, k, dtype=torch.float32, device=self.weight_scale.device)
        if self.weight is None:  # only the CPU kernel's repacked copy is left: unpack its rows
            assert self._cpu_int4 is not None
            _untangle_int4_cpu(self._cpu_int4[r0:r1], *_known_int4_cpu_layout(), out=w).sub_(8)
        elif self.bits == 8:
            w.copy_(self.weight[r0:r1])
        else:  # write the two nibbles straight into the even and odd columns
            p = self.weight[r0:r1]
            pairs = w.view(r1 - r0, k // 2, 2)
            pairs[..., 0].copy_(p >> 4)  # arithmetic shift: the signed high nibble
            pairs[..., 1].copy_(((p & 0xF) ^ 8) - 8)  # sign-extend the low nibble
        s = self.weight_scale[r0:r1].float()
        if self.group_size is None:
            return w.mul_(s.unsqueeze(-1))
        g = self.group_size
        w.view(r1 - r0, k // g, g).mul_(s.unsqueeze(-1))
        return w


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
