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
            "print(main.__module__, 'glm.options' in sys.modules)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jieba', 'nltk', 'rouge_chinese')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "glm.finetune.cli True", "[]"]  # the scorers load when they score


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (['{"content": "a", "summary": "b"}', '{"content": "a", summary: "b"}'], [], "line 2 is not JSON"),
        ([], [], "is empty"),
        (['{"content": "a", "summary": "b"}'], ["--response-column", "answer"], "no row has the column 'answer'"),
        (['{"content": "a", "summary": "b"}'], ["--pre-seq-len", "0"], "--pre-seq-len must be a positive"),
        (['{"content": "a b c", "summary": "b"}'], ["--max-source-length", "1"], "cut to nothing"),
        (['{"content": "a", "summary": "b"}'], ["--max-source-length", "4000"], "max_sequence_length"),
        (['{"content": "a", "summary": "b", "history": []}'], ["--history_column", "hist"],
         "no row has the column 'hist' (the rows have 'content', 'history', 'summary'): name the right one with "
         "--history-column"),
        (['', '{"content": "a", "summary": "b", "history": [["q", null]]}'], ["--history_column", "history"],
         "train.json line 2: column 'history' must be a list of [query, reply] pairs of strings"),
        (['{"content": "a", "summary": "b"}'], ["--do_predict", "--test_file", "{train}"],
         "--do_predict needs --predict_with_generate"),
        (['{"content": "a", "summary": "b"}'], ["--do_eval"], "--do_eval needs --validation_file"),
        (['{"content": "a", "summary": "b"}'], ["--num_beams", "4"], "beam search is not offered"),
        (['{"content": "a", "summary": "b"}'], ["--lora-rank", "0"], "--lora-rank must be a positive integer"),
        (['{"content": "a", "summary": "b"}'], ["--lora-rank", "4", "--lora-alpha", "-1"],
         "--lora-alpha must be a positive number"),
        (['{"content": "a", "summary": "b"}'], ["--lora-rank", "4", "--lora-target", "qkv"], "--lora-target 'qkv'"),
        (['{"content": "a", "summary": "b"}'], ["--validation_file", "{bad}"], "bad.json line 3 is not JSON"),
        (['{"content": "a", "summary": "b"}'], ["--validation_file", "{train}", "--do_eval", "--response_column",
                                                "summary", "--prompt_column", "text"],
         "train.json: no row has the column 'text'"),
    ],
    ids=["not-json", "empty", "missing-column", "pre-seq-len", "cut-to-nothing", "too-long", "mistyped-history",
         "null-in-history", "predict-needs-generate", "eval-needs-file", "beams", "lora-rank", "lora-alpha",
         "lora-target", "validation-line", "validation-column"],
)
def test_bad_input_is_one_line(tmp_path, capsys, lines, extra, message):
    from glm.finetune.cli import main

    f = tmp_path / "train.json"
    f.write_text("".join(line + "\n" for line in lines))
    (tmp_path / "bad.json").write_text('{"content": "a", "summary": "b"}\n\n{"content": "a"\n')
    extra = [a.format(train=f, bad=tmp_path / "bad.json") for a in extra]
    try:
        rc = main(["--model", str(BASE), "--train-file", str(f), "--output-dir", str(tmp_path / "out"), *extra])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (1, 2) and len(err) == 1, err
    assert err[0].startswith("glm-finetune: error:") and message in err[0]
    assert not (tmp_path / "out").exists()  # the data is checked before anything is written (or loaded)


def _output_dir_case(tmp_path, case):
    out = tmp_path / "out"
    if case == "base-model":
        return BASE
    if case == "file":
        out.write_text("notes")
    elif case == "weights":
        out.mkdir()
        (out / "pytorch_model.bin").write_bytes(b"not ours")
    elif case in ("not-empty", "not-empty-overwrite"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "earlier-run":
        out.mkdir()
        (out / "train_args.json").write_text("{}")
        (out / "checkpoint-2").mkdir()
    return out


@pytest.mark.parametrize("case, message", [
    ("base-model", "is the folder of the model being read"),
    ("file", "is a file: name a folder"),
    ("weights", "holds pytorch_model.bin, which glm-finetune did not write (a model?): choose another folder"),
    ("not-empty", "is not empty: choose another folder, or pass --overwrite_output_dir"),
    ("earlier-run", "holds checkpoints of an earlier run: continue it with --resume"),
])
def test_output_dir_that_must_not_be_written_is_refused_before_loading(tmp_path, capsys, case, message):
    from glm.finetune.cli import main

    out = _output_dir_case(tmp_path, case)
    before = {p: p.read_bytes() for p in (out.rglob("*") if out.is_dir() else [out]) if p.is_file()}
    extra = ["--overwrite_output_dir"] if case in ("base-model", "weights") else []  # refused all the same
    rc = main(["--model", str(BASE), "--train-file", str(TRAIN / "train.json"), "--output-dir", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"glm-finetune: error: {err[0].split('error: ', 1)[1]}"] and message in err[0], err
    assert "glm: chatglm-tiny" not in err[0]  # before the model loads
    assert {p: p.read_bytes() for p in (out.rglob("*") if out.is_dir() else [out]) if p.is_file()} == before


def test_resume_edge_cases_are_one_line_before_loading(tmp_path, capsys):
    from glm.finetune.cli import main

    ck = tmp_path / "run" / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck.parent / "train_args.json").write_text("{}")
    (ck / "trainer_state.json").write_text('{"global_step": 4, "log_history": []}')
    common = ["--model", str(BASE), "--train-file", str(TRAIN / "train.json"), "--output-dir", str(tmp_path / "o")]
    assert main([*common, "--resume", str(ck.parent), "--max-steps", "4"]) == 1
    assert main([*common, "--resume_from_checkpoint", str(ck), "--max-steps", "8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"glm-finetune: error: {ck} is at step 4: --max-steps 4 leaves nothing to train; raise "
                   "--max-steps to continue",
                   f"glm-finetune: error: the checkpoint {ck} has no config.json (nor adapter_config.json): it is "
                   "incomplete; resume from another checkpoint"]
    assert not (tmp_path / "o").exists()


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


def test_every_official_name_sets_the_same_option_as_ours():
    from glm.finetune.cli import build_parser

    p = build_parser()
    pairs = [("--model_name_or_path", "--model", "m"), ("--model_revision", "--revision", "r"),
             ("--quantization_bit", "--quant", "4"), ("--ptuning_checkpoint", "--ptuning", "d"),
             ("--train_file", "--train-file", "t"), ("--validation_file", "--validation-file", "v"),
             ("--test_file", "--test-file", "t"), ("--prompt_column", "--prompt-column", "p"),
             ("--response_column", "--response-column", "r"), ("--history_column", "--history-column", "h"),
             ("--source_prefix", "--source-prefix", "s"), ("--max_source_length", "--max-source-length", "7"),
             ("--max_target_length", "--max-target-length", "7"),
             ("--val_max_target_length", "--val-max-target-length", "7"),
             ("--max_train_samples", "--max-train-samples", "3"), ("--max_eval_samples", "--max-eval-samples", "3"),
             ("--max_predict_samples", "--max-predict-samples", "3"), ("--pre_seq_len", "--pre-seq-len", "8"),
             ("--learning_rate", "--learning-rate", "0.5"), ("--per_device_train_batch_size", "--batch-size", "3"),
             ("--per_device_eval_batch_size", "--eval-batch-size", "3"),
             ("--gradient_accumulation_steps", "--gradient-accumulation-steps", "3"),
             ("--max_steps", "--max-steps", "3"), ("--save_steps", "--save-steps", "3"),
             ("--logging_steps", "--logging-steps", "3"), ("--resume_from_checkpoint", "--resume", "c"),
             ("--generation_max_length", "--generation-max-length", "30"), ("--num_beams", "--num-beams", "1")]
    base = ["--output_dir", "o"]
    defaults = vars(p.parse_args(base))
    for official, ours, value in pairs:
        a, b = vars(p.parse_args([*base, official, value])), vars(p.parse_args([*base, ours, value]))
        assert a == b and a != defaults, official
    for flag in ("do_train", "do_eval", "do_predict", "predict_with_generate", "overwrite_output_dir",
                 "prefix_projection", "overwrite_cache", "fp16"):
        assert getattr(p.parse_args([*base, f"--{flag}"]), flag) is True
        assert getattr(p.parse_args([*base, f"--{flag}", "false"]), flag) is False
    assert p.parse_args([*base, "--output-dir", "x"]).output_dir == "x"
