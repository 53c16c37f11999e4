"""glm.finetune.loop: the data order, finding a checkpoint, and a resumed run that continues exactly."""

import json

import pytest
import torch
from finetune_cases import BASE, OPTS, TRAIN, finetune, golden_rows

from glm.errors import CheckpointError
from glm.finetune import batch_order, find_checkpoint


def test_each_epoch_is_a_seeded_permutation_known_without_replay():
    epoch = lambda e: sum((batch_order(10, 3, 42, 4 * e + j) for j in range(4)), [])  # noqa: E731
    assert sorted(epoch(0)) == sorted(epoch(1)) == list(range(10))
    assert epoch(0) != epoch(1)  # a fresh order each epoch
    assert batch_order(10, 3, 42, 5) == epoch(1)[3:6]  # any micro-batch on its own, as --resume needs


def test_find_checkpoint_takes_the_latest_complete_one(tmp_path):
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-20", False),
                           ("checkpoint-x", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by number, not by name
    assert find_checkpoint(tmp_path / "checkpoint-2") == tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match="not a glm-finetune checkpoint"):
        find_checkpoint(tmp_path / "checkpoint-20")


def test_cli_resume_continues_exactly(tmp_path):
    common = ["--model", BASE, "--train-file", TRAIN / "train.json", "--max-source-length", 24,
              "--max-target-length", 12, "--pre-seq-len", 4, "--prefix-projection", "--learning-rate", 0.05,
              "--batch-size", 2, "--gradient-accumulation-steps", 2, "--max-steps", 4, "--save-steps", 2,
              "--logging-steps", 1]
    r = finetune(*common, "--output-dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r = finetune(*common, "--output-dir", tmp_path / "a")
    assert r.returncode == 1 and "--resume" in r.stderr  # will not silently mix two runs
    r = finetune(*common, "--resume", tmp_path / "a" / "checkpoint-2", "--output-dir", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "a" / "pytorch_model.bin", weights_only=True)
    b = torch.load(tmp_path / "b" / "pytorch_model.bin", weights_only=True)
    assert sorted(a) == sorted(b) and len(a) == 5
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in "ab"]
    steps = [[(e["step"], e["loss"], e["learning_rate"], e["epoch"]) for e in log if "loss" in e] for log in logs]
    assert steps[0] == steps[1]
    # As the Trainer logs: the rate set for the next step, epochs of 2 micro-batches (4 rows of 2) each.
    assert [x for s in steps[1] for x in (s[0], s[2], s[3])] == pytest.approx(
        [1, 0.0375, 1.0, 2, 0.025, 2.0, 3, 0.0125, 3.0, 4, 0.0, 4.0])
    assert all("train_runtime" in log[-1] and log[-1]["step"] == 4 for log in logs)


def _rows():
    import glm
    from glm.finetune import preprocess_rows

    m = glm.load(BASE)
    return m, preprocess_rows(m.tokenizer, golden_rows(), **{**OPTS, "max_source_length": 24, "max_target_length": 8})


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from glm.finetune.cli import main

    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)  # an earlier run of ours, which --overwrite_output_dir clears
    (out / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7}')
    (out / "train_args.json").write_text("{}")
    # A learning rate of 1e30: the first step's prefix is finite, the next loss is not.
    rc = main(["--model", str(BASE), "--train-file", str(TRAIN / "train.json"), "--max-source-length", "24",
               "--max-target-length", "8", "--pre-seq-len", "4", "--learning-rate", "1e30", "--batch-size", "4",
               "--gradient-accumulation-steps", "1", "--max-steps", "4", "--save-steps", "1", "--output-dir", str(out),
               "--overwrite_output_dir"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("glm-finetune: error: the ") and "at step 2: training diverged and " \
        f"stopped; the last good checkpoint is {out / 'checkpoint-1'}. Lower --learning-rate" in err[-1], err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "pytorch_model.bin").exists()  # no NaN prefix saved as the result
    state = torch.load(out / "checkpoint-1" / "pytorch_model.bin", weights_only=True)
    assert all(t.isfinite().all() for t in state.values())


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(tmp_path, capsys, monkeypatch):
    import glm.finetune.cli as cli

    calls = []

    def interrupt(preds, refs):  # Ctrl+C arriving while the first evaluation scores
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "score_rows", interrupt)
    out = tmp_path / "out"
    common = ["--model", str(BASE), "--train-file", str(TRAIN / "train.json"), "--max-source-length", "24",
              "--max-target-length", "8", "--pre-seq-len", "4", "--batch-size", "4", "--gradient-accumulation-steps",
              "1", "--max-steps", "3", "--save-steps", "2", "--logging-steps", "1", "--output-dir", str(out)]
    assert cli.main([*common, "--do_train", "--do_eval", "--validation_file", str(TRAIN / "train.json"),
                     "--predict_with_generate", "--generation_max_length", "30", "--max_eval_samples", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"glm-finetune: interrupted at step 2: saved {out / 'checkpoint-2'}; continue with --resume "
                       f"{out}") and calls == [1]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert cli.main([*common, "--resume", str(out)]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]


def test_an_optimizer_state_of_other_shapes_is_a_one_line_error(tmp_path):
    from glm.finetune import TrainConfig, add_prefix, train

    m, (ids, labels) = _rows()
    add_prefix(m, 4, seed=0)
    other = torch.nn.Parameter(torch.zeros(6, m.config.num_layers * 2 * m.config.hidden_size))
    opt = torch.optim.AdamW([other])
    other.grad = torch.ones_like(other)
    opt.step()
    ck = tmp_path / "checkpoint-1"
    ck.mkdir()
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    (ck / "trainer_state.json").write_text('{"global_step": 1, "log_history": []}')
    with pytest.raises(CheckpointError, match=r"optimizer.pt does not fit this run's trainable parameters \(its "
                                              r"exp_avg of shape \(6, 64\) is for a parameter of another shape"):
        train(m, ids, labels, TrainConfig(max_steps=2), tmp_path / "out", resume=ck)
