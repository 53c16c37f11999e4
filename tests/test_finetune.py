"""P-Tuning v2 training against the reference goldens, and the real `glm-finetune` command on the tiny fixture."""

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from glm_testutil import FIXTURES, golden
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import glm
from glm.config import GLMConfig
from glm.finetune import (
    DataError,
    add_prefix,
    prefix_parameters,
    preprocess_rows,
    ptuning_loss,
    read_rows,
    training_inputs,
)
from glm.loader import save_prefix
from glm.model import GLM
from glm.quant import QuantLinear, quantize_

TRAIN = FIXTURES / "chatglm-tiny-ptuning-train"
BASE = FIXTURES / "chatglm-tiny"
G, GT = golden("chatglm-tiny-ptuning-train")
LOSS_TOL, GRAD_RTOL = 1e-5, 1e-4
OPTS = dict(max_source_length=G["max_source_length"], max_target_length=G["max_target_length"],
            prompt_column=G["prompt_column"], response_column=G["response_column"],
            history_column=G["history_column"])


def _rows():
    return read_rows(TRAIN / "train.json")


# ---------------------------------------------------------------------------------------------------- goldens


def test_preprocess_rows_gives_the_official_ids_and_labels(chatglm_tiny):
    ids, labels = preprocess_rows(chatglm_tiny.tokenizer, _rows(), **OPTS)
    assert ids == G["input_ids"]
    assert labels == G["labels"]


@pytest.mark.parametrize("case", G["cases"], ids=lambda c: c["prefix"])
def test_loss_and_gradients_match_the_reference(case):
    m = glm.load(BASE, ptuning=TRAIN / case["prefix"])
    assert m.config.prefix_projection is case["prefix_projection"]
    params = prefix_parameters(m)
    loss = ptuning_loss(m, G["input_ids"], G["labels"])
    assert abs(loss.item() - case["loss"]) <= LOSS_TOL
    loss.backward()
    named = dict(m.model.prefix_encoder.named_parameters())
    assert len(named) == len(case["grads"]) == len(params)
    for ck_name, golden_name in case["grads"].items():
        ours, ref = named[ck_name.removeprefix("transformer.prefix_encoder.")].grad, GT[golden_name]
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= GRAD_RTOL * ref.abs().max().item(), ck_name
    # Gradients reach the prefix encoder and nothing else.
    assert all(p.grad is None and not p.requires_grad for n, p in m.model.named_parameters()
               if not n.startswith("prefix_encoder."))
    with torch.no_grad():
        for i, ref in enumerate(case["per_example_loss"]):
            assert abs(ptuning_loss(m, G["input_ids"][i : i + 1], G["labels"][i : i + 1]).item() - ref) <= LOSS_TOL


def test_training_positions_run_on_over_the_pads(chatglm_tiny):
    cfg = chatglm_tiny.config
    ids = torch.tensor([[5, 6, cfg.gmask_token_id, cfg.bos_token_id, 7, cfg.eos_token_id, 3, 3]])
    pos, mask = training_inputs(ids, cfg, prefix=2)
    assert pos[0].tolist() == [[0, 1, 2, 2, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3, 4, 5]]
    assert mask.shape == (1, 1, 8, 10)
    assert mask[0, 0, :, :2].all()  # every token sees the prefix
    assert mask[0, 0, 0, 2:6].tolist() == [True, True, True, False]  # the context is bidirectional up to <sop>
    assert mask[0, 0, 5, 2:].tolist() == [True] * 6 + [False] * 2  # causal from <sop> on


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


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_rows_are_one_line_errors(chatglm_tiny, tmp_path):
    tok = chatglm_tiny.tokenizer
    with pytest.raises(DataError, match="'prompt'"):
        preprocess_rows(tok, _rows(), **{**OPTS, "prompt_column": "prompt"})
    with pytest.raises(DataError, match="cut to nothing"):
        preprocess_rows(tok, _rows(), **{**OPTS, "max_source_length": 1})
    with pytest.raises(DataError, match="non-empty"):
        preprocess_rows(tok, [{"content": "", "summary": "x"}], **OPTS)
    with pytest.raises(DataError, match="row 1: column 'history'"):
        preprocess_rows(tok, [{"content": "a", "summary": "b", "history": "c"}], **OPTS)
    f = tmp_path / "t.json"
    f.write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        read_rows(f)
    f.write_text('{"content": "a", "summary": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        read_rows(f)


ROOT = Path(__file__).parents[1]


def _finetune(*args, timeout=120):
    """`glm-finetune ARGS` as a user runs it (the console script calls the same `main`), in its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "glm.finetune", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def test_console_script_is_registered():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["glm-finetune"] == "glm.finetune:main"


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (['{"content": "a", "summary": "b"}', '{"content": "a", summary: "b"}'], [], "line 2 is not JSON"),
        ([], [], "is empty"),
        (['{"content": "a", "summary": "b"}'], ["--response-column", "answer"], "no row has the column 'answer'"),
        (['{"content": "a", "summary": "b"}'], ["--pre-seq-len", "0"], "--pre-seq-len must be a positive"),
        (['{"content": "a b c", "summary": "b"}'], ["--max-source-length", "1"], "cut to nothing"),
        (['{"content": "a", "summary": "b"}'], ["--max-source-length", "4000"], "max_sequence_length"),
    ],
    ids=["not-json", "empty", "missing-column", "pre-seq-len", "cut-to-nothing", "too-long"],
)
def test_bad_input_is_one_line(tmp_path, capsys, lines, extra, message):
    from glm.finetune import main

    f = tmp_path / "train.json"
    f.write_text("".join(line + "\n" for line in lines))
    try:
        rc = main(["--model", str(BASE), "--train-file", str(f), "--output-dir", str(tmp_path / "out"), *extra])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (1, 2) and len(err) == 1, err
    assert err[0].startswith("glm-finetune: error:") and message in err[0]
    assert not (tmp_path / "out").exists()  # the data is checked before anything is written (or loaded)


def test_cli_bad_line_is_one_line_and_exit_code_1(tmp_path):
    f = tmp_path / "train.json"
    f.write_text('{"content": "a", "summary": "b"}\nnot json\n')
    r = _finetune("--model", BASE, "--train-file", f, "--output-dir", tmp_path / "out")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"glm-finetune: error: {f} line 2 is not JSON (Expecting value): "
                                             "the file must hold one JSON object a line"]


# ---------------------------------------------------------------------------------------------------- the command


def test_cli_trains_and_its_output_loads_and_changes_the_reply(tmp_path, chatglm_tiny):
    out = tmp_path / "out"
    r = _finetune("--model", BASE, "--train-file", TRAIN / "train.json", "--history-column", "history",
                  "--max-source-length", 16, "--max-target-length", 12, "--pre-seq-len", 8, "--learning-rate", 0.5,
                  "--batch-size", 4, "--gradient-accumulation-steps", 1, "--max-steps", 20, "--save-steps", 10,
                  "--logging-steps", 5, "--validation-file", TRAIN / "train.json", "--output-dir", out)
    assert r.returncode == 0, r.stderr
    assert "saved the prefix to" in r.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "pytorch_model.bin", "train_log.jsonl",
                                                "checkpoint-10", "checkpoint-20"}
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_log = [e for e in log if "loss" in e]
    assert [e["step"] for e in train_log] == [5, 10, 15, 20] and all(e["tokens_per_s"] > 0 for e in train_log)
    evals = [e for e in log if "eval_loss" in e]
    assert [e["step"] for e in evals] == [10, 20] and evals[1]["eval_loss"] < evals[0]["eval_loss"]

    # The prefix the run started from (add_prefix with the run's seed, 42) against the trained one.
    opts = {**OPTS, "max_source_length": 16, "max_target_length": 12}
    ids, labels = preprocess_rows(chatglm_tiny.tokenizer, _rows(), **opts)
    start = glm.load(BASE)
    add_prefix(start, 8, seed=42)
    trained = glm.load(BASE, ptuning=out)
    with torch.no_grad():
        before, after = ptuning_loss(start, ids, labels).item(), ptuning_loss(trained, ids, labels).item()
    assert after < before - 1.5, (before, after)  # perplexity down by more than 4x
    prompt = chatglm_tiny.tokenizer.encode("类型#上衣*材质#牛仔布")
    assert trained.generate(prompt, 8) != chatglm_tiny.generate(prompt, 8)


def test_cli_resume_continues_exactly(tmp_path):
    common = ["--model", BASE, "--train-file", TRAIN / "train.json", "--max-source-length", 24,
              "--max-target-length", 12, "--pre-seq-len", 4, "--prefix-projection", "--learning-rate", 0.05,
              "--batch-size", 2, "--gradient-accumulation-steps", 2, "--max-steps", 4, "--save-steps", 2,
              "--logging-steps", 1]
    r = _finetune(*common, "--output-dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r = _finetune(*common, "--output-dir", tmp_path / "a")
    assert r.returncode == 1 and "--resume" in r.stderr  # will not silently mix two runs
    r = _finetune(*common, "--resume", tmp_path / "a" / "checkpoint-2", "--output-dir", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "a" / "pytorch_model.bin", weights_only=True)
    b = torch.load(tmp_path / "b" / "pytorch_model.bin", weights_only=True)
    assert sorted(a) == sorted(b) and len(a) == 5
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [(e["step"], e["loss"]) for e in logs[0]] == [(e["step"], e["loss"]) for e in logs[1]]
    assert [e["step"] for e in logs[1]] == [1, 2, 3, 4]


def test_chat_takes_ptuning_option(tmp_path):
    from glm.options import ArgumentParser, add_model_args

    p = ArgumentParser()
    add_model_args(p)
    assert p.parse_args(["--ptuning", str(tmp_path)]).ptuning == str(tmp_path)


# ---------------------------------------------------------------------------------------------------- quantized bases


def _random_rows(cfg, lengths, target=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + target + 3
    ids, labels = [], []
    for n in lengths:
        a, b = (torch.randint(10, 900, (k,), generator=g).tolist() for k in (n, target))
        row = a + [cfg.gmask_token_id, cfg.bos_token_id] + b + [cfg.eos_token_id]
        pad = T - len(row)
        ids.append(row + [cfg.pad_token_id] * pad)
        labels.append([-100] * (n + 1) + row[n + 1 :] + [-100] * pad)
    return ids, labels


def _train_prefix(m, steps: int = 12) -> list[float]:
    """A 6-token prefix trained for `steps` AdamW steps on two random rows; the loss of each step."""
    add_prefix(m, 6, seed=0)
    opt = torch.optim.AdamW(prefix_parameters(m), lr=0.1, weight_decay=0.0)
    ids, labels = _random_rows(m.config, (12, 20))
    losses = []
    for _ in range(steps):
        loss = ptuning_loss(m, ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fixture", ["glm-tiny-int8", "glm-tiny-int4"])
def test_quantized_base_trains(fixture):
    m = glm.load(FIXTURES / fixture)
    losses = _train_prefix(m)
    assert losses[-1] < losses[0] - 3.0, losses
    for mod in m.model.modules():
        if isinstance(mod, QuantLinear):
            assert mod.packed_weight().dtype == torch.int8 and mod.bias.grad is None


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops allocate while active (views and in-place results not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                st = t.untyped_storage()
                if id(st) not in self.live:
                    self.live[id(st)] = st.nbytes()
                    weakref.finalize(st, self.live.pop, id(st), None)
                    self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_training_step_never_holds_the_float_weights(bits):
    # Wide enough that the float32 weights (25 MB) dwarf the activations of a short batch.
    cfg = GLMConfig(**{**GLMConfig.from_name("tiny").to_dict(), "hidden_size": 512, "inner_hidden_size": 2048,
                       "num_layers": 2})
    m = quantize_(GLM(cfg).eval().requires_grad_(False), bits)
    add_prefix(m, 4, seed=0)
    params = prefix_parameters(m)
    float_bytes = sum(4 * q.in_features * q.out_features for q in m.modules() if isinstance(q, QuantLinear))
    ids, labels = _random_rows(cfg, (8,), target=6)
    with PeakMemory() as mem:
        ptuning_loss(m, ids, labels).backward()
    assert all(p.grad is not None for p in params)
    # Activations and a 2 MiB slice of dequantized rows or two: far from one float32 copy of the weights.
    assert mem.peak < float_bytes / 2, (mem.peak, float_bytes)


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_loss_and_gradients_match_the_reference_on_gpu():
    case = G["cases"][1]  # the MLP prefix: every kind of prefix parameter
    m = glm.load(BASE, ptuning=TRAIN / case["prefix"], device="cuda", dtype="float32")
    prefix_parameters(m)
    loss = ptuning_loss(m, G["input_ids"], G["labels"])
    loss.backward()
    assert abs(loss.item() - case["loss"]) <= LOSS_TOL
    named = dict(m.model.prefix_encoder.named_parameters())
    for ck_name, golden_name in case["grads"].items():
        ours, ref = named[ck_name.removeprefix("transformer.prefix_encoder.")].grad.cpu(), GT[golden_name]
        assert (ours - ref).abs().max().item() <= GRAD_RTOL * ref.abs().max().item(), ck_name


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["glm-tiny-int8", "glm-tiny-int4"])
def test_quantized_fp16_base_trains_on_gpu(fixture):
    # The Triton kernels run the forward; the backward dequantizes a slice of rows at a time.
    m = glm.load(FIXTURES / fixture, device="cuda", dtype="float16")
    losses = _train_prefix(m)
    assert m.model.layers[1].attention.dense.forward_path == "triton"
    assert losses[-1] < losses[0] - 3.0, losses
