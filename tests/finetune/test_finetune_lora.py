"""LoRA as the trainable part: the loss and every factor's gradient against PEFT on the reference model."""

import json

import pytest
from finetune_cases import BASE, GRAD_RTOL, LOSS_TOL
from finetune_cases import G as TRAIN_G
from glm_testutil import FIXTURES

import glm
from glm.finetune import lora_parameters, ptuning_loss, training_loss

LORA = FIXTURES / "chatglm-tiny-lora"


def test_loss_and_gradients_match_peft():
    from safetensors.torch import load_file

    g = json.loads((LORA / "golden.json").read_text())["train"]
    gt = load_file(str(LORA / "golden.safetensors"))
    m = glm.load(BASE, lora=LORA / "adapter")
    params = lora_parameters(m)
    assert sorted(params) == sorted(g["grads"])
    assert not any(p.requires_grad for n, p in m.model.named_parameters() if "lora_" not in n)
    loss = training_loss(m, TRAIN_G["input_ids"], TRAIN_G["labels"])
    assert abs(loss.item() - g["loss"]) <= LOSS_TOL
    loss.backward()
    for key, name in g["grads"].items():
        ref, got = gt[name], params[key].grad
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= GRAD_RTOL, key
    assert ptuning_loss is training_loss


def test_lora_parameters_needs_an_adapter():
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora_parameters(glm.load(BASE))
