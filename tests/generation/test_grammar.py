"""Constrained decoding (json_schema, glm.generation.grammar): every reply parses and validates, on many schema
shapes, with sampling on the tiny model with the real vocabulary; constrained and free rows share a batch; logprobs
stay the model's; pieces never spell out a whitespace piece's name."""

import json
import re

import pytest

from glm.engine import ChatGLM
from glm.errors import GenerationError
from glm.generation import GenerationConfig

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")


def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def _int(lo, hi):
    return {"type": "integer", "minimum": lo, "maximum": hi}


# Bounded shapes: a random model finishes each of them (strings are bounded by length, pattern or enum).
SCHEMAS = [
    {"type": "boolean"},
    {"type": "null"},
    {"enum": ["red", "green", "blue"]},
    {"const": {"ok": True}},
    _int(-5, 5),
    _int(100, 999),
    {"type": "string", "maxLength": 6},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
    {"type": "string", "pattern": "^\\d{3}-\\d{4}$"},
    {"type": "string", "format": "date"},
    {"type": "string", "enum": ["是", "否"]},
    {"type": ["string", "null"], "maxLength": 4},
    {"anyOf": [_int(0, 9), {"type": "string", "maxLength": 3}]},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 3},
    {"type": "array", "prefixItems": [_int(0, 9), {"enum": ["x", "y"]}], "items": False},
    _obj({"a": {"type": "boolean"}}),
    _obj({"name": {"type": "string", "maxLength": 8}, "age": _int(0, 120)}),
    _obj({"point": _obj({"x": _int(0, 99), "y": _int(0, 99)})}),
    _obj({"tags": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z]{1,3}$"}, "maxItems": 3}}),
    _obj({"kind": {"enum": ["cat", "dog"]}, "legs": {"const": 4}}),
    _obj({"id": _int(1, 50), "email": {"type": "string", "pattern": "^[a-z]{1,4}@[a-z]{1,4}\\.com$"}}),
    _obj({"matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                     "items": {"type": "array", "items": _int(0, 1), "minItems": 2, "maxItems": 2}}}),
    _obj({"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 5}}, required=["ok"]),
]
# Shapes without a bound on their length (digits of a number, depth of a tree): a random model may run out.
UNBOUNDED = [
    {"type": "number", "minimum": 0, "maximum": 1},
    _obj({"price": {"type": "number", "minimum": 0, "maximum": 100}, "currency": {"enum": ["EUR", "USD"]}}),
    {"$defs": {"node": _obj({"v": _int(0, 9), "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                       "maxItems": 1}})}, "$ref": "#/$defs/node"},
]
MAX_NEW = 40


@pytest.fixture(scope="module")
def pool(chatglm_tiny):
    """chatglm-tiny's weights with 8 cache rows."""
    return ChatGLM(chatglm_tiny.model, chatglm_tiny.tokenizer, chatglm_tiny.path, max_batch=8)


def sampled(schema, seed, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0, seed=seed, json_schema=schema,
                            **kw)


def compact(text: str) -> bool:
    """No whitespace between JSON tokens (strings taken out)."""
    return not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text))


def test_every_reply_parses_and_validates(pool):
    ids = pool.tokenizer.encode("hi")
    eos = pool.config.eos_token_id
    cases = [(s, seed) for s in SCHEMAS + UNBOUNDED for seed in (1, 2)]
    reqs = [pool.submit(ids, sampled(s, seed)) for s, seed in cases]  # 8 rows at a time, the rest wait
    ends = {}
    for (schema, seed), r in zip(cases, reqs):
        toks = list(r)
        text, reason = pool.tokenizer.decode(toks), r.result.finish_reason
        ends[reason] = ends.get(reason, 0) + 1
        if reason == "length":  # the budget ran out first: only an unbounded shape may do so
            assert schema in UNBOUNDED and len(toks) == MAX_NEW, (schema, text)
            continue
        assert reason == "stop", (schema, seed, text)
        jsonschema.validate(json.loads(text), schema)
        assert compact(text), text
        assert toks[-1] == eos  # once the JSON is complete, the mask allows only the end
    assert ends.get("stop", 0) >= len(SCHEMAS) * 2


def test_constrained_and_free_rows_share_a_batch(pool):
    ids = pool.tokenizer.encode("你好")
    schema = SCHEMAS[17]
    configs = [sampled(schema, 1), GenerationConfig(max_new_tokens=12), sampled(schema, 2),
               GenerationConfig(max_new_tokens=12, do_sample=True, seed=3), sampled(None, 4)]
    alone = [list(pool.submit(ids, c)) for c in configs]
    together = [list(r) for r in [pool.submit(ids, c) for c in configs]]
    assert together == alone
    for j in (0, 2):
        jsonschema.validate(json.loads(pool.tokenizer.decode(alone[j])), schema)
    with pytest.raises(ValueError):  # the free rows were not constrained
        json.loads(pool.tokenizer.decode(alone[1]))


def test_json_completed_by_the_last_token_allowed_is_a_stop(pool):
    ids = pool.tokenizer.encode("hi")
    full = list(pool.submit(ids, sampled(SCHEMAS[17], 1)))  # ends with <eop>
    for n, reason in ((len(full) - 1, "stop"), (len(full) - 2, "length")):
        r = pool.submit(ids, sampled(SCHEMAS[17], 1).replace(max_new_tokens=n))
        assert list(r) == full[:n] and r.result.finish_reason == reason


def test_logprobs_are_the_models_before_the_mask(pool):
    ids = pool.tokenizer.encode("hi")
    r = pool.submit(ids, GenerationConfig(max_new_tokens=MAX_NEW, json_schema=SCHEMAS[17], logprobs=3))
    toks = list(r)
    lp = pool.logits(ids + toks[:-1])[len(ids) - 1:].float().log_softmax(-1)  # (len(toks), V)
    for k, (t, got) in enumerate(zip(toks, r.logprobs)):
        assert got.logprob == pytest.approx(lp[k, t].item(), abs=1e-4)
        assert [a for a, _ in got.top] == lp[k].topk(3).indices.tolist()
    # the mask chose tokens the unconstrained model would not: their logprobs are below the best ones'
    assert any(got.logprob < got.top[0][1] - 1e-3 for got in r.logprobs)


def test_pieces_never_spell_a_whitespace_piece(pool):
    """`<` then `n` then `>` decode to a newline, which a JSON string cannot hold: a constrained reply never joins
    them, even where the grammar allows it and the scores push hard for it."""
    schema = {"type": "string", "pattern": "^<n[>x]$"}
    push = {pool.tokenizer.sp.PieceToId(">"): 100}
    ids = pool.submit(pool.tokenizer.encode("hi"), GenerationConfig(max_new_tokens=8, json_schema=schema,
                                                                    logit_bias=push))
    assert pool.tokenizer.decode(list(ids)) == '"<nx"'
    assert pool.tokenizer.decode(pool.tokenizer.encode_bytes(b'"<n>"')) == '"\n"'  # what it would have been


def test_a_chat_reply_under_a_schema_is_not_post_processed(pool):
    # process_response would turn "好," into "好，" (full-width next to CJK), which this schema does not allow
    schema = {"type": "string", "pattern": "^好,$"}
    reply, history = pool.chat("hi", json_schema=schema, max_length=64)
    assert reply == '"好,"' and history[-1][1] == reply
    assert list(pool.stream_chat("hi", json_schema=schema, max_length=64))[-1][0] == reply  # <eop> is skipped


@pytest.mark.parametrize("schema, why", [
    ({"type": "strin"}, "cannot be enforced"),
    ([1], "must be a JSON Schema"),
    ({"x": {1, 2}}, "must be JSON data"),
])
def test_bad_schemas_are_refused(pool, schema, why):
    with pytest.raises(GenerationError, match=why):
        pool.generate(pool.tokenizer.encode("hi"), 4, json_schema=schema)
    with pytest.raises(GenerationError, match="stop_at_eos"):
        GenerationConfig(json_schema={}, stop_at_eos=False)
