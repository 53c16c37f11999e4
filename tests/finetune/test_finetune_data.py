"""glm.finetune.data: reading JSON-lines rows and the official preprocessing, against the reference goldens."""

import pytest
from finetune_cases import OPTS, G, golden_rows

from glm.finetune import DataError, preprocess_rows, read_rows


def test_preprocess_rows_gives_the_official_ids_and_labels(chatglm_tiny):
    ids, labels = preprocess_rows(chatglm_tiny.tokenizer, golden_rows(), **OPTS)
    assert ids == G["input_ids"]
    assert labels == G["labels"]


def test_an_empty_history_is_round_0_as_the_official_trainer_renders_it(chatglm_tiny):
    # The official preprocess_function_train numbers every row of a history column, `[]` included (its chat sends
    # the bare query instead); a row without the column is the bare query.
    tok = chatglm_tiny.tokenizer
    opts = {**OPTS, "max_source_length": 40, "max_target_length": 8}
    ids, _ = preprocess_rows(tok, [
        {"content": "hi", "summary": "x", "history": []},
        {"content": "[Round 0]\n问：hi\n答：", "summary": "x"},
        {"content": "hi", "summary": "x"},
    ], **opts)
    assert ids[0] == ids[1] != ids[2]


def test_the_data_error_is_the_one_of_glm_errors():
    from glm.errors import DataError as Error

    assert DataError is Error


def test_bad_rows_are_one_line_errors(chatglm_tiny, tmp_path):
    tok = chatglm_tiny.tokenizer
    with pytest.raises(DataError, match="'prompt'"):
        preprocess_rows(tok, golden_rows(), **{**OPTS, "prompt_column": "prompt"})
    with pytest.raises(DataError, match="cut to nothing"):
        preprocess_rows(tok, golden_rows(), **{**OPTS, "max_source_length": 1})
    with pytest.raises(DataError, match="non-empty"):
        preprocess_rows(tok, [{"content": "", "summary": "x"}], **{**OPTS, "history_column": None})
    with pytest.raises(DataError, match="row 1: column 'history'"):
        preprocess_rows(tok, [{"content": "a", "summary": "b", "history": "c"}], **OPTS)
    f = tmp_path / "t.json"
    f.write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        read_rows(f)
    f.write_text('{"content": "a", "summary": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        read_rows(f)


def test_a_utf8_bom_is_read(tmp_path):
    f = tmp_path / "t.json"
    f.write_bytes('\ufeff{"content": "a", "summary": "b"}\n'.encode())
    assert read_rows(f) == [{"content": "a", "summary": "b"}]


def test_source_prefix_and_val_max_target_length(chatglm_tiny):
    from glm.finetune import generation_rows

    tok, rows = chatglm_tiny.tokenizer, [{"content": "hi", "summary": "Soft rain on the roof"}]
    opts = {**OPTS, "history_column": None, "max_source_length": 16, "max_target_length": 16}
    assert preprocess_rows(tok, rows, **opts, source_prefix="Q: ")[0] == \
        preprocess_rows(tok, [{**rows[0], "content": "Q: hi"}], **opts)[0]
    prompts, refs = generation_rows(tok, rows, **opts, source_prefix="Q: ")
    assert prompts == [tok.encode("Q: hi")] and refs == ["Soft rain on the roof"]
    _, short = generation_rows(tok, rows, **{**opts, "max_target_length": 4})  # val_max_target_length - 2 tokens
    assert short == [tok.decode(tok.encode("Soft rain on the roof", False)[:2]).strip()] and short != refs
