"""Prompt layout and GLM's 2D positions, id checks, and the left-padded batch of an uncached forward.

The trainer builds its inputs from here too, so that a prompt is laid out one way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glm.attention import attention_mask
from glm.config import GLMConfig
from glm.errors import GenerationError


def prompt_layout(ids: list[int], cfg: GLMConfig) -> tuple[int, int]:
    """(context_len, mask_pos) of one prompt: the index of `<sop>` and of `[gMASK]` (else `[MASK]`)."""
    if cfg.bos_token_id not in ids:
        raise GenerationError(
            "the prompt has no <sop> token: build it with tokenizer.encode(text), which appends [gMASK] <sop>"
        )
    ctx = ids.index(cfg.bos_token_id)
    mask_tok = cfg.gmask_token_id if cfg.gmask_token_id in ids else cfg.mask_token_id
    if mask_tok not in ids:
        raise GenerationError("the prompt has neither [gMASK] nor [MASK]: build it with tokenizer.encode(text)")
    return ctx, ids.index(mask_tok)


def positions(n: int, ctx: int, mask_pos: int) -> tuple[list[int], list[int]]:
    """The two position rows of a sequence of `n` tokens whose `<sop>` is at `ctx` and mask at `mask_pos`.

    Before `<sop>`: position i, block position 0. From `<sop>` on: the position freezes at the mask's index and
    the block position counts 1, 2, ... (GLM's 2D positions: the reply is one block filled in at the mask).
    """
    pos = [i if i < ctx else mask_pos for i in range(n)]
    block = [0 if i < ctx else i - ctx + 1 for i in range(n)]
    return pos, block


def prompt_positions(ids: list[int], cfg: GLMConfig) -> tuple[list[int], list[int]]:
    """The two position rows of a prompt (see `positions`)."""
    ctx, mask_pos = prompt_layout(ids, cfg)
    return positions(len(ids), ctx, mask_pos)


def check_ids(ids, cfg: GLMConfig, what: str = "input_ids") -> list[int]:
    """A prompt as a list of Python ints inside the vocabulary (an id past it would be an IndexError on a CPU and
    a device-side assert, which poisons the process, on CUDA)."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.is_complex():
            raise GenerationError(f"{what} must be a 1-D integer tensor or a list of ints, got {tuple(ids.shape)} "
                                  f"{ids.dtype}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise GenerationError(f"{what} must be a list of token ids (ints), got {type(ids).__name__}: "
                              "encode text with tokenizer.encode(text)")
    out = list(ids)
    if not out:
        raise GenerationError(f"{what} is empty: encode some text with tokenizer.encode(text)")
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) and not (hasattr(t, "__index__") and not isinstance(t, float)):
            raise GenerationError(f"{what} must hold ints, got {type(t).__name__} {t!r}")
        if not 0 <= int(t) < cfg.vocab_size:
            raise GenerationError(f"{what} holds id {int(t)}, outside this model's vocabulary [0, {cfg.vocab_size})")
    return [int(t) for t in out]


@dataclass
class Batch:
    """Left-padded prompts for one uncached forward (`ChatGLM.logits`, prefill, the trainer).

    ids (B, T) long; position_ids (B, 2, T) long (pads 0); valid (B, T) bool (False on pads); context_len (B,)
    long, the slot of `<sop>`.
    """

    ids: Tensor
    position_ids: Tensor
    valid: Tensor
    context_len: Tensor

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], cfg: GLMConfig, device=None) -> Batch:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("empty prompt: encode some text with tokenizer.encode(text)")
        T = max(len(p) for p in prompts)
        ids, pos, valid, ctxs = [], [], [], []
        for p in prompts:
            pad = T - len(p)
            ctx, mask_pos = prompt_layout(p, cfg)
            # Positions are computed per sequence before padding, as the reference tokenizer does; pads get 0.
            r0, r1 = positions(len(p), ctx, mask_pos)
            ids.append([cfg.pad_token_id] * pad + list(p))
            pos.append([[0] * pad + r0, [0] * pad + r1])
            valid.append([False] * pad + [True] * len(p))
            ctxs.append(pad + ctx)
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
        return cls(t(ids), t(pos), t(valid, torch.bool), t(ctxs))

    def mask(self, prefix: int = 0, prefix_len: Tensor | None = None) -> Tensor:
        """(B, 1, T, prefix + T) bool mask; `prefix` P-Tuning slots come first, seen by all (with `prefix_len`
        (B,), row b's first prefix_len[b] of them only: its own prefix; the others are masked)."""
        B, T = self.ids.shape
        pre = self.valid.new_ones(B, prefix)
        if prefix_len is not None:
            pre = torch.arange(prefix, device=pre.device)[None, :] < prefix_len[:, None]
        valid = torch.cat((pre, self.valid), dim=1)
        slots = torch.arange(prefix, prefix + T, device=self.ids.device)
        return attention_mask(valid, self.context_len + prefix, slots, prefix + T)


__all__ = ["Batch", "check_ids", "positions", "prompt_layout", "prompt_positions"]
