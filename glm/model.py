"""The GLM v1 transformer of ChatGLM-6B.

embeddings -> num_layers x GLMBlock -> final layernorm -> lm_head. Modules are named after the checkpoint
(less its `transformer.` prefix), so loading is a rename table and a strict `load_state_dict`. Tensor parallelism
(glm.parallel) shards the modules in place and sets the two `all_reduce` hooks of each block.
Shapes: B batch, T new tokens, S key slots, C hidden, H heads, D head dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from glm.attention import KVCache, apply_rotary_2d, prefix_attention, rotary_cos_sin, rotary_inv_freq
from glm.config import GLMConfig


def gelu_tanh(x: Tensor) -> Tensor:
    # The reference's own tanh GELU; same formula as F.gelu(approximate="tanh"), kept explicit for exactness.
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class SelfAttention(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim  # heads held here (glm.parallel: 1/N)
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.all_reduce: Callable[[Tensor], Tensor] | None = None  # tensor parallel: sums the ranks' `dense` outputs

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        input_pos: Tensor | None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        # The fused QKV output is laid out per head, (H, 3*D), not as three [Q; K; V] blocks.
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each (B, T, H, D)
        q, k = apply_rotary_2d(q, cos, sin), apply_rotary_2d(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, H, S_max, D)
            n_keys = mask.shape[-1] if mask is not None else int(input_pos[-1]) + 1
            k, v = k[:, :, :n_keys], v[:, :, :n_keys]  # read only the slots in use
        elif prefix_kv is not None:
            # P-Tuning v2: the learned prefix keys/values sit in front of the prompt's (no rotary on them).
            pk, pv = (t.expand(B, -1, -1, -1) for t in prefix_kv)
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
        y = prefix_attention(q, k, v, mask)  # (B, H, T, D)
        y = self.dense(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C); a partial sum per rank when sharded
        return y if self.all_reduce is None else self.all_reduce(y)


class MLP(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)
        self.all_reduce: Callable[[Tensor], Tensor] | None = None  # tensor parallel: sums the ranks' outputs

    def forward(self, x: Tensor) -> Tensor:
        y = self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))
        return y if self.all_reduce is None else self.all_reduce(y)


class GLMBlock(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.alpha = cfg.alpha
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None, prefix_kv=None) -> Tensor:
        # GLM's residual is the layernorm *output* scaled by alpha = sqrt(2 * 28), not the block input.
        x = self.input_layernorm(x)
        h = self.alpha * x + self.attention(x, cos, sin, mask, cache, input_pos, prefix_kv)
        h = self.post_attention_layernorm(h)
        return self.alpha * h + self.mlp(h)


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: pre_seq_len virtual tokens, each a key and a value for every layer, (P, L*2*C).

    The official `PrefixEncoder`: an embedding of width L*2*C, or with `prefix_projection` an embedding of width C
    through Linear -> tanh -> Linear. It stays float32 (the official training and inference keep it so); its
    output is cast to the model dtype.
    """

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        C, width = cfg.hidden_size, cfg.num_layers * 2 * cfg.hidden_size
        self.embedding = nn.Embedding(cfg.pre_seq_len, C if cfg.prefix_projection else width)
        self.trans = nn.Sequential(nn.Linear(C, C), nn.Tanh(), nn.Linear(C, width)) if cfg.prefix_projection else None
        self.dropout = nn.Dropout(0.1)  # the official prefix dropout: active in training mode only

    def forward(self, dtype: torch.dtype) -> Tensor:
        x = self.embedding.weight  # the official embeds arange(P): the whole table, in order
        if self.trans is not None:
            x = self.trans(x)
        return self.dropout(x.to(dtype))  # the reference casts to the model dtype, then drops out


class GLM(nn.Module):
    """ChatGLM-6B. Stateless apart from the caches passed into `forward`."""

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(cfg)
        self.register_buffer("inv_freq", rotary_inv_freq(cfg.head_dim).to(torch.get_default_device()), persistent=False)

    def init_buffers(self, device: torch.device | str) -> None:
        """(Re)build the non-persistent buffers, e.g. after meta-device construction and assign-loading."""
        self.inv_freq = rotary_inv_freq(self.config.head_dim).to(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layernorm.weight.device

    @property
    def n_head(self) -> int:
        """Attention heads this process holds: all of them, or its share under tensor parallelism (glm.parallel)."""
        return self.layers[0].attention.n_head

    def prefix_kv(self, encoder: PrefixEncoder | None = None) -> list[tuple[Tensor, Tensor]]:
        """The P-Tuning v2 prefix keys and values of every layer, each (1, H, P, D); one pass of `encoder` (default:
        the model's own)."""
        cfg, enc = self.config, encoder if encoder is not None else self.prefix_encoder
        kv = enc(self.dtype).view(enc.embedding.num_embeddings, cfg.num_layers * 2, self.n_head, -1)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1)  # (L*2, 1, H, P, D): layer i's key at 2i, its value at 2i+1
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(cfg.num_layers)]

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        mask: Tensor | None,
        caches: list[KVCache] | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """One forward pass.

        Args:
            input_ids: (B, T) long.
            position_ids: (B, 2, T) long, position and block position (see `glm.generation.positions`).
            mask: (B, 1, T, S) bool "may attend", or None for no masking.
            caches: one KVCache per layer, or None for an uncached forward over `input_ids` alone.
            input_pos: (T,) long, the cache slots of the new tokens (with `caches`).
            last_only: compute logits for the last position only.
            logits_at: (B, T) bool, compute logits only where True (training: the labelled positions).
        Returns:
            logits (B, T, V), or (B, 1, V) with `last_only`, or (N, V) for the N positions of `logits_at`; float32.
        """
        x = self.word_embeddings(input_ids)  # (B, T, C)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, x.dtype)
        prefix = self.prefix_kv() if caches is None and self.config.pre_seq_len else None
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                cos,
                sin,
                mask,
                caches[i] if caches is not None else None,
                input_pos,
                prefix[i] if prefix is not None else None,
            )
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[logits_at]  # (N, C)
        x = self.final_layernorm(x)
        return self.lm_head(x).float()

    def new_caches(self, batch: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        """Preallocated caches for `batch` rows of up to `max_len` slots (P-Tuning prefix slots included)."""
        cfg = self.config
        device = device or self.device
        dtype = dtype or self.dtype
        return [
            KVCache(batch, self.n_head, max_len, cfg.head_dim, dtype, device)
            for _ in range(cfg.num_layers)
        ]
