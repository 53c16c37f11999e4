"""The official ptuning scripts' command lines, typed in as they are (only the data and model paths swapped for the
tiny fixtures, and a few steps appended), run by glm-finetune; the scores they write recomputed with the official
formula from generated_predictions.txt."""

import json
import re
import shlex

import numpy as np
from finetune_cases import BASE, TRAIN, finetune

from glm.finetune.cli import main

TRAIN_SH = r"""
PRE_SEQ_LEN=128
LR=2e-2

CUDA_VISIBLE_DEVICES=0 python3 main.py \
    --do_train \
    --train_file AdvertiseGen/train.json \
    --validation_file AdvertiseGen/dev.json \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path THUDM/chatglm-6b \
    --output_dir output/adgen-chatglm-6b-pt-$PRE_SEQ_LEN-$LR \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --predict_with_generate \
    --max_steps 3000 \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate $LR \
    --pre_seq_len $PRE_SEQ_LEN \
    --quantization_bit 4
"""

EVALUATE_SH = r"""
PRE_SEQ_LEN=128
CHECKPOINT=adgen-chatglm-6b-pt-128-2e-2
STEP=3000

CUDA_VISIBLE_DEVICES=0 python3 main.py \
    --do_predict \
    --validation_file AdvertiseGen/dev.json \
    --test_file AdvertiseGen/dev.json \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path THUDM/chatglm-6b \
    --ptuning_checkpoint ./output/$CHECKPOINT/checkpoint-$STEP \
    --output_dir ./output/$CHECKPOINT \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_eval_batch_size 1 \
    --predict_with_generate \
    --pre_seq_len $PRE_SEQ_LEN \
    --quantization_bit 4
"""

DS_TRAIN_FINETUNE_SH = r"""
LR=1e-4

MASTER_PORT=$(shuf -n 1 -i 10000-65535)

deepspeed --num_gpus=4 --master_port $MASTER_PORT main.py \
    --deepspeed deepspeed.json \
    --do_train \
    --train_file AdvertiseGen/train.json \
    --test_file AdvertiseGen/dev.json \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path THUDM/chatglm-6b \
    --output_dir ./output/adgen-chatglm-6b-ft-$LR \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 1 \
    --predict_with_generate \
    --max_steps 5000 \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate $LR \
    --fp16
"""

PATHS = {"AdvertiseGen/train.json": TRAIN / "train.json", "AdvertiseGen/dev.json": TRAIN / "train.json",
         "THUDM/chatglm-6b": BASE}


def command_line(script: str, **variables) -> list[str]:
    """The arguments the script passes to main.py, its shell variables expanded (`variables` replace some), the
    data and model paths swapped for the fixtures."""
    values = {**dict(re.findall(r"^(\w+)=(\S+)$", script, re.M)), **variables}
    line = script.split("main.py", 1)[1].replace("\\\n", " ")
    for name in sorted(values, key=len, reverse=True):
        line = line.replace(f"${name}", str(values[name]))
    return [str(PATHS.get(a, a)) for a in shlex.split(line)]


def official_scores(path) -> dict[str, float]:
    """`compute_metrics` of ptuning/main.py, over the texts of generated_predictions.txt (an empty text scores 0
    ROUGE, where rouge_chinese raises)."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        pred, label = row["predict"], row["labels"]
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if " ".join(hypothesis).split() and " ".join(reference).split():
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        else:
            result = {k: {"f": 0.0} for k in ("rouge-1", "rouge-2", "rouge-l")}
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}


def test_train_sh_then_evaluate_sh(tmp_path, monkeypatch):
    # train.sh in its own process, as a user runs it: one step of 16 rows instead of 3000.
    r = finetune(*command_line(TRAIN_SH), "--max_steps", 1, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "output" / "adgen-chatglm-6b-pt-128-2e-2"
    assert {"checkpoint-1", "pytorch_model.bin", "train_results.json"} <= {p.name for p in out.iterdir()}
    assert r.stderr.count("eval_loss") == 1  # the validation loss at each save, shown as well as logged
    assert r.stderr.strip().splitlines()[-1].endswith(f"--quant 4 --ptuning {out.relative_to(tmp_path)}")
    train_results = json.loads((out / "train_results.json").read_text())
    assert train_results["train_samples"] == 4 and train_results["epoch"] == 4.0

    # evaluate.sh on that run's last checkpoint, in the same folder; 2 rows, and shorter predictions than 512.
    argv = command_line(EVALUATE_SH, STEP=1) + ["--max_predict_samples", "2", "--generation_max_length", "96"]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    lines = (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2 and all(set(row) == {"labels", "predict"} for row in rows)
    assert rows[0]["labels"] == "简约的白色牛仔上衣,百搭又清爽。"  # the reference as the tokenizer gives it back
    results = json.loads((out / "predict_results.json").read_text())
    assert set(results) == {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4",
                            "predict_runtime", "predict_samples_per_second", "predict_steps_per_second",
                            "predict_samples"}
    assert results["predict_samples"] == 2
    expected = official_scores(out / "generated_predictions.txt")
    assert {k: results[f"predict_{k}"] for k in expected} == expected
    combined = json.loads((out / "all_results.json").read_text())
    assert combined["train_samples"] == 4 and combined["predict_samples"] == 2  # merged, as the Trainer does
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()  # the training run's files are untouched


def test_ds_train_finetune_sh(tmp_path, capsys, monkeypatch):
    # Full fine-tuning in the official script; here a prefix trains (said on the terminal), in one process.
    monkeypatch.chdir(tmp_path)
    assert main(command_line(DS_TRAIN_FINETUNE_SH) + ["--max_steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "--deepspeed is not read" in err and "pre_seq_len 128 (without --pre_seq_len main.py fine-tunes" in err
    out = tmp_path / "output" / "adgen-chatglm-6b-ft-1e-4"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["epoch"]) for e in log if "loss" in e] == [(2, 2.0)]  # 4 rows a batch: an epoch a step

