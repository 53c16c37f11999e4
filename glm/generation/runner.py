"""The model side of generation: the KV caches of a pool of rows, their growth, prefill, the decode step and its
compilation. It maps token ids to logits per row and knows nothing of requests.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from glm.attention import KVCache
from glm.generation.inputs import Batch, prompt_layout


class Runner:
    """KV caches of `max_batch` rows of up to `max_context` tokens each (after the P-Tuning prefix slots).

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
        self.P = model.config.pre_seq_len or 0
        self.caches: list[KVCache] | None = None
        self.lengths = [0] * max_batch  # tokens in each row's cache, P-Tuning prefix excluded
        self._layout = [(0, 0)] * max_batch  # (context_len, mask_pos) of each row's prompt
        self._compiled = None
        self._views: dict[tuple[int, int], list[KVCache]] = {}  # (lo, hi) -> views of the caches over those rows

    @property
    def slots(self) -> int:
        """Tokens each row's cache has room for after the prefix (0 before the first request)."""
        return self.caches[0].k.shape[2] - self.P if self.caches is not None else 0

    def ensure(self, need: int) -> None:
        """Caches with room for `need` tokens after the prefix; grows (keeping every row), never shrinks."""
        if self.slots >= need and self.caches[0].k.dtype == self.model.dtype:
            return
        S = self.max_context if self.compile else min(self.max_context, -(-need // self.GROW) * self.GROW)
        old, self.caches = self.caches, self.model.new_caches(self.max_batch, self.P + S)
        self._views.clear()  # they view the old allocation
        if old is not None:
            for o, c in zip(old, self.caches):  # keep the running rows' keys and values
                c.k[:, :, : o.k.shape[2]] = o.k
                c.v[:, :, : o.v.shape[2]] = o.v
        else:
            self.model.fill_prefix(self.caches)
        del old
        if self.compile:
            for c in self.caches:  # CUDA graphs must update the caches in place, never copy them in
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)

    def release(self, i: int) -> None:
        self.lengths[i] = 0

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> Tensor:
        """One forward over `prompts`, each into its row's slots [P, P + len). Returns the last logits (n, V)."""
        model, cfg, P = self.model, self.model.config, self.P
        # Several prompts are left-padded into one batch (each row's positions are its own, pads are never seen);
        # its keys and values are then moved to each row's slots.
        batch = Batch.from_prompts(prompts, cfg, model.device)
        n, T = batch.ids.shape
        slots = torch.arange(P, P + T, device=model.device)
        if n == 1:
            caches = self._span(rows[0], rows[0] + 1)  # straight into the row
        else:
            caches = model.new_caches(n, P + T)
            model.fill_prefix(caches)
        logits = model(batch.ids, batch.position_ids, batch.mask(prefix=P), caches, slots, last_only=True)[:, -1]
        for j, (i, p) in enumerate(zip(rows, prompts)):
            L = len(p)
            if n > 1:
                for c, tmp in zip(self.caches, caches):
                    c.k[i, :, P : P + L] = tmp.k[j, :, P + T - L : P + T]
                    c.v[i, :, P : P + L] = tmp.v[j, :, P + T - L : P + T]
            self.lengths[i] = L
            self._layout[i] = prompt_layout(p, cfg)
        return logits

    def logits(self, prompt: list[int]) -> Tensor:
        """float32 logits (len, V) of one uncached forward over a prompt; the caches are not touched."""
        batch = Batch.from_prompts([prompt], self.model.config, self.model.device)
        return self.model(batch.ids, batch.position_ids, batch.mask(prefix=self.P))[0]

    def fork(self, src: int, dsts: list[int]) -> None:
        """Rows `dsts` start as copies of row `src` (its prompt's keys and values, length and positions)."""
        n = self.P + self.lengths[src]
        for c in self.caches:
            c.k[dsts, :, :n] = c.k[src, :, :n]
            c.v[dsts, :, :n] = c.v[src, :, :n]
        for d in dsts:
            self.lengths[d], self._layout[d] = self.lengths[src], self._layout[src]

    def decode(self, rows: list[int], tokens: list[int]) -> Tensor:
        """One step: `tokens[j]` goes into row `rows[j]` (ascending) at its next slot. Returns logits (n, V)."""
        P, dev = self.P, self.model.device
        # Eager steps run over the span of rows in use (rows are taken lowest first, so a lone request decodes as
        # batch 1); a compiled step keeps one shape, all rows. Rows of the span not in use write a dummy token at
        # their first slot, which the next prefill of that row overwrites.
        lo, hi = (0, self.max_batch) if self.compile else (rows[0], rows[-1] + 1)
        inputs = [[0, 0, 0, P] for _ in range(hi - lo)]  # token, position, block position, slot
        for i, t in zip(rows, tokens):
            n, (ctx, mask_pos) = self.lengths[i], self._layout[i]
            # The token at index n takes positions [mask_pos, n - ctx + 1]: the first frozen at the mask, the
            # second counting on from the <sop> (block position 1).
            inputs[i - lo] = [t, mask_pos, n - ctx + 1, P + n]
        x = torch.tensor(inputs, dtype=torch.long, device=dev)  # (n, 4): one copy to the device per step
        tok, pos, slot = x[:, :1], x[:, 1:3, None], x[:, 3:]
        S = self.caches[0].k.shape[2]
        n_keys = P + max(self.lengths[i] for i in rows) + 1
        # A decode query sees every written slot of its row: the prefix and all earlier tokens, and itself.
        key_valid = torch.arange(S, device=dev)[None, :] <= slot  # (n, S)
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
