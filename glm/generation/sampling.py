"""`GenerationConfig`, the one validator of every sampling and length setting, and the batched per-row sampler.

Every entry point (the Python API, glm-chat's options, glm-web's sliders, glm-serve's JSON fields) builds a
`GenerationConfig` and reports its error: the ranges live here only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from glm.errors import GenerationError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing scores by them overflows float32 (as vLLM)
MAX_SEED = 2**64
FLOAT32_MAX = 3.4028234663852886e38
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # ids one request may bias (OpenAI's limit)


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
    # OpenAI's sampling fields (vLLM's meaning): penalties on the counts of the tokens generated so far, a bias
    # added to the scores of given ids, and min-p (drop tokens under min_p times the likeliest one's probability).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_p: float = 0.0
    # Return each new token's log-probability and the `logprobs` likeliest alternatives (0..20; None: off): the
    # model's log-softmax before any sampling processor, as OpenAI and vLLM return them.
    logprobs: int | None = None
    # A JSON Schema the reply must satisfy, enforced while decoding (glm.generation.grammar): the reply is compact
    # JSON that validates against it, and ends when the JSON is complete. {"type": "object"}: any JSON object.
    json_schema: dict | None = None

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
        if not _is_int(self.top_k) or self.top_k < -1:
            raise GenerationError(f"top_k must be an integer >= 0 (0 or -1 turn it off), got {self.top_k!r}")
        if self.top_k == -1:  # vLLM's and OpenAI clients' "off"
            self.top_k = 0
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be a number > 0 (1 is no penalty), got "
                                  f"{self.repetition_penalty!r}")
        # Any int64 (OpenAI's type) or uint64: a negative seed is the same 64 bits as its unsigned twin.
        if self.seed is not None and (not _is_int(self.seed) or not -(1 << 63) <= self.seed < MAX_SEED):
            raise GenerationError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2.0 <= v <= 2.0:
                raise GenerationError(f"{name} must be a number in [-2, 2] (0 is none), got {v!r}")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise GenerationError(f"min_p must be a number in [0, 1] (0 turns it off), got {self.min_p!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise GenerationError(f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} token ids to numbers, "
                                      f"got {self.logit_bias!r:.60}")
            for k, v in self.logit_bias.items():
                if not _is_int(k) or k < 0 or not _is_real(v) or not -100 <= v <= 100:
                    raise GenerationError(f"logit_bias maps token ids (integers >= 0) to numbers in [-100, 100], "
                                          f"got {k!r}: {v!r}")
            self.logit_bias = dict(self.logit_bias) or None
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise GenerationError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, dict):
                raise GenerationError(f"json_schema must be a JSON Schema (a dict) or None, got "
                                      f"{self.json_schema!r:.60}")
            try:
                json.dumps(self.json_schema)
            except (TypeError, ValueError, RecursionError) as e:
                raise GenerationError(f"json_schema must be JSON data ({e})") from None
            if not self.stop_at_eos:
                raise GenerationError("json_schema needs stop_at_eos=True: the reply ends where its JSON does")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = tuple(self.stop)

    @classmethod
    def from_settings(cls, **settings) -> GenerationConfig:
        """A config from keyword settings; an unknown keyword is a GenerationError naming it (not a TypeError)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise GenerationError(f"unknown generation setting(s) {', '.join(unknown)}: use {', '.join(names)}")
        return cls(**settings)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_BELOW

    def replace(self, **changes) -> GenerationConfig:
        return GenerationConfig.from_settings(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def budget(self, prompt_len: int) -> int | float:
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


# The official chat/stream_chat defaults (top_k 50 is transformers' default, which the official code never sets):
# the one place every entry point takes them from.
CHAT_DEFAULTS = GenerationConfig(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, top_k=50)


# ---------------------------------------------------------------------------------------------------- the pipeline


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


def _min_p_drop(vals: Tensor, min_p: Tensor | None) -> Tensor | None:
    """Entries to drop for min-p: probability under min_p times the row's largest (None: no row uses it)."""
    if min_p is None:
        return None
    probs = vals.softmax(dim=-1)
    return probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)


def next_token_probs(scores: Tensor, temperature: Tensor, top_k: Tensor, one_minus_top_p: Tensor,
                     k_max: int, min_p: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The distribution each row's token is drawn from: temperature, then top-k, then top-p, then softmax.

    Mirrors transformers' warpers, ties included (top-k keeps every score equal to the k-th largest). When every
    row's top-k is on and has no ties at its boundary, only the `k_max` best candidates are sorted, not the whole
    vocabulary.

    Args:
        scores: (B, V) float32, after the invalid-score rule and repetition penalty.
        temperature: (B,) float32; top_k: (B,) long, 0 for off; one_minus_top_p: (B,) float32, 0 for off.
        k_max: the largest top_k of the rows (0 if any row has it off).
        min_p: (B,) float32, 0 for off, or None when no row uses it; applied last.
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
            if (drop := _min_p_drop(vals, min_p)) is not None:
                vals = vals.masked_fill(drop, float("-inf"))
            return vals.softmax(dim=-1), idx
    sorted_asc, order = scores.sort(dim=-1)
    # The k-th largest score of each row (top-k off: the smallest); every score tied with it stays.
    kth = sorted_asc.gather(1, (V - top_k.clamp(1, V)).where(top_k > 0, torch.zeros_like(top_k))[:, None])
    sorted_asc = sorted_asc.masked_fill(sorted_asc < kth, float("-inf"))
    sorted_asc = sorted_asc.masked_fill(_top_p_drop(sorted_asc, one_minus_top_p), float("-inf"))
    if (drop := _min_p_drop(sorted_asc, min_p)) is not None:
        sorted_asc = sorted_asc.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_asc).softmax(dim=-1), None


def apply_count_penalties(scores: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's presence and frequency penalties: subtract `frequency * count + presence * (count > 0)` from each
    token's score, where `count` is how often the row has generated it. counts (B, V); presence, frequency (B,)."""
    return scores - counts * frequency[:, None] - (counts > 0).to(scores.dtype) * presence[:, None]


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


# ---------------------------------------------------------------------------------------------------- per row


def _counts_tokens(c: GenerationConfig) -> bool:
    return c.presence_penalty != 0.0 or c.frequency_penalty != 0.0



class Sampler:
    """The sampling settings of a pool of `max_batch` rows, as tensors written once per request, and the one
    batched pass that picks every row's next token.

    Args:
        max_batch: rows; vocab_size: the model's vocabulary; device: where the tensors live.
    """

    def __init__(self, max_batch: int, vocab_size: int, device: torch.device):
        B, dev = max_batch, device
        self.vocab_size = vocab_size
        self.configs: list[GenerationConfig | None] = [None] * B
        self.temperature = torch.ones(B, device=dev)
        self.top_k = torch.zeros(B, dtype=torch.long, device=dev)
        self.one_minus_top_p = torch.zeros(B, device=dev)
        self.penalty = torch.ones(B, device=dev)
        self.greedy = torch.ones(B, dtype=torch.bool, device=dev)
        self.seed = torch.zeros(B, dtype=torch.long, device=dev)
        self.seeded = torch.zeros(B, dtype=torch.bool, device=dev)
        self.draws = torch.zeros(B, dtype=torch.long, device=dev)
        self.min_p = torch.zeros(B, device=dev)
        self.presence = torch.zeros(B, device=dev)
        self.frequency = torch.zeros(B, device=dev)
        self.counts: Tensor | None = None  # (B, V) generated-token counts, allocated once a row needs them
        self.bias: list[tuple[Tensor, Tensor] | None] = [None] * B  # (ids, values) of each row's logit_bias
        # Prompt + new ids of the rows with a repetition penalty (the only reader); grown with the caches.
        self.seen = torch.zeros(B, 0, dtype=torch.long, device=dev)
        self.n_seen = [0] * B

    def reserve(self, slots: int) -> None:
        """Room for `slots` ids per row in `seen`; grows, never shrinks."""
        if self.seen.shape[1] < slots:
            old = self.seen.shape[1]
            seen = self.seen.new_zeros(self.seen.shape[0], slots)
            seen[:, :old] = self.seen
            if old:  # the new slots repeat an id of the row, as the padding of set_row
                seen[:, old:] = self.seen[:, :1]
            self.seen = seen

    def set_row(self, i: int, config: GenerationConfig, prompt: list[int]) -> None:
        """Row i's settings, read by every step until the row is set again."""
        c = config
        self.configs[i] = c
        # Valid settings past float32 / int64 (temperature 1e300, top_k 10**30) are clamped, not an overflow error:
        # float32's largest value already flattens (or sharpens) the scores as far as they go; top_k >= V is all.
        self.temperature[i] = float(min(c.temperature, FLOAT32_MAX)) if not c.greedy else 1.0
        self.top_k[i] = min(c.top_k, self.vocab_size)
        self.one_minus_top_p[i] = 1 - c.top_p  # in float64 first, then float32: as the reference's scalar
        self.penalty[i] = float(min(c.repetition_penalty, FLOAT32_MAX))
        self.greedy[i] = c.greedy
        self.seeded[i] = c.seed is not None
        s = (c.seed or 0) % MAX_SEED
        self.seed[i] = s - (1 << 64) if s >= 1 << 63 else s  # the same 64 bits as an int64
        self.draws[i] = 0
        self.min_p[i] = c.min_p
        self.presence[i], self.frequency[i] = c.presence_penalty, c.frequency_penalty
        if _counts_tokens(c):
            if self.counts is None:
                self.counts = torch.zeros(len(self.configs), self.vocab_size, device=self.temperature.device)
            self.counts[i].zero_()
        self.bias[i] = None
        if c.logit_bias:
            dev = self.temperature.device
            self.bias[i] = (torch.tensor(list(c.logit_bias), dtype=torch.long, device=dev),
                            torch.tensor(list(c.logit_bias.values()), dtype=torch.float32, device=dev))
        if c.repetition_penalty != 1.0:
            self.seen[i].fill_(prompt[0])  # padding repeats an id of the row: the penalty is idempotent
            self.seen[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            self.n_seen[i] = len(prompt)

    def sample(self, rows: list[int], logits: Tensor,
               allowed: tuple[list[int], Tensor] | None = None) -> tuple[list[int], list[bool]]:
        """The next token of each of `rows` from their logits (n, V), in one batched pass.

        `allowed`: (positions j in `rows`, (k, V) bool) the only ids those rows may take (a grammar's mask): the
        others are set to -inf before every processor. Returns the tokens and, per row, whether the invalid-score
        rule fired.
        """
        configs = [self.configs[i] for i in rows]
        idx = torch.tensor(rows, device=logits.device) if len(rows) < len(self.configs) else None
        g = (lambda t: t[idx]) if idx is not None else (lambda t: t)  # noqa: E731
        scores, bad = fix_invalid_scores(logits)
        n_ok = None
        if allowed is not None:
            at, ok = allowed[0], allowed[1].to(logits.device, non_blocking=True)
            if len(at) == len(rows):  # every row constrained: no gather and scatter
                scores = torch.where(ok, scores, float("-inf"))
                n_ok = ok.sum(-1)
            else:
                at = torch.tensor(at, device=logits.device)
                scores[at] = torch.where(ok, scores[at], float("-inf"))
                n_ok = torch.full((len(rows),), self.vocab_size, dtype=torch.long, device=logits.device)
                n_ok[at] = ok.sum(-1)
        for j, i in enumerate(rows):  # OpenAI's logit_bias comes first, as vLLM applies it
            if self.bias[i] is not None:
                ids, vals = self.bias[i]
                scores[j, ids] += vals
        penalised = [j for j, c in enumerate(configs) if c.repetition_penalty != 1.0]
        if penalised:
            n = max(self.n_seen[rows[j]] for j in penalised)
            scores = apply_repetition_penalty(scores, g(self.seen)[:, :n], g(self.penalty))
        counted = [j for j, c in enumerate(configs) if _counts_tokens(c)]
        if counted:
            scores = apply_count_penalties(scores, g(self.counts), g(self.presence), g(self.frequency))
        nxt = scores.argmax(dim=-1)
        sampled = [c for c in configs if not c.greedy]
        if sampled:
            V = self.vocab_size
            k_max = 0 if any(c.top_k == 0 for c in sampled) else max(min(c.top_k, V) for c in sampled)
            greedy = g(self.greedy)
            top_k = torch.where(greedy, k_max, g(self.top_k))  # greedy rows: any valid k, their draw is unused
            if n_ok is not None:  # top-k among the allowed ids: no full sort for a row with fewer than k of them
                top_k = torch.where(top_k > 0, torch.minimum(top_k, n_ok.clamp(min=1)), top_k)
            min_p = g(self.min_p) if any(c.min_p > 0 for c in sampled) else None
            probs, index = next_token_probs(scores, g(self.temperature), top_k, g(self.one_minus_top_p), k_max,
                                            min_p)
            draws = g(self.draws)
            u = torch.where(g(self.seeded), seeded_uniform(g(self.seed), draws),
                            torch.rand(len(rows), device=logits.device))
            nxt = torch.where(greedy, nxt, draw(probs, index, u))
            if idx is None:
                self.draws += 1
            else:
                self.draws[idx] += 1
        toks = nxt.tolist()
        if counted:
            at = torch.tensor([rows[j] for j in counted], device=nxt.device)
            self.counts.index_put_((at, nxt[counted]), torch.ones(len(counted), device=nxt.device), accumulate=True)
        for j in penalised:
            i = rows[j]
            if self.n_seen[i] < self.seen.shape[1]:
                self.seen[i, self.n_seen[i]] = toks[j]
                self.n_seen[i] += 1
        return toks, bad.tolist()


__all__ = ["CHAT_DEFAULTS", "GenerationConfig", "Sampler", "apply_count_penalties", "apply_repetition_penalty", "draw",
           "fix_invalid_scores",
           "next_token_probs", "seeded_uniform"]
