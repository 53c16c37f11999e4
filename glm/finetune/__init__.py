"""P-Tuning v2 training (`glm-finetune`): a small prefix learns, the whole model stays frozen.

Mirrors the official `ptuning/` scripts of ChatGLM-6B: the same data preprocessing, loss, optimizer (AdamW,
linear decay, gradient clipping at 1.0), prefix dropout and checkpoint layout, on a float, INT8 or INT4 base.

    input_ids, labels = preprocess_rows(tok, rows, max_source_length=64, max_target_length=64,
                                        prompt_column="content", response_column="summary")
    loss = ptuning_loss(m, input_ids, labels)   # gradients reach m.model.prefix_encoder only

One concern per module, the library importing no entry-point code:

- `data`: JSON-lines rows and the official preprocessing into ids and labels;
- `prefix`: a fresh prefix encoder, and freezing everything else;
- `loss`: the official loss, and the positions and mask of the right-padded rows;
- `loop`: the training loop, evaluation, checkpoints and resuming;
- `part`: what trains (the prefix by default), `full`: every weight, sharded with FSDP (`--full`);
- `distributed`: the ranks of a `torchrun` start, each one's share of the rows, DistributedDataParallel;
- `cli`: the `glm-finetune` command (`glm.finetune.cli.main`), the only module that imports entry-point code, with
  `launch`, its options of several processes (and torchrun's launcher for `--nproc-per-node`).
"""

from __future__ import annotations

from glm.errors import DataError
from glm.finetune.data import IGNORE, preprocess_rows, read_rows
from glm.finetune.loop import (
    TrainConfig,
    batch_order,
    evaluate,
    find_checkpoint,
    load_training_state,
    save_training_checkpoint,
    train,
)
from glm.finetune.lora import lora_parameters
from glm.finetune.loss import ptuning_loss, training_inputs, training_loss
from glm.finetune.prefix import add_prefix, prefix_parameters

__all__ = ["IGNORE", "DataError", "TrainConfig", "add_prefix", "batch_order", "evaluate", "find_checkpoint",
           "load_training_state", "lora_parameters", "prefix_parameters", "preprocess_rows", "ptuning_loss",
           "read_rows", "save_training_checkpoint", "train", "training_inputs", "training_loss"]
