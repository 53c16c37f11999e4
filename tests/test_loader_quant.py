"""Quantized checkpoints through the loader: the official int8/int4 layout, quantize-on-load, fp16 scales, save."""

import json
import shutil

import pytest
import torch
from glm_testutil import FIXTURES, golden
from hypothesis import given, settings
from hypothesis import strategies as st
from test_config import refused

import glm

pytest.importorskip("glm.quant.linear")
TOL = 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_official_quantized_checkpoint(bits):
    g, gt = golden(f"glm-tiny-int{bits}")
    m = glm.load(FIXTURES / f"glm-tiny-int{bits}")
    assert m.config.quantization_bit == bits
    for case in g["cases"]:
        assert (m.logits(case["input_ids"]) - gt[case["logits"]]).abs().max().item() <= TOL
        assert m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False) == case["greedy_ids"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_reproduces_the_reference_bytes(bits):
    ref = torch.load(FIXTURES / f"glm-tiny-int{bits}" / "pytorch_model.bin", weights_only=True)
    m = glm.load(FIXTURES / "glm-tiny", quant=bits)
    ours = m.model.state_dict()
    n = 0
    for name, t in ref.items():
        if name.endswith((".weight", ".weight_scale")) and t.dtype in (torch.int8, torch.float32) and "layers" in name:
            mod = name.removeprefix("transformer.")
            if mod in ours and (t.dtype == torch.int8 or name.endswith("weight_scale")):
                assert ours[mod].dtype == t.dtype and torch.equal(ours[mod], t), name
                n += 1
    assert n == 3 * 4 * 2  # 3 layers x 4 linears x (weight, scale)
    g, gt = golden(f"glm-tiny-int{bits}")
    for case in g["cases"]:
        assert (m.logits(case["input_ids"]) - gt[case["logits"]]).abs().max().item() <= TOL


def test_fp16_scales_as_in_the_release(tmp_path):
    d = tmp_path / "int4-fp16-scales"
    shutil.copytree(FIXTURES / "glm-tiny-int4", d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd = {k: (v.half() if k.endswith("weight_scale") else v) for k, v in sd.items()}
    torch.save(sd, d / "pytorch_model.bin")
    m = glm.load(d)
    # The float model with weights q * scale_fp16 (scale upcast, never rounded further) is the oracle.
    from glm.quant import dequantize

    flt = glm.load(FIXTURES / "glm-tiny")
    for i, layer in enumerate(flt.model.layers):
        for lin in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            key = f"transformer.layers.{i}.{lin}"
            w = dequantize(sd[key + ".weight"], sd[key + ".weight_scale"], 4)
            layer.get_submodule(lin).weight.data.copy_(w)
    ids = [124, 12, 97, 937, 970, 966, 831, 1001, 1004]
    assert (m.logits(ids) - flt.logits(ids)).abs().max().item() <= TOL
    scales = [b for n, b in m.model.state_dict().items() if n.endswith("weight_scale")]
    assert scales and all(s.dtype == torch.float16 for s in scales)


@pytest.mark.parametrize("kw", [dict(quant=8), dict(quant=4), dict(quant=4, group_size=32)])
def test_save_load_round_trip_is_exact(tmp_path, kw):
    m = glm.load(FIXTURES / "glm-tiny", **kw)
    out = glm.save(m, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_bit"] == kw["quant"] and cfg.get("quantization_group_size") == kw.get("group_size")
    again = glm.load(out)
    a, b = m.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = [801, 456, 1001, 1004]
    assert torch.equal(m.logits(ids), again.logits(ids))


def test_grouped_int4_is_closer_to_float_than_per_channel():
    ids = [124, 12, 97, 937, 970, 966, 831, 1001, 1004]
    ref = glm.load(FIXTURES / "glm-tiny").logits(ids)
    err_pc = (glm.load(FIXTURES / "glm-tiny", quant=4).logits(ids) - ref).abs().mean()
    err_g = (glm.load(FIXTURES / "glm-tiny", quant=4, group_size=32).logits(ids) - ref).abs().mean()
    assert err_g < err_pc


def test_bad_quant_options_are_clear_errors():
    with pytest.raises(ValueError, match="quant must be 4 or 8"):
        glm.load(FIXTURES / "glm-tiny", quant=3)
    with pytest.raises(ValueError, match="group_size"):
        glm.load(FIXTURES / "glm-tiny", quant=8, group_size=32)
    with pytest.raises(glm.CheckpointError, match="already int4"):
        glm.load(FIXTURES / "glm-tiny-int4", quant=8)
    with pytest.raises(ValueError, match="output layer needs quant=4 or 8"):
        glm.load(FIXTURES / "glm-tiny", quantize_lm_head=True)
    with pytest.raises(ValueError, match="cpu_kernel must be"):
        glm.load(FIXTURES / "glm-tiny-int4", cpu_kernel="turbo")
    with pytest.raises(ValueError, match="applies to quantized models"):
        glm.load(FIXTURES / "glm-tiny", cpu_kernel="fast")


@pytest.mark.parametrize("kw", [dict(quant=4), dict()])
def test_fast_cpu_kernel_is_chosen_at_load(kw):
    from glm.quant import QuantLinear, sqnr

    path = FIXTURES / ("glm-tiny" if kw else "glm-tiny-int4")
    m = glm.load(path, cpu_kernel="fast", **kw)
    kernels = {mod.cpu_kernel for mod in m.model.modules() if isinstance(mod, QuantLinear)}
    assert kernels == {"fast"}
    exact = glm.load(path, **kw)
    assert {mod.cpu_kernel for mod in exact.model.modules() if isinstance(mod, QuantLinear)} == {"exact"}
    ids = [801, 456, 1001, 1004]
    # int8 activations are not exact (about 44 dB here): held to the 35 dB the kernel's own test asks of them.
    assert sqnr(exact.logits(ids), m.logits(ids)) > 35


@pytest.mark.parametrize("bits", [8, 4])
def test_head_of_an_official_quantized_checkpoint_is_quantized_on_request(tmp_path, bits):
    """The -int4/-int8 releases keep lm_head in fp16; quantize_lm_head quantizes it with the blocks' bits as it is
    read, exactly as quantizing the float checkpoint with its head would."""
    from glm.quant import QuantLinear

    m = glm.load(FIXTURES / f"glm-tiny-int{bits}", quantize_lm_head=True)
    ref = glm.load(FIXTURES / "glm-tiny", quant=bits, quantize_lm_head=True)
    assert isinstance(m.model.lm_head, QuantLinear) and m.config.quantize_lm_head
    a, b = m.model.lm_head.state_dict(), ref.model.lm_head.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = [801, 456, 1001, 1004]
    again = glm.load(glm.save(m, tmp_path / "q"))
    assert again.config.quantize_lm_head and torch.equal(m.logits(ids), again.logits(ids))


def test_quantized_lm_head(tmp_path):
    m = glm.load(FIXTURES / "glm-tiny", quant=8, quantize_lm_head=True)
    from glm.quant import QuantLinear

    assert isinstance(m.model.lm_head, QuantLinear)
    again = glm.load(glm.save(m, tmp_path / "q"))
    assert isinstance(again.model.lm_head, QuantLinear)
    ids = [801, 456, 1001, 1004]
    assert torch.equal(m.logits(ids), again.logits(ids))


# ---------------------------------------------------------------------------------------------------- damaged input

QUANT_STATE = {bits: torch.load(FIXTURES / f"glm-tiny-int{bits}" / "pytorch_model.bin", weights_only=True)
               for bits in (8, 4)}


def _quant_copy(tmp_path, bits, sd):
    d = tmp_path / f"int{bits}"
    shutil.copytree(FIXTURES / f"glm-tiny-int{bits}", d)
    torch.save(sd, d / "pytorch_model.bin")
    return d


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([8, 4]), data=st.data())
def test_quantized_tensors_of_the_wrong_dtype(tmp_path_factory, bits, data):
    sd = dict(QUANT_STATE[bits])
    names = sorted(k for k in sd if k.endswith((".weight", ".weight_scale")) and "layers" in k
                   and "layernorm" not in k)
    name = data.draw(st.sampled_from(names))
    if sd[name].dtype == torch.int8:  # a quantized weight: anything but int8 is wrong
        dtype = data.draw(st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.float16, torch.float32]))
        want = "torch.int8"
    else:  # a scale: must be floating point
        dtype = data.draw(st.sampled_from([torch.int8, torch.int32, torch.bool]))
        want = "floating point"
    sd[name] = sd[name].to(dtype)
    msg = refused(glm.CheckpointError, glm.load, _quant_copy(tmp_path_factory.mktemp("q"), bits, sd))
    assert name in msg and want in msg


def test_int8_checkpoint_without_quantization_bit_says_so(tmp_path):
    d = tmp_path / "int8"
    shutil.copytree(FIXTURES / "glm-tiny-int8", d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_bit"]
    (d / "config.json").write_text(json.dumps(cfg))
    msg = refused(glm.CheckpointError, glm.load, d)
    assert "is torch.int8 but must be floating point" in msg and "quantization_bit" in msg
    cfg["quantization_bit"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    assert glm.load(d).config.quantization_bit == 8  # the repaired copy loads


@pytest.mark.parametrize("kw", [dict(quantization_bit=3), dict(quantization_bit=True), dict(quantization_bit="4"),
                                dict(quantization_bit=8, quantization_group_size=32), dict(quantization_group_size=48)])
def test_bad_quantization_settings_in_config(tmp_path, kw):
    d = tmp_path / "int4"
    shutil.copytree(FIXTURES / "glm-tiny-int4", d)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **kw}))
    field = "quantization_group_size" if "quantization_group_size" in kw else "quantization_bit"
    assert field in refused(glm.ConfigError, glm.load, d)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_from_the_stored_values_whatever_the_dtype(bits):
    """The fp16 checkpoint is quantized from its fp16 values, as the official quantizer does, not from a bfloat16
    rounding of them: the int8/int4 weights are the same whatever dtype the model runs in."""
    from glm.quant import QuantLinear

    def weights(dtype):
        m = glm.load(FIXTURES / "glm-tiny", dtype=dtype, quant=bits)
        return {n: mod.packed_weight() for n, mod in m.model.named_modules() if isinstance(mod, QuantLinear)}

    a, b = weights("float32"), weights("bfloat16")
    assert a.keys() == b.keys() and a and all(torch.equal(a[n], b[n]) for n in a)
