import shutil

import pytest
from glm_testutil import FIXTURES, golden
from hypothesis import given, settings
from hypothesis import strategies as st
from test_config import refused

import glm
from glm.tokenizer import StreamDecoder, Tokenizer

G, _ = golden("chatglm-tiny")


@pytest.mark.parametrize("case", G["tokenizer"], ids=lambda c: repr(c["text"][:20]))
def test_tokenizer_cases(chatglm_tiny, case):
    tok = chatglm_tiny.tokenizer
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert tok.decode(case["ids"]) == case["decoded"]


def test_special_ids_come_from_config(chatglm_tiny):
    tok, cfg = chatglm_tiny.tokenizer, chatglm_tiny.config
    assert tok.encode("x")[-2:] == [cfg.gmask_token_id, cfg.bos_token_id]
    assert tok.decode([cfg.gmask_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id]) == ""


def test_decode_skips_unused_embedding_rows(chatglm_tiny):
    tok = chatglm_tiny.tokenizer
    ids = tok.encode("你好", add_special_tokens=False)
    assert tok.decode(ids + [130400, 130527]) == "你好"


@pytest.mark.parametrize("text", ["emoji 👋😀🎉", "def f(x):\n    return x * 2\n", "Hello, 世界! 你好吗?", "𠀀𠀁 rare"])
def test_stream_decoder_concatenates_to_decode(chatglm_tiny, text):
    tok = chatglm_tiny.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    dec = StreamDecoder(tok)
    parts = [dec.put(i) for i in ids] + [dec.flush()]
    assert "".join(parts) == tok.decode(ids)
    assert all("\ufffd" not in p for p in parts)  # half an emoji is never shown


# ---------------------------------------------------------------------------------------------------- bad input

MODEL = FIXTURES / "chatglm-tiny" / "ice_text.model"
VOCAB = 130528
# Arbitrary text, weighted towards what breaks tokenizers: lone surrogates, control characters, whitespace runs.
PIECES = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.characters(categories=["Cc"]),
                   st.sampled_from([" " * 3, "\n", "\t", "<n>", "<|blank_3|>", "\ufffd", "[gMASK]", "<sop>"]))
ANY_TEXT = st.lists(PIECES, max_size=30).map("".join)


def _tok(path=MODEL, **kw):
    return Tokenizer(path, bos_id=130004, eos_id=130005, mask_id=130000, gmask_id=130001, pad_id=3, **kw)


@settings(max_examples=200, deadline=None)
@given(text=ANY_TEXT)
def test_encode_takes_any_str(chatglm_tiny, text):
    tok = chatglm_tiny.tokenizer
    ids = tok.encode(text)
    assert ids[-2:] == [130001, 130004] and all(type(i) is int and 0 <= i < VOCAB for i in ids)
    out = tok.decode(ids)
    assert isinstance(out, str) and not any("\ud800" <= c <= "\udfff" for c in out)


def test_surrogates_become_the_replacement_character(chatglm_tiny):
    tok = chatglm_tiny.tokenizer
    assert tok.encode("a\udcffb") == tok.encode("a\ufffdb")  # lone (surrogateescape of byte 0xff)
    assert tok.encode("x\ud800") == tok.encode("x\ufffd")
    assert tok.encode("hi \ud83d\ude00") == tok.encode("hi 😀")  # a pair is the character it encodes
    assert tok.encode("\x00\x1b[31m\x7f") == tok.encode("\x00\x1b[31m\x7f")


def test_chat_with_a_lone_surrogate(chatglm_tiny):
    reply, history = chatglm_tiny.chat("\udcff", max_length=16, do_sample=False)
    assert isinstance(reply, str) and history == [("\udcff", reply)]
    assert chatglm_tiny.chat("你好", max_length=16, do_sample=False)[0]


@pytest.mark.parametrize("value", [b"hello", bytearray(b"x"), None, 5, ["a"], 1.5])
def test_encode_refuses_what_is_not_a_str(chatglm_tiny, value):
    msg = refused(TypeError, chatglm_tiny.tokenizer.encode, value)
    assert "str" in msg
    assert chatglm_tiny.tokenizer.encode("你好") == [5, 74874, 130001, 130004]


DAMAGED = {
    "empty": lambda data: b"",
    "garbage": lambda data: b"not a sentencepiece model\n" * 4,
    "truncated-1k": lambda data: data[:1000],
    "truncated-half": lambda data: data[: len(data) // 2],
    "tail-only": lambda data: data[len(data) // 2:],
}


@pytest.fixture(scope="module")
def chatglm_copy(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "chatglm-tiny"
    shutil.copytree(FIXTURES / "chatglm-tiny", d)
    return d


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_tokenizer_file_is_a_checkpoint_error(chatglm_copy, kind):
    good = MODEL.read_bytes()
    p = chatglm_copy / "ice_text.model"
    p.write_bytes(DAMAGED[kind](good))
    assert "ice_text.model" in refused(glm.CheckpointError, glm.load, chatglm_copy)
    p.write_bytes(good)
    assert glm.load(chatglm_copy).tokenizer.encode("你好") == [5, 74874, 130001, 130004]


@settings(max_examples=20, deadline=None)
@given(cut=st.integers(0, MODEL.stat().st_size - 1), junk=st.binary(max_size=16))
def test_cut_or_garbled_tokenizer_file_loads_or_is_a_checkpoint_error(tmp_path_factory, cut, junk):
    p = tmp_path_factory.mktemp("tok") / "ice_text.model"
    p.write_bytes(MODEL.read_bytes()[:cut] + junk)
    try:
        tok = _tok(p, vocab_size=VOCAB)
    except glm.CheckpointError as e:
        assert "\n" not in str(e)
    else:  # cut at a record boundary: a smaller vocabulary, which must still encode and decode
        tok.decode(tok.encode("hello 你好"))


def test_tokenizer_and_config_from_different_checkpoints():
    assert "pieces" in refused(glm.CheckpointError, _tok, vocab_size=1024)
    assert "not found" in refused(glm.CheckpointError, _tok, MODEL.parent / "nope.model")
    assert _tok(vocab_size=VOCAB).encode("你好") == [5, 74874, 130001, 130004]


def test_stop_matcher_matches_on_the_post_processed_text(chatglm_tiny):
    from glm.chat import process_response
    from glm.tokenizer import StopMatcher

    tok = chatglm_tiny.tokenizer
    ids = tok.encode("你好;世界", add_special_tokens=False)
    raw, processed = StopMatcher(tok, ("；",)), StopMatcher(tok, ("；",), process_response)
    assert [raw(t) for t in ids] == [None] * len(ids)  # the raw text has a half-width ';'
    hits = [processed(t) for t in ids]
    assert "；" in hits and hits[-1] == "；"
    plain = StopMatcher(tok, (";",))
    assert plain.__call__ and any(plain(t) == ";" for t in ids)


# ---------------------------------------------------------------------------------------------------- token bytes


def _utf8_context(b: int) -> list[int] | None:
    """Bytes around byte `b` that make a valid UTF-8 character, with b's place in it; None where no text holds b."""
    if b < 0x80:
        return [b]
    if b < 0xC0:  # a continuation byte
        return [0xC2, b]
    if b < 0xC2 or b >= 0xF5:
        return None
    lead = {0xE0: [0xA0, 0x80], 0xF0: [0x90, 0x80, 0x80], 0xF4: [0x80, 0x80, 0x80]}
    return [b] + lead.get(b, [0x80] * (1 if b < 0xE0 else 2 if b < 0xF0 else 3))


def test_every_ids_bytes_decode_as_the_tokenizer_does(chatglm_tiny):
    tok, V = chatglm_tiny.tokenizer, chatglm_tiny.config.vocab_size
    table = tok.token_bytes(V)
    assert len(table) == V
    sp = tok.sp
    nul = sp.PieceToId("<0x00>")
    text_ids = [i for i in range(tok.n_pieces) if not sp.IsByte(i) and not table[i].startswith(b"\xff")]
    # Each id in context (after a NUL byte, so that a leading space stays), all in one decode.
    parts = tok.decode([t for i in text_ids for t in (nul, i)]).split("\x00")[1:]
    assert len(parts) == len(text_ids)
    assert [p.encode() for p in parts] == [table[i] for i in text_ids]
    assert table[tok.newline_id] == b"\n" and table[sp.PieceToId("<|tab|>")] == b"\t"
    assert table[sp.PieceToId("<|blank_80|>")] == b" " * 80 and table[sp.PieceToId("\u2581")] == b" "
    byte_id = {int(sp.IdToPiece(i)[3:5], 16): i for i in range(tok.n_pieces) if sp.IsByte(i)}
    for b, i in byte_id.items():  # a byte piece is its byte, inside any character that holds it
        ctx = _utf8_context(b)
        if ctx is None:  # never in UTF-8 text: decoded as U+FFFD, marked as no text
            assert table[i] == b"\xff" + sp.IdToPiece(i).encode() and tok.decode([nul, i]) == "\x00\ufffd"
            continue
        assert table[i] == bytes([b])
        assert tok.decode([nul] + [byte_id[c] for c in ctx]) == "\x00" + bytes(ctx).decode()
    # The rest are no text: control pieces and unused rows decode to nothing, <unk> to a placeholder.
    for i in [i for i in range(V) if table[i].startswith(b"\xff") and (i >= tok.n_pieces or not sp.IsByte(i))]:
        assert tok.decode([nul, i]) == ("\x00 \u2047 " if i == 0 else "\x00"), i


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 中文,{}\":\n\t<n>|_é😀ＡＢ1")), max_size=30))
def test_encode_bytes_joins_to_exactly_the_text(chatglm_tiny, text):
    tok = chatglm_tiny.tokenizer
    table = tok.token_bytes()
    ids = tok.encode_bytes(text.encode())
    assert b"".join(table[i] for i in ids) == text.encode()
    if "<" not in text and not text.startswith(" ") and "Ａ" not in text and "Ｂ" not in text:
        # the tokenizer's own segmentation; and joined bytes are what decode gives (ids that spell "<n>"
        # are rewritten; the leading space of a text and the normaliser's folding are the tokenizer's own)
        assert tok.decode(ids) == text


def test_encode_bytes_keeps_the_tokenizers_segmentation(chatglm_tiny):
    tok = chatglm_tiny.tokenizer
    # sentencepiece would put its dummy-prefix space in front ("▁{\"", bytes b' {"'), which is not the text
    assert tok.encode_bytes(b'{"') == [tok.sp.PieceToId('{"')]
    assert tok.encode_bytes("中文,好".encode()) == tok.encode("中文,好", add_special_tokens=False)[1:]  # no "▁"
    assert tok.encode_bytes(b"a ") == [tok.sp.PieceToId("a"), tok.sp.PieceToId("\u2581")]
