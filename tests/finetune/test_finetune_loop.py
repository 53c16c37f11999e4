"""glm.finetune.loop: the data order, finding a checkpoint, and a resumed run that continues exactly."""

import json

import pytest
import torch
from finetune_cases import BASE, TRAIN, finetune

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
