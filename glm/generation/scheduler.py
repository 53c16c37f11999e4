"""Continuous batching: a FIFO of requests over a fixed pool of cache rows, driven by one worker thread.

A request is prefilled whole into a free row (GLM's prompt is bidirectional up to `<sop>`, so it cannot be
prefilled in causal chunks), then takes part in one shared decode step until it finishes, is cancelled or fails;
its row is then free for the next request at once. Each row has its own cache length, positions and sampling
settings, so a request's output does not depend on what else is in the batch.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import threading
import weakref
from collections import deque
from collections.abc import Callable

import torch

from glm.errors import GenerationError, QueueFull
from glm.generation.grammar import Matcher, allowed_tokens
from glm.generation.inputs import check_ids, prompt_layout
from glm.generation.request import Request, StopMatch, TokenLogprob
from glm.generation.runner import Runner
from glm.generation.sampling import MAX_SEED, GenerationConfig, Sampler, _is_int


class Scheduler:
    """Requests wait FIFO (at most `max_waiting`) for one of `max_batch` cache rows, are prefilled whole, then
    share one decode step (see `Runner`) and one sampling pass (see `Sampler`).

    Use it through `ChatGLM.submit`, which builds the request's stop-string matcher.
    """

    PREFILL_TOKENS = 8192  # padded prompt tokens of one prefill forward: bounds its temporary caches

    def __init__(self, model, *, max_batch: int = 1, max_context: int | None = None, compile: bool = False,
                 max_waiting: int | None = None, runner: Callable[..., Runner] = Runner):
        cfg = model.config
        if not _is_int(max_batch) or not 1 <= max_batch <= 4096:
            raise GenerationError(f"max_batch must be an integer in [1, 4096], got {max_batch!r}")
        limit = max_context if max_context is not None else cfg.max_sequence_length
        if not _is_int(limit) or not 2 <= limit <= 1 << 20:
            raise GenerationError(f"max_context must be an integer in [2, {1 << 20}], got {limit!r}")
        if max_waiting is not None and (not _is_int(max_waiting) or max_waiting < 0):
            raise GenerationError(f"max_waiting must be an integer >= 0 or None, got {max_waiting!r}")
        self.model = model
        self.max_batch, self.max_context, self.max_waiting = max_batch, limit, max_waiting
        # `runner` makes the Runner: tensor parallelism (glm.parallel) passes one that mirrors it on every rank.
        self.runner = runner(model, max_batch, limit, compile)
        self.sampler = Sampler(max_batch, cfg.vocab_size, model.device)
        self.step_hooks: list[Callable[[int], None]] = []  # called with the number of rows of each decode step
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: deque[list[Request]] = deque()  # groups: the choices of one prompt are admitted together
        self._cv = threading.Condition()
        self._step = threading.RLock()  # held by the worker through each step; `between_steps` waits for it
        self._worker: threading.Thread | None = None

    # -- public

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def n_waiting(self) -> int:
        return sum(len(g) for g in self.waiting)

    def submit(self, prompt, config: GenerationConfig, *, logits_hook=None, sink=None,
               stop_match: Callable[[], StopMatch] | None = None, n: int | None = None,
               adapter: int = 0, grammar: Callable[[], Matcher] | None = None) -> Request | list[Request]:
        """Queue one prompt; raises GenerationError for a bad prompt or setting, QueueFull when full.

        With `n`, a list of n requests (choices) sharing one prefill of the prompt, then decoding as separate rows;
        choice j draws with seed `seed + j`. `sink`, if given, is then called as `sink(j, event)`. `stop_match`
        makes a stop-string matcher for each request. `adapter`: the number of a `runner.adapters` (0: none).
        `grammar` makes the grammar matcher of each (config.json_schema's,
        built by `ChatGLM.submit`, which has the tokenizer).
        """
        if not isinstance(config, GenerationConfig):
            raise GenerationError(f"config must be a GenerationConfig, got {type(config).__name__}")
        if not _is_int(adapter) or not 0 <= adapter <= len(self.runner.adapters):
            raise GenerationError(f"adapter must be the number of one of this model's adapters, got {adapter!r}")
        if n is not None and (not _is_int(n) or not 1 <= n <= self.max_batch):
            raise GenerationError(f"n must be an integer in [1, {self.max_batch}] (this model's cache rows, "
                                  f"max_batch), got {n!r}")
        prompt = check_ids(prompt, self.model.config)
        prompt_layout(prompt, self.model.config)
        budget = config.budget(len(prompt))
        room = self.max_context - len(prompt)
        if room < 1:
            raise GenerationError(
                f"the prompt is {len(prompt)} tokens, which leaves no room under the context limit of "
                f"{self.max_context} tokens: shorten the prompt (or the history)"
            )
        V = self.model.config.vocab_size
        if config.logit_bias and max(config.logit_bias) >= V:
            raise GenerationError(f"logit_bias names token id {max(config.logit_bias)}, outside this model's "
                                  f"vocabulary [0, {V})")
        if config.stop and stop_match is None:
            raise GenerationError("stop strings need a tokenizer: load a checkpoint with ice_text.model")
        if config.json_schema is not None and grammar is None:
            raise GenerationError("json_schema needs a tokenizer: load a checkpoint with ice_text.model")
        group = []
        for j in range(n or 1):
            c = config if j == 0 or config.seed is None else config.replace(seed=(config.seed + j) % MAX_SEED)
            put = sink if n is None or sink is None else functools.partial(sink, j)
            group.append(Request(prompt, c, int(min(budget, room)), logits_hook=logits_hook, sink=put,
                                 stop_match=stop_match() if config.stop else None, wake=self._wake,
                                 adapter=adapter, grammar=grammar() if config.json_schema is not None else None))
        with self._cv:
            if self.max_waiting is not None and self.n_waiting + len(group) > self.max_waiting:
                raise QueueFull(f"the server is busy: {self.n_waiting} requests are already waiting; retry later")
            self.waiting.append(list(group))  # a copy: cancelled choices leave it, not the caller's list
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=_work, args=(weakref.ref(self),), name="glm-scheduler",
                                                daemon=True)
                _start_worker(self._worker)
            self._cv.notify()
        return group if n is not None else group[0]

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @contextlib.contextmanager
    def between_steps(self):
        """Hold the worker between two steps (where adapters are added: no step sees half of one)."""
        with self._step:
            yield

    # -- the worker

    def _run_once(self, idle_wait: float) -> None:
        """Admit and decode one step, or wait up to `idle_wait` seconds for work."""
        with self._cv:
            if not self.waiting and self.running == 0:
                self._cv.wait(idle_wait)
                return
        try:
            with self._step:
                self._drop_cancelled()
                self._admit()
                if self.running:
                    self._decode_step()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: handed to each running request, which raises it
            for i, r in enumerate(self.rows):
                if r is not None:
                    self._free(i, None, error=e)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for g in [g for g in self.waiting if any(r.cancelled for r in g)]:
                for r in [r for r in g if r.cancelled]:
                    g.remove(r)
                    r._finish("cancelled")
                if not g:
                    self.waiting.remove(g)
        for i, r in enumerate(self.rows):
            if r is not None and r.cancelled:
                self._free(i, "cancelled")

    def _free(self, i: int, reason: str | None, stop: str | None = None, error: BaseException | None = None):
        r, self.rows[i] = self.rows[i], None
        self.runner.release(i)
        if error is not None:
            r._fail(error)
        else:
            r._finish(reason, stop)

    def _admit(self) -> None:
        """Prefill waiting prompts into free rows, oldest first; those admitted together share one forward."""
        while True:
            with self._cv:
                free = [i for i, r in enumerate(self.rows) if r is None]
                groups: list[tuple[list[int], list[Request]]] = []
                used = T = 0
                while self.waiting and used + len(self.waiting[0]) <= len(free):
                    T_next = max(T, len(self.waiting[0][0].prompt))
                    if groups and T_next * (len(groups) + 1) > self.PREFILL_TOKENS:
                        break
                    g = self.waiting.popleft()
                    groups.append((free[used : used + len(g)], g))
                    used, T = used + len(g), T_next
            if not groups:
                return
            try:
                self._prefill(groups)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: these requests fail, the others go on
                for rows, g in groups:
                    for i, req in zip(rows, g):
                        if self.rows[i] is req:
                            self._free(i, None, error=e)
                        else:
                            req._fail(e)

    def _prefill(self, groups: list[tuple[list[int], list[Request]]]) -> None:
        self.runner.ensure(max(len(g[0].prompt) + g[0].budget for _, g in groups))
        self.sampler.reserve(self.runner.slots)
        for rows, g in groups:
            for i, req in zip(rows, g):
                self.rows[i] = req
                self.sampler.set_row(i, req.config, req.prompt)
        logits = self.runner.prefill([rows[0] for rows, _ in groups], [g[0].prompt for _, g in groups],
                                     [g[0].adapter for _, g in groups])
        for rows, _ in groups:  # the other choices of a prompt start from a copy of its row
            if len(rows) > 1:
                self.runner.fork(rows[0], rows[1:])
        counts = torch.tensor([len(rows) for rows, _ in groups], device=logits.device)
        self._sample_and_emit([i for rows, _ in groups for i in rows], logits.repeat_interleave(counts, dim=0))

    def _decode_step(self) -> None:
        rows = [i for i, r in enumerate(self.rows) if r is not None]
        for h in self.step_hooks:
            h(len(rows))
        logits = self.runner.decode(rows, [self.rows[i].tokens[-1] for i in rows])
        self._sample_and_emit(rows, logits)

    def _sample_and_emit(self, rows: list[int], logits: torch.Tensor) -> None:
        """Pick the next token of `rows` from their logits (n, V), hand each out, and end the requests that are
        done: the one place that decides where a request ends."""
        reqs = [self.rows[i] for i in rows]
        for r, lg in zip(reqs, logits):
            if r.logits_hook is not None:
                r.logits_hook(lg[None])
        constrained = [j for j, r in enumerate(reqs) if r.grammar is not None]
        allowed = None
        if constrained:  # the grammars' masks, the other rows free
            allowed = (constrained, allowed_tokens([reqs[j].grammar for j in constrained], logits.shape[-1]))
        toks, bads = self.sampler.sample(rows, logits, allowed)
        self._logprobs(reqs, logits, toks)
        eos = self.model.config.eos_token_id
        for i, r, t, bad in zip(rows, reqs, toks, bads):
            if bad:
                r.nan = True
            try:
                complete = r.grammar is not None and r.grammar.advance(t)
            except GenerationError as e:  # this request fails, the others go on
                self._free(i, None, error=e)
                continue
            # `ending` is set before the last token is handed out, so that a reader of that token knows it is the
            # last (the official stream skips it).
            stop = r.stop_match(t) if r.stop_match is not None else None
            if stop is not None:
                r.ending = "stop"
            elif r.config.stop_at_eos and t == eos:  # (once its JSON is complete, the only token a grammar allows)
                r.ending = "stop"
            elif len(r.tokens) + 1 >= r.budget:
                r.ending = "stop" if complete else "length"  # no room left for <eop> after complete JSON
            r._emit(t)
            if r.ending is not None:
                self._free(i, r.ending, stop)


    @staticmethod
    def _logprobs(reqs: list[Request], logits: torch.Tensor, toks: list[int]) -> None:
        """Each asking request's new token's log-softmax, and its `logprobs` likeliest alternatives."""
        asked = [j for j, r in enumerate(reqs) if r.config.logprobs is not None]
        if not asked:
            return
        lp = logits[asked].float().log_softmax(dim=-1)  # (n, V): before every sampling processor
        chosen = lp.gather(1, torch.tensor([[toks[j]] for j in asked], device=lp.device))[:, 0].tolist()
        k = max(reqs[j].config.logprobs for j in asked)
        vals, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        vals, ids = vals.tolist(), ids.tolist()
        for n, j in enumerate(asked):
            want = reqs[j].config.logprobs
            reqs[j].logprobs.append(TokenLogprob(chosen[n], list(zip(ids[n][:want], vals[n][:want]))))


_workers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_exiting = threading.Event()


def _start_worker(t: threading.Thread) -> None:
    if not _workers:
        atexit.register(_stop_workers)  # once per process that generates anything, not at import
    _workers.add(t)
    t.start()


def _stop_workers() -> None:
    """At exit, before the interpreter tears down: a scheduler thread that woke up during finalization (or was in
    the middle of a step) would abort the process from inside torch. A Ctrl+C while waiting ends the wait."""
    _exiting.set()
    try:
        for t in list(_workers):
            t.join(timeout=30)
    except KeyboardInterrupt:  # the user insists: leave now (the threads are daemons)
        pass


def _work(ref: weakref.ref) -> None:
    """The scheduler's thread. It holds its scheduler only while working or waiting a moment for work, so that a
    model nobody uses any more is freed, and the thread ends with it (or when the program exits)."""
    with torch.inference_mode():
        while not _exiting.is_set() and (scheduler := ref()) is not None:
            scheduler._run_once(idle_wait=0.5)
            del scheduler


__all__ = ["Scheduler"]
