"""Positions, sampling, and the generation core: a fixed pool of cache rows that requests join and leave.

A `Scheduler` owns the KV caches of `max_batch` rows. A request is prefilled whole into a free row (GLM's prompt is
bidirectional up to `<sop>`, so it cannot be prefilled in causal chunks), then takes part in one shared decode step
of shape (max_batch, 1) until it finishes, is cancelled or fails; its row is then free for the next request at
once. Each row has its own cache length, positions and sampling settings, so a request's output does not depend
on what else is in the batch. Every entry point (generate, chat, glm-chat, glm-web, glm-serve) runs through here.
"""

from __future__ import annotations

import atexit
import math
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from glm.attention import KVCache, attention_mask
from glm.config import GLMConfig


class GenerationError(ValueError):
    """A prompt or setting generation cannot work with."""


class QueueFull(GenerationError):
    """More requests are waiting than the scheduler accepts."""


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
    """Left-padded prompts for one uncached forward (`ChatGLM.logits`, scripts).

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
            ctx, _ = prompt_layout(p, cfg)
            # Positions are computed per sequence before padding, as the reference tokenizer does; pads get 0.
            r0, r1 = prompt_positions(p, cfg)
            ids.append([cfg.pad_token_id] * pad + list(p))
            pos.append([[0] * pad + r0, [0] * pad + r1])
            valid.append([False] * pad + [True] * len(p))
            ctxs.append(pad + ctx)
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
        return cls(t(ids), t(pos), t(valid, torch.bool), t(ctxs))

    def mask(self, prefix: int = 0) -> Tensor:
        """(B, 1, T, prefix + T) bool mask; `prefix` P-Tuning slots come first, seen by all."""
        B, T = self.ids.shape
        valid = torch.cat((self.valid.new_ones(B, prefix), self.valid), dim=1)
        slots = torch.arange(prefix, prefix + T, device=self.ids.device)
        return attention_mask(valid, self.context_len + prefix, slots, prefix + T)


# ---------------------------------------------------------------------------------------------------- settings

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing scores by them overflows float32 (as vLLM)
MAX_SEED = 2**64
FLOAT32_MAX = 3.4028234663852886e38


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    # An int is always finite (and math.isfinite cannot take one past float's range, 10**400).
    return _is_int(v) or isinstance(v, float) and math.isfinite(v)


@dataclass
class GenerationConfig:
    """Everything that decides one request's output: the one settings object of every entry point.

    The length is `max_new_tokens`, or `max_length` (prompt + reply, the official chat's meaning), or the smaller
    of both; either way no request runs past the scheduler's context limit (it ends there with reason "length").
    Sampling follows the official order: invalid-score rule, repetition penalty, temperature, top-k, top-p.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default, which the official chat never overrides
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self):
        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise GenerationError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.do_sample, bool):
            raise GenerationError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise GenerationError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be a number > 0 (1 is no penalty), got "
                                  f"{self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise GenerationError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_BELOW

    def replace(self, **changes) -> GenerationConfig:
        return GenerationConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def budget(self, prompt_len: int) -> int:
        """New tokens this config allows after a prompt of `prompt_len` tokens (before the context limit)."""
        if self.max_new_tokens is None and self.max_length is None:
            raise GenerationError("give max_new_tokens or max_length")
        n = self.max_new_tokens if self.max_new_tokens is not None else math.inf
        if self.max_length is not None:
            if prompt_len >= self.max_length:
                raise GenerationError(
                    f"the prompt is {prompt_len} tokens, which leaves no room under max_length={self.max_length}: "
                    "shorten the prompt (or the history) or raise max_length"
                )
            n = min(n, self.max_length - prompt_len)
        return n


# ---------------------------------------------------------------------------------------------------- sampling


def fix_invalid_scores(scores: Tensor) -> tuple[Tensor, Tensor]:
    """The official rule, per row: if any score is NaN or inf, zero them all and put 5e4 on id 5.

    Branch-free (no host sync). Returns the scores and a (B,) bool tensor saying where the rule fired.
    """
    # NaN and inf survive a sum, and finite logits never overflow one: a single cheap pass over the vocabulary.
    bad = ~torch.isfinite(scores.sum(-1))
    fallback = torch.zeros_like(scores)
    fallback[..., 5] = 5e4
    return torch.where(bad[:, None], fallback, scores), bad


def apply_repetition_penalty(scores: Tensor, prev_ids: Tensor, penalty: Tensor) -> Tensor:
    """Divide the positive scores of already-seen ids by the row's penalty, multiply the negative ones (CTRL).

    prev_ids (B, N): ids seen by each row; padding must repeat an id of the same row (the penalty is idempotent).
    penalty (B,) float32; rows with 1.0 are unchanged.
    """
    if prev_ids.numel() == 0:
        return scores
    p = penalty[:, None]
    s = scores.gather(1, prev_ids)
    s = torch.where(s < 0, s * p, s / p)
    return scores.scatter(1, prev_ids, s)


def _top_p_drop(sorted_asc: Tensor, one_minus_top_p: Tensor) -> Tensor:
    """Entries to drop, given scores sorted ascending: the low tail whose mass stays <= 1 - top_p."""
    cum = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= one_minus_top_p[:, None]
    drop[..., -1:] = False  # always keep at least one
    return drop


def next_token_probs(scores: Tensor, temperature: Tensor, top_k: Tensor, one_minus_top_p: Tensor,
                     k_max: int) -> tuple[Tensor, Tensor | None]:
    """The distribution each row's token is drawn from: temperature, then top-k, then top-p, then softmax.

    Mirrors transformers' warpers, ties included (top-k keeps every score equal to the k-th largest). When every
    row's top-k is on and has no ties at its boundary, only the `k_max` best candidates are sorted, not the whole
    vocabulary.

    Args:
        scores: (B, V) float32, after the invalid-score rule and repetition penalty.
        temperature: (B,) float32; top_k: (B,) long, 0 for off; one_minus_top_p: (B,) float32, 0 for off.
        k_max: the largest top_k of the rows (0 if any row has it off).
    Returns:
        (probs, index): probs (B, n) over candidates `index` (B, n), or (B, V) probs and index None.
    """
    scores = scores / temperature[:, None]
    V = scores.shape[-1]
    if 0 < k_max < V:
        vals, idx = scores.topk(k_max, dim=-1)  # (B, k_max), descending
        kth = vals.gather(1, top_k[:, None] - 1)  # (B, 1)
        if bool(((scores >= kth).sum(-1) == top_k).all()):  # no ties at the boundary: k candidates exactly
            vals = vals.masked_fill(torch.arange(k_max, device=vals.device) >= top_k[:, None], float("-inf"))
            vals, idx = vals.flip(-1), idx.flip(-1)  # ascending, as the reference sorts
            vals = vals.masked_fill(_top_p_drop(vals, one_minus_top_p), float("-inf"))
            return vals.softmax(dim=-1), idx
    sorted_asc, order = scores.sort(dim=-1)
    # The k-th largest score of each row (top-k off: the smallest); every score tied with it stays.
    kth = sorted_asc.gather(1, (V - top_k.clamp(1, V)).where(top_k > 0, torch.zeros_like(top_k))[:, None])
    sorted_asc = sorted_asc.masked_fill(sorted_asc < kth, float("-inf"))
    sorted_asc = sorted_asc.masked_fill(_top_p_drop(sorted_asc, one_minus_top_p), float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_asc).softmax(dim=-1), None


_MASK64 = (1 << 64) - 1


def _splitmix64(x: Tensor) -> Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic; shifts made logical by masking)."""

    def shr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)

    x = x + (0x9E3779B97F4A7C15 - (1 << 64))
    x = (x ^ shr(x, 30)) * (0xBF58476D1CE4E5B9 - (1 << 64))
    x = (x ^ shr(x, 27)) * (0x94D049BB133111EB - (1 << 64))
    return x ^ shr(x, 31)


def seeded_uniform(seed: Tensor, counter: Tensor) -> Tensor:
    """A uniform draw in [0, 1) per row, a pure function of (seed, counter): each seeded request has a stream of
    its own, whatever else is in the batch. seed, counter: (B,) int64 -> (B,) float32."""
    x = _splitmix64(_splitmix64(seed) ^ counter)
    return ((x >> 40) & ((1 << 24) - 1)).float() * (1.0 / (1 << 24))


def draw(probs: Tensor, index: Tensor | None, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: one id per row from probs (B, n) with uniforms u (B,)."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
    return (index.gather(1, pick) if index is not None else pick)[:, 0]


# ---------------------------------------------------------------------------------------------------- requests


@dataclass
class Result:
    """How a request ended: `finish_reason` "stop" (`<eop>` or a stop string), "length" or "cancelled"."""

    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    stop: str | None = None  # the stop string that matched
    nan: bool = False  # the model produced NaN/inf logits and the official fallback picked token 5

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class Request:
    """One prompt on its way through the scheduler. Iterate it for the new ids; `result` once it has ended."""

    def __init__(self, prompt: list[int], config: GenerationConfig, budget: int, logits_hook=None, sink=None):
        self.prompt = prompt
        self.config = config
        self.budget = budget
        self.logits_hook = logits_hook
        self.tokens: list[int] = []
        self.result: Result | None = None
        self.nan = False
        self.ending: str | None = None  # the finish reason, set just before the last token is handed out
        self.error: BaseException | None = None
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        # Where events go: this queue (for iteration), or a callable of the caller's (an asyncio server's).
        self._put = sink if sink is not None else self._events.put
        self._cancel = threading.Event()
        self._drained = False  # the end (or the error) has been read
        self._scheduler: Scheduler | None = None
        self._stop_text = None  # (StreamDecoder, text) when the request has stop strings

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step (and the request ends with "cancelled")."""
        if self.result is None:
            self._cancel.set()
            if self._scheduler is not None:
                self._scheduler._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[int]:
        """The new ids as they come; raises the error that ended the request, if one did. Once read to the end,
        a request has nothing more to give: iterating it again (or `wait`) returns at once."""
        while not self._drained:
            ev = self._events.get()
            if isinstance(ev, int):
                yield ev
                continue
            self._drained = True
            if ev is not None:
                raise ev
        if self.error is not None:
            raise self.error

    def wait(self) -> Result:
        for _ in self:
            pass
        return self.result

    # Called by the scheduler's worker thread only.
    def _emit(self, tok: int) -> None:
        self.tokens.append(tok)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._put(tok)

    def _finish(self, reason: str, stop: str | None = None) -> None:
        self.result = Result(self.tokens, len(self.prompt), reason, stop, self.nan)
        self._put(None)

    def _fail(self, e: BaseException) -> None:
        self.error = e
        self.result = Result(self.tokens, len(self.prompt), "error", None, self.nan)
        self._put(e)


# ---------------------------------------------------------------------------------------------------- scheduler


class Scheduler:
    """Continuous batching over a fixed pool of `max_batch` cache rows, driven by one worker thread.

    Requests wait FIFO (at most `max_waiting`) for a free row, are prefilled whole, then share one decode step;
    inactive rows are masked, never reallocated. Eager decoding runs over the span of rows in use and reads only
    the key slots in use. With `compile=True` the step runs through `torch.compile(mode="reduce-overhead")` (CUDA
    graphs on a GPU) with fixed shapes, (max_batch, 1): the caches are allocated for the whole context at once, and
    attention reads the key slots rounded up to a bucket of `KEY_BUCKET`, so that a handful of graphs serve every
    length.
    """

    KEY_BUCKET = 512
    PREFILL_TOKENS = 8192  # padded prompt tokens of one prefill forward: bounds its temporary caches
    GROW = 256  # eager caches grow in steps of this many slots, up to the context limit

    def __init__(self, model, *, max_batch: int = 1, max_context: int | None = None, compile: bool = False,
                 tokenizer=None, max_waiting: int | None = None):
        cfg = model.config
        if not _is_int(max_batch) or not 1 <= max_batch <= 4096:
            raise GenerationError(f"max_batch must be an integer in [1, 4096], got {max_batch!r}")
        limit = max_context if max_context is not None else cfg.max_sequence_length
        if not _is_int(limit) or not 2 <= limit <= 1 << 20:
            raise GenerationError(f"max_context must be an integer in [2, {1 << 20}], got {limit!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_context = max_batch, limit
        self.compile = compile
        self.max_waiting = max_waiting
        self.step_hooks: list[Callable[[int], None]] = []  # called with the number of rows of each decode step
        self.P = cfg.pre_seq_len or 0
        self.rows: list[Request | None] = [None] * max_batch
        self.lengths = [0] * max_batch  # tokens in each row's cache, P-Tuning prefix excluded
        self.waiting: deque[Request] = deque()
        self.caches = None
        self._state: dict[str, Tensor] = {}
        self._compiled = None
        self._views: dict[tuple[int, int], list[KVCache]] = {}  # (lo, hi) -> views of the caches over those rows
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None

    # -- public

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def submit(self, prompt, config: GenerationConfig, logits_hook=None, sink=None) -> Request:
        """Queue one prompt; raises GenerationError for a bad prompt or setting, QueueFull when full.

        Events (each new id, then None at the end, or the exception that ended it) are read by iterating the
        Request, or handed to `sink(event)` from the scheduler's thread when given (then the Request is not
        iterable).
        """
        if not isinstance(config, GenerationConfig):
            raise GenerationError(f"config must be a GenerationConfig, got {type(config).__name__}")
        prompt = check_ids(prompt, self.model.config)
        prompt_layout(prompt, self.model.config)
        budget = config.budget(len(prompt))
        room = self.max_context - len(prompt)
        if room < 1:
            raise GenerationError(
                f"the prompt is {len(prompt)} tokens, which leaves no room under the context limit of "
                f"{self.max_context} tokens: shorten the prompt (or the history)"
            )
        if config.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer: load a checkpoint with ice_text.model")
        req = Request(prompt, config, int(min(budget, room)), logits_hook, sink)
        req._scheduler = self
        with self._cv:
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are already waiting; retry later")
            self.waiting.append(req)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=_work, args=(weakref.ref(self),), name="glm-scheduler",
                                                daemon=True)
                _start_worker(self._worker)
            self._cv.notify()
        return req

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- the worker

    def _run_once(self, idle_wait: float) -> None:
        """Admit and decode one step, or wait up to `idle_wait` seconds for work."""
        with self._cv:
            if not self.waiting and self.running == 0:
                self._cv.wait(idle_wait)
                return
        try:
            self._drop_cancelled()
            self._admit()
            if self.running:
                self._decode_step()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: each running request gets the error
            for i, r in enumerate(self.rows):
                if r is not None:
                    self._free(i, None, error=e)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                r._finish("cancelled")
        for i, r in enumerate(self.rows):
            if r is not None and r.cancelled:
                self._free(i, "cancelled")

    def _free(self, i: int, reason: str | None, stop: str | None = None, error: BaseException | None = None):
        r, self.rows[i] = self.rows[i], None
        self.lengths[i] = 0
        if self._state:
            self._state["active"][i] = False
        if error is not None:
            r._fail(error)
        else:
            r._finish(reason, stop)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, oldest first; those admitted together share one forward."""
        while True:
            with self._cv:
                free = [i for i, r in enumerate(self.rows) if r is None]
                group: list[tuple[int, Request]] = []
                T = 0
                while self.waiting and len(group) < len(free):
                    T_next = max(T, len(self.waiting[0].prompt))
                    if group and T_next * (len(group) + 1) > self.PREFILL_TOKENS:
                        break
                    group.append((free[len(group)], self.waiting.popleft()))
                    T = T_next
            if not group:
                return
            try:
                self._prefill(group)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: these requests fail, the others go on
                for i, req in group:
                    if self.rows[i] is req:
                        self._free(i, None, error=e)
                    else:
                        req._fail(e)

    def _ensure_caches(self, need: int) -> None:
        """Caches of max_batch rows with room for `need` tokens after the prefix; grows, never shrinks."""
        have = self.caches[0].k.shape[2] - self.P if self.caches is not None else 0
        if have >= need and self.caches[0].k.dtype == self.model.dtype:
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
        if not self._state:
            B, dev = self.max_batch, self.model.device
            z = lambda dt=torch.long: torch.zeros(B, dtype=dt, device=dev)  # noqa: E731
            self._state = dict(
                active=z(torch.bool), last=z(), pos=torch.zeros(B, 2, dtype=torch.long, device=dev), lens=z(),
                temperature=torch.ones(B, device=dev), top_k=z(), one_minus_top_p=z(torch.float32),
                penalty=torch.ones(B, device=dev), greedy=torch.ones(B, dtype=torch.bool, device=dev),
                seed=z(), seeded=z(torch.bool), draws=z(),
            )
        ids = torch.zeros(self.max_batch, S, dtype=torch.long, device=self.model.device)
        if "ids" in self._state:
            ids[:, : self._state["ids"].shape[1]] = self._state["ids"]
        self._state["ids"] = ids  # prompt + new ids of each row, for the repetition penalty

    def _prefill(self, group: list[tuple[int, Request]]) -> None:
        """One forward over the prompts of `group` (row, request); each row's keys and values land at its slots."""
        model, cfg, P = self.model, self.model.config, self.P
        self._ensure_caches(max(len(r.prompt) + r.budget for _, r in group))
        for i, req in group:
            self.rows[i] = req
            self._set_row(i, req)
        # Several prompts are left-padded into one batch (each row's positions are its own, pads are never seen);
        # its keys and values are then moved to each row's slots [P, P + len).
        batch = Batch.from_prompts([r.prompt for _, r in group], cfg, model.device)
        n, T = batch.ids.shape
        slots = torch.arange(P, P + T, device=model.device)
        if n == 1:
            caches = self._span(group[0][0], group[0][0] + 1)  # straight into the row
        else:
            caches = model.new_caches(n, P + T)
            model.fill_prefix(caches)
        logits = model(batch.ids, batch.position_ids, batch.mask(prefix=P), caches, slots, last_only=True)[:, -1]
        for j, (i, req) in enumerate(group):
            L = len(req.prompt)
            if n > 1:
                for c, tmp in zip(self.caches, caches):
                    c.k[i, :, P : P + L] = tmp.k[j, :, P + T - L : P + T]
                    c.v[i, :, P : P + L] = tmp.v[j, :, P + T - L : P + T]
            self.lengths[i] = L
            self._state["lens"][i] = P + L
        self._sample_and_emit([i for i, _ in group], logits)

    def _set_row(self, i: int, req: Request) -> None:
        """A row's settings and positions: written once, read by every step."""
        cfg, st, c, T = self.model.config, self._state, req.config, len(req.prompt)
        st["ids"][i].fill_(req.prompt[0])  # padding repeats an id of the row: the penalty is idempotent
        st["ids"][i, :T] = torch.tensor(req.prompt, dtype=torch.long)
        # Valid settings past float32 / int64 (temperature 1e300, top_k 10**30) are clamped, not an overflow error:
        # float32's largest value already flattens (or sharpens) the scores as far as they go; top_k >= V is all.
        st["temperature"][i] = float(min(c.temperature, FLOAT32_MAX)) if not c.greedy else 1.0
        st["top_k"][i] = min(c.top_k, cfg.vocab_size)
        st["one_minus_top_p"][i] = 1 - c.top_p  # in float64 first, then float32: as the reference's scalar
        st["penalty"][i] = float(min(c.repetition_penalty, FLOAT32_MAX))
        st["greedy"][i] = c.greedy
        st["seeded"][i] = c.seed is not None
        st["seed"][i] = (c.seed or 0) - (1 << 64) if (c.seed or 0) >= 1 << 63 else (c.seed or 0)
        st["draws"][i] = 0
        # The next token of a row at index t takes positions [mask_pos, t - ctx + 1]: the first frozen at the mask,
        # the second counting on from the <sop> (block position 1).
        ctx, mask_pos = prompt_layout(req.prompt, cfg)
        st["pos"][i, 0], st["pos"][i, 1] = mask_pos, T - ctx + 1

    def _span(self, lo: int, hi: int) -> list[KVCache]:
        """The caches of rows [lo, hi): views, made once per span and cache allocation."""
        if (lo, hi) not in self._views:
            self._views[lo, hi] = [c.rows(lo, hi) for c in self.caches]
        return self._views[lo, hi]

    def _decode_step(self) -> None:
        st, P = self._state, self.P
        active = [i for i, r in enumerate(self.rows) if r is not None]
        for h in self.step_hooks:
            h(len(active))
        n_keys = P + max(self.lengths[i] for i in active) + 1
        S = self.caches[0].k.shape[2]
        # Eager steps run over the span of rows in use (rows are taken lowest first, so a lone request decodes as
        # batch 1); a compiled step keeps one shape, all rows.
        lo, hi = (0, self.max_batch) if self.compile else (active[0], active[-1] + 1)
        slot = st["lens"][lo:hi].clone()  # (n,) where each row writes its new token
        keys = torch.arange(S, device=slot.device)
        # A decode query sees every written slot of its row: the prefix and all earlier tokens, and itself.
        key_valid = keys[None, :] <= slot[:, None]  # (n, S)
        logits = self._step(st["last"][lo:hi, None], st["pos"][lo:hi, :, None], slot[:, None], key_valid, n_keys,
                            lo, hi)
        a = st["active"].long()
        st["lens"] += a
        st["pos"][:, 1] += a
        for i in active:
            self.lengths[i] += 1
        rows = [i - lo for i in active]
        self._sample_and_emit(active, logits[rows] if len(rows) < hi - lo else logits)

    def _step(self, tok, pos, slot, key_valid, n_keys, lo, hi) -> Tensor:
        if self.compile:
            S = key_valid.shape[1]
            n = min(S, -(-n_keys // self.KEY_BUCKET) * self.KEY_BUCKET)
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self._eager_step, mode="reduce-overhead", fullgraph=True,
                                                   dynamic=False)
                return self._compiled(tok, pos, slot, key_valid[:, None, None, :n]).clone()
            except Exception as e:  # noqa: BLE001 - a compiler problem must not end the conversation
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); decoding eagerly", RuntimeWarning,
                              stacklevel=2)
                self.compile = False
        caches = self.caches if (lo, hi) == (0, self.max_batch) else self._span(lo, hi)
        return self._eager_step(tok, pos, slot, key_valid[:, None, None, :n_keys], caches)

    def _eager_step(self, tok, pos, slot, mask, caches=None):
        return self.model(tok, pos, mask, self.caches if caches is None else caches, slot, last_only=True)[:, -1]

    def _sample_and_emit(self, rows: list[int], logits: Tensor) -> None:
        """Choose the next token of `rows` from their logits (n, V) in one batched pass, then hand them out."""
        st = self._state
        reqs = [self.rows[i] for i in rows]
        for r, lg in zip(reqs, logits):
            if r.logits_hook is not None:
                r.logits_hook(lg[None])
        idx = torch.tensor(rows, device=logits.device) if len(rows) < self.max_batch else None
        g = (lambda t: t[idx]) if idx is not None else (lambda t: t)  # noqa: E731
        scores, bad = fix_invalid_scores(logits)
        if any(r.config.repetition_penalty != 1.0 for r in reqs):
            n = max(self.lengths[i] for i in rows)
            scores = apply_repetition_penalty(scores, g(st["ids"])[:, :n], g(st["penalty"]))
        nxt = scores.argmax(dim=-1)
        sampled = [r for r in reqs if not r.config.greedy]
        if sampled:
            top_k = g(st["top_k"])
            V = self.model.config.vocab_size
            k_max = 0 if any(r.config.top_k == 0 for r in sampled) else max(min(r.config.top_k, V) for r in sampled)
            top_k = torch.where(g(st["greedy"]), k_max, top_k)  # greedy rows: any valid k, their draw is unused
            probs, index = next_token_probs(scores, g(st["temperature"]), top_k, g(st["one_minus_top_p"]), k_max)
            draws = g(st["draws"])
            u = torch.where(g(st["seeded"]), seeded_uniform(g(st["seed"]), draws), torch.rand(len(rows),
                            device=logits.device))
            nxt = torch.where(g(st["greedy"]), nxt, draw(probs, index, u))
            if idx is None:
                st["draws"] += 1
            else:
                st["draws"][idx] += 1
        if idx is None:
            st["last"].copy_(nxt)
        else:
            st["last"][idx] = nxt
        toks, bads = nxt.tolist(), bad.tolist()
        eos = self.model.config.eos_token_id
        for i, r, t, b in zip(rows, reqs, toks, bads):
            n = self.lengths[i]
            if n < st["ids"].shape[1]:
                st["ids"][i, n] = t
            if b:
                r.nan = True
            st["active"][i] = True
            # The one place that decides where a request ends; `ending` is set before its last token is handed
            # out, so that a reader of that token knows it is the last (the official stream skips it).
            stop = self._stop_string(r, t) if r.config.stop else None
            if stop is not None:
                r.ending = "stop"
            elif r.config.stop_at_eos and t == eos:
                r.ending = "stop"
            elif len(r.tokens) + 1 >= r.budget:
                r.ending = "length"
            r._emit(t)
            if r.ending is not None:
                self._free(i, r.ending, stop)

    def _stop_string(self, r: Request, t: int) -> str | None:
        from glm.tokenizer import StreamDecoder

        if r._stop_text is None:
            r._stop_text = [StreamDecoder(self.tokenizer), ""]
        dec, text = r._stop_text
        delta = dec.put(t)
        text += delta
        r._stop_text[1] = text
        longest = max(len(s) for s in r.config.stop)
        tail = text[-(longest + len(delta)):]
        return next((s for s in r.config.stop if s in tail), None)


_workers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_exiting = threading.Event()


def _start_worker(t: threading.Thread) -> None:
    if not _workers:
        atexit.register(_stop_workers)  # once per process that generates anything, not at import
    _workers.add(t)
    t.start()


def _stop_workers() -> None:
    """At exit, before the interpreter tears down: a scheduler thread that woke up during finalization (or was in
    the middle of a step) would abort the process from inside torch."""
    _exiting.set()
    for t in list(_workers):
        t.join(timeout=30)


def _work(ref: weakref.ref) -> None:
    """The scheduler's thread. It holds its scheduler only while working or waiting a moment for work, so that a
    model nobody uses any more is freed, and the thread ends with it (or when the program exits)."""
    with torch.inference_mode():
        while not _exiting.is_set() and (scheduler := ref()) is not None:
            scheduler._run_once(idle_wait=0.5)
            del scheduler


__all__ = ["GenerationConfig", "GenerationError", "QueueFull", "Request", "Result", "Scheduler"]
