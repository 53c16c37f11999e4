"""Tensor parallelism on CPUs (gloo), 2 ranks, float32: every fixture's goldens through a model split over two
processes, what each rank holds, and the one-line refusals.

This process is rank 0; one rank-1 process, started at the first load, serves every model of the module (starting
a rank costs seconds: the tests share it). The refusals that must meet no started world come first, and the test
that kills rank 1 comes last.
"""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from glm_testutil import FIXTURES, TOL, entry_point, glm_tiny_cases, golden

import glm
from glm.errors import ParallelError
from glm.generation import GenerationConfig
from glm.parallel import world as tp_world

G, GT, PROMPTS, GREEDY = glm_tiny_cases()
IDS = [124, 12, 97, 937, 970, 966, 831, 1001, 1004]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tp():
    """`tp(name, **kw)`: the fixture `name` loaded over 2 ranks (once per module); the ranks stop afterwards."""
    models = {}

    def load(name="glm-tiny", **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in models:
            models[key] = glm.load(FIXTURES / name, tensor_parallel=2, **kw)
        return models[key]

    yield load
    models.clear()
    w = tp_world.current()
    if w is not None:
        w.close()


def _worst(m, cases, gt) -> float:
    worst = 0.0
    for case in cases:
        lg = m.logits(case["input_ids"])
        lg = lg[-8:] if case.get("logits_positions") == "last8" else lg
        assert lg.shape == gt[case["logits"]].shape
        worst = max(worst, (lg - gt[case["logits"]]).abs().max().item())
    return worst


# -- refusals before any rank starts


def test_a_rank_that_cannot_start_is_one_line(monkeypatch):
    assert tp_world.current() is None
    monkeypatch.setattr(tp_world, "worker_command",
                        lambda: [sys.executable, "-c", "import sys; sys.exit('rank 1: no such device')"])
    t0 = time.monotonic()
    with pytest.raises(ParallelError, match=r"^tensor-parallel rank 1 could not start \(exit status 1\): rank 1: no "
                                            r"such device$"):
        glm.load(FIXTURES / "glm-tiny", tensor_parallel=2)
    assert time.monotonic() - t0 < 60 and tp_world.current() is None


@pytest.mark.parametrize("name, kw, n, needle", [
    ("glm-tiny", {}, 3, "must divide its 8 attention heads, MLP width 512 and vocabulary 1024; use one of: 1, 2, 4, 8"),
    ("glm-tiny", {}, 16, "use one of: 1, 2, 4, 8"),
    ("glm-tiny", dict(quant=4, group_size=32), 8, "hold whole groups of 32); use one of: 1, 2, 4"),
    ("chatglm-tiny", {}, 4, "its 2 attention heads"),
])
def test_sizes_that_do_not_split_the_model_are_refused(name, kw, n, needle):
    with pytest.raises(ParallelError, match=f"^tensor_parallel={n} does not split this model") as e:
        glm.load(FIXTURES / name, tensor_parallel=n, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw, needle", [
    (dict(tensor_parallel=0), "must be an integer >= 1"),
    (dict(tensor_parallel=True), "must be an integer >= 1"),
    (dict(tensor_parallel=2, compile=True), "does not work with compile"),
    (dict(tensor_parallel=2, lora=FIXTURES / "chatglm-tiny-lora" / "adapter"), "does not take a LoRA adapter"),
    (dict(tensor_parallel=2, device="cuda:1"), "use 'cuda' rather than 'cuda:1'"),
])
def test_what_tensor_parallel_does_not_take_is_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        glm.load(FIXTURES / "glm-tiny", **kw)


def test_glm_serve_refuses_adapters_with_tensor_parallel_before_loading(capsys):
    from glm import serve

    with pytest.raises(SystemExit) as e:
        serve.main(["--model", str(FIXTURES / "chatglm-tiny"), "--tensor-parallel", "2", "--adapter",
                    f"a={FIXTURES / 'chatglm-tiny-lora' / 'adapter'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--adapter does not work with --tensor-parallel" in err and err.count("\n") == 1


def test_under_torchrun_a_taken_port_or_another_size_is_one_line(monkeypatch):
    assert tp_world.current() is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(ParallelError, match=f"^port {port} on 127.0.0.1 \\(MASTER_PORT\\) is taken"):
            glm.load(FIXTURES / "glm-tiny", tensor_parallel=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ParallelError, match=r"started as one of 4 ranks \(WORLD_SIZE\) but asked for "
                                            r"tensor_parallel=2"):
        glm.load(FIXTURES / "glm-tiny", tensor_parallel=2)
    assert tp_world.current() is None


def test_under_torchrun_ranks_given_different_checkpoints_refuse_in_one_line(monkeypatch):
    """Rank 0 is this process, rank 1 glm-chat started as torchrun starts it, with another --model."""
    assert tp_world.current() is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    rank1 = subprocess.Popen([*entry_point("glm.cli"), "--model", str(FIXTURES / "glm-tiny"), "--tensor-parallel", "2"],
                             env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", RANK="1", LOCAL_RANK="1",
                                      **env), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        for k, v in dict(env, RANK="0", LOCAL_RANK="0").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ParallelError) as e:
            glm.load(FIXTURES / "chatglm-tiny", tensor_parallel=2)
        _, err = rank1.communicate(timeout=120)
    finally:
        rank1.kill()
        if tp_world.current() is not None:
            tp_world.current().close()
    line = (r"ranks disagree on the checkpoint: rank 1 has glm-tiny \(\w+\) and rank 0 chatglm-tiny \(\w+\); start "
            r"every rank with the same --model and options")
    assert re.fullmatch(line, str(e.value))
    assert rank1.returncode == 1 and re.fullmatch(f"glm-chat: error: {line}\n", err.decode()), err
    assert tp_world.current() is None


# -- exactness over 2 ranks


def test_float_goldens_and_greedy_ids(tp):
    m = tp("glm-tiny")
    assert m.tensor_parallel == 2
    assert _worst(m, [c for c in G["cases"] if "logits" in c], GT) <= TOL
    for case in GREEDY:
        steps = []
        ids = m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False,
                         logits_hook=lambda lg: steps.append(lg[0].clone()))
        assert ids == case["greedy_ids"]
        assert (torch.stack(steps) - GT[case["step_logits"]]).abs().max().item() <= TOL


def test_a_batch_and_choices_equal_one_process(tp):
    m, one = tp("glm-tiny", max_batch=4), glm.load(FIXTURES / "glm-tiny", max_batch=4)
    batch = next(c for c in G["cases"] if c["kind"] == "batch")
    assert m.generate(batch["prompts"], len(batch["greedy_ids"][0]), stop_at_eos=False) == batch["greedy_ids"]
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, seed=3, stop_at_eos=False)
    assert [list(r) for r in m.submit(IDS, cfg, n=3)] == [list(r) for r in one.submit(IDS, cfg, n=3)]


def test_a_cancelled_stream_frees_its_row_on_every_rank(tp):
    m = tp("glm-tiny")
    stream = m.generate_stream(IDS, 40, stop_at_eos=False)
    next(stream)
    stream.close()  # cancelled: rank 0 frees the row and the other rank with it
    case = GREEDY[0]
    assert m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False) == case["greedy_ids"]


@pytest.mark.parametrize("kw", [{}, dict(quant=4, quantize_lm_head=True)], ids=["float", "int4-head"])
def test_a_head_tied_to_the_embedding_equals_one_process(tp, tmp_path, kw):
    """The release ties lm_head to the embedding (the fixtures do not): the shards of both are one table's rows, and
    with a quantized head the embedding looks its rows up in the head's shard."""
    import json
    import shutil

    tied = tmp_path / "glm-tiny-tied"
    shutil.copytree(FIXTURES / "glm-tiny", tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    m, one = glm.load(tied, tensor_parallel=2, **kw), glm.load(tied, **kw)
    assert (m.logits(IDS) - one.logits(IDS)).abs().max().item() <= TOL
    assert m.generate(IDS, 12, stop_at_eos=False) == one.generate(IDS, 12, stop_at_eos=False)


def test_chatglm_tiny_logits_and_chat_goldens(tp):
    g, gt = golden("chatglm-tiny")
    m = tp("chatglm-tiny")
    assert _worst(m, g["logits"], gt) <= TOL
    for t in g["chat"]:
        history = [tuple(h) for h in t["history"]]
        reply, _ = m.chat(t["query"], history, max_length=t["max_length"], do_sample=False)
        assert reply == t["response"]
    t = next(t for t in g["chat"] if "stream" in t)
    assert [r for r, _ in m.stream_chat(t["query"], [tuple(h) for h in t["history"]], max_length=t["max_length"],
                                        do_sample=False)] == t["stream"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_goldens(tp, bits):
    g, gt = golden(f"glm-tiny-int{bits}")
    m = tp(f"glm-tiny-int{bits}")
    assert _worst(m, g["cases"], gt) <= TOL
    for case in g["cases"]:
        assert m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False) == case["greedy_ids"]


@pytest.mark.parametrize("kw", [dict(quant=4, group_size=32), dict(quant=8)], ids=["int4-g32", "int8"])
def test_quantized_while_loading_equals_one_process(tp, kw):
    """No fixture holds grouped int4: the oracle is the same quantization in one process (itself checked against the
    reference's bytes in tests/test_loader_quant.py). Per-channel int8 checks that a row-parallel linear quantized
    while loading takes the scales of its whole rows."""
    m, one = tp("glm-tiny", **kw), glm.load(FIXTURES / "glm-tiny", **kw)
    for case in PROMPTS[:4]:
        assert (m.logits(case["input_ids"]) - one.logits(case["input_ids"])).abs().max().item() <= TOL
    assert m.generate(IDS, 24, stop_at_eos=False) == one.generate(IDS, 24, stop_at_eos=False)


def test_ptuning_goldens(tp):
    g, gt = golden("glm-tiny-ptuning")
    m = tp("glm-tiny", ptuning=FIXTURES / "glm-tiny-ptuning")
    assert _worst(m, g["cases"], gt) <= TOL
    for case in g["cases"]:
        assert m.generate(case["input_ids"], len(case["greedy_ids"]), stop_at_eos=False) == case["greedy_ids"]


def test_a_prefix_through_its_projection_equals_one_process(tp):
    prefix = FIXTURES / "chatglm-tiny-ptuning-train" / "prefix-mlp"  # prefix_projection: its MLP's output is split
    m, one = tp("chatglm-tiny", ptuning=prefix), glm.load(FIXTURES / "chatglm-tiny", ptuning=prefix)
    ids = one.tokenizer.encode("你好")
    assert (m.logits(ids) - one.logits(ids)).abs().max().item() <= TOL
    assert m.generate(ids, 12, stop_at_eos=False) == one.generate(ids, 12, stop_at_eos=False)


# -- what each rank holds


def test_rank_0_holds_half_of_every_split_tensor(tp, tiny):
    m = tp("glm-tiny")
    layer, cfg = m.model.layers[0], m.config
    C, F, V = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
    assert layer.attention.query_key_value.weight.shape == (3 * C // 2, C)
    assert layer.attention.dense.weight.shape == (C, C // 2)
    assert layer.mlp.dense_h_to_4h.weight.shape == (F // 2, C) and layer.mlp.dense_4h_to_h.weight.shape == (C, F // 2)
    assert m.model.lm_head.inner.weight.shape == m.model.word_embeddings.inner.weight.shape == (V // 2, C)
    # Rank 0 holds the first heads: its rows of query_key_value are the reference's first rows.
    assert torch.equal(layer.attention.query_key_value.weight, tiny.model.layers[0].attention.query_key_value.weight[
        : 3 * C // 2])
    assert 0.45 < m.memory_bytes() / tiny.memory_bytes() < 0.55
    m.generate(IDS, 2)
    assert m.scheduler.runner.caches[0].k.shape[1] == cfg.num_attention_heads // 2
    q = tp("glm-tiny-int4").model.layers[0].attention.dense
    assert (q.in_features, q.out_features, q.packed_weight().shape, q.weight_scale.shape) == (C // 2, C, (C, C // 4),
                                                                                              (C,))
    pe = tp("glm-tiny", ptuning=FIXTURES / "glm-tiny-ptuning").model.prefix_encoder
    assert pe.embedding.weight.shape == (6, cfg.num_layers * 2 * C // 2)


def test_save_is_refused(tp, tmp_path):
    with pytest.raises(ValueError, match="holds only its shard"):
        glm.save(tp("glm-tiny"), tmp_path / "out")


# -- last: a rank that dies


def test_a_dead_rank_fails_the_next_call_at_once(tp):
    m = tp("glm-tiny")
    w = tp_world.current()
    w.procs[0].kill()
    t0 = time.monotonic()
    with pytest.raises(ParallelError, match=r"tensor-parallel rank 1 died \(exit status -9\)"):
        for _ in range(100):  # the watchdog notices within a fraction of a second; a collective fails at once
            m.generate(IDS, 4)
            time.sleep(0.05)
    with pytest.raises(ParallelError, match="rank 1 died"):
        m.logits(IDS)
    assert time.monotonic() - t0 < 30
