"""The official chat format: prompt template, history, reply post-processing, and `chat` / `stream_chat`.

Kept out of the model: the model maps ids to logits; this module maps conversations to ids and back.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

from glm.errors import GenerationError
from glm.generation import GenerationConfig, Request
from glm.tokenizer import StreamDecoder

History = list[tuple[str, str]]

MAX_RESERVE = 256
NAN_WARNING = ("the model produced NaN/inf logits; the official fallback picked token 5. "
               "This usually means float16 overflow: try dtype='bfloat16' or 'float32'.")


def build_prompt(query: str, history: History | None = None, *, rounds: bool = False) -> str:
    """The official template: the bare query with no history, else numbered rounds of 问/答.

    `rounds=True`: the numbered template even for an empty history (`[Round 0]\\n问：{query}\\n答：`), as the
    official trainer (`ptuning/main.py`) renders a row whose history column holds `[]`; the official chat sends
    the bare query instead.
    """
    if not history and not rounds:
        return query
    history = history or []
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return rounds + f"[Round {len(history)}]\n问：{query}\n答："


_CJK = "[\u4e00-\u9fff]"
_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))


def process_response(text: str) -> str:
    """The official post-processing: strip, fill in the training date, full-width punctuation next to CJK."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for half, full in _PUNCT:
        text = re.sub(f"({_CJK}){re.escape(half)}", rf"\g<1>{full}", text)
        text = re.sub(f"{re.escape(half)}({_CJK})", rf"{full}\g<1>", text)
    return text


def reply_reserve(max_length: int) -> int:
    """Tokens kept free for the reply when old rounds are dropped: an eighth of max_length, at most 256.

    256 of the default 2048 leaves most of the context to the conversation while a reply still gets a useful
    length; small max_lengths keep the same proportion (the golden test turns, which leave exactly 40 tokens for
    their replies, fit untouched up to max_length 320).
    """
    return max(1, min(MAX_RESERVE, max_length // 8))


def fit_history(tokenizer, query: str, history: History | None, max_length: int, reserve: int | None = None, *,
                limit_name: str = "max_length") -> History:
    """Drop whole oldest rounds until the prompt leaves `reserve` tokens (default `reply_reserve`) for the reply.

    Raises GenerationError when the query alone does not fit (naming the limit `limit_name`).
    """
    reserve = reply_reserve(max_length) if reserve is None else reserve
    history = check_history(history)
    while True:
        n = len(tokenizer.encode(build_prompt(query, history)))
        if n + reserve <= max_length:
            return history
        if not history:
            raise GenerationError(
                f"the message is {n} tokens, too long for {limit_name}={max_length} "
                f"(it needs room for at least {reserve} reply tokens): shorten it or raise {limit_name}"
            )
        history.pop(0)


def fit_turn(engine, query: str, history: History | None, max_length: int) -> tuple[History, int]:
    """The history to send with `query` (oldest whole rounds dropped so that the prompt and the reply reserve fit
    both max_length and the engine's context limit), and how many rounds were dropped."""
    history = check_history(history)
    if engine.max_context < max_length:  # the context limit is the tighter one: the error names it
        kept = fit_history(_tokenizer(engine), query, history, engine.max_context, limit_name="max_context")
    else:
        kept = fit_history(_tokenizer(engine), query, history, max_length)
    return kept, len(history) - len(kept)


def check_history(history) -> History:
    """A history as a list of (query, reply) string pairs; anything else is a GenerationError."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple)):
        raise GenerationError(f"history must be a list of (query, reply) pairs, got {type(history).__name__}")
    out = []
    for i, rnd in enumerate(history):
        if isinstance(rnd, (str, bytes)) or not isinstance(rnd, (list, tuple)) or len(rnd) != 2 \
                or not all(isinstance(x, str) for x in rnd):
            raise GenerationError(f"history[{i}] must be a (query, reply) pair of strings, got {rnd!r:.60}")
        out.append((rnd[0], rnd[1]))
    return out


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise GenerationError(f"{engine.path} has no ice_text.model, so it cannot chat: use a full checkpoint")
    return engine.tokenizer


def reply_text(config: GenerationConfig):
    """The function from a chat reply's decoded text to what the reader gets: `process_response`, except for a
    reply under a JSON schema, which is given as generated (full-width punctuation would change its strings)."""
    return process_response if config.json_schema is None else str


def submit_turn(engine, query: str, history: History, config: GenerationConfig,
                adapter: str | None = None) -> Request:
    """Queue the reply to `query` after `history` (the official prompt template), with `adapter` if given."""
    if not isinstance(query, str):
        raise GenerationError(f"query must be a string, got {type(query).__name__}")
    return engine.submit(_tokenizer(engine).encode(build_prompt(query, history)), config,
                         postprocess=reply_text(config), adapter=adapter)


def replies(engine, request: Request) -> Iterator[tuple[str, bool]]:
    """`(reply_text(decoded reply so far), is_last)` after every token of a chat request.

    Closing the iterator early cancels the request, so its cache row is free for the next one at once.
    """
    dec, text = StreamDecoder(engine.tokenizer), reply_text(request.config)
    try:
        for n, t in enumerate(request, 1):
            dec.put(t)
            # The scheduler may be tokens ahead of this reader: the last token is known by count, not by `ending`.
            yield text(dec.current), request.is_last(n)
    finally:
        request.cancel()
    if request.result is not None and request.result.nan:
        warnings.warn(NAN_WARNING, RuntimeWarning, stacklevel=3)


def stream_reply(engine, query: str, history: History | None, config: GenerationConfig,
                 final: bool = True, adapter: str | None = None) -> Iterator[str]:
    """The reply so far after every token. With `final` the last value is exactly `chat`'s reply; without it
    the stream is the official one, which yields nothing for the token that ends generation (so it can end one
    token short of `chat`'s reply when max_length cuts it)."""
    request = submit_turn(engine, query, check_history(history), config, adapter)
    for reply, last in replies(engine, request):
        if last and not final:
            return
        yield reply


def stream_chat(engine, query: str, history: History | None, config: GenerationConfig,
                final: bool = False, adapter: str | None = None) -> Iterator[tuple[str, History]]:
    """Yield `(reply so far, history + [(query, reply so far)])` after every generated token, as the official
    stream_chat (with `final=True`, ours, the last value is exactly `chat`'s reply)."""
    history = check_history(history)
    for reply in stream_reply(engine, query, history, config, final=final, adapter=adapter):
        yield reply, history + [(query, reply)]


def chat(engine, query: str, history: History | None, config: GenerationConfig,
         adapter: str | None = None) -> tuple[str, History]:
    """One reply, as the official `chat`: `(reply, history + [(query, reply)])`."""
    history = check_history(history)
    reply = ""
    for reply, _ in stream_chat(engine, query, history, config, final=True, adapter=adapter):
        pass
    return reply, history + [(query, reply)]


class SettledText:
    """Turns successive texts of one reply (each the whole reply so far) into append-only deltas, for a terminal
    or a server stream whose deltas must add up to the final reply.

    `process_response` can still change the tail of a chat reply (a ',' becomes '，' once a CJK character
    follows; trailing spaces are stripped; '[[训练时间]]' is replaced), so that tail is held back until it is
    settled; with `stop` strings, so is a tail that may grow into one, and the reply ends before the first.
    """

    _HOLD = re.compile(r"(\s+|[,!:;?]|\[\[?[训练时间\]]*)$")

    def __init__(self, stop: tuple[str, ...] = (), chat: bool = True):
        self.sent = ""
        self.stop = tuple(stop)
        self.chat = chat  # hold back what process_response may still change

    def cut(self, text: str) -> str:
        """`text` up to the first stop string."""
        hits = [text.index(s) for s in self.stop if s in text]
        return text[: min(hits)] if hits else text

    def update(self, reply: str) -> str:
        stable = self.cut(reply)
        if self.chat:
            stable = self._HOLD.sub("", stable)
        for s in self.stop:  # a tail that may still become a stop string
            for n in range(min(len(s) - 1, len(stable)), 0, -1):
                if stable.endswith(s[:n]):
                    stable = stable[:-n]
                    break
        if not stable.startswith(self.sent):
            return ""
        delta, self.sent = stable[len(self.sent):], stable
        return delta

    def finish(self, reply: str) -> str:
        """The rest of the final reply; if the sent text diverged (rare), a newline and the whole reply."""
        reply = self.cut(reply)
        if reply.startswith(self.sent):
            delta = reply[len(self.sent):]
        else:
            delta = "\n" + reply
        self.sent = reply
        return delta
