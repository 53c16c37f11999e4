import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from glm_testutil import FIXTURES, golden
from hypothesis import given, settings
from hypothesis import strategies as st
from test_config import refused

import glm
from glm.engine import resolve_device
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


# ---------------------------------------------------------------------------------------------------- damaged input
# Every damaged checkpoint is refused with one exception type and a one-line message (`refused`), and a good load
# of the same folder works once the damage is undone. Copies live in tmp folders; tests/fixtures is never written.

FAST = settings(max_examples=15, deadline=None)
REAL_INDEX = json.loads((FIXTURES / "glm-tiny" / "pytorch_model.bin.index.json").read_text())
INDEXES = ["pytorch_model.bin.index.json", "model.safetensors.index.json"]
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
JSON_ANY = st.recursive(JSON_LEAF, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), c, max_size=3)),
                        max_leaves=6)
NOT_STR = JSON_ANY.filter(lambda v: not isinstance(v, str))


def _copy(tmp_path_factory, name="glm-tiny"):
    d = tmp_path_factory.mktemp("damaged") / name
    shutil.copytree(FIXTURES / name, d)
    return d


def _restored(d, name="glm-tiny"):
    """Undo any damage to a copy of a fixture (files added by the test are removed), then it must load."""
    for p in d.iterdir():
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p)
    shutil.copytree(FIXTURES / name, d, dirs_exist_ok=True)
    return glm.load(d)


BAD_WEIGHT_MAP = st.one_of(
    JSON_ANY.filter(lambda v: not isinstance(v, dict)),  # not a mapping at all
    st.just({}),
    st.dictionaries(st.text(max_size=20), NOT_STR, min_size=1, max_size=3),  # values that are not file names
    st.builds(lambda k, v: {**REAL_INDEX["weight_map"], k: v}, st.sampled_from(sorted(REAL_INDEX["weight_map"])),
              NOT_STR),  # one bad entry among good ones
)
BAD_INDEX = st.one_of(
    BAD_WEIGHT_MAP.map(lambda wm: {"metadata": {"total_size": 1}, "weight_map": wm}),
    JSON_ANY.filter(lambda v: not (isinstance(v, dict) and "weight_map" in v)),  # no weight_map
)


@FAST
@given(index=BAD_INDEX, name=st.sampled_from(INDEXES))
def test_index_whose_weight_map_is_not_names_to_files(tmp_path_factory, index, name):
    d = _copy(tmp_path_factory)
    (d / name).write_text(json.dumps(index))
    assert name in refused(glm.CheckpointError, glm.load, d)


@FAST
@given(data=st.binary(max_size=80), name=st.sampled_from(INDEXES))
def test_index_that_is_not_json(tmp_path_factory, data, name):
    d = _copy(tmp_path_factory)
    (d / name).write_bytes(data)
    assert name in refused(glm.CheckpointError, glm.load, d)


def test_index_damage_is_undone_and_loads(tmp_path_factory):
    d = _copy(tmp_path_factory)
    (d / INDEXES[0]).write_text('{"weight_map": [1, 2]}')
    refused(glm.CheckpointError, glm.load, d)
    _check(_restored(d))


def _outside_names(d: Path, outside: Path) -> list[str]:
    """Names for an index entry that lead outside the checkpoint folder `d`; `outside` holds a valid shard."""
    (d / "link.bin").symlink_to(outside / "shard.bin")
    (d / "linkdir").symlink_to(outside, target_is_directory=True)
    return ["/etc/passwd", str(outside / "shard.bin"), "../outside/shard.bin", "sub/../../outside/shard.bin",
            "link.bin", "linkdir/shard.bin", "", "a\0b.bin"]


@pytest.mark.parametrize("index", INDEXES)
def test_index_naming_a_file_outside_the_folder_is_refused_unopened(tmp_path, index):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "glm-tiny", d)
    outside = tmp_path / "outside"
    outside.mkdir()
    # A valid shard: had the loader opened it, the load would have gone on, not been refused.
    first = sorted(set(REAL_INDEX["weight_map"].values()))[0]
    shutil.copy(FIXTURES / "glm-tiny" / first, outside / "shard.bin")
    for name in _outside_names(d, outside):
        wm = {k: (name if v == first else v) for k, v in REAL_INDEX["weight_map"].items()}
        (d / index).write_text(json.dumps({"weight_map": wm}))
        msg = refused(glm.CheckpointError, glm.load, d)
        assert "refusing to open" in msg, (name, msg)
    _check(_restored(d))


def test_single_weight_file_linked_from_outside_is_refused(tmp_path):
    d = _folder(tmp_path)
    torch.save(_state(), tmp_path / "elsewhere.bin")
    (d / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    assert "outside the checkpoint folder" in refused(glm.CheckpointError, glm.load, d)


def test_hugging_face_cache_links_into_blobs_are_fine(tmp_path):
    repo = tmp_path / "models--THUDM--chatglm-tiny"
    snap, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted((FIXTURES / "glm-tiny").iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    _check(glm.load(snap))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@FAST
@given(cut=st.floats(0, 0.999))
def test_truncated_weights(tmp_path_factory, fmt, cut):
    d = tmp_path_factory.mktemp("cut")
    (d / "config.json").write_bytes((FIXTURES / "glm-tiny" / "config.json").read_bytes())
    p = d / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    if fmt == "bin":
        torch.save(_state(), p)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _state().items()}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * cut)])
    assert p.name in refused(glm.CheckpointError, glm.load, d)


@settings(max_examples=12, deadline=None)
@given(pos=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255))
def test_garbled_bytes_load_or_are_refused_never_a_raw_error(tmp_path_factory, pos, byte):
    d = _copy(tmp_path_factory)
    p = d / "pytorch_model-00001-of-00002.bin"
    data = bytearray(p.read_bytes())
    data[int(len(data) * pos)] = byte
    p.write_bytes(bytes(data))
    try:
        glm.load(d)
    except (glm.CheckpointError, glm.ConfigError, ValueError) as e:
        assert "\n" not in str(e)


FLOAT_NAMES = sorted(k for k in _state() if "rotary" not in k)
NOT_FLOAT = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


@FAST
@given(name=st.sampled_from(FLOAT_NAMES), dtype=st.sampled_from(NOT_FLOAT))
def test_non_float_tensor_in_a_float_checkpoint(tmp_path_factory, name, dtype):
    sd = _state()
    sd[name] = sd[name].to(dtype)
    d = _folder(tmp_path_factory.mktemp("dtype"), sd)
    msg = refused(glm.CheckpointError, glm.load, d)
    assert name in msg and "floating point" in msg


def test_int8_weight_in_a_float_checkpoint_says_what_is_wrong(tmp_path):
    sd = _state()
    sd["transformer.layers.0.attention.dense.weight"] = sd["transformer.layers.0.attention.dense.weight"].to(torch.int8)
    msg = refused(glm.CheckpointError, glm.load, _folder(tmp_path, sd))
    assert "transformer.layers.0.attention.dense.weight is torch.int8" in msg and "quantization_bit" in msg
    _check(glm.load(_folder(tmp_path, _state(), name="good")))


@pytest.mark.parametrize("value", [
    5, "weights", [torch.zeros(2)], {"a": torch.zeros(2)}, None,
    torch.zeros(128).to_sparse(), torch.empty(128, device="meta"),
], ids=["int", "str", "list", "dict", "none", "sparse", "meta"])
def test_state_dict_entries_that_are_not_dense_tensors(tmp_path, value):
    sd = _state()
    sd["transformer.final_layernorm.bias"] = value
    msg = refused(glm.CheckpointError, glm.load, _folder(tmp_path, sd))
    assert "final_layernorm.bias" in msg


@pytest.mark.parametrize("state", [[1, 2], {0: torch.zeros(2)}, torch.zeros(3)], ids=["list", "int-key", "tensor"])
def test_weight_files_that_are_not_state_dicts(tmp_path, state):
    refused(glm.CheckpointError, glm.load, _folder(tmp_path, state))


def test_mps_without_mps_is_a_one_line_error():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert "--device cpu" in refused(ValueError, resolve_device, "mps")
    assert "MPS" in refused(ValueError, glm.load, FIXTURES / "glm-tiny", device="mps")


@settings(max_examples=60, deadline=None)
@given(device=st.one_of(st.text(max_size=12), st.integers(-2, 2), st.floats(), st.none(), st.lists(st.integers())))
def test_any_device_value_resolves_or_is_a_one_line_value_error(device):
    try:
        dev = resolve_device(device)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert dev.type in ("cpu", "cuda", "mps")
        assert dev.type == "cpu" or torch.cuda.is_available() or torch.backends.mps.is_available()


@pytest.mark.parametrize("device", ["xpu", "meta", "hpu", "cuda:x", "", "CPU", "mps:1", "cpu\n"])
def test_unknown_devices_are_one_line_value_errors(device):
    assert "device" in refused(ValueError, resolve_device, device)


@pytest.mark.parametrize("model", ["x" * 5000, "a\0b", "/dev/null", "no\udcffthing", "../" * 40 + "nowhere"],
                         ids=["too-long", "nul", "device-file", "surrogate", "dotdot"])
def test_odd_model_paths_are_checkpoint_errors(model):
    refused(glm.CheckpointError, glm.load, model)


@pytest.mark.parametrize("pre_seq_len,error,needle", [
    (0, glm.ConfigError, "pre_seq_len"), ("6", glm.ConfigError, "pre_seq_len"), (6.0, glm.ConfigError, "pre_seq_len"),
    (None, glm.CheckpointError, "pre_seq_len"), (7, glm.CheckpointError, "prefix_encoder"),
])
def test_damaged_ptuning_folder(tmp_path, pre_seq_len, error, needle):
    d = tmp_path / "prefix"
    shutil.copytree(FIXTURES / "glm-tiny-ptuning", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": pre_seq_len}))
    assert needle in refused(error, glm.load, FIXTURES / "glm-tiny", ptuning=d)
