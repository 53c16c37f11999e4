"""Training data: JSON-lines rows, and the official preprocessing into ids and labels."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from glm.chat import build_prompt
from glm.errors import DataError

IGNORE = -100  # label of the positions the loss skips (the prompt, the pads): PyTorch's ignore_index


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (one JSON object a line; blank lines are skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no such file {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg}): the file must hold one JSON object a line") \
                from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n} is not a JSON object: the file must hold one JSON object a line")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} is empty: it must hold one JSON object a line")
    return rows


def _prompt(query: str, history, history_column: str | None, line: int) -> str:
    """The official training prompt: the query alone without a history, else the chat template's rounds.

    A row whose history is `[]` still gets `[Round 0]` (`rounds=True`): the official `preprocess_function_train`
    numbers every row of a history column, unlike the official chat.
    """
    if history_column is None or history is None:
        return query
    if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
        raise DataError(f"row {line}: column {history_column!r} must be a list of [query, reply] pairs")
    return build_prompt(query, history, rounds=True)


def preprocess_rows(
    tokenizer,
    rows: Sequence[dict],
    *,
    max_source_length: int,
    max_target_length: int,
    prompt_column: str,
    response_column: str,
    history_column: str | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Training rows exactly as the official `preprocess_function_train` builds them.

    Each row becomes `prompt + [gMASK] <sop> + response + <eop>`, the prompt ids cut to max_source_length - 1 and
    the response ids to max_target_length - 2, right-padded to max_source_length + max_target_length. Labels are
    -100 before `<sop>`, then the ids from `<sop>` on; pads are -100. Rows whose prompt or response is empty are
    skipped, as the official code skips them.

    Args:
        tokenizer: a `glm.Tokenizer`.
        rows: dicts with the prompt, response and optionally history columns.
        max_source_length, max_target_length: the official length limits.
        prompt_column, response_column: the column names.
        history_column: a column of [query, reply] rounds rendered before the prompt; None: no history.
    Returns:
        (input_ids, labels): lists of lists of ints, each row max_source_length + max_target_length long.
    """
    if max_source_length < 1 or max_target_length < 2:
        raise DataError("max_source_length must be >= 1 and max_target_length >= 2 (room for [gMASK] <sop> <eop>)")
    for col in (prompt_column, response_column):
        if not any(col in r for r in rows):
            have = sorted({k for r in rows for k in r})
            raise DataError(f"no row has the column {col!r} (the rows have {', '.join(map(repr, have))}): "
                            "name the right one with --prompt-column / --response-column")
    seq_len = max_source_length + max_target_length
    pad = tokenizer.pad_id
    input_ids, labels, prompt_tokens = [], [], 0
    for n, row in enumerate(rows, 1):
        query, answer = row.get(prompt_column), row.get(response_column)
        if not query or not answer:
            continue
        if not isinstance(query, str) or not isinstance(answer, str):
            raise DataError(f"row {n}: columns {prompt_column!r} and {response_column!r} must hold text")
        prompt = _prompt(query, row.get(history_column) if history_column else None, history_column, n)
        a = tokenizer.encode(prompt, add_special_tokens=False)[: max_source_length - 1]
        b = tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]
        prompt_tokens += len(a)
        ids = a + [tokenizer.gmask_id, tokenizer.bos_id] + b + [tokenizer.eos_id]
        ctx = len(a) + 1  # the index of <sop>
        lab = [IGNORE] * ctx + ids[ctx:]
        # The official code pads the labels with the pad id, then ignores every label equal to it.
        lab = [IGNORE if t == pad else t for t in lab] + [IGNORE] * (seq_len - len(ids))
        input_ids.append(ids + [pad] * (seq_len - len(ids)))
        labels.append(lab)
    if not input_ids:
        raise DataError(f"no row has both a non-empty {prompt_column!r} and a non-empty {response_column!r}")
    if prompt_tokens == 0:
        raise DataError(f"every prompt of column {prompt_column!r} is cut to nothing "
                        f"(max_source_length {max_source_length} keeps {max_source_length - 1} tokens): "
                        "raise --max-source-length")
    return input_ids, labels


__all__ = ["IGNORE", "DataError", "preprocess_rows", "read_rows"]
