"""glm.finetune.predict and metrics: every row generated through the scheduler, batched or not the same, and the
official scores."""

import pytest
from finetune_cases import BASE, OPTS, TRAIN, golden_rows

import glm
from glm.finetune import OFFICIAL_GENERATION, generate_rows, generation_rows, score_rows


@pytest.fixture(scope="module")
def prefixed():
    return glm.load(BASE, ptuning=TRAIN / "prefix-mlp")


def test_generation_rows_are_the_official_eval_preprocessing(prefixed):
    tok = prefixed.tokenizer
    prompts, refs = generation_rows(tok, golden_rows(), **{**OPTS, "max_source_length": 12, "max_target_length": 6})
    assert len(prompts) == len(refs) == 4
    # Prompt ids cut to max_source_length - 2, then [gMASK] <sop>; a history row as the chat renders it.
    assert prompts[0] == tok.encode("类型#上衣*材质#牛仔布*颜色#白色*风格#简约")[:10] + [tok.gmask_id, tok.bos_id]
    history = golden_rows()[2]["history"]
    assert prompts[2][:-2] == tok.encode(glm.chat.build_prompt("那它适合什么季节穿？", history), False)[:10]
    assert refs[1] == tok.decode(tok.encode("Soft rain on the roof,", False)[:4]).strip()


def test_predictions_do_not_depend_on_the_batch(prefixed, capsys):
    prompts, _ = generation_rows(prefixed.tokenizer, golden_rows(), **OPTS)
    config = OFFICIAL_GENERATION.replace(max_length=64)
    alone, _ = generate_rows(prefixed, prompts, config, seed=7, max_batch=1)
    prefixed.model.prefix_encoder.train()  # as between training steps: generation turns the dropout off
    batched, seconds = generate_rows(prefixed, prompts, config, seed=7, max_batch=4, progress=True)
    assert prefixed.model.prefix_encoder.training  # and back on after it
    prefixed.model.prefix_encoder.eval()
    assert batched == alone and len(set(alone)) == 4 and seconds > 0
    assert generate_rows(prefixed, prompts[:1], config, seed=8, max_batch=4)[0] != alone[:1]  # seed + row index
    err = capsys.readouterr().err
    assert "predicting" in err and "row/s" in err  # the progress bar, rows per second


def test_scores_of_known_texts():
    s = score_rows(["简约的白色牛仔上衣", "", "rain"], ["简约的白色牛仔上衣", "春秋", "rain"])
    # Rows 1 and 3 are perfect (a one-word row has no bigram: ROUGE-2 0); row 2 is empty (ROUGE 0: rouge_chinese
    # refuses an empty text; BLEU 0).
    assert s == pytest.approx({"rouge-1": 200 / 3, "rouge-2": 100 / 3, "rouge-l": 200 / 3, "bleu-4": 200 / 3})
    assert list(s) == ["rouge-1", "rouge-2", "rouge-l", "bleu-4"]
