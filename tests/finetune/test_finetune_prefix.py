"""glm.finetune.prefix: the prefix encoder that trains (dropout in training only) and its saved layout."""

import json

import torch
from finetune_cases import BASE, TRAIN, G

import glm
from glm.loader import save_prefix


def test_prefix_dropout_only_in_training_mode():
    m = glm.load(BASE, ptuning=TRAIN / "prefix-mlp")
    enc = m.model.prefix_encoder
    with torch.no_grad():
        assert torch.equal(enc(torch.float32), enc(torch.float32))
        enc.train()
        a, b = enc(torch.float32), enc(torch.float32)
        enc.eval()
    assert not torch.equal(a, b)
    zeros = (a == 0).float().mean().item()
    assert 0.02 < zeros < 0.25  # dropout p = 0.1: a wide statistical band (it only shows dropout is on in training)


def test_saved_prefix_is_the_official_layout_and_reloads(tmp_path):
    m = glm.load(BASE, ptuning=TRAIN / "prefix-mlp")
    save_prefix(m.model, tmp_path, base_folder=m.path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    official = torch.load(TRAIN / "prefix-mlp" / "pytorch_model.bin", weights_only=True)
    assert sorted(state) == sorted(official)
    assert all(torch.equal(state[k], official[k].float()) for k in state)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["pre_seq_len"] == 4 and cfg["prefix_projection"] is True
    assert cfg["auto_map"] == json.loads((BASE / "config.json").read_text())["auto_map"]  # the base's config
    again = glm.load(BASE, ptuning=tmp_path)
    assert torch.equal(again.logits(G["input_ids"][1][:9]), m.logits(G["input_ids"][1][:9]))


def test_a_nan_prefix_is_refused_as_broken(tmp_path):
    import pytest

    from glm.errors import CheckpointError

    state = torch.load(TRAIN / "prefix" / "pytorch_model.bin", weights_only=True)
    torch.save({k: torch.full_like(v.float(), float("nan")) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((TRAIN / "prefix" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds NaN or inf values: it is broken"):
        glm.load(BASE, ptuning=tmp_path)
