"""2D rotary embedding, prefix-LM attention and the preallocated KV cache of GLM v1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> Tensor:
    """Inverse frequencies of one rotary half: `d = head_dim // 2` channels, `d // 2` frequencies.

    The reference keeps `inv_freq` as a half-precision buffer, so its frequencies are the fp16-rounded values
    even when the model runs in fp32.
    """
    d = head_dim // 2
    # On the CPU whatever the default device: arange on the meta device imports torch._dynamo (seconds).
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
    return inv.half().float()  # fp16-rounded, as the reference's buffer


def rotary_cos_sin(position_ids: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cos/sin tables for the 2D rotary embedding.

    Args:
        position_ids: (B, 2, T) long: row 0 the position, row 1 the block position.
        inv_freq: (d/2,) float32, from `rotary_inv_freq`.
        dtype: the model dtype.
    Returns:
        cos, sin: (B, T, 1, head_dim) in `dtype`; the first half of head_dim rotates by `position_ids[:, 0]`,
        the second by `position_ids[:, 1]`.
    """
    if dtype == torch.float16:
        # In fp16 the reference builds t * inv_freq in fp16 too; mirror its rounding.
        freqs = (position_ids.half()[..., None] * inv_freq.half()).float()  # (B, 2, T, d/2)
    else:
        freqs = position_ids.float()[..., None] * inv_freq  # (B, 2, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, 2, T, d): non-interleaved halves
    emb = emb.permute(0, 2, 1, 3).flatten(2)[:, :, None, :]  # (B, T, 1, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary_2d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k: each of the two halves of a head is rotated non-interleaved (`rotate_half`) on its own.

    Args:
        x: (B, T, H, D); cos, sin: (B, T, 1, D).
    """
    q = x.unflatten(-1, (2, 2, x.shape[-1] // 4))  # (B, T, H, half, part, D/4)
    rot = torch.stack((-q[..., 1, :], q[..., 0, :]), dim=-2).flatten(-3)  # rotate_half within each half
    return x * cos + rot * sin


def attention_mask(key_valid: Tensor, context_len: Tensor, q_slots: Tensor, n_keys: int) -> Tensor:
    """The GLM prefix-LM mask as a boolean "may attend" tensor for SDPA.

    Every query sees the whole prefix (slots < context_len, bidirectional, `[gMASK]` included); slots from
    `<sop>` on are causal; pad keys are never seen.  The reference masks with -10000 rather than -inf, so a pad
    row that masks everything attends uniformly; we let such a row see itself instead, which keeps SDPA free of
    NaN and changes nothing a real token can see.

    Args:
        key_valid: (B, S_max) bool, False for pads and unwritten slots.
        context_len: (B,) long, the slot of `<sop>` in each row.
        q_slots: (T,) long, the cache slots of the queries.
        n_keys: how many key slots the attention reads (S <= S_max).
    Returns:
        (B, 1, T, n_keys) bool.
    """
    j = torch.arange(n_keys, device=key_valid.device)
    causal = j[None, :] <= q_slots[:, None]  # (T, S)
    prefix = j[None, None, :] < context_len[:, None, None]  # (B, 1, S)
    allowed = key_valid[:, None, :n_keys] & (prefix | causal[None])  # (B, T, S)
    allowed = allowed | (j[None, :] == q_slots[:, None])[None]
    return allowed[:, None]


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v through SDPA.

    The reference divides q by sqrt(D) * (layer_id + 1) and multiplies the fp32 scores back by (layer_id + 1):
    mathematically the plain 1/sqrt(D) scaling, there only to keep fp16 scores from overflowing. SDPA computes
    softmax in fp32 internally, which serves the same purpose.

    Args:
        q: (B, H, T, D); k, v: (B, H, S, D); mask: (B, 1, T, S) bool or None (attend everywhere).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, (B, H, S_max, D); written in place, never grown."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) and return the full buffers (B, H, S_max, D).

        `input_pos` is (T,), the same slots for every row (a prefill), or (B, 1), one slot per row (a decode step
        of rows at different lengths).
        """
        if input_pos.dim() == 2:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, input_pos[:, 0]] = k[:, :, 0]
            self.v[rows, :, input_pos[:, 0]] = v[:, :, 0]
        else:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        return self.k, self.v

    def rows(self, lo: int, hi: int) -> KVCache:
        """A cache over rows [lo, hi), sharing this one's memory (a request is prefilled into its row through it;
        an eager decode step runs over the span of rows in use)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[lo:hi], persistent=False)
        view.register_buffer("v", self.v[lo:hi], persistent=False)
        return view
