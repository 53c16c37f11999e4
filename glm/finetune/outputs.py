"""The output folder: what a run may write into (never over files it did not write) and the result files it
writes there, under the names and keys the official scripts (the Hugging Face Trainer) use."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from glm.errors import DataError

MARK = "train_args.json"  # every glm-finetune run writes it first: a folder holding it is our own output
# Files that are model weights or a run's state: never overwritten unless this program wrote the folder.
_PRECIOUS = ("*.bin", "*.safetensors", "*.pt", "*.pth", "*.gguf", "config.json", "ice_text.model",
             "adapter_config.json", "checkpoint-*", "*.index.json")


def check_output_dir(out: Path, *, overwrite: bool, training: bool, resume: Path | None = None,
                     protected: tuple[Path, ...] = ()) -> None:
    """Refuse, in one line, an output folder a run must not write into; call it before anything loads.

    A file is refused; so is a folder that holds the model or prefix being read (`protected`), or model weights,
    checkpoints or configs of anything but an earlier glm-finetune run. Another non-empty folder needs `overwrite`
    (`--overwrite_output_dir`), and so does an earlier run's folder with checkpoints that a new training run would
    mix with its own (unless it resumes from there).
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"--output_dir {out} is a file: name a folder (it is created if missing)")
    real = out.resolve()
    for p in protected:
        if real == p.resolve():
            raise DataError(f"--output_dir {out} is the folder of the model being read: choose another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = (out / MARK).is_file()
    if not ours:
        precious = sorted({f.name for pat in _PRECIOUS for f in out.glob(pat)})
        if precious:
            raise DataError(f"--output_dir {out} holds {', '.join(precious[:3])}{' ...' if len(precious) > 3 else ''}"
                            ", which glm-finetune did not write (a model?): choose another folder")
        if not overwrite:
            raise DataError(f"--output_dir {out} is not empty: choose another folder, or pass "
                            "--overwrite_output_dir to write into it")
        return
    if training and any(out.glob("checkpoint-*")) and not overwrite:
        if resume is not None and real in (resume.resolve(), resume.resolve().parent):
            return
        raise DataError(f"{out} holds checkpoints of an earlier run: continue it with --resume {out}, "
                        "start over with --overwrite_output_dir, or choose another --output-dir")


def clear_checkpoints(out: Path) -> None:
    """Remove the checkpoint-N folders of an earlier run in our own output folder (`--overwrite_output_dir`), so
    that `--resume` never picks one of them up."""
    if not (out / MARK).is_file():
        return
    for c in out.glob("checkpoint-*"):
        if c.is_dir() and (c / "trainer_state.json").is_file():
            shutil.rmtree(c)


def speed_metrics(split: str, seconds: float, samples: int, steps: int) -> dict[str, float]:
    """The Trainer's `speed_metrics`: `{split}_runtime`, `_samples_per_second`, `_steps_per_second`."""
    seconds = max(seconds, 1e-9)
    return {f"{split}_runtime": round(seconds, 4), f"{split}_samples_per_second": round(samples / seconds, 3),
            f"{split}_steps_per_second": round(steps / seconds, 3)}


def save_metrics(out: Path, split: str, metrics: dict) -> None:
    """`{split}_results.json`, and the same keys merged into `all_results.json`, as the Trainer's `save_metrics`
    writes them (sorted keys, indent 4)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / f"{split}_results.json", metrics)
    combined = {}
    if (out / "all_results.json").is_file():
        try:
            combined = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            combined = {}
    combined.update(metrics)
    _write_json(out / "all_results.json", combined)


def log_metrics(split: str, metrics: dict, echo) -> None:
    """The metrics on the terminal, one `key = value` line each, as the Trainer's `log_metrics` shows them."""
    print(f"***** {split} metrics *****", file=echo)
    width = max(len(k) for k in metrics)
    for k in sorted(metrics):
        v = metrics[k]
        print(f"  {k:<{width}} = {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"  {k:<{width}} = {v}",
              file=echo)
    echo.flush()


def write_predictions(out: Path, predictions: list[str], references: list[str]) -> Path:
    """`generated_predictions.txt`: one JSON object a line, `{"labels": ..., "predict": ...}`, as the official
    `main.py` writes it."""
    path = out / "generated_predictions.txt"
    with open(str(path) + ".tmp", "w", encoding="utf-8") as f:
        for p, ref in zip(predictions, references):
            f.write(json.dumps({"labels": ref, "predict": p}, ensure_ascii=False) + "\n")
    os.replace(str(path) + ".tmp", path)
    return path


def _write_json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=4, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["MARK", "check_output_dir", "clear_checkpoints", "log_metrics", "save_metrics", "speed_metrics",
           "write_predictions"]
