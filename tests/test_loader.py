import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from glm_testutil import FIXTURES, golden

import glm
from glm.loader import WEIGHT_MAP, checkpoint_to_module, module_to_checkpoint

G, GT = golden("glm-tiny")
CASE = G["cases"][1]
ROOT = Path(__file__).resolve().parents[1]


def _state():
    sd = {}
    for f in sorted((FIXTURES / "glm-tiny").glob("pytorch_model-*.bin")):
        sd.update(torch.load(f, weights_only=True))
    return sd


def _folder(tmp_path, state=None, config=None, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    cfg = json.loads((FIXTURES / "glm-tiny" / "config.json").read_text())
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    if state is not None:
        torch.save(state, d / "pytorch_model.bin")
    return d


def _check(m):
    assert (m.logits(CASE["input_ids"]) - GT[CASE["logits"]]).abs().max().item() <= 1e-4


def test_weight_map_is_a_bijection_on_used_names():
    used = {k: v for k, v in WEIGHT_MAP.items() if v}
    assert len(set(used.values())) == len(used)
    assert checkpoint_to_module("transformer.layers.27.mlp.dense_4h_to_h.bias") == "layers.27.mlp.dense_4h_to_h.bias"
    assert module_to_checkpoint("layers.3.attention.dense.weight") == "transformer.layers.3.attention.dense.weight"
    assert checkpoint_to_module("transformer.layers.0.attention.rotary_emb.inv_freq") is None


def test_sharded_checkpoint(tiny):
    _check(tiny)


def test_single_file_checkpoint(tmp_path):
    _check(glm.load(_folder(tmp_path, _state())))


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    d = _folder(tmp_path)
    save_file({k: v.contiguous() for k, v in _state().items()}, str(d / "model.safetensors"))
    _check(glm.load(d))


def test_missing_shard_is_a_clear_error(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "glm-tiny", d)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(glm.CheckpointError, match="pytorch_model-00002-of-00002.bin .*missing.*re-download"):
        glm.load(d)


def test_corrupt_shard_is_a_clear_error(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "glm-tiny", d)
    p = d / "pytorch_model-00001-of-00002.bin"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(glm.CheckpointError, match="corrupt"):
        glm.load(d)


def test_wrong_shape_is_a_clear_error(tmp_path):
    sd = _state()
    sd["transformer.layers.1.mlp.dense_h_to_4h.weight"] = torch.zeros(500, 128, dtype=torch.float16)
    with pytest.raises(glm.CheckpointError, match=r"dense_h_to_4h.weight has shape \(500, 128\).*\(512, 128\)"):
        glm.load(_folder(tmp_path, sd))


def test_missing_tensor_is_a_clear_error(tmp_path):
    sd = _state()
    del sd["transformer.final_layernorm.bias"]
    with pytest.raises(glm.CheckpointError, match="lacks 1 tensors"):
        glm.load(_folder(tmp_path, sd))


def test_unexpected_tensor_is_a_clear_error(tmp_path):
    sd = _state()
    sd["model.embed_tokens.weight"] = torch.zeros(2)
    with pytest.raises(glm.CheckpointError, match="unexpected tensor"):
        glm.load(_folder(tmp_path, sd))


@pytest.mark.parametrize("cfg,msg", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
    ({"multi_query_attention": True, "padded_vocab_size": 65024}, "ChatGLM2"),
])
def test_unknown_architecture_is_a_clear_error(tmp_path, cfg, msg):
    with pytest.raises(glm.ConfigError, match=msg):
        glm.load(_folder(tmp_path, _state(), cfg))


def test_wrong_path_is_a_clear_error(tmp_path):
    with pytest.raises(glm.CheckpointError, match="no such folder"):
        glm.load(str(tmp_path / "nope" / "deeper" / "x"))
    with pytest.raises(glm.CheckpointError, match="no weights"):
        glm.load(_folder(tmp_path))


def test_tied_word_embeddings_default(tmp_path):
    sd = _state()
    del sd["lm_head.weight"]
    cfg = json.loads((FIXTURES / "glm-tiny" / "config.json").read_text())
    del cfg["tie_word_embeddings"]  # default: tied, as the release
    d = tmp_path / "tied"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, d / "pytorch_model.bin")
    m = glm.load(d)
    assert m.model.lm_head.weight is m.model.word_embeddings.weight


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_cast(dtype):
    m = glm.load(FIXTURES / "glm-tiny", dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in m.model.parameters())


def test_bad_device_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="dtype"):
        glm.load(FIXTURES / "glm-tiny", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA was requested.*--device cpu"):
            glm.load(FIXTURES / "glm-tiny", device="cuda")


def test_save_load_round_trip(tiny, tmp_path):
    out = glm.save(tiny, tmp_path / "saved")
    assert (out / "model.safetensors").is_file()
    again = glm.load(out)
    for (n, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n


def _hf_cache(tmp_path, repo="THUDM/chatglm-tiny"):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    shutil.copytree(FIXTURES / "chatglm-tiny", snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return cache


def _run_offline(cache, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home"),
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_offline_resolution_from_local_hf_cache(tmp_path):
    cache = _hf_cache(tmp_path)
    r = _run_offline(cache, "import glm; m = glm.load('THUDM/chatglm-tiny'); print(m.tokenizer.encode('你好'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[5, 74874, 130001, 130004]"


def test_offline_without_cached_copy_is_a_clear_error(tmp_path):
    cache = _hf_cache(tmp_path)
    r = _run_offline(cache, "import glm; glm.load('THUDM/not-cached')")
    assert r.returncode != 0
    assert "not in the local Hugging Face cache" in r.stderr


def test_cached_copy_is_used_without_asking_the_hub(tmp_path):
    cache = _hf_cache(tmp_path)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # any request to the Hub would fail
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", "import glm; print(glm.load('THUDM/chatglm-tiny').path.name)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0123456789abcdef0123456789abcdef01234567"
