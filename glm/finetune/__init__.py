"""Fine-tuning (`glm-finetune`): a P-Tuning v2 prefix or LoRA factors learn on a frozen model, or (`--full`) every
weight does.

Mirrors the official `ptuning/` scripts of ChatGLM-6B: the same data preprocessing, loss, optimizer (AdamW,
linear decay, gradient clipping at 1.0), prefix dropout, checkpoint layout and evaluation (generated predictions
scored with ROUGE and BLEU), on a float, INT8 or INT4 base; LoRA factors are initialised and saved as PEFT does.

    input_ids, labels = preprocess_rows(tok, rows, max_source_length=64, max_target_length=64,
                                        prompt_column="content", response_column="summary")
    loss = training_loss(m, input_ids, labels)   # gradients reach the trainable part only

One concern per module, the library importing no entry-point code:

- `data`: JSON-lines rows and the official preprocessing into ids and labels, or prompts and references;
- `prefix`, `lora`: a fresh prefix encoder or LoRA factors, freezing everything else, and saving them;
- `part`: the one interface of what trains, for the loop (a prefix, LoRA factors; `full`: every weight, sharded
  with FSDP, `--full`);
- `loss`: the official loss, and the positions and mask of the right-padded rows;
- `loop`: the training loop, evaluation, checkpoints and resuming;
- `distributed`: the ranks of a `torchrun` start, each one's share of the rows, DistributedDataParallel;
- `predict`, `metrics`: generating for every row through the scheduler, and the official scores;
- `outputs`: what the output folder may hold, and the result files;
- `cli`: the `glm-finetune` command (`glm.finetune.cli.main`), the only module that imports entry-point code, with
  `launch`, its options of several processes (and torchrun's launcher for `--nproc-per-node`).
"""

from __future__ import annotations

from glm.errors import DataError, TrainingError
from glm.finetune.data import IGNORE, Rows, generation_rows, preprocess_rows, read_rows
from glm.finetune.loop import (
    Interrupted,
    TrainConfig,
    batch_order,
    evaluate,
    find_checkpoint,
    load_training_state,
    save_training_checkpoint,
    train,
)
from glm.finetune.lora import add_lora, lora_parameters, save_adapter
from glm.finetune.loss import ptuning_loss, training_inputs, training_loss
from glm.finetune.metrics import score_rows
from glm.finetune.part import Part, lora_part, prefix_part, trainable_part
from glm.finetune.predict import OFFICIAL_GENERATION, generate_rows
from glm.finetune.prefix import add_prefix, prefix_parameters

__all__ = ["IGNORE", "OFFICIAL_GENERATION", "DataError", "Interrupted", "Part", "Rows", "TrainConfig",
           "TrainingError", "add_lora", "add_prefix", "batch_order", "evaluate", "find_checkpoint", "generate_rows",
           "generation_rows", "load_training_state", "lora_part", "lora_parameters", "prefix_part",
           "prefix_parameters", "preprocess_rows", "ptuning_loss", "read_rows", "save_adapter",
           "save_training_checkpoint", "score_rows", "train", "training_inputs", "training_loss", "trainable_part"]
