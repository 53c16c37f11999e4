"""A quantized lm_head tied to the embedding (as ChatGLM-6B ties them): quantize-on-load, save, reload."""

import json
import shutil

import pytest
import torch
from quant_ckpt import FIXTURES

import glm
from glm.quant import QuantEmbedding, QuantLinear, sqnr

IDS = [124, 12, 97, 937, 970, 966, 831, 1001, 1004]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """glm-tiny with `tie_word_embeddings`: the loader then takes lm_head from the embedding table."""
    d = tmp_path_factory.mktemp("tied") / "glm-tiny-tied"
    shutil.copytree(FIXTURES / "glm-tiny", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("kw", [dict(quant=4), dict(quant=8), dict(quant=4, group_size=32)])
def test_quantized_tied_head_looks_the_embedding_up_in_it(tied, tmp_path, kw):
    flt = glm.load(tied)
    m = glm.load(tied, quantize_lm_head=True, **kw)
    head, emb = m.model.lm_head, m.model.word_embeddings
    assert isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding) and emb.head is head
    assert "word_embeddings.weight" not in m.model.state_dict()
    ids = torch.tensor(IDS)
    assert torch.equal(emb(ids), head.dequantized_weight()[ids])
    assert sqnr(flt.logits(IDS), m.logits(IDS)) > (25 if kw["quant"] == 8 else 8)

    again = glm.load(glm.save(m, tmp_path / "q"))
    assert isinstance(again.model.word_embeddings, QuantEmbedding)
    a, b = m.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(m.logits(IDS), again.logits(IDS))


def test_float_tied_head_is_still_saved_once(tied, tmp_path):
    m = glm.load(tied, quant=4)
    assert m.model.lm_head.weight is m.model.word_embeddings.weight
    from safetensors.torch import load_file

    saved = load_file(str(glm.save(m, tmp_path / "q") / "model.safetensors"))
    assert "lm_head.weight" not in saved and "transformer.word_embeddings.weight" in saved


def test_tied_head_of_a_stored_quantized_checkpoint_is_quantized_on_request(tied, tmp_path):
    """As the -int4 release: blocks stored int4, the head float and tied; quantize_lm_head quantizes it on load."""
    stored = glm.save(glm.load(tied, quant=4), tmp_path / "q")
    m = glm.load(stored, quantize_lm_head=True)
    ref = glm.load(tied, quant=4, quantize_lm_head=True)
    assert isinstance(m.model.word_embeddings, QuantEmbedding) and m.model.word_embeddings.head is m.model.lm_head
    a, b = m.model.state_dict(), ref.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(m.logits(IDS), ref.logits(IDS))
