"""glm.finetune.cli: the real `glm-finetune` command on the tiny fixture, its one-line errors, and the line between
the command and the library."""

import json
import subprocess
import sys

import pytest
import torch
from finetune_cases import BASE, OPTS, ROOT, TRAIN, finetune, golden_rows

import glm
from glm.finetune import add_prefix, preprocess_rows, ptuning_loss


def test_console_script_is_registered():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["glm-finetune"] == "glm.finetune.cli:main"


def test_python_m_glm_finetune_help():
    r = finetune("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: glm-finetune") and "--train-file" in r.stdout


def test_the_library_imports_no_entry_point_code():
    code = ("import sys, glm.finetune\n"
            "from glm.finetune import data, loop, loss, prefix\n"
            "print(sorted(m for m in ('glm.options', 'glm.cli', 'glm.web', 'glm.serve', 'glm.finetune.cli') "
            "if m in sys.modules))\n"
            "from glm.finetune.cli import main\n"
            "print(main.__module__, 'glm.options' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "glm.finetune.cli True"]


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
    from glm.finetune.cli import main

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
    r = finetune("--model", BASE, "--train-file", f, "--output-dir", tmp_path / "out")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"glm-finetune: error: {f} line 2 is not JSON (Expecting value): "
                                             "the file must hold one JSON object a line"]


def test_cli_trains_and_its_output_loads_and_changes_the_reply(tmp_path, chatglm_tiny):
    out = tmp_path / "out"
    r = finetune("--model", BASE, "--train-file", TRAIN / "train.json", "--history-column", "history",
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
    ids, labels = preprocess_rows(chatglm_tiny.tokenizer, golden_rows(), **opts)
    start = glm.load(BASE)
    add_prefix(start, 8, seed=42)
    trained = glm.load(BASE, ptuning=out)
    with torch.no_grad():
        before, after = ptuning_loss(start, ids, labels).item(), ptuning_loss(trained, ids, labels).item()
    assert after < before - 1.5, (before, after)  # perplexity down by more than 4x
    prompt = chatglm_tiny.tokenizer.encode("类型#上衣*材质#牛仔布")
    assert trained.generate(prompt, 8) != chatglm_tiny.generate(prompt, 8)


def test_chat_takes_ptuning_option(tmp_path):
    from glm.options import ArgumentParser, add_model_args

    p = ArgumentParser()
    add_model_args(p)
    assert p.parse_args(["--ptuning", str(tmp_path)]).ptuning == str(tmp_path)
