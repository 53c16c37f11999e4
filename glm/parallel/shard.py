"""Megatron-style sharding of a GLM over N ranks: which part of every checkpoint tensor a rank holds.

    query_key_value  column-parallel by heads: ChatGLM lays its output out per head, (H, 3*D), so a rank's heads
                     are one contiguous block of rows [h0*3D, h1*3D) (not three slices of [Q; K; V] blocks)
    dense            row-parallel: the input columns of the rank's heads [h0*D, h1*D); partial sums, one all-reduce
    dense_h_to_4h    column-parallel: rows [r*F/N, (r+1)*F/N)
    dense_4h_to_h    row-parallel: the matching input columns; one all-reduce
    word_embeddings  split along the vocabulary: each rank looks up its rows, the others' are zero; one all-reduce
    lm_head          split along the vocabulary (tied to the embedding's shard when the checkpoint ties them); the
                     logits are gathered
    prefix_encoder   P-Tuning v2: the rank's heads of every layer's prefix keys and values
    layernorms       replicated

Row-parallel biases are added once, on rank 0 (the other ranks hold zeros). INT8/INT4 weights are cut in their
stored layout: rows with their scales, or input columns (int4 bytes hold two neighbouring inputs, group scales
cover runs of `group_size` inputs, and per-channel scales are whole-row values every rank keeps). A linear
quantized while loading is quantized whole and then cut, so its scales are those of the unsharded model.
Why the vocabulary is split rather than replicated: docs/parallel.md.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from glm.config import GLMConfig
from glm.errors import ParallelError
from glm.model import GLM

_LAYER = re.compile(r"^layers\.\d+\.(attention\.query_key_value|attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)"
                    r"\.(weight|bias|weight_scale)$")
_COLUMN = ("attention.query_key_value", "mlp.dense_h_to_4h")  # output rows split
_ROW = ("attention.dense", "mlp.dense_4h_to_h")  # input columns split


def valid_sizes(cfg: GLMConfig, quant: int | None = None, group_size: int | None = None) -> list[int]:
    """The tensor-parallel sizes this model (and its quantization) can be split into."""
    return [n for n in range(1, cfg.num_attention_heads + 1) if _fits(cfg, n, quant, group_size)]


def _fits(cfg: GLMConfig, n: int, bits: int | None, group: int | None) -> bool:
    H, C, F, V = cfg.num_attention_heads, cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
    if H % n or F % n or V % n:
        return False
    ins = (C // n, F // n)  # the input widths of the row-parallel linears on each rank
    if bits == 4 and any(k % 2 for k in ins):  # int4 packs two inputs a byte
        return False
    return not (group and any(k % group for k in ins))  # a group's scale covers inputs of one rank only


def check_size(cfg: GLMConfig, n: int, quant: int | None = None, group_size: int | None = None) -> None:
    """Refuse a tensor-parallel size that does not split this model evenly (a one-line ParallelError)."""
    bits = quant or cfg.quantization_bit or None
    group = group_size or cfg.quantization_group_size
    if not _fits(cfg, n, bits, group):
        ok = ", ".join(map(str, valid_sizes(cfg, bits, group)))
        extra = ""
        if bits == 4:
            extra = " (with int4 each rank's share of the inputs of dense and dense_4h_to_h must be even" + (
                f" and hold whole groups of {group})" if group else ")")
        raise ParallelError(
            f"tensor_parallel={n} does not split this model: N must divide its {cfg.num_attention_heads} attention "
            f"heads, MLP width {cfg.inner_hidden_size} and vocabulary {cfg.vocab_size}{extra}; use one of: {ok}")


class ShardPlan:
    """What rank `rank` of `size` holds. The loader calls `prepare`, `take` and `assigned` (glm.loader.building);
    `finish` then connects the shards through the collectives of `comm` (a glm.parallel.world.World)."""

    def __init__(self, cfg: GLMConfig, rank: int, size: int):
        self.cfg, self.rank, self.size = cfg, rank, size
        H, F, V = cfg.num_attention_heads, cfg.inner_hidden_size, cfg.vocab_size
        D, h = cfg.head_dim, H // size
        self.heads = (rank * h, (rank + 1) * h)
        self.spans = {  # (first, last) output rows, or input columns, of this rank
            "attention.query_key_value": (rank * h * 3 * D, (rank + 1) * h * 3 * D),
            "attention.dense": (rank * h * D, (rank + 1) * h * D),
            "mlp.dense_h_to_4h": (rank * F // size, (rank + 1) * F // size),
            "mlp.dense_4h_to_h": (rank * F // size, (rank + 1) * F // size),
        }
        self.vocab = (rank * V // size, (rank + 1) * V // size)
        self.whole: set[str] = set()  # row-parallel linears quantized whole while loading, cut once quantized

    # -- the empty model

    def prepare(self, model: GLM, quantizer=None) -> None:
        """Give the (meta) model this rank's shapes."""
        self.cfg = cfg = model.config  # with a P-Tuning folder's prefix settings applied
        n = self.size
        for i, layer in enumerate(model.layers):
            layer.attention.n_head = cfg.num_attention_heads // n
            for parent, attr in ((layer.attention, "query_key_value"), (layer.mlp, "dense_h_to_4h")):
                lin = getattr(parent, attr)
                setattr(parent, attr, _empty_like(lin, lin.in_features, lin.out_features // n))
            for parent, attr, name in ((layer.attention, "dense", "attention.dense"),
                                       (layer.mlp, "dense_4h_to_h", "mlp.dense_4h_to_h")):
                full = f"layers.{i}.{name}"
                if quantizer is not None and full in quantizer.pending:
                    self.whole.add(full)  # quantized whole first: its scales must see the whole row
                    continue
                lin = getattr(parent, attr)
                setattr(parent, attr, _empty_like(lin, lin.in_features // n, lin.out_features))
        V, C = self.vocab[1] - self.vocab[0], cfg.hidden_size
        model.lm_head = _empty_like(model.lm_head, C, V)
        if isinstance(model.word_embeddings, nn.Embedding):
            model.word_embeddings = nn.Embedding(V, C, _weight=torch.empty(V, C, device="meta"))  # no init: no dynamo
        else:  # a quantized head tied to the embedding (glm.quant.QuantEmbedding): look up in the head's shard
            from glm.quant import tie_quantized_embedding

            tie_quantized_embedding(model)
        pe = getattr(model, "prefix_encoder", None)
        if pe is not None:
            if pe.trans is None:
                w = torch.empty(cfg.pre_seq_len, pe.embedding.embedding_dim // n, device="meta")
                pe.embedding = nn.Embedding(*w.shape, _weight=w)
            else:
                pe.trans[2] = _empty_like(pe.trans[2], C, pe.trans[2].out_features // n)

    # -- each tensor as it is read

    def take(self, name: str, t: Tensor) -> Tensor:
        """This rank's part of the checkpoint tensor that goes to module tensor `name` (often a view: the loader
        copies what it keeps, so that nothing of the rest stays; from a memory-mapped file only the part is read)."""
        m = _LAYER.match(name)
        if m:
            kind, attr = m.group(1), m.group(2)
            lo, hi = self.spans[kind]
            if kind in _COLUMN:
                return t[lo:hi]  # weight and bias rows, and their scales (per row, or per row and group)
            if name.rpartition(".")[0] in self.whole:
                return torch.zeros_like(t) if attr == "bias" and self.rank else t
            if attr == "bias":
                return t if self.rank == 0 else torch.zeros_like(t)  # added once, on rank 0
            if attr == "weight_scale":
                g = self.cfg.quantization_group_size
                return t if t.dim() == 1 else t[:, lo // g : hi // g].contiguous()
            per_byte = 8 // self.cfg.quantization_bit if not t.is_floating_point() else 1
            return t[:, lo // per_byte : hi // per_byte].contiguous()
        if name in ("word_embeddings.weight", "lm_head.weight", "lm_head.weight_scale"):
            return t[self.vocab[0] : self.vocab[1]]
        if name in ("prefix_encoder.embedding.weight", "prefix_encoder.trans.2.weight", "prefix_encoder.trans.2.bias"):
            if name == "prefix_encoder.embedding.weight" and self.cfg.prefix_projection:
                return t  # the projection's input: replicated
            return self._prefix_heads(t, columns=name == "prefix_encoder.embedding.weight")
        return t

    def _prefix_heads(self, t: Tensor, columns: bool) -> Tensor:
        """The rank's heads of a prefix tensor laid out (..., L*2, H, D) along its columns or rows."""
        cfg, (h0, h1) = self.cfg, self.heads
        if columns:  # (P, L*2*H*D)
            return t.view(t.shape[0], cfg.num_layers * 2, cfg.num_attention_heads, -1)[:, :, h0:h1].reshape(
                t.shape[0], -1)
        rest = t.shape[1:]  # the trans output rows: (L*2*H*D, C) or (L*2*H*D,)
        return t.view(cfg.num_layers * 2, cfg.num_attention_heads, -1, *rest)[:, h0:h1].reshape(-1, *rest)

    def assigned(self, model: GLM, name: str) -> None:
        """After tensor `name` is in: cut a row-parallel linear quantized whole, once it is quantized."""
        mod_name = name.rpartition(".")[0]
        if mod_name not in self.whole:
            return
        from glm.quant import QuantLinear

        mod = model.get_submodule(mod_name)
        if isinstance(mod, QuantLinear):
            lo, hi = self.spans[mod_name.split(".", 2)[2]]
            parent, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _columns_of(mod, lo, hi))
            self.whole.discard(mod_name)

    # -- the loaded shard

    def finish(self, model: GLM, comm) -> GLM:
        """Connect the shards: the all-reduce after each row-parallel linear, the vocabulary-split lookup and head."""
        if self.whole:
            raise ParallelError(f"internal: {sorted(self.whole)[0]} was never quantized")
        for layer in model.layers:
            layer.attention.all_reduce = layer.mlp.all_reduce = comm.all_reduce
        model.word_embeddings = VocabParallelEmbedding(model.word_embeddings, *self.vocab, comm.all_reduce)
        model.lm_head = VocabParallelHead(model.lm_head, comm.all_gather)
        return model


def _empty_like(lin: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """A meta linear of the same kind (float or quantized) and bias as `lin`, of another shape."""
    bias = lin.bias is not None
    if isinstance(lin, nn.Linear):
        return nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=lin.weight.dtype)
    from glm.quant import QuantLinear

    return QuantLinear(in_features, out_features, lin.bits, lin.group_size, bias=bias, dtype=lin.weight_scale.dtype,
                       device="meta")


def _columns_of(mod, lo: int, hi: int):
    """Input columns [lo, hi) of a QuantLinear, as a QuantLinear of their own (same bytes, same scales)."""
    from glm.quant import QuantLinear

    per_byte, g = 8 // mod.bits, mod.group_size
    scale = mod.weight_scale if g is None else mod.weight_scale[:, lo // g : hi // g].contiguous()
    out = QuantLinear(hi - lo, mod.out_features, mod.bits, g, bias=mod.bias is not None, dtype=scale.dtype,
                      device="meta")
    out.weight = mod.packed_weight()[:, lo // per_byte : hi // per_byte].contiguous()
    out.weight_scale = scale
    if mod.bias is not None:
        out.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)
    out.cpu_kernel = mod.cpu_kernel
    return out.prepare()


class VocabParallelEmbedding(nn.Module):
    """The lookup of a vocabulary shard [lo, hi): rows of other ranks' ids are zero here, and the all-reduce sums
    each id's one non-zero row (exactly: the other terms are zeros)."""

    def __init__(self, inner: nn.Module, lo: int, hi: int, all_reduce):
        super().__init__()
        self.inner, self.lo, self.hi, self.all_reduce = inner, lo, hi, all_reduce

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.lo
        mine = (local >= 0) & (local < self.hi - self.lo)
        x = self.inner(torch.where(mine, local, torch.zeros_like(local)))  # (B, T, C)
        return self.all_reduce(x.masked_fill(~mine[..., None], 0))


class VocabParallelHead(nn.Module):
    """The logits of a vocabulary shard, gathered from every rank along the last dimension: the whole vocabulary."""

    def __init__(self, inner: nn.Module, all_gather):
        super().__init__()
        self.inner, self.all_gather = inner, all_gather

    def forward(self, x: Tensor) -> Tensor:
        return self.all_gather(self.inner(x))


__all__ = ["ShardPlan", "VocabParallelEmbedding", "VocabParallelHead", "check_size", "valid_sizes"]
