"""`Request`, one prompt on its way through the scheduler, and `Result`, how it ended."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from glm.generation.sampling import GenerationConfig

# Given each new token, the stop string the text now holds, or None (built with the detokenizer:
# `glm.tokenizer.StopMatcher`), so that the scheduler never needs the tokenizer.
StopMatch = Callable[[int], "str | None"]


@dataclass
class TokenLogprob:
    """A new token's log-probability under the model, and the likeliest alternatives (id, logprob), best first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Result:
    """How a request ended: `finish_reason` "stop" (`<eop>`, a stop string, or a grammar completed by the last
    token the length allowed), "length", "cancelled" or "error"."""

    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    stop: str | None = None  # the stop string that matched
    nan: bool = False  # the model produced NaN/inf logits and the official fallback picked token 5

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class Request:
    """One prompt on its way through the scheduler. Iterate it for the new ids; `result` once it has ended.

    Events (each new id, then None at the end, or the exception that ended it) are read by iterating the request,
    or handed to `sink(event)` from the scheduler's thread when one is given (then it is not iterable).
    """

    def __init__(self, prompt: list[int], config: GenerationConfig, budget: int, *, logits_hook=None, sink=None,
                 stop_match: StopMatch | None = None, wake: Callable[[], None] | None = None, adapter: int = 0,
                 grammar=None):
        self.prompt = prompt
        self.config = config
        self.adapter = adapter  # the number of the adapter its row uses (0: none; see glm.generation.adapters)
        self.budget = budget
        self.logits_hook = logits_hook
        self.stop_match = stop_match
        self.grammar = grammar  # a glm.generation.grammar.Matcher when the tokens are constrained
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # with config.logprobs: one per token, set before it is handed out
        self.result: Result | None = None
        self.nan = False
        self.ending: str | None = None  # the finish reason, set just before the last token is handed out
        self.n_final: int | None = None  # how many tokens the request ends with, known when the last one is handed out
        self.error: BaseException | None = None
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        # Where events go: this queue (for iteration), or a callable of the caller's (an asyncio server's).
        self._put = sink if sink is not None else self._events.put
        self._cancel = threading.Event()
        self._wake = wake  # tells the scheduler to look at its rows (a cancel frees one)
        self._drained = False  # the end (or the error) has been read

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step (and the request ends with "cancelled")."""
        if self.result is None:
            self._cancel.set()
            if self._wake is not None:
                self._wake()

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

    def is_last(self, n: int) -> bool:
        """Whether the n-th token read (1-based) is the request's last one."""
        return self.n_final is not None and n == self.n_final

    def wait(self) -> Result:
        for _ in self:
            pass
        return self.result

    # Called by the scheduler's worker thread only.
    def _emit(self, tok: int) -> None:
        self.tokens.append(tok)
        if self.ending is not None:  # a reader behind the scheduler tells its last token by this count, not `ending`
            self.n_final = len(self.tokens)
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


__all__ = ["Request", "Result", "StopMatch", "TokenLogprob"]
