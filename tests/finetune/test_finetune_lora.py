"""LoRA as the trainable part: the loss and every factor's gradient against PEFT on the reference model."""

import json

import pytest
import torch
from finetune_cases import BASE, GRAD_RTOL, LOSS_TOL, TRAIN
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


def _prompt(i: int) -> list[int]:
    """Row i of the golden rows up to its <sop>: a generation prompt."""
    ids = TRAIN_G["input_ids"][i]
    return ids[: ids.index(130004) + 1]


def _train_lora(out, steps=3, seed=0):
    """A fresh rank-4 adapter on query_key_value and dense, trained `steps` steps on the golden rows; the model."""
    from glm.finetune import TrainConfig, add_lora, train

    m = glm.load(BASE)
    add_lora(m, 4, alpha=8, dropout=0.1, targets=("dense", "query_key_value"), seed=seed)
    train(m, TRAIN_G["input_ids"], TRAIN_G["labels"], TrainConfig(learning_rate=0.05, batch_size=4,
          gradient_accumulation_steps=1, max_steps=steps, save_steps=steps, logging_steps=1), out)
    return m


def test_new_factors_are_initialised_as_peft_does(chatglm_tiny):
    from glm.finetune import add_lora
    from glm.lora import lora_modules

    m, again = glm.load(BASE), glm.load(BASE)
    add_lora(m, 4, seed=3)
    add_lora(again, 4, seed=3)
    mods = lora_modules(m.model)
    assert sorted(mods) == ["layers.0.attention.query_key_value", "layers.1.attention.query_key_value"]
    for name, mod in mods.items():
        a, b = mod.lora_A, mod.lora_B
        bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert a.shape == (4, 16) and b.shape == (48, 4) and mod.scaling == 2.0  # PEFT's lora_alpha default, 8
        assert a.abs().max() <= bound and a.abs().max() > bound / 2 and not b.any()
        assert torch.equal(a, lora_modules(again.model)[name].lora_A)  # seeded
    ids = _prompt(0)
    assert torch.equal(m.logits(ids), chatglm_tiny.logits(ids))  # B = 0: the update starts at nothing


def test_trained_adapter_saves_in_peft_layout_and_loads_back_exactly(tmp_path, chatglm_tiny):
    from safetensors.torch import load_file

    m = _train_lora(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    peft = load_file(str(LORA / "adapter" / "adapter_model.safetensors"))
    assert set(peft) < set(saved) and {k.replace("query_key_value", "dense") for k in peft} < set(saved)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(cfg) == set(json.loads((LORA / "adapter" / "adapter_config.json").read_text()))
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"]) == \
        (4, 8, 0.1, ["query_key_value", "dense"])
    assert (tmp_path / "a" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    ids = _prompt(2) + [TRAIN_G["input_ids"][2][len(_prompt(2))]]  # and a token of the reply
    back = glm.load(BASE, lora=tmp_path / "a")
    assert torch.equal(back.logits(ids), m.logits(ids))
    assert not torch.equal(back.logits(ids), chatglm_tiny.logits(ids))  # it trained
    # The base is untouched: only the factors trained.
    fresh = dict(chatglm_tiny.model.named_parameters())
    assert all(torch.equal(p, fresh[n.replace(".base.", ".")]) for n, p in m.model.named_parameters()
               if "lora_" not in n)
    # Fixed seeds: the same run again gives the same adapter, bit for bit.
    _train_lora(tmp_path / "b")
    again = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_cli_trains_lora_on_an_int4_base_and_resumes(tmp_path, capsys):
    from safetensors.torch import load_file

    from glm.finetune.cli import main

    common = ["--model", str(BASE), "--quant", "4", "--train-file", str(TRAIN / "train.json"),
              "--max-source-length", "24", "--max-target-length", "8", "--batch-size", "4",
              "--gradient-accumulation-steps", "1", "--save-steps", "1", "--learning-rate", "0.05"]
    assert main([*common, "--lora-rank", "4", "--lora-alpha", "16", "--max-steps", "2",
                 "--output-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "LoRA adapter" in err and err.strip().splitlines()[-1].endswith(f"--quant 4 --lora {tmp_path / 'a'}")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_alpha"] == 16
    assert main([*common, "--resume", str(tmp_path / "a" / "checkpoint-1"), "--max-steps", "2",
                 "--output-dir", str(tmp_path / "b")]) == 0
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
