"""The official chat format: prompt template, history, reply post-processing, and `chat` / `stream_chat`.

Kept out of the model: the model maps ids to logits; this module maps conversations to ids and back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from glm.generation import GenerationError, SamplingConfig, generate_stream, make_generator

History = list[tuple[str, str]]

# The official defaults of chat/stream_chat; top_k 50 is transformers' default, which the official code never sets.
CHAT_DEFAULTS = dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, top_k=50, repetition_penalty=1.0)


def build_prompt(query: str, history: History | None = None) -> str:
    """The official template: the bare query with no history, else numbered rounds of 问/答."""
    if not history:
        return query
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


def fit_history(tokenizer, query: str, history: History | None, max_length: int, reserve: int = 1) -> History:
    """Drop whole oldest rounds until the prompt leaves at least `reserve` tokens for the reply under max_length.

    Raises GenerationError when the query alone does not fit.
    """
    history = list(history or [])
    while True:
        n = len(tokenizer.encode(build_prompt(query, history)))
        if n + reserve <= max_length:
            return history
        if not history:
            raise GenerationError(
                f"the message is {n} tokens, too long for max_length={max_length} "
                f"(it needs room for at least {reserve} reply tokens): shorten it or raise max_length"
            )
        history.pop(0)


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise GenerationError(f"{engine.path} has no ice_text.model, so it cannot chat: use a full checkpoint")
    return engine.tokenizer


def _sampling(do_sample, top_p, temperature, top_k, repetition_penalty) -> SamplingConfig:
    return SamplingConfig(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty)


def stream_chat(
    engine,
    query: str,
    history: History | None = None,
    max_length: int = 2048,
    do_sample: bool = True,
    top_p: float = 0.7,
    temperature: float = 0.95,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    generator=None,
    final: bool = False,
) -> Iterator[tuple[str, History]]:
    """Yield `(reply so far, history + [(query, reply so far)])` after every generated token.

    As the official stream_chat: the token that ends generation (`<eop>`, or the one that reaches max_length)
    yields nothing, and every value is `process_response` of the decoded new ids. With `final=True` (ours) that
    last token yields too, so that the last value is exactly `chat`'s reply (the official stream can end one
    token short of it when max_length cuts the reply).
    """
    history = list(history or [])
    prompt_len, tokens = _reply_tokens(engine, query, history, max_length, generator, seed,
                                       _sampling(do_sample, top_p, temperature, top_k, repetition_penalty))
    eos, new = engine.config.eos_token_id, []
    try:
        for step in tokens:
            t = int(step[0])
            new.append(t)
            last = t == eos or prompt_len + len(new) >= max_length
            if last and not final:
                return
            reply = process_response(engine.tokenizer.decode(new))
            yield reply, history + [(query, reply)]
            if last:
                return
    finally:
        tokens.close()  # also when the caller stops early: the caches are free for the next turn at once


def chat(engine, query: str, history: History | None = None, max_length: int = 2048, do_sample: bool = True,
         top_p: float = 0.7, temperature: float = 0.95, top_k: int = 50, repetition_penalty: float = 1.0,
         seed: int | None = None, generator=None) -> tuple[str, History]:
    """One reply, as the official `chat`: `(reply, history + [(query, reply)])`."""
    history = list(history or [])
    _, tokens = _reply_tokens(engine, query, history, max_length, generator, seed,
                              _sampling(do_sample, top_p, temperature, top_k, repetition_penalty))
    reply = process_response(engine.tokenizer.decode([int(step[0]) for step in tokens]))
    return reply, history + [(query, reply)]


def _reply_tokens(engine, query, history, max_length, generator, seed, sampling):
    """(prompt length, the generation stream (B=1) of one turn), with the engine's reused caches."""
    prompt_ids = _tokenizer(engine).encode(build_prompt(query, history))
    gen = generator if generator is not None else make_generator(seed, engine.device)
    stream = generate_stream(engine.model, [prompt_ids], max_length=max_length, generator=gen, sampling=sampling,
                             decoder=getattr(engine, "decoder", None))
    return len(prompt_ids), stream


class ReplyPrinter:
    """Turns the successive replies of `stream_chat` into append-only text for a terminal.

    `process_response` can still change the tail of a reply (a ',' becomes '，' once a CJK character follows;
    trailing spaces are stripped; '[[训练时间]]' is replaced), so that tail is held back until it is settled.
    """

    _HOLD = re.compile(r"(\s+|[,!:;?]|\[\[?[训练时间\]]*)$")

    def __init__(self):
        self.printed = ""

    def update(self, reply: str) -> str:
        stable = self._HOLD.sub("", reply)
        if not stable.startswith(self.printed):
            return ""
        delta, self.printed = stable[len(self.printed):], stable
        return delta

    def finish(self, reply: str) -> str:
        """The rest of the final reply; if the printed text diverged (rare), a newline and the whole reply."""
        if reply.startswith(self.printed):
            delta = reply[len(self.printed):]
        else:
            delta = "\n" + reply
        self.printed = reply
        return delta
