"""The ChatGLM-6B tokenizer: sentencepiece (`ice_text.model`) plus the release's whitespace pieces."""

from __future__ import annotations

import os
import re
from pathlib import Path

from glm.errors import CheckpointError  # a damaged ice_text.model is a damaged checkpoint

MAX_BLANK = 80
_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    """`text` as sentencepiece can take it: surrogate code points cannot be UTF-8 encoded (sentencepiece raises).

    Surrogate pairs become the character they encode; lone surrogates (e.g. from `surrogateescape` decoding of
    invalid UTF-8) become U+FFFD, the replacement character, as a UTF-8 decoder would produce.
    """
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _preprocess(text: str) -> str:
    """Newlines, tabs and runs of 2..80 spaces become dedicated pieces before sentencepiece sees the text."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):  # longest run first
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


class Tokenizer:
    """Encode/decode exactly as the official `ChatGLMTokenizer` (num_image_tokens 0, no lower-casing).

    Args:
        model_file: path to `ice_text.model`.
        bos_id, eos_id, mask_id, gmask_id, pad_id: special ids, read from the checkpoint's config.json.
        vocab_size: the model's vocabulary (config.json), which the pieces must fit in.

    Raises CheckpointError (one line) when `model_file` is missing, unreadable, damaged or of another vocabulary.
    """

    def __init__(self, model_file: str | os.PathLike, *, bos_id: int, eos_id: int, mask_id: int, gmask_id: int,
                 pad_id: int, vocab_size: int | None = None):
        import sentencepiece as spm

        path = Path(model_file)
        fix = "re-download ice_text.model from the checkpoint"
        if not path.is_file():
            raise CheckpointError(f"tokenizer model {path} not found: the checkpoint folder needs ice_text.model")
        self.sp = spm.SentencePieceProcessor()
        try:
            # Read here rather than by sentencepiece: Python reports unreadable files (and odd path names) itself.
            ok = self.sp.LoadFromSerializedProto(path.read_bytes())
        except OSError as e:
            raise CheckpointError(f"cannot read {path} ({e.strerror or e}): {fix}") from None
        except RuntimeError as e:  # sentencepiece raises on an empty, truncated or foreign file
            raise CheckpointError(f"{path} is not a sentencepiece model ({e}): {fix}") from None
        if ok is False or self.sp.vocab_size() <= 0:
            raise CheckpointError(f"{path} is not a sentencepiece model: {fix}")
        self.bos_id, self.eos_id, self.mask_id, self.gmask_id, self.pad_id = bos_id, eos_id, mask_id, gmask_id, pad_id
        self.n_pieces = self.sp.vocab_size()
        self.newline_id = self.sp.PieceToId("<n>")
        self._bytes: list[bytes] | None = None  # token_bytes(), built on first use
        self._longest: dict[bytes, int] | None = None  # encode_bytes' fallback
        self._top = 0
        if vocab_size is not None and self.n_pieces > vocab_size:
            raise CheckpointError(f"{path} has {self.n_pieces} pieces but config.json's vocab_size is {vocab_size}: "
                                  f"they come from different checkpoints; {fix}")

    @classmethod
    def from_config(cls, model_file: str | os.PathLike, cfg) -> Tokenizer:
        return cls(model_file, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id, mask_id=cfg.mask_token_id,
                   gmask_id=cfg.gmask_token_id, pad_id=cfg.pad_token_id, vocab_size=cfg.vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (any str); with special tokens, `[gMASK] <sop>` is appended (the generation prompt)."""
        if not isinstance(text, str):
            hint = ": decode the bytes first" if isinstance(text, (bytes, bytearray)) else ""
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}{hint}")
        ids = self.sp.EncodeAsIds(_preprocess(_encodable(text))) if text else []
        if add_special_tokens:
            ids = ids + [self.gmask_id, self.bos_id]
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`. Pads are dropped, control pieces decode to "", ids past the piece table are skipped."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids if i != self.pad_id and 0 <= i < self.n_pieces]
        if not ids:
            return ""
        return _postprocess(self.sp.DecodeIds(ids))

    @property
    def vocab_size(self) -> int:
        return self.n_pieces

    def token_bytes(self, n_vocab: int | None = None) -> list[bytes]:
        """The bytes each id adds to the decoded text (UTF-8), for grammar engines; `n_vocab`: the model's rows.

        `▁` is a space, `<n>`, `<|tab|>` and `<|blank_N|>` their whitespace, byte pieces their byte. Ids that add
        no text of their own are `b"\\xff"` (a byte UTF-8 never uses: the grammar engines' special-token marker)
        and their piece name: control pieces, `<unk>` (decoded as a " ⁇ " placeholder, never wanted), byte pieces
        that no UTF-8 text holds (0xC0, 0xC1, 0xF5..0xFF: decoded as U+FFFD) and rows past the piece table.
        Joined, the bytes of ids are their decoded text, except where pieces spell out a whitespace piece's name
        (`<` then `n>`), which decoding rewrites (see `REWRITTEN`), and for the dropped leading space of a text.
        """
        if self._bytes is None:
            sp, out = self.sp, []
            for i in range(self.n_pieces):
                piece = sp.IdToPiece(i)
                if sp.IsByte(i):
                    b = int(piece[3:5], 16)
                    out.append(bytes([b]) if b < 0xC0 or 0xC2 <= b < 0xF5 else b"\xff" + piece.encode())
                elif sp.IsControl(i) or sp.IsUnknown(i):
                    out.append(b"\xff" + piece.encode())
                else:  # only ChatGLM's whitespace pieces change in post-processing ("<" is a cheap test)
                    text = piece.replace("\u2581", " ")
                    out.append((_postprocess(text) if "<" in text else text).encode())
            self._bytes = out
        return self._bytes + [b"\xff<unused_%d>" % i for i in range(self.n_pieces, n_vocab or 0)]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids whose `token_bytes` join to exactly `data`, as a grammar engine needs when it tokenizes the text it
        forces (its masks then follow that segmentation): the tokenizer's own where it keeps every byte, else
        longest match (text the normaliser folds, such as `ＡＢＣ`, or a literal `<n>`)."""
        table = self.token_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if text:
            # A newline on both ends: sentencepiece's dummy-prefix space and its trimming of a trailing space land
            # on the newline piece (`<n>`, user-defined, so segmented alone), which is cut off again.
            ids = self.sp.EncodeAsIds(_preprocess("\n" + text + "\n"))
            first, last = ids.index(self.newline_id), len(ids) - 1 - ids[::-1].index(self.newline_id)
            ids = ids[first + 1 : last]
            if b"".join(table[i] for i in ids) == data:
                return ids
        if self._longest is None:
            self._longest = {}
            for i, b in enumerate(table):
                if self.sp.IsByte(i):  # every byte has its piece (ordinary pieces, listed first, win)
                    b = bytes([int(self.sp.IdToPiece(i)[3:5], 16)])
                if b and not b.startswith(b"\xff"):
                    self._longest.setdefault(b, i)
            self._top = max(map(len, self._longest))
        longest, ids, at = self._longest, [], 0
        while at < len(data):
            k = next(k for k in range(min(self._top, len(data) - at), 0, -1) if data[at : at + k] in longest)
            ids.append(longest[data[at : at + k]])
            at += k
        return ids


_PATTERNS = ("<n>", "<|tab|>", *(f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)))
_LONGEST = max(len(p) for p in _PATTERNS)
# The texts that decoding rewrites wherever they appear, also when ordinary pieces spell them out (`<` then `n>`
# decodes to a newline): a grammar engine that sees each id's bytes must not let pieces join into one.
REWRITTEN = _PATTERNS


def _pattern_start(raw: str) -> int:
    """Where a trailing piece of `raw` that may still grow into `<n>`, `<|tab|>` or `<|blank_N|>` begins."""
    at = raw.rfind("<", max(0, len(raw) - _LONGEST))
    if at >= 0 and any(p.startswith(raw[at:]) for p in _PATTERNS):
        return at
    return len(raw)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back the text that is settled.

    Only a short window is decoded per id: the ids since the last settled text plus the ids before them
    (sentencepiece drops the leading space of a text's first piece, so the window always starts on ids already
    shown, as the decode of the whole would see them). Text that may still change is held back: an incomplete
    UTF-8 sequence of byte pieces, and a tail that may grow into a whitespace piece such as `<|blank_4|>`.
    `text + tail` is always `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""  # settled text, as decode() gives it
        self.tail = ""  # the rest of decode(ids), which may still change
        self._prefix = self._read = 0  # the window: ids[_prefix:_read] were settled by the last step
        self._held = ""  # raw sentencepiece text after `text`, held back for a possible whitespace piece

    @property
    def current(self) -> str:
        """decode(ids) so far."""
        return self.text + self.tail

    def put(self, token_id: int) -> str:
        """Add one id; returns the text it settled (often "", e.g. inside a multi-byte character)."""
        t = int(token_id)
        if t == self.tok.pad_id or not 0 <= t < self.tok.n_pieces:
            return ""  # decode() drops these
        self.ids.append(t)
        sp = self.tok.sp
        before = sp.DecodeIds(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        window = sp.DecodeIds(self.ids[self._prefix :])
        fresh = window[len(before) :]
        if window.endswith("\ufffd") or len(window) <= len(before):
            pending = fresh  # not settled yet: decoded again with the next id
        else:
            self._held += fresh
            self._prefix, self._read = self._read, len(self.ids)
            # sentencepiece drops every leading space of a text: a window must not start on a pure-space piece.
            while self._prefix > 0 and not sp.IdToPiece(self.ids[self._prefix]).strip("\u2581"):
                self._prefix -= 1
            pending = ""
        cut = _pattern_start(self._held)
        settled = _postprocess(self._held[:cut])
        self._held = self._held[cut:]
        self.text += settled
        self.tail = _postprocess(self._held + pending)
        return settled

    def flush(self) -> str:
        """The held-back rest, once no id follows."""
        delta, self.text, self.tail, self._held = self.tail, self.text + self.tail, "", ""
        return delta


class StopMatcher:
    """Given each new id of a request, the first of its stop strings that the decoded text now holds, else None.

    Built by `ChatGLM.submit` and handed to the request, so that the scheduler never needs the tokenizer. With
    `postprocess` (a chat reply's `process_response`), stop strings are matched on the text the reader gets,
    which that function may change (`;` becomes `；` next to CJK).
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], postprocess=None):
        self.dec = StreamDecoder(tokenizer)
        self.stop = tuple(stop)
        self.longest = max(len(s) for s in self.stop)
        self.postprocess = postprocess
        self.text = ""

    def __call__(self, token_id: int) -> str | None:
        delta = self.dec.put(token_id)
        if self.postprocess is not None:  # the whole text: post-processing can change what came before
            text = self.postprocess(self.dec.text)
            return next((s for s in self.stop if s in text), None)
        self.text += delta
        tail = self.text[-(self.longest + len(delta)):]  # only a match that the new text completes
        return next((s for s in self.stop if s in tail), None)
