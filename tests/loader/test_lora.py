"""LoRA adapters as PEFT saves them: the logits and greedy ids of the PEFT-made fixture, merging, saving, and every
kind of bad adapter as a one-line error."""

import json
import shutil

import pytest
import torch
from glm_testutil import FIXTURES

import glm
from glm.errors import CheckpointError

TOL = 1e-4
LORA = FIXTURES / "chatglm-tiny-lora"
ADAPTER = LORA / "adapter"
G = json.loads((LORA / "golden.json").read_text())


def _gt():
    from safetensors.torch import load_file

    return load_file(str(LORA / "golden.safetensors"))


@pytest.fixture(scope="module")
def with_lora():
    return glm.load(FIXTURES / "chatglm-tiny", lora=ADAPTER)


@pytest.mark.parametrize("case", G["prompts"], ids=lambda c: c["text"][:12])
def test_logits_and_greedy_ids_match_peft_on_the_reference(with_lora, case):
    gt = _gt()
    assert with_lora.tokenizer.encode(case["text"]) == case["ids"]
    lg = with_lora.logits(case["ids"])
    assert lg.argmax(-1).tolist() == case["argmax"]
    assert (lg[-2:] - gt[case["logits_last2"]]).abs().max().item() <= TOL
    n = len(case["greedy_new_ids"])
    assert with_lora.generate(case["ids"], n, stop_at_eos=False) == case["greedy_new_ids"]


def test_the_adapter_changes_the_logits():  # a test that would pass with the adapter ignored would prove nothing
    base = glm.load(FIXTURES / "chatglm-tiny")
    case = G["prompts"][0]
    assert (base.logits(case["ids"])[-2:] - _gt()[case["logits_last2"]]).abs().max().item() > 10 * TOL


def test_merged_at_load_and_saved_merged_give_the_same_logits(with_lora, tmp_path):
    ids = G["prompts"][1]["ids"]
    ref = with_lora.logits(ids)
    merged = glm.load(FIXTURES / "chatglm-tiny", lora=ADAPTER, merge_lora=True)
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    assert (merged.logits(ids) - ref).abs().max().item() <= TOL
    m = glm.load(FIXTURES / "chatglm-tiny", lora=ADAPTER)
    with pytest.raises(ValueError, match="merge_lora=True"):
        m.save(tmp_path / "x")
    glm.save(m, tmp_path / "merged", merge_lora=True)
    back = glm.load(tmp_path / "merged")
    assert (back.logits(ids) - ref).abs().max().item() <= TOL


def test_a_quantized_base_keeps_the_adapter_unmerged():
    m = glm.load(FIXTURES / "chatglm-tiny", quant=8, lora=ADAPTER)
    qkv = m.model.layers[0].attention.query_key_value
    assert type(qkv).__name__ == "LoRALinear" and type(qkv.base).__name__ == "QuantLinear"
    base = glm.load(FIXTURES / "chatglm-tiny", quant=8)
    ids = G["prompts"][0]["ids"]
    gt = _gt()[G["prompts"][0]["logits_last2"]]
    # int8 weights move the logits a little; the adapter's update is still there (closer to the golden than base).
    assert (m.logits(ids)[-2:] - gt).abs().max() < (base.logits(ids)[-2:] - gt).abs().max()
    with pytest.raises(ValueError, match="quantized"):
        glm.load(FIXTURES / "chatglm-tiny", quant=8, lora=ADAPTER, merge_lora=True)


def _adapter(tmp_path, **changes):
    d = tmp_path / "adapter"
    shutil.copytree(ADAPTER, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(bias="all"), "bias 'all' is not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_dora=True), "DoRA"),
    (dict(r=0), "r must be a positive number"),
    (dict(lora_alpha=-8), "lora_alpha must be a positive number"),
    (dict(target_modules=["q_proj", "v_proj"]), "target_modules"),
    (dict(peft_type="PREFIX_TUNING"), "peft_type"),
    (dict(base_model_name_or_path="THUDM/chatglm2-6b"), "not ChatGLM-6B v1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_adapters_are_one_line_errors(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message) as e:
        glm.load(FIXTURES / "chatglm-tiny", lora=_adapter(tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_a_regex_target_and_rslora_are_understood(tmp_path):
    from glm.loader.lora import read_adapter_config

    cfg = read_adapter_config(_adapter(tmp_path, target_modules=r".*\.query_key_value", use_rslora=True))
    assert cfg["targets"] == ["query_key_value"] and cfg["scaling"] == pytest.approx(8 / 2)


def test_missing_corrupt_and_mismatched_adapters_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no LoRA adapter folder"):
        glm.load(FIXTURES / "chatglm-tiny", lora=tmp_path / "nope")
    d = _adapter(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        glm.load(FIXTURES / "chatglm-tiny", lora=d)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model"):
        glm.load(FIXTURES / "chatglm-tiny", lora=d)
    from safetensors.torch import load_file, save_file

    t = load_file(str(ADAPTER / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)
    save_file(t, str(d / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="another model size") as e:
        glm.load(FIXTURES / "chatglm-tiny", lora=d)
    assert key in str(e.value)
