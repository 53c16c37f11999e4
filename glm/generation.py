"""Positions, masks, sampling and the decoding loop (prefill, then one token at a time through the KV cache)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from glm.attention import attention_mask
from glm.config import GLMConfig


class GenerationError(ValueError):
    """A prompt or setting generation cannot work with."""


# ---------------------------------------------------------------------------------------------------- positions


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


def prompt_positions(ids: list[int], cfg: GLMConfig) -> tuple[list[int], list[int]]:
    """The two position rows of a prompt (GLM's 2D positions).

    Before `<sop>`: position i, block position 0. From `<sop>` on: the position freezes at the mask's index and
    the block position counts 1, 2, ...
    """
    ctx, mask_pos = prompt_layout(ids, cfg)
    pos = [i if i < ctx else mask_pos for i in range(len(ids))]
    block = [0 if i < ctx else i - ctx + 1 for i in range(len(ids))]
    return pos, block


@dataclass
class Batch:
    """Left-padded prompts with everything the model needs about them.

    ids (B, T) long; position_ids (B, 2, T) long (pads 0); valid (B, T) bool (False on pads); context_len (B,)
    long, the slot of `<sop>`; mask_pos (B,), lengths (B,) the unpadded prompt lengths.
    """

    ids: Tensor
    position_ids: Tensor
    valid: Tensor
    context_len: Tensor
    mask_pos: Tensor
    lengths: Tensor

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], cfg: GLMConfig, device=None) -> Batch:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("empty prompt: encode some text with tokenizer.encode(text)")
        T = max(len(p) for p in prompts)
        ids, pos, valid, ctxs, masks = [], [], [], [], []
        for p in prompts:
            pad = T - len(p)
            ctx, mask_pos = prompt_layout(p, cfg)
            # Positions are computed per sequence before padding, as the reference tokenizer does; pads get 0.
            r0, r1 = prompt_positions(p, cfg)
            ids.append([cfg.pad_token_id] * pad + list(p))
            pos.append([[0] * pad + r0, [0] * pad + r1])
            valid.append([False] * pad + [True] * len(p))
            ctxs.append(pad + ctx)
            masks.append(mask_pos)
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
        return cls(t(ids), t(pos), t(valid, torch.bool), t(ctxs), t(masks), t([len(p) for p in prompts]))


def full_mask(batch: Batch, prefix: int = 0) -> Tensor:
    """(B, 1, T, prefix + T) bool mask of an uncached forward; `prefix` P-Tuning slots come first, seen by all."""
    B, T = batch.ids.shape
    valid = torch.cat((batch.valid.new_ones(B, prefix), batch.valid), dim=1)
    slots = torch.arange(prefix, prefix + T, device=batch.ids.device)
    return attention_mask(valid, batch.context_len + prefix, slots, prefix + T)


# ---------------------------------------------------------------------------------------------------- sampling


@dataclass
class SamplingConfig:
    """How the next token is chosen. The defaults of `chat` are the official ones (see glm.chat)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default, which the official chat never overrides
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 is no penalty), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def fix_invalid_scores(scores: Tensor) -> tuple[Tensor, Tensor]:
    """The official rule: if any score is NaN or inf, zero them all and put 5e4 on id 5.

    Branch-free (no host sync). Returns the scores and a 0-dim bool tensor saying whether the rule fired.
    """
    # NaN and inf survive a sum, and finite logits never overflow one: a single cheap pass over the vocabulary.
    bad = ~torch.isfinite(scores.sum())
    fallback = torch.zeros_like(scores)
    fallback[..., 5] = 5e4
    return torch.where(bad, fallback, scores), bad


def apply_repetition_penalty(scores: Tensor, prev_ids: Tensor, penalty: float) -> Tensor:
    """Divide the positive scores of already-seen ids by `penalty`, multiply the negative ones (CTRL's rule)."""
    if penalty == 1.0 or prev_ids.numel() == 0:
        return scores
    s = scores.gather(1, prev_ids)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter(1, prev_ids, s)


def _top_p_filter(sorted_asc: Tensor, top_p: float) -> Tensor:
    """Mask of entries to drop, given scores sorted ascending: the low tail whose mass stays <= 1 - top_p."""
    cum = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)
    drop[..., -1:] = False  # always keep at least one
    return drop


def next_token_probs(scores: Tensor, cfg: SamplingConfig) -> tuple[Tensor, Tensor | None]:
    """The distribution a sampled token is drawn from: temperature, then top-k, then top-p, then softmax.

    Mirrors transformers' warpers, ties included (top-k keeps every score equal to the k-th largest). When top-k
    is on and has no ties at its boundary, only the k candidates are sorted, not the whole vocabulary.

    Args:
        scores: (B, V) float32, after the invalid-score rule and repetition penalty.
    Returns:
        (probs, index): probs (B, n) over candidates `index` (B, n), or (B, V) probs and index None.
    """
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    V = scores.shape[-1]
    k = min(cfg.top_k, V)
    if 0 < k < V:
        vals, idx = scores.topk(k, dim=-1)  # (B, k), descending
        kth = vals[:, -1:]
        if bool(((scores >= kth).sum(-1) == k).all()):  # no ties at the boundary: k candidates exactly
            vals, idx = vals.flip(-1), idx.flip(-1)  # ascending, as the reference sorts
            if cfg.top_p < 1.0:
                vals = vals.masked_fill(_top_p_filter(vals, cfg.top_p), float("-inf"))
            return vals.softmax(dim=-1), idx
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_asc, order = scores.sort(dim=-1)
        drop = _top_p_filter(sorted_asc, cfg.top_p)
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores.softmax(dim=-1), None


def full_probs(scores: Tensor, cfg: SamplingConfig) -> Tensor:
    """`next_token_probs` scattered back onto the whole vocabulary, (B, V)."""
    probs, idx = next_token_probs(scores, cfg)
    if idx is None:
        return probs
    return torch.zeros_like(scores).scatter(1, idx, probs)


def select_next(scores: Tensor, prev_ids: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Next token ids (B,) from the last-position scores (B, V), with the official processors in order."""
    scores = apply_repetition_penalty(scores, prev_ids, cfg.repetition_penalty)
    if cfg.greedy:
        return scores.argmax(dim=-1)
    probs, idx = next_token_probs(scores, cfg)
    pick = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    if idx is not None:
        pick = idx.gather(1, pick)
    return pick[:, 0]


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------------------------- decoding


class Decoder:
    """Owns the KV caches and the one-token decode step of a model.

    The caches are preallocated for (batch, max_len) and reused by every later call that fits, across turns.
    Eager mode reads only the key slots in use (best on CPU). With `compile=True` the step runs through
    `torch.compile(mode="reduce-overhead")` (CUDA graphs on a GPU) with fixed shapes: attention reads the key
    slots rounded up to a bucket of `KEY_BUCKET`, so that a handful of graphs serve every context length without
    reading all `max_len` slots at every step; the mask hides the unwritten ones.
    """

    KEY_BUCKET = 512

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.compile = compile
        self.caches = None
        self._shape = (0, 0)
        self._step = None
        self.busy = False  # a generation is using the caches (another one then gets its own)
        self.nan_seen = False  # the last generation hit NaN/inf logits (and the official fallback)

    def caches_for(self, batch: int, max_len: int):
        B, S = self._shape
        if self.caches is None or B != batch or S < max_len or self.caches[0].k.dtype != self.model.dtype:
            self.caches = None  # free the old ones first
            # Compiled graphs specialise on the cache shape: round it up so that later turns share the graphs.
            S = max(max_len, self.model.config.max_sequence_length) if self.compile else max_len
            self.caches = self.model.new_caches(batch, S)
            if self.compile:
                for c in self.caches:  # CUDA graphs must update the caches in place, never copy them in
                    torch._dynamo.mark_static_address(c.k)
                    torch._dynamo.mark_static_address(c.v)
            self._shape = (batch, S)
            self._step = None
        return self.caches

    def step(self, tok: Tensor, pos: Tensor, slot: Tensor, key_valid: Tensor, n_keys: int) -> Tensor:
        """Logits (B, V) of one new token per row. tok (B, 1), pos (B, 2, 1), slot (1,), key_valid (B, S_max)."""
        if self.compile:
            S = key_valid.shape[1]
            n = min(S, -(-n_keys // self.KEY_BUCKET) * self.KEY_BUCKET)
            try:
                if self._step is None:
                    self._step = torch.compile(self._eager_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
                return self._step(tok, pos, slot, key_valid[:, None, None, :n]).clone()
            except Exception as e:  # noqa: BLE001 - a compiler problem must not end the conversation
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); decoding eagerly", RuntimeWarning,
                              stacklevel=2)
                self.compile = False
        # A decode query sees every written non-pad slot: the prefix ones and all earlier ones.
        return self._eager_step(tok, pos, slot, key_valid[:, None, None, :n_keys])

    def _eager_step(self, tok, pos, slot, mask):
        return self.model(tok, pos, mask, self.caches, slot, last_only=True)[:, -1]


@torch.inference_mode()
def generate_stream(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    sampling: SamplingConfig | None = None,
    stop_at_eos: bool = True,
    generator: torch.Generator | None = None,
    logits_hook=None,
    decoder: Decoder | None = None,
) -> Iterator[Tensor]:
    """Generate for a left-padded batch of prompts; yields the new token ids (B,) after every step.

    Stops when every row has produced `<eop>` (with `stop_at_eos`) or the padded length reaches `max_length`
    (default: prompt length + `max_new_tokens`). A finished row keeps being fed the pad id, as the reference does.
    `logits_hook`, if given, is called with the raw float32 logits (B, V) that choose each token. `decoder`
    carries caches (and a compiled step) from one call to the next.
    """
    cfg = model.config
    sampling = sampling or SamplingConfig()
    device = model.device
    batch = Batch.from_prompts(prompts, cfg, device)
    B, T = batch.ids.shape
    if max_length is None:
        if max_new_tokens is None:
            raise GenerationError("give max_new_tokens or max_length")
        max_length = T + max_new_tokens
    elif max_new_tokens is not None:
        max_length = min(max_length, T + max_new_tokens)
    if T >= max_length:
        raise GenerationError(
            f"the prompt is {T} tokens, which leaves no room under max_length={max_length}: "
            "shorten the prompt (or the history) or raise max_length"
        )

    if decoder is None or decoder.busy:
        decoder = Decoder(model)
    decoder.busy = True
    try:
        yield from _decode(model, batch, max_length, sampling, stop_at_eos, generator, logits_hook, decoder)
    finally:
        decoder.busy = False


def _decode(model, batch, max_length, sampling, stop_at_eos, generator, logits_hook, decoder):
    cfg, device = model.config, model.device
    B, T = batch.ids.shape
    P = cfg.pre_seq_len or 0
    caches = decoder.caches_for(B, P + max_length)
    S_max = caches[0].k.shape[2]
    model.fill_prefix(caches)
    # Everything the loop touches is allocated here; the loop only writes in place.
    key_valid = torch.zeros(B, S_max, dtype=torch.bool, device=device)
    key_valid[:, :P] = True
    key_valid[:, P : P + T] = batch.valid
    all_ids = torch.full((B, max_length), cfg.pad_token_id, dtype=torch.long, device=device)
    all_ids[:, :T] = batch.ids
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    nan_seen = torch.zeros((), dtype=torch.bool, device=device)
    pad = torch.full((B,), cfg.pad_token_id, dtype=torch.long, device=device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    # The next token of a row at unpadded index i takes positions [mask_pos, i - ctx + 1]: the first frozen at the
    # mask, the second counting on from the <sop> (block position 1).
    ctx_unpadded = batch.context_len - (T - batch.lengths)
    pos = torch.stack((batch.mask_pos, batch.lengths - ctx_unpadded + 1), dim=1)[:, :, None]  # (B, 2, 1)

    # Prefill: the whole prompt at once.
    slots = torch.arange(P, P + T, device=device)
    mask = attention_mask(key_valid, batch.context_len + P, slots, P + T)
    logits = model(batch.ids, batch.position_ids, mask, caches, slots, last_only=True)[:, -1]

    cur = T
    try:
        while True:
            if logits_hook is not None:
                logits_hook(logits)
            scores, bad = fix_invalid_scores(logits)
            nan_seen |= bad
            nxt = select_next(scores, all_ids[:, :cur], sampling, generator)
            nxt = torch.where(unfinished, nxt, pad)
            all_ids[:, cur] = nxt
            cur += 1
            yield nxt
            if stop_at_eos:
                unfinished &= nxt != cfg.eos_token_id
                if not bool(unfinished.any()):
                    break
            if cur >= max_length:
                break
            slot.fill_(P + cur - 1)
            key_valid[:, P + cur - 1] = True
            logits = decoder.step(nxt[:, None], pos, slot, key_valid, P + cur)
            pos[:, 1] += 1
    finally:  # also when the caller stops the stream early, e.g. at <eop>
        decoder.nan_seen = bool(nan_seen)
        if decoder.nan_seen:
            warnings.warn(
                "the model produced NaN/inf logits; the official fallback picked token 5. "
                "This usually means float16 overflow: try dtype='bfloat16' or 'float32'.",
                RuntimeWarning,
                stacklevel=3,
            )
