"""Weight-only INT4/INT8 linear on x86 CPUs: our C++ kernel (``cpu_wq.cpp``) and its pure-torch reference.

Layout ("tile16"), owned by the kernel and built here by :func:`pack_tiles`:

- output channels go 16 to a tile (N padded to a multiple of 16), K is padded to a multiple of 32 (both with q = 0);
- a tile is a run of 64-byte chunks along K; byte ``4 * r + j`` of a chunk belongs to row ``r`` of the tile;
- INT4: a chunk covers 8 values of K, the low nibble of byte ``4r + j`` holds ``u[k0 + j]``, the high nibble
  ``u[k0 + 4 + j]``, with ``u = q + 8``; INT8: a chunk covers 4 values, the byte is ``u[k0 + j]`` with ``u = q + 128``;
- scales are float32: ``[Np]`` per channel, or ``[Np / 16, K / group_size, 16]`` grouped (each tile's scales
  together); the bias, if any, float32 ``[Np]``.

So four consecutive K values of one output channel sit in one 32-bit lane, the operand shape of ``vpdpbusd``.

Two modes (``fast``): exact keeps x in float (fp32 arithmetic, ``F.linear(x, q * scale, b)`` up to summation order);
fast quantizes each block of 32 values of x to int8 with one scale (ggml's q8_0) and runs integer dot products.

The extension is compiled on first use (``-O3 -march=<arch> -fopenmp``, one translation unit) by
``torch.utils.cpp_extension`` and cached in torch's extension folder under a name that hashes the source, the flags,
this CPU's feature flags and the torch version. Where it cannot be built, :func:`cpu_kernels` warns once and returns
None, and callers keep torch's stock operators.
"""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BLOCK_K",
    "TILE_N",
    "cpu_kernels",
    "cpu_unpack_rows",
    "cpu_unpack_rows_reference",
    "cpu_unpack_t",
    "cpu_unpack_t_reference",
    "cpu_wq_linear",
    "cpu_wq_linear_reference",
    "official_from_tiles",
    "pack_tiles",
    "tile_bias",
    "tile_scales",
    "tiles_from_official",
    "unpack_tiles",
]

TILE_N = 16  # output channels per tile
BLOCK_K = 32  # K values per activation block in the fast mode; groups must be multiples of it
_SOURCE = Path(__file__).with_name("cpu_wq.cpp")


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


# ------------------------------------------------------------------------------------------------ layout (torch)


def pack_tiles(q: Tensor, bits: int) -> Tensor:
    """The tile16 layout of unpacked int8 values.

    Args:
        q: int8 ``[N, K]``, values in [-8, 7] (bits=4) or [-128, 127] (bits=8).
        bits: 4 or 8.

    Returns:
        uint8, flat, ``Np * Kp * bits / 8`` bytes (Np, Kp: N and K rounded up to 16 and 32).
    """
    n, k = q.shape
    np_, kp = _round_up(n, TILE_N), _round_up(k, BLOCK_K)
    off = 8 if bits == 4 else 128
    u = torch.full((np_, kp), off, dtype=torch.uint8, device=q.device)
    u[:n, :k] = (q.to(torch.int16) + off).to(torch.uint8)
    if bits == 8:  # [tiles, 16 rows, chunks, 4] -> [tiles, chunks, 16 rows, 4]
        return u.view(np_ // TILE_N, TILE_N, kp // 4, 4).transpose(1, 2).contiguous().view(-1)
    # [tiles, 16 rows, chunks, 2 nibbles, 4] -> [tiles, chunks, 16 rows, 4, 2 nibbles]
    t = u.view(np_ // TILE_N, TILE_N, kp // 8, 2, 4).permute(0, 2, 1, 4, 3)
    return (t[..., 0] | (t[..., 1] << 4)).contiguous().view(-1)


def unpack_tiles(w: Tensor, bits: int, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_tiles`: int8 ``[N, K]``."""
    np_, kp = _round_up(n, TILE_N), _round_up(k, BLOCK_K)
    if bits == 8:
        u = w.view(np_ // TILE_N, kp // 4, TILE_N, 4).transpose(1, 2).reshape(np_, kp)
    else:
        b = w.view(np_ // TILE_N, kp // 8, TILE_N, 4)
        t = torch.stack([b & 0xF, b >> 4], dim=-1)  # [tiles, chunks, 16 rows, 4, 2 nibbles]
        u = t.permute(0, 2, 1, 4, 3).reshape(np_, kp)
    return (u[:n, :k].to(torch.int16) - (8 if bits == 4 else 128)).to(torch.int8)


def tile_scales(scale: Tensor, k: int, group_size: int | None) -> Tensor:
    """The kernel's float32 scales: ``[Np]`` per channel, ``[Np / 16, K / group_size, 16]`` grouped (padded with 0)."""
    n = scale.shape[0]
    np_ = _round_up(n, TILE_N)
    s = torch.zeros((np_,) + tuple(scale.shape[1:]), dtype=torch.float32, device=scale.device)
    s[:n] = scale
    if group_size is None:
        return s
    return s.view(np_ // TILE_N, TILE_N, -1).transpose(1, 2).contiguous()


def tile_bias(bias: Tensor | None, n: int) -> Tensor | None:
    """The kernel's bias: float32 ``[Np]``, or None."""
    if bias is None:
        return None
    b = torch.zeros(_round_up(n, TILE_N), dtype=torch.float32, device=bias.device)
    b[:n] = bias
    return b


def _check_group(k: int, group_size: int | None) -> None:
    if group_size is not None and (group_size % BLOCK_K or k % group_size):
        raise ValueError(f"the CPU kernels need group_size to be a multiple of {BLOCK_K} dividing K={k}, "
                         f"got {group_size}")


# ------------------------------------------------------------------------------------------------ references


def _ref_weight(w: Tensor, scale: Tensor, bits: int, group_size: int | None, n: int, k: int) -> Tensor:
    """fp64 ``q * scale`` ``[N, K]`` from the tile16 tensors."""
    q = unpack_tiles(w, bits, n, k).double()
    if group_size is None:
        return q * scale[:n].double()[:, None]
    s = scale.transpose(1, 2).reshape(-1, scale.shape[1])[:n].double()  # [N, groups]
    return q * s.repeat_interleave(group_size, dim=1)


def _quantize_blocks(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each block of 32 values of each row to int8 with one scale ``d = max|x| / 127``: (q as float64, d)."""
    m, k = x.shape
    kp = _round_up(k, BLOCK_K)
    xb = torch.zeros(m, kp, dtype=torch.float32)
    xb[:, :k] = x.float()
    xb = xb.view(m, kp // BLOCK_K, BLOCK_K)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return q.double(), (amax / 127.0).double()


def cpu_wq_linear_reference(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None, bits: int,
                            group_size: int | None, n: int, fast: bool) -> Tensor:
    """Pure-torch :func:`cpu_wq_linear` (float64 arithmetic, rounded once): the oracle of the kernel's tests.

    Same arguments and result as :func:`cpu_wq_linear`.
    """
    m, k = x.shape
    _check_group(k, group_size)
    wf = _ref_weight(w, scale, bits, group_size, n, k)  # [N, K]
    if fast:
        q, d = _quantize_blocks(x)  # [M, nb, 32], [M, nb, 1]
        xd = (q * d).reshape(m, -1)[:, :k]  # the activations the integer dot products see
    else:
        xd = x.double()
    y = xd @ wf.T
    if bias is not None:
        y = y + bias[:n].double()
    return y.to(x.dtype)


def cpu_unpack_rows_reference(w: Tensor, scale: Tensor, rows: Tensor, bits: int, group_size: int | None, n: int,
                              k: int, dtype: torch.dtype) -> Tensor:
    """Pure-torch :func:`cpu_unpack_rows`."""
    return _ref_weight(w, scale, bits, group_size, n, k)[rows].float().to(dtype)


# ------------------------------------------------------------------------------------------------ the extension


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.cache
def cpu_kernels(arch: str = "native"):
    """The compiled ops (``wq_linear``, ``unpack_rows``, ``unpack_t``, ``to_tiles``, ``from_tiles``, ``isa``), or None.

    Built on first call.

    Args:
        arch: the ``-march`` value; tests also build ``haswell`` (AVX2) and ``x86-64`` (plain C++) to cover every
            code path on one machine.

    Returns:
        The ``torch.ops`` namespace of this build, or None (after a one-line warning) where it cannot be built.
    """
    from torch.utils import cpp_extension

    ns = "glm_cpu_" + re.sub(r"\W", "_", arch)
    flags = ["-O3", f"-march={arch}", "-fopenmp", f"-DGLM_CPU_NS={ns}"]
    parts = [_SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_flags().encode(), torch.__version__.encode()]
    key = b"\0".join(parts)
    name = f"{ns}_{hashlib.sha1(key).hexdigest()[:12]}"
    build_dir = Path(cpp_extension.get_default_build_root()) / name
    if not (build_dir / f"{name}.so").is_file():
        print(f"glm: compiling the CPU INT4/INT8 kernels (once, cached in {build_dir})", file=sys.stderr, flush=True)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"glm: the CPU INT4/INT8 kernels could not be built ({reason}); quantized linears use torch's "
                      "stock operators", RuntimeWarning, stacklevel=2)
        return None
    # Shapes for torch.compile, which traces the ops without running them.
    torch.library.register_fake(f"{ns}::wq_linear")(
        lambda x, w, scale, bias, bits, group_size, n, fast: x.new_empty(x.shape[0], n))
    torch.library.register_fake(f"{ns}::unpack_rows")(
        lambda w, scale, rows, bits, group_size, n, k, dtype: w.new_empty(rows.shape[0], k, dtype=dtype))
    torch.library.register_fake(f"{ns}::unpack_t")(lambda w, scale, bits, group_size, n, k, r0, out: None)
    torch.library.register_fake(f"{ns}::to_tiles")(
        lambda official, bits, k: official.new_empty(_round_up(official.shape[0], TILE_N) * _round_up(k, BLOCK_K)
                                                     * bits // 8, dtype=torch.uint8))
    torch.library.register_fake(f"{ns}::from_tiles")(
        lambda tiles, bits, n, k: tiles.new_empty(n, k * bits // 8, dtype=torch.int8))
    return getattr(torch.ops, ns)


_UNRESOLVED = object()
_native_ops: object = _UNRESOLVED


def _ops():
    """This machine's build (:func:`cpu_kernels`), resolved once into a module global: torch.compile traces a global
    read, where it would try to trace the building function itself."""
    global _native_ops
    if _native_ops is _UNRESOLVED:
        _native_ops = cpu_kernels()
    return _native_ops


def tiles_from_official(weight: Tensor, bits: int, k: int, ops=None) -> Tensor:
    """The tile16 bytes of an official stored weight (int8 ``[N, K * bits / 8]``), in one C++ pass.

    Same result as ``pack_tiles(unpack_int4(weight) if bits == 4 else weight, bits)``, without the temporaries.
    """
    ops = ops or _ops()
    return ops.to_tiles(weight.contiguous(), bits, k)


def official_from_tiles(w: Tensor, bits: int, n: int, k: int, ops=None) -> Tensor:
    """Inverse of :func:`tiles_from_official`: the official int8 ``[N, K * bits / 8]`` weight."""
    ops = ops or _ops()
    return ops.from_tiles(w, bits, n, k)


def cpu_wq_linear(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None, bits: int, group_size: int | None,
                  n: int, fast: bool, ops=None) -> Tensor:
    """``y = x @ (q * scale).T + bias`` on the CPU from the tile16 layout (C++ kernel).

    Args:
        x: ``[M, K]`` float32, bfloat16 or float16.
        w: the :func:`pack_tiles` bytes of the ``[N, K]`` weight.
        scale: :func:`tile_scales` (float32).
        bias: :func:`tile_bias` (float32 ``[Np]``) or None.
        bits: 4 or 8.
        group_size: None (per channel) or a multiple of 32 dividing K.
        n: N, the output features.
        fast: quantize x to int8 per block of 32 (ggml's q8_0) and use integer dot products; else exact float.
        ops: the extension (default: :func:`cpu_kernels`).

    Returns:
        ``[M, N]`` in x's dtype.
    """
    ops = ops or _ops()
    _check_group(x.shape[-1], group_size)
    return ops.wq_linear(x.contiguous(), w, scale, bias, bits, group_size or 0, n, fast)


def cpu_unpack_t(w: Tensor, scale: Tensor, bits: int, group_size: int | None, n: int, k: int, r0: int,
                 out: Tensor, ops=None) -> Tensor:
    """``(q * scale)[r0 : r0 + out.shape[1]].T`` written into ``out`` ``[K, rows]`` (fp32 product, rounded once).

    The weight slice of a GEMM with many rows of x (``x @ out``); ``r0`` must be a multiple of 16. Writing into a
    buffer the caller reuses saves the page faults of a fresh allocation per slice.

    Returns:
        ``out``.
    """
    ops = ops or _ops()
    ops.unpack_t(w, scale, bits, group_size or 0, n, k, r0, out)
    return out


def cpu_unpack_t_reference(w: Tensor, scale: Tensor, bits: int, group_size: int | None, n: int, k: int, r0: int,
                           r1: int, dtype: torch.dtype) -> Tensor:
    """Pure-torch :func:`cpu_unpack_t`."""
    return _ref_weight(w, scale, bits, group_size, n, k)[r0:r1].T.float().to(dtype).contiguous()


def cpu_unpack_rows(w: Tensor, scale: Tensor, rows: Tensor, bits: int, group_size: int | None, n: int, k: int,
                    dtype: torch.dtype, ops=None) -> Tensor:
    """Rows ``rows`` of ``q * scale`` as ``[len(rows), K]`` in ``dtype`` (fp32 product, rounded once), from tile16.

    The embedding lookup of a quantized, tied ``lm_head``, and weight slices for GEMMs with many rows.
    """
    ops = ops or _ops()
    return ops.unpack_rows(w, scale, rows.reshape(-1).long().contiguous(), bits, group_size or 0, n, k, dtype)
