"""GLMConfig as a schema: every bad config.json is a one-line ConfigError naming the field; good ones still load."""

import json
import math
import shutil

import pytest
from glm_testutil import FIXTURES, golden
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import glm
from glm.config import BOOLS, LIMITS, PRESETS, TOKEN_IDS, ConfigError, GLMConfig

FAST = settings(max_examples=30, deadline=None)
BASE = json.loads((FIXTURES / "glm-tiny" / "config.json").read_text())
G, GT = golden("glm-tiny")
CASE = G["cases"][1]

# The release's own config.json (THUDM/chatglm-6b), null pre_seq_len included.
RELEASE = {
    "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"], "bos_token_id": 130004,
    "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3,
    "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048,
    "model_type": "chatglm", "num_attention_heads": 32, "num_layers": 28, "position_encoding_2d": True,
    "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False, "torch_dtype": "float16",
    "transformers_version": "4.27.1", "use_cache": True, "vocab_size": 130528,
}


def refused(exc_type, fn, *args, **kwargs) -> str:
    """Call `fn`, which must raise `exc_type` with a one-line message; return the message."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    return msg


def still_loads(folder):
    """Restore a good config.json in `folder`: the checkpoint loads and reproduces the golden logits."""
    (folder / "config.json").write_text(json.dumps(BASE))
    m = glm.load(folder)
    assert (m.logits(CASE["input_ids"]) - GT[CASE["logits"]]).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A copy of glm-tiny whose config.json the tests overwrite (the fixture itself is never touched)."""
    d = tmp_path_factory.mktemp("cfg") / "glm-tiny"
    shutil.copytree(FIXTURES / "glm-tiny", d)
    return d


def with_(**kw):
    return {**BASE, **kw}


# Values of the wrong JSON type for an integer field (floats included: 28.0 is not a layer count).
NOT_INT = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
                    st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


def test_release_fixture_and_preset_configs_are_valid():
    for name in ("glm-tiny", "glm-tiny-int4", "glm-tiny-int8", "glm-tiny-ptuning", "chatglm-tiny"):
        GLMConfig.from_json(FIXTURES / name / "config.json")
    for name in PRESETS:
        GLMConfig.from_name(name)
    c = GLMConfig.from_dict(RELEASE)
    assert (c.num_layers, c.head_dim, c.pre_seq_len) == (28, 128, None)
    assert GLMConfig.from_dict(with_(quantization_bit=4, quantization_group_size=32)).quantization_group_size == 32


@pytest.mark.parametrize("field", [*LIMITS, *TOKEN_IDS])
@FAST
@given(data=st.data())
def test_integer_fields_refuse_wrong_types_and_out_of_range_values(field, data):
    lo, hi = (0, BASE["vocab_size"] - 1) if field in TOKEN_IDS else (1, LIMITS[field])
    bad = st.one_of(NOT_INT, st.integers(max_value=lo - 1), st.integers(min_value=hi + 1),
                    st.integers(min_value=10**12, max_value=10**40))
    value = data.draw(bad.filter(lambda v: not (field == "pre_seq_len" and v is None)))  # null: no prefix
    msg = refused(ConfigError, GLMConfig.from_dict, with_(**{field: value}))
    assert field in msg and "config.json" in msg


def test_absurd_sizes_are_refused_before_anything_is_built(ckpt):
    for field, value in [("num_layers", 10**12), ("vocab_size", 10**15), ("hidden_size", 2**40),
                         ("max_sequence_length", 10**9), ("inner_hidden_size", 10**10), ("pre_seq_len", 10**8)]:
        (ckpt / "config.json").write_text(json.dumps(with_(**{field: value})))
        assert "config.json" in refused(ConfigError, glm.load, ckpt)
    still_loads(ckpt)


@FAST
@given(hidden=st.integers(1, 2048), heads=st.integers(1, 64))
def test_heads_split_hidden_into_head_dims_divisible_by_4(hidden, heads):
    d = with_(hidden_size=hidden, num_attention_heads=heads)
    if hidden % heads == 0 and (hidden // heads) % 4 == 0:
        assert GLMConfig.from_dict(d).head_dim * heads == hidden
    else:
        msg = refused(ConfigError, GLMConfig.from_dict, d)
        assert "num_attention_heads" in msg or "head_dim" in msg


def test_head_dim_examples():
    assert "divisible by num_attention_heads" in refused(ConfigError, GLMConfig.from_dict, with_(hidden_size=100))
    assert "multiple of 4" in refused(ConfigError, GLMConfig.from_dict, with_(hidden_size=48))  # head_dim 6


@pytest.mark.parametrize("field", BOOLS)
@FAST
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=4), st.lists(st.booleans(), max_size=2)))
def test_flags_must_be_json_booleans(field, value):
    assert field in refused(ConfigError, GLMConfig.from_dict, with_(**{field: value}))


@pytest.mark.parametrize("kw,msg", [
    (dict(position_encoding_2d=False), "ChatGLM2"),
    (dict(quantization_embeddings=True), "quantization_embeddings"),
    (dict(quantize_lm_head=True), "quantize_lm_head"),
    (dict(eos_token_id=1004), "must differ"),
    (dict(gmask_token_id=1000), "must differ"),
    (dict(quantization_bit=4, inner_hidden_size=511), "even"),
    (dict(model_type="llama"), "unsupported architecture"),
    (dict(architectures=["LlamaForCausalLM"]), "unsupported architecture"),
    (dict(architectures="ChatGLMModel"), "architectures"),
    (dict(architectures=[1]), "architectures"),
    (dict(model_type=None), "model_type"),
    (dict(torch_dtype=16), "torch_dtype"),
    (dict(padded_vocab_size=65024), "ChatGLM2"),
])
def test_impossible_combinations(kw, msg):
    assert msg in refused(ConfigError, GLMConfig.from_dict, with_(**kw))


@FAST
@given(eps=st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(max_value=0), st.floats(min_value=1),
                     st.just(math.nan), st.just(math.inf), st.integers()))
def test_layernorm_epsilon_must_be_a_small_positive_number(eps):
    assert "layernorm_epsilon" in refused(ConfigError, GLMConfig.from_dict, with_(layernorm_epsilon=eps))


@FAST
@given(bits=st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=2)))
def test_quantization_bit_is_0_4_or_8(bits):
    if type(bits) is int and bits in (0, 4, 8):
        assert GLMConfig.from_dict(with_(quantization_bit=bits)).quantization_bit == bits
    else:
        assert "quantization_bit" in refused(ConfigError, GLMConfig.from_dict, with_(quantization_bit=bits))


@FAST
@given(bits=st.sampled_from([0, 4, 8]), gs=st.one_of(st.integers(-4, 700), st.floats(1, 64), st.booleans()))
def test_group_size_needs_int4_and_must_divide_both_widths(bits, gs):
    d = with_(quantization_bit=bits, quantization_group_size=gs)
    if type(gs) is int and bits == 4 and gs >= 1 and 128 % gs == 0 and 512 % gs == 0:
        assert GLMConfig.from_dict(d).quantization_group_size == gs
    else:
        assert "quantization_group_size" in refused(ConfigError, GLMConfig.from_dict, d)


@FAST
@given(d=st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)))
def test_config_must_be_a_json_object(d):
    assert "JSON object" in refused(ConfigError, GLMConfig.from_dict, d)


@pytest.mark.parametrize("data", [
    b"", b"not json", b"\xff\xfe\x00{", b'{"num_layers": 3', b"[1, 2]", b'"config"', b"null", b"42",
    b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to exhaust the parser's recursion
    b'{"num_layers": 1' + b"0" * 5000 + b"}",  # an integer literal too long for Python to read
    b'{"num_layers": 3, "pad": "' + b"x" * (2 << 20) + b'"}',  # too big to be a config
], ids=["empty", "text", "not-utf8", "truncated", "list", "string", "null", "number", "deep", "long-int", "huge"])
def test_config_files_that_are_not_json_objects(ckpt, data):
    (ckpt / "config.json").write_bytes(data)
    assert "config.json" in refused(ConfigError, GLMConfig.from_json, ckpt / "config.json")
    assert "config.json" in refused(ConfigError, glm.load, ckpt)
    still_loads(ckpt)


@settings(max_examples=20, deadline=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_as_config_json(tmp_path_factory, data):
    try:
        assume(not isinstance(json.loads(data), dict))  # "{}" and the like are valid (all defaults)
    except ValueError:
        pass
    p = tmp_path_factory.mktemp("bytes") / "config.json"
    p.write_bytes(data)
    refused(ConfigError, GLMConfig.from_json, p)


def test_unreadable_and_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    assert "cannot read" in refused(ConfigError, glm.load, ckpt)
    (ckpt / "config.json").rmdir()
    assert "no config.json" in refused(ConfigError, GLMConfig.from_json, ckpt / "config.json")
    still_loads(ckpt)


def test_messages_stay_on_one_line_whatever_the_path(tmp_path):
    d = tmp_path / "two\nlines\u2028here"
    d.mkdir()
    (d / "config.json").write_text("{")
    msg = refused(ConfigError, GLMConfig.from_json, d / "config.json")
    assert "two\\nlines\\u2028here" in msg


def test_prefix_projection_is_accepted():
    assert GLMConfig.from_dict(with_(pre_seq_len=4, prefix_projection=True)).prefix_projection is True
