"""Where a checkpoint is: a local folder or a Hugging Face Hub download, and which of its files hold the weights.

Every weight file a folder (or its shard index) names must lie inside that folder (`_inside`): an index cannot make
us open anything else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from glm.config import read_json
from glm.errors import CheckpointError

DEFAULT_MODEL = "THUDM/chatglm-6b"
HUB_PATTERNS = ["*.json", "*.model", "*.safetensors", "*.bin", "MODEL_LICENSE"]
MAX_INDEX_BYTES = 64 << 20  # ChatGLM-6B's shard index is 20 KB

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


__all__ = ["DEFAULT_MODEL", "HUB_PATTERNS", "MAX_INDEX_BYTES", "checkpoint_files", "resolve"]
