"""Grammar-constrained decoding: a JSON Schema (OpenAI's `response_format`, a tool's parameters) enforced on a
request's tokens by llguidance, which is imported only when a request asks for it.

A `Vocabulary` (the bytes of every id, from the tokenizer) is built once per model, a grammar compiled once per
request and a `Matcher` made for each of its choices. Each decode step `allowed_tokens` computes the masks of the
constrained rows of the batch; the sampler sets every other token's score to -inf before its processors,
so that constrained and free rows share a step, and logprobs (taken from the raw logits) keep their meaning.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from glm.errors import GenerationError

# Compact JSON (`{"a":1,"b":[2,3]}`): no whitespace between tokens at all, so that a weak model cannot spend its
# tokens on blanks. A schema may ask otherwise with llguidance's own "x-guidance" key.
JSON_OPTIONS = {"whitespace_flexible": False}
SPECIAL = b"\xff"  # llguidance's marker of ids that are no text (UTF-8 never holds this byte)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GenerationError("json_schema needs llguidance, which is not installed: pip install 'glm[serve]'") \
            from None
    return llguidance


class _Tokens:
    """What llguidance's TokenizerWrapper reads: the bytes of every id, the specials, EOS and a tokenize call."""

    def __init__(self, tokens: list[bytes], encode: Callable[[bytes], list[int]], eos_id: int):
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos_id, None
        self.special_token_ids = [i for i, b in enumerate(tokens) if b.startswith(SPECIAL)]
        self._encode = encode

    def __call__(self, data: bytes) -> list[int]:
        return self._encode(data)


class Vocabulary:
    """A model's vocabulary as llguidance needs it, built once per model (about a second for ChatGLM-6B's).

    Args:
        tokens: the bytes each id adds to the text; ids that are no text are `b"\\xff" + name`.
        encode: bytes -> ids whose `tokens` join to exactly those bytes (llguidance tokenizes the text a grammar
            forces with it, and its masks then allow only that segmentation: a tokenizer that adds a space, as
            sentencepiece does in front of a text, makes it reject its own mask).
        eos_id: the id that ends a reply (allowed once the grammar is complete).
        rewritten: texts that decoding rewrites even when several pieces spell them out (ChatGLM's `<n>`): no
            constrained reply may join pieces into one, since the grammar saw their bytes, not the rewrite.
    """

    def __init__(self, tokens: list[bytes], encode: Callable[[bytes], list[int]], eos_id: int,
                 rewritten: tuple[str, ...] = ()):
        llg = _llguidance()
        self.tokens, self.eos_id = tokens, eos_id
        self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_Tokens(tokens, encode, eos_id)), n_vocab=len(tokens))
        # A proper prefix of a rewritten text -> what would complete it; ids sorted by their bytes, to find the
        # ids that start with a completion by bisection.
        self._complete: dict[bytes, list[bytes]] = {}
        for text in rewritten:
            b = text.encode()
            for k in range(1, len(b)):
                self._complete.setdefault(b[:k], []).append(b[k:])
        self.tail = max((len(t) for t in rewritten), default=1) - 1  # bytes of text a matcher keeps
        self._order = sorted(range(len(tokens)), key=tokens.__getitem__) if rewritten else []
        self._sorted = [tokens[i] for i in self._order]
        self._forbidden: dict[bytes, Tensor] = {}

    def compile_json(self, schema: dict) -> str:
        """The llguidance grammar of a JSON Schema; GenerationError (saying why) if it cannot be enforced."""
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GenerationError(f"json_schema is not a valid schema: {e}") from None
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if failed:
            raise GenerationError(f"json_schema cannot be enforced: {messages[0][:300]}")
        return grammar

    def forbidden_after(self, tail: bytes) -> Tensor | None:
        """Ids whose bytes, after text ending in `tail`, would spell out a rewritten text (None: no such id)."""
        out = []
        for k in range(1, len(tail) + 1):
            prefix = tail[-k:]
            if prefix not in self._complete:
                continue
            if prefix not in self._forbidden:
                ids = []
                for c in self._complete[prefix]:
                    lo = bisect.bisect_left(self._sorted, c)
                    hi = bisect.bisect_left(self._sorted, c[:-1] + bytes([c[-1] + 1]))  # past all that start with c
                    ids += self._order[lo:hi]
                self._forbidden[prefix] = torch.tensor(sorted(set(ids)), dtype=torch.long)
            out.append(self._forbidden[prefix])
        return torch.cat(out) if out else None


class Matcher:
    """The grammar state of one choice: what may come next, and whether the reply is complete."""

    def __init__(self, vocab: Vocabulary, grammar: str):
        self.vocab = vocab
        self.ll = _llguidance().LLMatcher(vocab.ll, grammar, log_level=0)
        self.tail = b""  # the reply's last bytes, for `Vocabulary.forbidden_after`

    def advance(self, token: int) -> bool:
        """Take the sampled `token`; True when the grammar is complete (only EOS may follow, and the mask
        allows nothing else: a constrained reply ends with its EOS like any other).

        Raises GenerationError if the grammar rejects it (it was masked: a bug, or a grammar llguidance gave up on).
        """
        if not self.ll.consume_token(token):
            raise GenerationError(f"the grammar rejected token {token}: {self.ll.get_error()[:300]}")
        if self.vocab.tail:
            self.tail = (self.tail + self.vocab.tokens[token])[-self.vocab.tail:]
        return self.ll.is_stopped()


def allowed_tokens(matchers: list[Matcher], vocab_size: int) -> Tensor:
    """(n, vocab_size) bool on the CPU: the ids each matcher allows next.

    One after the other in this thread: a JSON mask takes tens of microseconds, and llguidance's thread pool
    (`LLExecutor`) would only compete with the model's threads for the cores.
    """
    n, words = len(matchers), (vocab_size + 31) // 32
    bits = np.zeros((n, words), dtype=np.int32)
    for j, m in enumerate(matchers):  # llguidance writes one bit per id into row j, lowest bit first
        m.ll.unsafe_compute_mask_ptr(bits.ctypes.data + j * words * 4, words * 4)
    ok = torch.from_numpy(np.unpackbits(bits.view(np.uint8), axis=1, count=vocab_size, bitorder="little")
                          .view(np.bool_))
    for j, m in enumerate(matchers):
        if m.ll.is_error():  # let it end: its `advance` then reports the error
            ok[j, m.vocab.eos_id] = True
        elif m.tail and (bad := m.vocab.forbidden_after(m.tail)) is not None:
            row = ok[j].clone()
            ok[j, bad] = False
            if not ok[j].any():  # only a rewritten text fits the grammar: allow it rather than nothing
                ok[j] = row
    return ok


__all__ = ["JSON_OPTIONS", "Matcher", "Vocabulary", "allowed_tokens"]
