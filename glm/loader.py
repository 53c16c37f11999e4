"""Find a checkpoint (Hugging Face Hub repo id or local folder), read its shards, and build the model.

The model is built on the meta device and every tensor is assigned as it is read, so peak host memory stays
about one copy of the weights (less with `quant`, which quantizes each block as soon as it is complete).
Only safetensors and `torch.load(weights_only=True)` are used: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from glm.config import GLMConfig, read_json
from glm.errors import CheckpointError, ConfigError, one_line  # noqa: F401
from glm.model import GLM

DEFAULT_MODEL = "THUDM/chatglm-6b"
HUB_PATTERNS = ["*.json", "*.model", "*.safetensors", "*.bin", "MODEL_LICENSE"]


MAX_INDEX_BYTES = 64 << 20  # ChatGLM-6B's shard index is 20 KB


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


# ---------------------------------------------------------------------------------------------------- resolution


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(model: str | os.PathLike = DEFAULT_MODEL, revision: str | None = None) -> Path:
    """A local folder holding the checkpoint: `model` itself if it is a folder, else a Hub download (cached).

    Offline (`HF_HUB_OFFLINE=1`) a repo id resolves from the local Hugging Face cache only.
    """
    p = Path(os.path.expanduser(str(model)))
    s = str(model)
    try:
        if p.is_dir():
            return p
        exists = p.exists()
    except OSError as e:  # a name too long for the file system, a folder we may not look into
        raise CheckpointError(f"cannot look at {s[:80]!r} ({e.strerror or e}): check the --model path") from None
    if exists:
        raise CheckpointError(f"{p} is a file; --model takes a checkpoint folder or a Hub repo id")
    if not _REPO_ID.match(s):
        raise CheckpointError(f"no such folder {s[:80]!r}, and it is not a Hub repo id like {DEFAULT_MODEL!r}")
    try:
        import huggingface_hub as hub
    except ImportError:  # pragma: no cover - a dependency
        raise CheckpointError("huggingface_hub is not installed: pip install huggingface_hub") from None
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.24 keeps them in utils
        from huggingface_hub import utils as errors
    try:
        # A complete cached copy is used as it is, without touching the network: offline use is the norm.
        cached = Path(hub.snapshot_download(s, revision=revision, local_files_only=True))
        if (cached / "config.json").is_file():
            checkpoint_files(cached)
            return cached
    except (errors.LocalEntryNotFoundError, CheckpointError, OSError, ValueError):
        pass
    try:
        return Path(hub.snapshot_download(s, revision=revision, allow_patterns=_hub_patterns(s, revision)))
    except errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"{s} is not in the local Hugging Face cache and the Hub cannot be reached (offline?): "
            "connect once to download it, or pass --model /path/to/folder"
        ) from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"no folder {s!r} here and no Hub repo of that name (or it is private): "
            f"check the name, e.g. {DEFAULT_MODEL}"
        ) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{s} has no revision {revision!r}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not download {s}: {e}") from None


def _hub_patterns(repo: str, revision: str | None) -> list[str]:
    """Download safetensors when the repo has them, else the .bin shards, never both."""
    import huggingface_hub as hub

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return HUB_PATTERNS
    try:
        files = hub.list_repo_files(repo, revision=revision)
    except Exception:  # noqa: BLE001 - let snapshot_download report the real problem
        return HUB_PATTERNS
    if any(f.endswith(".safetensors") for f in files):
        return [p for p in HUB_PATTERNS if p != "*.bin"]
    return [p for p in HUB_PATTERNS if p != "*.safetensors"]


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, preferring safetensors; every shard an index names must exist.

    Every weight file must lie inside `folder` (see `_inside`): an index cannot make us open anything else.
    """
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = [_inside(folder, s, index_name) for s in _index_shards(index)]
            missing = [s for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(
                    f"shard {missing[0].name} named in {index_name} is missing from {folder}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: re-download the checkpoint"
                )
            return shards
        if (folder / single).is_file():
            return [_inside(folder, single, single)]
    raise CheckpointError(
        f"no weights in {folder}: expected pytorch_model*.bin or *.safetensors (with an index when sharded)"
    )


def _index_shards(index: Path) -> list[str]:
    """The file names a shard index's weight_map names, sorted."""
    fix = "re-download the checkpoint"
    try:
        d = read_json(index, MAX_INDEX_BYTES, CheckpointError, fix)
    except FileNotFoundError:  # removed since is_file()
        raise CheckpointError(f"{index} disappeared while loading: {fix}") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{index} is corrupt: it needs a weight_map of tensor names to file names "
                              f"(strings), got {_describe(wm)}: {fix}")
    return sorted(set(wm.values()))


def _describe(v) -> str:
    if not isinstance(v, dict):
        return "nothing" if v is None else f"a {type(v).__name__}"
    if not v:
        return "an empty one"
    k, x = next((k, x) for k, x in v.items() if not (isinstance(k, str) and isinstance(x, str)))
    return f"{type(x).__name__} {str(x)[:40]!r} for {str(k)[:60]!r}"


def _inside(folder: Path, name: str, named_by: str) -> Path:
    """`folder / name`, refused (before it is opened) unless it stays inside `folder`, links resolved.

    The one exception is the Hugging Face cache, whose snapshot folders hold links into the repo's `blobs/`.
    """
    pure = Path(name)
    if not name or "\0" in name or pure.is_absolute() or ".." in pure.parts or pure.drive:
        raise CheckpointError(f"{named_by} names {name[:80]!r}, which is not a file of the checkpoint folder "
                              f"{folder}: refusing to open it; re-download the checkpoint")
    try:
        root = folder.resolve()
        target = (folder / pure).resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise CheckpointError(f"cannot follow {folder / pure} ({e}): re-download the checkpoint") from None
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if not target.is_relative_to(root) and not (blobs is not None and target.is_relative_to(blobs)):
        raise CheckpointError(f"{folder / pure} is a link to {target}, outside the checkpoint folder: refusing to "
                              f"open it; copy the file into {folder} instead")
    return folder / pure


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


def _check_tensor(ck_name: str, t: Tensor, expect: Tensor, stored_quant: int) -> None:
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


# ---------------------------------------------------------------------------------------------------- building


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


def _quant_linear_names(num_layers: int, include_lm_head: bool) -> list[str]:
    """Module names of the linears a quantized model holds as QuantLinear (the list lives in glm.quant)."""
    from glm.quant import quantized_linear_names

    block = quantized_linear_names(include_lm_head=False)
    names = [f"layers.{i}.{s}" for i in range(num_layers) for s in block]
    return names + (["lm_head"] if include_lm_head else [])


def _swap_in_quant_linears(model: GLM, cfg: GLMConfig) -> None:
    """Replace float linears by (meta) QuantLinear modules, for checkpoints stored quantized."""
    from glm.quant import swap_linear, tie_quantized_embedding

    for name in _quant_linear_names(cfg.num_layers, cfg.quantize_lm_head):
        swap_linear(model, name, cfg.quantization_bit, cfg.quantization_group_size, empty=True)
    if cfg.quantize_lm_head and cfg.tie_word_embeddings:
        tie_quantized_embedding(model)  # the table is the stored lm_head.weight


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
) -> GLM:
    """Build a GLM from a checkpoint folder: meta-device construction, then assign each tensor as it is read.

    With `ptuning`, a P-Tuning v2 folder (config.json with pre_seq_len, and the prefix encoder's weights) is
    applied on top, as the official ptuning scripts load it.
    """
    cfg = GLMConfig.from_json(folder / "config.json")
    files = checkpoint_files(folder)
    prefix_files: list[Path] = []
    if ptuning is not None:
        if not ptuning.is_dir():
            raise CheckpointError(f"no P-Tuning folder {ptuning}")
        pcfg = GLMConfig.from_json(ptuning / "config.json")
        if not pcfg.pre_seq_len:
            raise CheckpointError(f"{ptuning}/config.json has no pre_seq_len: not a P-Tuning v2 checkpoint")
        cfg.pre_seq_len, cfg.prefix_projection = pcfg.pre_seq_len, pcfg.prefix_projection
        prefix_files = checkpoint_files(ptuning)
        files = files + prefix_files
    if quant and cfg.quantization_bit and quant != cfg.quantization_bit:
        raise CheckpointError(
            f"this checkpoint is already int{cfg.quantization_bit}; it cannot be re-quantized to int{quant}"
        )
    stored_quant = cfg.quantization_bit
    if quantize_lm_head and not (quant or stored_quant):
        raise ValueError("quantizing the output layer needs quant=4 or 8 (--quant), or a quantized checkpoint")
    with torch.device("meta"):
        model = GLM(cfg)
    if stored_quant:
        _swap_in_quant_linears(model, cfg)

    pending = {}  # linear -> tensors still to read before it can be quantized
    head_added = stored_quant and quantize_lm_head and not cfg.quantize_lm_head
    if quant and not stored_quant:
        pending = {n: {"weight", "bias"} for n in _quant_linear_names(cfg.num_layers, quantize_lm_head)}
    elif head_added:  # the official -int4/-int8 checkpoints keep a float head: quantize it like the blocks
        quant, group_size = cfg.quantization_bit, cfg.quantization_group_size
        pending = {"lm_head": {"weight", "bias"}}
    if pending:
        from glm.quant import swap_linear
    seen: set[str] = set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="loading")
    # A quantized head tied to the embedding is saved once, as lm_head.weight (a float tied head: as the embedding).
    head_stored = stored_quant and cfg.quantize_lm_head
    for path in files:
        from_prefix = ptuning is not None and path in prefix_files
        for ck_name, t in read_tensors(path):
            name = checkpoint_to_module(ck_name)
            if name is None or (cfg.tie_word_embeddings and name == "lm_head.weight" and not head_stored):
                continue
            is_prefix = name.startswith("prefix_encoder.")
            # A P-Tuning folder contributes its prefix encoder only, as the official scripts load it.
            if (is_prefix and not cfg.pre_seq_len) or (from_prefix and not is_prefix):
                continue
            _check_tensor(ck_name, t, _expected(model, name), stored_quant)
            mod_name, _, attr = name.rpartition(".")
            tied_head = name == "word_embeddings.weight" and "lm_head" in pending and cfg.tie_word_embeddings
            if is_prefix:  # the prefix encoder stays float32, as the official scripts keep it
                t = t.to(device=device, dtype=torch.float32)
            elif (attr == "weight" and mod_name in pending) or tied_head:
                # About to be quantized: kept as stored (memory-mapped, no float copy), so it is quantized from the
                # checkpoint's own values, as the official quantizer quantizes the fp16 release.
                t = t.to(device=device)
            elif t.is_floating_point() and not name.endswith("weight_scale"):
                t = t.to(device=device, dtype=dtype)
            else:  # int8 weights as stored; scales as stored (upcast at use, never rounded down)
                t = t.to(device=device)
            _set_tensor(model, name, t)
            seen.add(name)
            if tied_head:
                # Quantize the tied head now and look the embedding up in it: the float table goes at once.
                from glm.quant import tie_quantized_embedding

                model.lm_head.weight = model.word_embeddings.weight
                swap_linear(model, "lm_head", quant, group_size)
                tie_quantized_embedding(model)
                model.word_embeddings.dtype = dtype  # rows come out in the model's dtype, not the stored one
                del pending["lm_head"]
            if mod_name in pending:
                pending[mod_name].discard(attr)
                if not pending[mod_name]:  # this linear is complete: quantize it now to keep peak memory low
                    swap_linear(model, mod_name, quant, group_size)
                    del pending[mod_name]
        if bar is not None:
            bar.update(path.stat().st_size)
        if quant or stored_quant:
            _return_freed_memory()
    if bar is not None:
        bar.close()
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.word_embeddings.weight  # tied: read once, shared
    for mod_name in list(pending):  # linears without bias (lm_head)
        swap_linear(model, mod_name, quant, group_size)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    missing = [n for n in missing if n != "inv_freq"]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensors the config needs, e.g. {module_to_checkpoint(missing[0])}: "
            "it is incomplete or of another model"
        )
    model.init_buffers(device)
    if stored_quant:
        from glm.quant import QuantLinear

        for mod in model.modules():
            if isinstance(mod, QuantLinear):  # into the CPU kernel's layout, one at a time (no-op elsewhere)
                mod.prepare()
        _return_freed_memory()
    if quant and not stored_quant:
        model.config.quantization_bit = quant
        model.config.quantization_group_size = group_size
        model.config.quantize_lm_head = quantize_lm_head
    elif head_added:
        model.config.quantize_lm_head = True
    return model.eval().requires_grad_(False)


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


# ---------------------------------------------------------------------------------------------------- saving

TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json", "MODEL_LICENSE")


def save_checkpoint(model: GLM, folder: str | os.PathLike, tokenizer_folder: Path | None = None) -> Path:
    """Write `model` as `model.safetensors` + `config.json` under the checkpoint's own names."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {}
    for name, t in model.state_dict().items():
        if name == "inv_freq" or (cfg.tie_word_embeddings and name == "lm_head.weight" and t.is_floating_point()):
            continue  # a float head tied to the embedding is saved once, as the embedding
        state[module_to_checkpoint(name)] = t.detach().contiguous().cpu()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    if tokenizer_folder is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_folder) / f
            if src.is_file() and src.resolve() != (out / f).resolve():
                shutil.copyfile(src, out / f)
    return out


def save_prefix(model: GLM, folder: str | os.PathLike, base_folder: Path | None = None) -> Path:
    """Write a P-Tuning v2 prefix as the official ptuning scripts save it.

    `config.json`: the base's (read from `base_folder` when given) with `pre_seq_len` and `prefix_projection`;
    `pytorch_model.bin`: only `transformer.prefix_encoder.*`, float32. Each file is written whole, then renamed.
    """
    cfg = model.config
    if not cfg.pre_seq_len:
        raise CheckpointError("the model has no P-Tuning prefix to save")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(base_folder) / "config.json" if base_folder is not None else None
    d = json.loads(base.read_text(encoding="utf-8")) if base is not None and base.is_file() else cfg.to_dict()
    d.update(pre_seq_len=cfg.pre_seq_len, prefix_projection=cfg.prefix_projection)
    state = {
        module_to_checkpoint(f"prefix_encoder.{name}"): t.detach().float().cpu().contiguous()
        for name, t in model.prefix_encoder.state_dict().items()
    }
    torch.save(state, out / "pytorch_model.bin.tmp")
    os.replace(out / "pytorch_model.bin.tmp", out / "pytorch_model.bin")
    (out / "config.json.tmp").write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(out / "config.json.tmp", out / "config.json")
    return out


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DEFAULT_MODEL",
    "WEIGHT_MAP",
    "build_model",
    "checkpoint_files",
    "resolve",
    "save_checkpoint",
    "save_prefix",
]
