"""`quantize_`: which linears are swapped, and the quantized tiny model against the reference's golden logits."""

import json

import pytest
import torch
from quant_ckpt import FIXTURES
from torch import nn

from glm.quant import (
    QuantEmbedding,
    QuantLinear,
    is_quantized_linear_name,
    quantize_,
    quantized_linear_names,
    set_cpu_kernel,
    sqnr,
    tie_quantized_embedding,
)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = nn.Module()
        self.attention.query_key_value = nn.Linear(c, 3 * c)
        self.attention.dense = nn.Linear(c, c)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(c, 4 * c)
        self.mlp.dense_4h_to_h = nn.Linear(4 * c, c)

    def forward(self, x):
        x = x + self.attention.dense(self.attention.query_key_value(x)[..., : x.shape[-1]])
        return x + self.mlp.dense_4h_to_h(torch.relu(self.mlp.dense_h_to_4h(x)))


class _Toy(nn.Module):
    """Named like glm.model.GLM: the block linears, plus an embedding and a head that stay float by default."""

    def __init__(self, c=64, vocab=128, layers=2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, c)
        self.layers = nn.ModuleList(_Block(c) for _ in range(layers))
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.other = nn.Linear(c, c)  # not a checkpoint linear: never quantized

    def forward(self, ids):
        x = self.word_embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x + self.other(x))


def test_names():
    assert quantized_linear_names() == (
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    )
    assert quantized_linear_names(include_lm_head=True)[-1] == "lm_head"
    yes = ["layers.0.attention.query_key_value", "transformer.layers.27.mlp.dense_4h_to_h.weight",
           "layers.3.attention.dense.weight_scale", "layers.3.mlp.dense_h_to_4h.bias"]
    no = ["word_embeddings", "layers.0.attention", "layers.0.attention.rotary_emb.inv_freq",
          "layers.0.input_layernorm.weight", "lm_head", "lm_head.weight", "layers.0.xattention.dense"]
    assert all(is_quantized_linear_name(n) for n in yes)
    assert not any(is_quantized_linear_name(n) for n in no)
    assert is_quantized_linear_name("lm_head", include_lm_head=True)
    assert is_quantized_linear_name("lm_head.weight", include_lm_head=True)


@pytest.mark.parametrize("bits,group_size,min_db", [(8, None, 35), (4, None, 12), (4, 32, 15)])
@pytest.mark.parametrize("include_lm_head", [False, True])
def test_quantize_swaps_the_block_linears_in_place(bits, group_size, min_db, include_lm_head):
    model = _Toy()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = model(ids)
    emb = model.word_embeddings.weight
    assert quantize_(model, bits, group_size, include_lm_head=include_lm_head) is model
    swapped = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expect = {f"layers.{i}.{s}" for i in range(2) for s in quantized_linear_names()}
    assert swapped == expect | ({"lm_head"} if include_lm_head else set())
    assert all(m.bits == bits and m.group_size == group_size for n, m in model.named_modules() if n in swapped)
    assert type(model.other) is nn.Linear and model.word_embeddings.weight is emb
    with torch.no_grad():
        assert sqnr(ref, model(ids)) > min_db


def test_quantize_progress_bar_runs():
    pytest.importorskip("tqdm")
    model = quantize_(_Toy(layers=1), 8, progress=True)
    assert isinstance(model.layers[0].mlp.dense_4h_to_h, QuantLinear)


def _golden(name):
    from safetensors.torch import load_file

    folder = FIXTURES / name
    return json.loads((folder / "golden.json").read_text())["cases"], load_file(str(folder / "golden.safetensors"))


def _last8(case, logits):
    return logits[-8:] if case.get("logits_positions") == "last8" else logits


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tiny_model_reproduces_the_reference_logits(bits):
    """glm-tiny (fp16 weights, run in fp32) quantized by `quantize_` gives the reference int8/int4 logits."""
    import glm

    m = glm.load(FIXTURES / "glm-tiny")
    quantize_(m.model, bits)
    assert sum(isinstance(mod, QuantLinear) for mod in m.model.modules()) == 4 * m.config.num_layers
    cases, tensors = _golden(f"glm-tiny-int{bits}")
    for case in (c for c in cases if "logits" in c):
        ours = _last8(case, m.logits(case["input_ids"]))
        ref = tensors[case["logits"]]
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4, case["logits"]


@pytest.mark.parametrize("cpu_kernel", ["exact", "fast"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tiny_model_in_bf16_uses_the_cpu_kernels(bits, cpu_kernel):
    import glm
    from glm.kernels.cpu_wq import cpu_kernels

    m = glm.load(FIXTURES / "glm-tiny", dtype="bfloat16")
    quantize_(m.model, bits, cpu_kernel=cpu_kernel)
    cases, tensors = _golden(f"glm-tiny-int{bits}")
    case = next(c for c in cases if "logits" in c)
    ours = _last8(case, m.logits(case["input_ids"]))
    chosen = {mod.forward_path for mod in m.model.modules() if isinstance(mod, QuantLinear)}
    if cpu_kernels() is not None and len(case["input_ids"]) <= QuantLinear.exact_max_rows:  # within their row limit
        assert chosen == {f"cpu_{cpu_kernel}"}
    # bf16 through 3 blocks: far from fp32's 1e-4, but the same logits to bf16 accuracy
    assert sqnr(tensors[case["logits"]], ours) > (30 if cpu_kernel == "exact" else 25)


def test_set_cpu_kernel_and_bad_mode():
    model = quantize_(_Toy(layers=1), 4)
    assert {m.cpu_kernel for m in model.modules() if isinstance(m, QuantLinear)} == {"exact"}
    set_cpu_kernel(model, "fast")
    assert {m.cpu_kernel for m in model.modules() if isinstance(m, QuantLinear)} == {"fast"}
    with pytest.raises(ValueError, match="cpu_kernel must be one of"):
        quantize_(_Toy(layers=1), 4, cpu_kernel="quick")


def test_set_cpu_kernel_takes_what_glm_load_returns():
    import glm

    m = glm.load(FIXTURES / "glm-tiny-int4")
    assert set_cpu_kernel(m, "fast") is m
    assert {q.cpu_kernel for q in m.model.modules() if isinstance(q, QuantLinear)} == {"fast"}
    with pytest.raises(TypeError, match="takes a loaded model"):
        set_cpu_kernel("glm-tiny-int4", "fast")


def test_tied_quantized_embedding_replaces_the_float_table():
    model = _Toy()
    ids = torch.randint(0, 128, (2, 7))
    quantize_(model, 4, include_lm_head=True)
    tie_quantized_embedding(model)
    assert isinstance(model.word_embeddings, QuantEmbedding)
    assert "word_embeddings.weight" not in model.state_dict()
    assert torch.equal(model.word_embeddings(ids), model.lm_head.dequantized_weight()[ids])
    with pytest.raises(TypeError, match="quantized lm_head"):
        tie_quantized_embedding(_Toy())
