"""The model side of generation: the KV caches of a pool of rows, their growth, prefill, the decode step and its
compilation. It maps token ids to logits per row and knows nothing of requests. Each row may use an adapter of its
own (a LoRA adapter or a P-Tuning prefix: see `Adapters`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from glm.attention import KVCache
from glm.generation.adapters import Adapters
from glm.generation.inputs import Batch, prompt_layout


class Runner:
    """KV caches of `max_batch` rows of up to `max_context` tokens each, after `P` prefix slots.

    A row's P-Tuning prefix (its adapter's, else the base model's) takes the first of those slots, and the rest are
    masked, so that rows with prefixes of different lengths, or none, share one step. A row's LoRA adapter is
    applied to it alone, within the batched step (`glm.lora.MultiLoRALinear`).

    Each row has its own length and positions, kept here on the host: a decode step's inputs are built from them,
    so nothing of a row is read back from the device. Eager decoding runs over the span of rows in use and reads
    only the key slots in use. With `compile=True` the step runs through `torch.compile(mode="reduce-overhead")`
    (CUDA graphs on a GPU) with fixed shapes, (max_batch, 1): the caches are allocated for the whole context at
    once, and attention reads the key slots rounded up to a bucket of `KEY_BUCKET`, so that a handful of graphs
    serve every length.
    """

    KEY_BUCKET = 512
    GROW = 256  # eager caches grow in steps of this many slots, up to the context limit

    def __init__(self, model, max_batch: int, max_context: int, compile: bool = False):
        self.model = model
        self.max_batch, self.max_context, self.compile = max_batch, max_context, compile
        self.adapters = Adapters(model)
        self.P = self.adapters.max_prefix  # prefix slots of the caches as allocated
        self.caches: list[KVCache] | None = None
        self.lengths = [0] * max_batch  # tokens in each row's cache, P-Tuning prefix excluded
        self._layout = [(0, 0)] * max_batch  # (context_len, mask_pos) of each row's prompt
        self.adapter = [0] * max_batch  # each row's adapter (0: none)
        self._plen = [0] * max_batch  # each row's prefix length: its slots [0, plen) of the P
        self._compiled = None
        self._views: dict[tuple[int, int], list[KVCache]] = {}  # (lo, hi) -> views of the caches over those rows

    @property
    def slots(self) -> int:
        """Tokens each row's cache has room for after the prefix (0 before the first request)."""
        return self.caches[0].k.shape[2] - self.P if self.caches is not None else 0

    def ensure(self, need: int) -> None:
        """Caches with room for `need` tokens after room for the longest prefix; grows (keeping every row, and
        moving its tokens when an adapter added since needs more prefix slots), never shrinks."""
        P = max(self.adapters.max_prefix, self.P if self.caches is not None else 0)
        if self.slots >= need and P == self.P and self.caches[0].k.dtype == self.model.dtype:
            return
        S = self.max_context if self.compile else min(self.max_context, -(-need // self.GROW) * self.GROW)
        S = max(S, self.slots)
        old, old_P, self.P = self.caches, self.P, P
        self.caches = self.model.new_caches(self.max_batch, P + S)
        self._views.clear()  # they view the old allocation
        if old is not None:
            for o, c in zip(old, self.caches):  # keep the running rows' prefixes, keys and values
                n = o.k.shape[2] - old_P
                c.k[:, :, :old_P], c.k[:, :, P : P + n] = o.k[:, :, :old_P], o.k[:, :, old_P:]
                c.v[:, :, :old_P], c.v[:, :, P : P + n] = o.v[:, :, :old_P], o.v[:, :, old_P:]
        del old
        if self.compile:
            for c in self.caches:  # CUDA graphs must update the caches in place, never copy them in
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)

    def release(self, i: int) -> None:
        self.lengths[i] = self._plen[i] = self.adapter[i] = 0

    def prefill(self, rows: list[int], prompts: list[list[int]], adapters: list[int] | None = None) -> Tensor:
        """One forward over `prompts`, each into its row's slots [P, P + len), row `rows[j]` with adapter
        `adapters[j]` (default: none). Returns the last logits (n, V)."""
        model, cfg, P = self.model, self.model.config, self.P
        adapters = adapters or [0] * len(rows)
        # Several prompts are left-padded into one batch (each row's positions are its own, pads are never seen);
        # its keys and values are then moved to each row's slots.
        batch = Batch.from_prompts(prompts, cfg, model.device)
        n, T = batch.ids.shape
        slots = torch.arange(P, P + T, device=model.device)
        caches = self._span(rows[0], rows[0] + 1) if n == 1 else model.new_caches(n, P + T)  # n == 1: in place
        plen = [self._put_prefix(caches, j, a) for j, a in enumerate(adapters)]
        mask = batch.mask(prefix=P, prefix_len=torch.tensor(plen, device=model.device))
        with self.adapters.use(self._lora_index(adapters)):
            logits = model(batch.ids, batch.position_ids, mask, caches, slots, last_only=True)[:, -1]
        for j, (i, p) in enumerate(zip(rows, prompts)):
            L = len(p)
            if n > 1:
                for c, tmp in zip(self.caches, caches):
                    c.k[i, :, : plen[j]], c.v[i, :, : plen[j]] = tmp.k[j, :, : plen[j]], tmp.v[j, :, : plen[j]]
                    c.k[i, :, P : P + L] = tmp.k[j, :, P + T - L : P + T]
                    c.v[i, :, P : P + L] = tmp.v[j, :, P + T - L : P + T]
            self.lengths[i], self._plen[i], self.adapter[i] = L, plen[j], adapters[j]
            self._layout[i] = prompt_layout(p, cfg)
        return logits

    def logits(self, prompt: list[int], adapter: int = 0) -> Tensor:
        """Every position's logits (T, V) of one prompt with `adapter`: one forward into caches of its own (the
        rows are not touched, so any thread may call it)."""
        model = self.model
        batch = Batch.from_prompts([prompt], model.config, model.device)
        T, p = len(prompt), self.adapters.prefix_len(adapter)
        caches = model.new_caches(1, p + T)
        self._put_prefix(caches, 0, adapter)
        with self.adapters.use(self._lora_index([adapter])):
            return model(batch.ids, batch.position_ids, batch.mask(prefix=p), caches,
                         torch.arange(p, p + T, device=model.device))[0]

    def _put_prefix(self, caches: list[KVCache], j: int, adapter: int) -> int:
        """Write the prefix of `adapter` into slots [0, p) of row j of `caches`; returns p."""
        kv = self.adapters.prefix(adapter)
        if kv is None:
            return 0
        for c, (pk, pv) in zip(caches, kv):
            p = pk.shape[2]
            c.k[j, :, :p], c.v[j, :, :p] = pk[0].to(c.k.dtype), pv[0].to(c.v.dtype)
        return kv[0][0].shape[2]

    def _lora_index(self, adapters: list[int]) -> Tensor | None:
        """The LoRA slot of each row as a tensor for `Adapters.use`; None when no row has a LoRA adapter."""
        slots = self.adapters.lora_slots(adapters)
        return torch.tensor(slots, device=self.model.device) if any(slots) else None

    def fork(self, src: int, dsts: list[int]) -> None:
        """Rows `dsts` start as copies of row `src` (its prompt's keys and values, length and positions)."""
        n = self.P + self.lengths[src]
        for c in self.caches:
            c.k[dsts, :, :n] = c.k[src, :, :n]
            c.v[dsts, :, :n] = c.v[src, :, :n]
        for d in dsts:
            self.lengths[d], self._layout[d] = self.lengths[src], self._layout[src]
            self.adapter[d], self._plen[d] = self.adapter[src], self._plen[src]

    def decode(self, rows: list[int], tokens: list[int]) -> Tensor:
        """One step: `tokens[j]` goes into row `rows[j]` (ascending) at its next slot. Returns logits (n, V)."""
        P, dev = self.P, self.model.device
        # Eager steps run over the span of rows in use (rows are taken lowest first, so a lone request decodes as
        # batch 1); a compiled step keeps one shape, all rows. Rows of the span not in use write a dummy token at
        # their first slot, which the next prefill of that row overwrites.
        lo, hi = (0, self.max_batch) if self.compile else (rows[0], rows[-1] + 1)
        # token, position, block position, slot, prefix length, LoRA slot
        inputs = [[0, 0, 0, P, 0, 0] for _ in range(hi - lo)]
        lora = self.adapters.lora_slots([self.adapter[i] for i in rows])
        for i, t, a in zip(rows, tokens, lora):
            n, (ctx, mask_pos) = self.lengths[i], self._layout[i]
            # The token at index n takes positions [mask_pos, n - ctx + 1]: the first frozen at the mask, the
            # second counting on from the <sop> (block position 1).
            inputs[i - lo] = [t, mask_pos, n - ctx + 1, P + n, self._plen[i], a]
        x = torch.tensor(inputs, dtype=torch.long, device=dev)  # (n, 6): one copy to the device per step
        tok, pos, slot, plen = x[:, :1], x[:, 1:3, None], x[:, 3:4], x[:, 4:5]
        S = self.caches[0].k.shape[2]
        n_keys = P + max(self.lengths[i] for i in rows) + 1
        # A decode query sees its row's prefix, every token written after the prefix slots, and itself.
        j = torch.arange(S, device=dev)[None, :]
        key_valid = (j <= slot) & ((j >= P) | (j < plen))  # (n, S)
        with self.adapters.use(x[:, 5] if any(lora) else None):
            logits = self._step(tok, pos, slot, key_valid, n_keys, lo, hi)
        for i in rows:
            self.lengths[i] += 1
        if len(rows) < hi - lo:
            logits = logits[[i - lo for i in rows]]
        return logits

    def _span(self, lo: int, hi: int) -> list[KVCache]:
        """The caches of rows [lo, hi): views, made once per span and cache allocation."""
        if (lo, hi) not in self._views:
            self._views[lo, hi] = [c.rows(lo, hi) for c in self.caches]
        return self._views[lo, hi]

    def _step(self, tok, pos, slot, key_valid, n_keys, lo, hi) -> Tensor:
        if self.compile:
            S = key_valid.shape[1]
            n = min(S, -(-n_keys // self.KEY_BUCKET) * self.KEY_BUCKET)
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self._eager_step, mode="reduce-overhead", fullgraph=True,
                                                   dynamic=False)
                return self._compiled(tok, pos, slot, key_valid[:, None, None, :n]).clone()
            except Exception as e:  # noqa: BLE001 - any compiler failure: warn and decode eagerly, exactly the same
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); decoding eagerly", RuntimeWarning,
                              stacklevel=2)
                self.compile = False
        caches = self.caches if (lo, hi) == (0, self.max_batch) else self._span(lo, hi)
        return self._eager_step(tok, pos, slot, key_valid[:, None, None, :n_keys], caches)

    def _eager_step(self, tok, pos, slot, mask, caches=None):
        return self.model(tok, pos, mask, self.caches if caches is None else caches, slot, last_only=True)[:, -1]


__all__ = ["Runner"]
