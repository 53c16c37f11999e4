"""Training on several ranks (gloo, 2 CPU processes): N ranks with accumulation A train what one process with N x A
trains, for a prefix (DDP) and for every weight (--full, FSDP2); --resume at another N; rank 0 alone writes; the
errors of starting ranks are one line and never hang.

The ranks are processes of their own, started by hand as torchrun starts them, or by `glm-finetune --nproc-per-node 2`
(torchrun's launcher) for --full; the one-process runs run in this process (a new interpreter costs seconds).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from finetune_cases import BASE, ROOT, TRAIN, finetune
from safetensors.torch import load_file

import glm
from glm.finetune.cli import main

TOL = 1e-5  # fp32 rounding: the same sums, added in another order
DATA = ["--model", BASE, "--train-file", TRAIN / "train.json", "--history-column", "history",
        "--max-source-length", 24, "--max-target-length", 12, "--batch-size", 1, "--device", "cpu",
        "--dist-timeout", 60, "--logging-steps", 1]
PREFIX = [*DATA, "--pre-seq-len", 4, "--prefix-projection", "--learning-rate", 0.05, "--max-steps", 4,
          "--save-steps", 2]
FULL = [*DATA, "--full", "--learning-rate", 1e-3, "--max-steps", 5, "--save-steps", 3]


def run_main(*args) -> int:
    """`glm-finetune ARGS` in this process (the real `main`), for the one-process runs and the error cases."""
    return main([str(a) for a in args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_of(folder):
    """The logged steps of a run (not its evaluations, nor the Trainer-style closing entry of totals)."""
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [e for e in log if "loss" in e]


def spawn(rank: int, world: int, port: int, *args) -> subprocess.Popen:
    """`python -m glm.finetune ARGS` as rank `rank` of `world` on this machine, started by hand as torchrun starts
    its ranks (its environment), rank 0 listening on `port`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "glm.finetune", *map(str, args)], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)


def wait_all(*procs, timeout=180) -> list[str]:
    """The stderr of each process once all have ended (each is killed if it outlives `timeout`)."""
    try:
        return [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_each_rank_takes_its_run_of_the_steps_micro_batches():
    from glm.finetune.distributed import Ranks

    one = [list(Ranks().micro_batches(s, 6)) for s in range(3)]
    three = [sum((list(Ranks(rank=r, world=3).micro_batches(s, 2)) for r in range(3)), []) for s in range(3)]
    assert one == three == [list(range(6 * s, 6 * s + 6)) for s in range(3)]


def test_two_ranks_train_the_prefix_one_process_trains(tmp_path, capsys, monkeypatch):
    port, args = free_port(), [*PREFIX, "--gradient-accumulation-steps", 1, "--output-dir", tmp_path / "two"]
    ranks = [spawn(r, 2, port, *args) for r in range(2)]
    err0, err1 = wait_all(*ranks)
    assert [p.returncode for p in ranks] == [0, 0], err0 + err1
    assert err1 == ""  # rank 0 alone reports and writes
    assert err0.count("saved the prefix") == 1 and "x 2 ranks" in err0, err0
    assert [e["step"] for e in log_of(tmp_path / "two")] == [1, 2, 3, 4]

    assert run_main(*PREFIX, "--gradient-accumulation-steps", 2, "--output-dir", tmp_path / "one") == 0
    # --resume at another number of ranks: the 2-rank checkpoint, continued by one process (with activation
    # checkpointing, which changes no number).
    calls = []
    import glm.finetune.cli as cli

    real = cli.checkpoint_blocks
    monkeypatch.setattr(cli, "checkpoint_blocks", lambda net: calls.append(net) or real(net))
    assert run_main(*PREFIX, "--gradient-accumulation-steps", 2, "--gradient-checkpointing",
                    "--resume", tmp_path / "two" / "checkpoint-2", "--output-dir", tmp_path / "resumed") == 0
    assert len(calls) == 1
    capsys.readouterr()

    load = lambda d: torch.load(tmp_path / d / "pytorch_model.bin", weights_only=True)  # noqa: E731
    two, one, resumed = load("two"), load("one"), load("resumed")
    assert sorted(two) == sorted(one) == sorted(resumed) and len(two) == 5
    for k in two:
        assert (two[k] - one[k]).abs().max() <= TOL, k
        assert (resumed[k] - one[k]).abs().max() <= TOL, k
    assert not torch.equal(one["transformer.prefix_encoder.embedding.weight"],
                           torch.load(tmp_path / "one" / "checkpoint-2" / "pytorch_model.bin", weights_only=True)[
                               "transformer.prefix_encoder.embedding.weight"])  # it did train after step 2
    losses = lambda d: [e["loss"] for e in log_of(tmp_path / d)]  # noqa: E731
    assert losses("two") == pytest.approx(losses("one"), abs=TOL) == losses("resumed")


def test_full_two_ranks_shard_what_one_process_trains_and_the_checkpoint_loads(tmp_path, capsys):
    r = finetune(*FULL, "--gradient-accumulation-steps", 1, "--nproc-per-node", 2, "--output-dir", tmp_path / "two",
                 timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("saved the model") == 1 and "every weight" in r.stderr, r.stderr

    # One process: the library the command runs, so that the trained model is at hand (a process group of one).
    from glm.finetune import TrainConfig, preprocess_rows, read_rows, train
    from glm.finetune.distributed import finish, start
    from glm.finetune.full import full_part

    m = glm.load(BASE)
    ids, labels = preprocess_rows(m.tokenizer, read_rows(TRAIN / "train.json"), max_source_length=24,
                                  max_target_length=12, prompt_column="content", response_column="summary",
                                  history_column="history")
    prompt = m.tokenizer.encode("类型#上衣*材质#牛仔布")
    ranks, _ = start("cpu", 60, need_group=True)
    try:
        part = full_part(m, ranks)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in part.params)
        train(m, ids, labels, TrainConfig(learning_rate=1e-3, batch_size=1, gradient_accumulation_steps=2,
                                          max_steps=5, save_steps=3, logging_steps=1), tmp_path / "one", part=part)
        trained_logits = m.logits(prompt)
    finally:
        finish()

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    base = torch.load(BASE / "pytorch_model.bin", weights_only=True)
    # The release's names (its rotary inv_freq buffers aside, which the model recomputes), float32 master weights.
    assert sorted(one) == sorted(two) == sorted(k for k in base if not k.endswith("inv_freq"))
    assert all(t.dtype == torch.float32 for t in one.values())
    for k in one:
        assert (one[k] - two[k]).abs().max() <= TOL, k
    assert max((one[k] - base[k].float()).abs().max() for k in one) > 1e-4  # every weight trains
    assert [e["loss"] for e in log_of(tmp_path / "two")] == pytest.approx([e["loss"] for e in log_of(tmp_path / "one")],
                                                                          abs=TOL)
    # The official layout: the base's own config.json fields (auto_map and the rest) and tokenizer alongside.
    cfg, base_cfg = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "two", BASE))
    assert cfg == {**base_cfg, "torch_dtype": "float32"}
    assert (tmp_path / "two" / "ice_text.model").is_file()

    loaded = glm.load(tmp_path / "one")
    assert (loaded.logits(prompt) - trained_logits).abs().max() <= 1e-6

    # The 2-rank checkpoint resumed by one process reaches what the 2 ranks reached.
    assert run_main(*FULL, "--gradient-accumulation-steps", 2, "--resume", tmp_path / "two" / "checkpoint-3",
                    "--output-dir", tmp_path / "resumed") == 0
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all((resumed[k] - two[k]).abs().max() <= TOL for k in two)
    capsys.readouterr()


def test_full_bfloat16_computes_in_bfloat16_over_float32_master_weights():
    from glm.finetune import training_loss
    from glm.finetune.distributed import finish, start
    from glm.finetune.full import full_part

    ids = [[5, 6, 7, 130001, 130004, 8, 9, 130005]]
    labels = [[-100, -100, -100, -100, 130004, 8, 9, 130005]]
    m = glm.load(BASE)
    with torch.no_grad():
        want = training_loss(m, ids, labels)  # float32
    ranks, _ = start("cpu", 60, need_group=True)
    try:
        part = full_part(m, ranks, torch.bfloat16)
        loss = training_loss(part.module, ids, labels)
        loss.backward()
    finally:
        finish()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in part.params)
    assert 0 < abs(loss.item() - want.item()) < 0.05 * want.item()  # bf16 rounding: near, not equal


def test_activation_checkpointing_runs_blocks_again_and_changes_no_gradient():
    from glm.finetune import training_loss
    from glm.finetune.distributed import checkpoint_blocks

    ids = [[5, 6, 7, 130001, 130004, 8, 9, 130005]]
    labels = [[-100, -100, -100, -100, 130004, 8, 9, 130005]]

    m = glm.load(BASE)
    m.model.requires_grad_(True)
    calls, mlp = [], m.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # counts the recomputation too (hooks would not)

    def grads():
        calls.clear()
        m.model.zero_grad(set_to_none=True)
        training_loss(m, ids, labels).backward()
        return {n: p.grad for n, p in m.model.named_parameters()}, len(calls)

    plain, n_plain = grads()
    checkpoint_blocks(m.model)
    again, n_again = grads()
    assert (n_plain, n_again) == (1, 2)  # the block's forward runs again in the backward pass
    assert all(torch.equal(plain[k], again[k]) for k in plain)


def test_a_port_in_use_and_a_rank_that_never_starts_are_one_line(tmp_path, capsys, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # Ranks started by hand: rank 0 cannot listen on a port in use; rank 0 alone waits --dist-timeout.
        # (In processes of their own: a failed start leaves torch.distributed unable to start again in a process.)
        procs = [spawn(0, 2, port, *PREFIX, "--output-dir", tmp_path / "a"),
                 spawn(0, 2, free_port(), *PREFIX, "--dist-timeout", 2, "--output-dir", tmp_path / "b")]
        in_use, alone = (e.strip().splitlines() for e in wait_all(*procs))
        assert [p.returncode for p in procs] == [1, 1]
        assert len(in_use) == 1 and in_use[0].startswith(f"glm-finetune: error: port 127.0.0.1:{port} is in use")
        assert len(alone) == 1 and "not every one of the 2 ranks joined within 2 s" in alone[0], alone
        # glm-finetune --nproc-per-node: torchrun's launcher cannot listen there (in this process: it fails before
        # any process group).
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert run_main(*PREFIX, "--nproc-per-node", 2, "--master-port", port, "--output-dir", tmp_path / "c") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"glm-finetune: error: port {port} is in use: choose another --master-port, or leave it out "
                       "to take a free one"]
    assert not any((tmp_path / d).exists() for d in "abc")


def test_more_ranks_than_micro_batches_is_one_line(tmp_path, capsys, monkeypatch):
    for k, v in dict(RANK=0, WORLD_SIZE=5, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()).items():
        monkeypatch.setenv(k, str(v))  # 4 rows of batch 1: a fifth rank would only repeat rows (refused unstarted)
    assert run_main(*PREFIX, "--output-dir", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "glm-finetune: error: 5 ranks but the data makes only 4 micro-batch(es) of --batch-size 1: use "
        "--nproc-per-node 4 or fewer"]


def test_ranks_that_disagree_on_the_checkpoint_stop_with_one_line(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(BASE, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "layernorm_epsilon": 1e-6}))
    args = [str(a) for a in PREFIX]
    port, out = free_port(), ["--output-dir", tmp_path / "out"]
    procs = [spawn(0, 2, port, *args, *out)]
    args[args.index("--model") + 1] = str(other)
    procs.append(spawn(1, 2, port, *args, *out))
    err0, err1 = wait_all(*procs)
    assert err0.strip().splitlines() == [
        "glm-finetune: error: ranks disagree on the checkpoint: rank(s) 1 differ from rank 0: give every rank the same "
        "--model (and --resume) files (compared: config.json, file sizes)"]
    assert [p.returncode for p in procs] == [1, 1] and err1 == ""  # rank 0 speaks for both
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--pre-seq-len", "4"], ["--quant", "4"], ["--dtype", "float16"]])
def test_full_refuses_what_it_cannot_train(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in DATA] + ["--full", *extra, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--full" in err[0], err


@pytest.mark.gpu
def test_full_on_cuda_computes_in_bfloat16_and_saves_a_checkpoint_that_loads(tmp_path):
    args = ["cuda" if a == "cpu" else a for a in FULL]  # NCCL, in a group of one
    r = finetune(*args, "--gradient-accumulation-steps", 1, "--max-steps", 2, "--gradient-checkpointing",
                 "--output-dir", tmp_path / "out", timeout=300)
    assert r.returncode == 0, r.stderr
    assert all(e["peak_memory_gb"] > 0 for e in log_of(tmp_path / "out") if "loss" in e)
    m = glm.load(tmp_path / "out", device="cuda")
    assert m.dtype == torch.float32 and torch.isfinite(m.logits([5, 6, 130001, 130004])).all()


def test_full_takes_the_official_learning_rate_unless_given():
    from glm.finetune import launch
    from glm.finetune.cli import build_parser

    parser = build_parser()
    for extra, lr in [([], 1e-4), (["--learning-rate", "3e-5"], 3e-5)]:
        args = parser.parse_args(["--train-file", "t.json", "--output-dir", "o", "--full", *extra])
        launch.check_args(parser, args)
        assert args.learning_rate == lr
    args = parser.parse_args(["--train-file", "t.json", "--output-dir", "o"])
    launch.check_args(parser, args)
    assert args.learning_rate == 2e-2  # P-Tuning's
