import pytest
from glm_testutil import golden

from glm.tokenizer import StreamDecoder

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
