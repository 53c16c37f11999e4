"""The official P-Tuning v2 loss, and the positions and mask of the right-padded rows it runs on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from glm.config import GLMConfig
from glm.errors import DataError, GenerationError
from glm.finetune.data import IGNORE
from glm.finetune.prefix import net_of
from glm.generation.inputs import Batch


def training_inputs(input_ids: Tensor, cfg: GLMConfig, prefix: int = 0) -> tuple[Tensor, Tensor]:
    """Positions and mask of right-padded training rows, as the official code computes them over the whole row.

    The pads after `<eop>` are just more causal tokens (nothing before them sees them): position frozen at the
    mask's index, block position counting on. That is a prompt of the row's full length, so the rows go through
    the one layout of prompts, `glm.generation.inputs.Batch` (equal lengths: it adds no padding of its own).

    Args:
        input_ids: (B, T) long, each row holding `[gMASK]` (else `[MASK]`) and `<sop>`.
        cfg: the model config (special ids).
        prefix: P-Tuning slots in front of the keys, seen by every query.
    Returns:
        position_ids (B, 2, T) long, mask (B, 1, T, prefix + T) bool.
    """
    try:
        batch = Batch.from_prompts(input_ids.tolist(), cfg, device=input_ids.device)
    except GenerationError:
        raise DataError("every training row needs [gMASK] (or [MASK]) and <sop>: build rows with preprocess_rows") \
            from None
    return batch.position_ids, batch.mask(prefix)


def training_loss(m, input_ids, labels) -> Tensor:
    """The official fine-tuning loss (P-Tuning v2, LoRA, any trainable part): shifted cross-entropy over float32
    logits, mean over the non-ignored tokens.

    Columns after the last labelled token of every row are dropped first: they are causal pads that no labelled
    position sees, so the loss and its gradients are exactly those of the full rows. Logits are computed only
    where a label counts.

    Args:
        m: a `glm.load` model (or its `GLM`); only the parameters that require grad (the prefix encoder, see
            `prefix_parameters`, or the LoRA factors, see `lora_parameters`) get gradients.
        input_ids, labels: (B, T) tensors or lists of lists, as `preprocess_rows` returns them.
    Returns:
        The scalar loss.
    """
    net = net_of(m)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=net.device)
    lab = torch.as_tensor(labels, dtype=torch.long, device=net.device)
    labelled = (lab != IGNORE).any(dim=0).nonzero()
    T = int(labelled[-1]) + 1 if len(labelled) else ids.shape[1]
    ids, lab = ids[:, :T], lab[:, :T]
    position_ids, mask = training_inputs(ids, net.config, net.config.pre_seq_len or 0)
    target = lab[:, 1:]  # position t predicts token t + 1
    counted = F.pad(target != IGNORE, (0, 1))  # (B, T): the positions whose prediction the loss counts
    # Logits of the counted positions only: the same mean as cross-entropy with ignore_index over all of them.
    logits = net(ids, position_ids, mask, logits_at=counted)  # (N, V) float32
    return F.cross_entropy(logits, target[target != IGNORE])


ptuning_loss = training_loss  # the name the P-Tuning API has used


__all__ = ["ptuning_loss", "training_inputs", "training_loss"]
