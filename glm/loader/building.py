"""Building a GLM from a checkpoint folder: meta-device construction, then each tensor assigned as it is read.

Peak host memory stays about one copy of the weights (less with `quant`, which quantizes each linear as soon as its
tensors are in: see `glm.loader.quantizing`, imported only for a quantized checkpoint or `quant`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from glm.config import GLMConfig
from glm.errors import CheckpointError
from glm.loader.hub import checkpoint_files
from glm.loader.reading import check_tensor, checkpoint_to_module, module_to_checkpoint, read_tensors
from glm.model import GLM


def build_model(
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quant: int | None = None,
    group_size: int | None = None,
    quantize_lm_head: bool = False,
    ptuning: Path | None = None,
    progress: bool = False,
    shard=None,
) -> GLM:
    """Build a GLM from a checkpoint folder: meta-device construction, then assign each tensor as it is read.

    With `ptuning`, a P-Tuning v2 folder (config.json with pre_seq_len, and the prefix encoder's weights) is
    applied on top, as the official ptuning scripts load it. `shard` (a `glm.parallel.shard.ShardPlan`) makes this
    process's tensor-parallel shard: it shapes the empty model (`prepare`), cuts each tensor as it is read (`take`)
    and settles a linear quantized whole (`assigned`), so that only the shard is ever held.
    """
    cfg = GLMConfig.from_json(folder / "config.json")
    files = checkpoint_files(folder)
    prefix_files = _read_ptuning(cfg, ptuning) if ptuning is not None else []
    _check_quant_request(cfg, quant, quantize_lm_head)
    stored_quant = cfg.quantization_bit
    quantizer = None
    if quant or stored_quant:
        from glm.loader.quantizing import StreamingQuantizer

        quantizer = StreamingQuantizer.plan(cfg, quant, group_size, quantize_lm_head)
    model = _empty_model(cfg)
    if shard is not None:
        shard.prepare(model, quantizer)
    for path in _with_progress(files + prefix_files, progress):
        _assign_file(model, path, path in prefix_files, device, dtype, quantizer, shard)
        if quant or stored_quant:
            _return_freed_memory()
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.word_embeddings.weight  # tied: read once, shared
    if quantizer is not None:
        quantizer.finish(model)
    _check_complete(model)
    if cfg.pre_seq_len and not all(bool(t.isfinite().all()) for t in model.prefix_encoder.state_dict().values()):
        where = ptuning if ptuning is not None else folder
        raise CheckpointError(f"the P-Tuning prefix in {where} holds NaN or inf values: it is broken (saved by a "
                              "training run that diverged?); use an earlier checkpoint or train it again")
    model.init_buffers(device)
    if stored_quant:
        from glm.loader.quantizing import prepare_stored

        prepare_stored(model)
        _return_freed_memory()
    return model.eval().requires_grad_(False)


def _read_ptuning(cfg: GLMConfig, ptuning: Path) -> list[Path]:
    """Take a P-Tuning v2 folder's prefix settings into `cfg`; its weight files."""
    if not ptuning.is_dir():
        raise CheckpointError(f"no P-Tuning folder {ptuning}")
    pcfg = GLMConfig.from_json(ptuning / "config.json")
    if not pcfg.pre_seq_len:
        raise CheckpointError(f"{ptuning}/config.json has no pre_seq_len: not a P-Tuning v2 checkpoint")
    cfg.pre_seq_len, cfg.prefix_projection = pcfg.pre_seq_len, pcfg.prefix_projection
    return checkpoint_files(ptuning)


def _check_quant_request(cfg: GLMConfig, quant: int | None, quantize_lm_head: bool) -> None:
    if quant and cfg.quantization_bit and quant != cfg.quantization_bit:
        raise CheckpointError(
            f"this checkpoint is already int{cfg.quantization_bit}; it cannot be re-quantized to int{quant}"
        )
    if quantize_lm_head and not (quant or cfg.quantization_bit):
        raise ValueError("quantizing the output layer needs quant=4 or 8 (--quant), or a quantized checkpoint")


class _NoInit(TorchFunctionMode):
    """Skips `torch.nn.init` while building on the meta device: there are no values to fill, and `normal_` of a meta
    tensor imports torch._dynamo, seconds of every process's start-up."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def on_meta():
    """Build modules on the meta device, without initialising their (absent) values."""
    with torch.device("meta"), _NoInit():
        yield


def _empty_model(cfg: GLMConfig) -> GLM:
    """The model on the meta device, with (meta) QuantLinears where the checkpoint is stored quantized."""
    with on_meta():
        model = GLM(cfg)
    if cfg.quantization_bit:
        from glm.loader.quantizing import swap_in_quant_linears

        swap_in_quant_linears(model, cfg)
    return model


def _with_progress(files: list[Path], show: bool) -> Iterator[Path]:
    """`files`, with a bar of the bytes read when `show`."""
    if not show:
        yield from files
        return
    from tqdm.auto import tqdm

    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="loading") as bar:
        for path in files:
            yield path
            bar.update(path.stat().st_size)


def _assign_file(model: GLM, path: Path, from_prefix: bool, device, dtype: torch.dtype, quantizer,
                 shard=None) -> None:
    """Check and assign every tensor of one weight file that the model takes."""
    cfg = model.config
    for ck_name, t in read_tensors(path):
        name = checkpoint_to_module(ck_name)
        if not _takes(cfg, name, from_prefix):
            continue
        whole = t
        if shard is not None:
            t = shard.take(name, t)
        check_tensor(ck_name, t, _expected(model, name), cfg.quantization_bit)
        keep = quantizer is not None and quantizer.keeps_as_stored(name)
        placed = _placed(name, t, device, dtype, keep)
        if t is not whole and placed.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr():
            placed = placed.clone()  # a shard keeps none of the rest (cast or moved, it is a copy already)
        _set_tensor(model, name, placed)
        if quantizer is not None:
            quantizer.assigned(model, name, dtype)
        if shard is not None:
            shard.assigned(model, name)


def _takes(cfg: GLMConfig, name: str | None, from_prefix: bool) -> bool:
    """Whether the model takes the checkpoint tensor that goes to module tensor `name`."""
    if name is None:
        return False
    # A quantized head tied to the embedding is saved once, as lm_head.weight (a float tied head: as the embedding).
    if cfg.tie_word_embeddings and name == "lm_head.weight" and not (cfg.quantization_bit and cfg.quantize_lm_head):
        return False
    is_prefix = name.startswith("prefix_encoder.")
    # A P-Tuning folder contributes its prefix encoder only, as the official scripts load it.
    return not ((is_prefix and not cfg.pre_seq_len) or (from_prefix and not is_prefix))


def _placed(name: str, t: Tensor, device, dtype: torch.dtype, keep_as_stored: bool) -> Tensor:
    """`t` on `device`, in the dtype the model holds it in."""
    if name.startswith("prefix_encoder."):  # the prefix encoder stays float32, as the official scripts keep it
        return t.to(device=device, dtype=torch.float32)
    if keep_as_stored:  # about to be quantized (see glm.loader.quantizing.StreamingQuantizer)
        return t.to(device=device)
    if t.is_floating_point() and not name.endswith("weight_scale"):
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)  # int8 weights as stored; scales as stored (upcast at use, never rounded down)


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise CheckpointError(f"the model has no tensor {name!r} for this checkpoint: its config.json does not match")


def _expected(model: nn.Module, name: str) -> Tensor:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        mod = None
    t = getattr(mod, attr, None) if mod is not None else None
    if not isinstance(t, Tensor):
        raise CheckpointError(f"checkpoint tensor for {name!r} has no place in the model: config.json does not match")
    return t


def _check_complete(model: nn.Module) -> None:
    """Refuse a model some of whose tensors no file held (still on the meta device)."""
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    missing = [n for n in missing if n != "inv_freq"]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensors the config needs, e.g. {module_to_checkpoint(missing[0])}: "
            "it is incomplete or of another model"
        )


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`; nothing elsewhere).

    Quantizing while loading frees hundreds of float and int8 blocks of 8-32 MB, which glibc keeps for reuse: over
    a billion bytes of the peak for INT4 ChatGLM-6B without this.
    """
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


__all__ = ["build_model"]
