"""Data: JSON-lines rows, and the official preprocessing into training ids and labels, or generation prompts and
reference texts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from glm.chat import build_prompt
from glm.errors import DataError

IGNORE = -100  # label of the positions the loss skips (the prompt, the pads): PyTorch's ignore_index


class Rows(list):
    """The rows of a file, each with the line it was read from, so that errors name the file and the line."""

    def __init__(self, rows, path: Path | None = None, lines: list[int] | None = None):
        super().__init__(rows)
        self.path = path
        self.lines = lines

    def where(self, i: int) -> str:
        """Where row i (0-based) came from: `FILE line N`, or `row N` for rows not read from a file."""
        if self.path is not None and self.lines is not None:
            return f"{self.path} line {self.lines[i]}"
        return f"row {i + 1}"

    def head(self, n: int | None) -> Rows:
        """The first n rows (`--max_*_samples`, taken before preprocessing as the official scripts do)."""
        return self if n is None else Rows(self[:n], self.path, None if self.lines is None else self.lines[:n])


def _rows(rows) -> Rows:
    return rows if isinstance(rows, Rows) else Rows(rows)


def read_rows(path: str | os.PathLike) -> Rows:
    """The rows of a JSON-lines file (one JSON object a line; blank lines are skipped; a UTF-8 BOM is read)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # editors on Windows start files with a BOM
    except FileNotFoundError:
        raise DataError(f"no such file {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder: name a JSON-lines file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    rows, lines = [], []
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
        lines.append(n)
    if not rows:
        raise DataError(f"{path} is empty: it must hold one JSON object a line")
    return Rows(rows, path, lines)


def _history(row: dict, history_column: str | None, where: str) -> list | None:
    """The row's [query, reply] rounds, checked; None without a history column (or a null history)."""
    if history_column is None or row.get(history_column) is None:
        return None
    history = row[history_column]
    ok = isinstance(history, list) and all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history)
    if not ok:
        raise DataError(f"{where}: column {history_column!r} must be a list of [query, reply] pairs of strings, "
                        f"got {json.dumps(history, ensure_ascii=False):.80}")
    return history


def _check_columns(rows: Rows, prompt_column: str, response_column: str, history_column: str | None) -> None:
    where = f"{rows.path}: " if rows.path is not None else ""
    for col, option in ((prompt_column, "--prompt-column"), (response_column, "--response-column"),
                        (history_column, "--history-column")):
        if col is not None and not any(col in r for r in rows):
            have = sorted({k for r in rows for k in r})
            raise DataError(f"{where}no row has the column {col!r} (the rows have {', '.join(map(repr, have))}): "
                            f"name the right one with {option}")


def _pairs(rows: Rows, prompt_column: str, response_column: str, history_column: str | None, rounds: bool,
           source_prefix: str):
    """(index, prompt text, response text) of the rows with a non-empty prompt and response, as the official
    code keeps them; the prompt rendered with the row's history rounds."""
    _check_columns(rows, prompt_column, response_column, history_column)
    for i, row in enumerate(rows):
        query, answer = row.get(prompt_column), row.get(response_column)
        if not query or not answer:
            continue
        if not isinstance(query, str) or not isinstance(answer, str):
            raise DataError(f"{rows.where(i)}: columns {prompt_column!r} and {response_column!r} must hold text")
        history = _history(row, history_column, rows.where(i))
        prompt = query if history is None else build_prompt(query, history, rounds=rounds)
        yield i, source_prefix + prompt, answer


def preprocess_rows(
    tokenizer,
    rows: Sequence[dict],
    *,
    max_source_length: int,
    max_target_length: int,
    prompt_column: str,
    response_column: str,
    history_column: str | None = None,
    source_prefix: str = "",
) -> tuple[list[list[int]], list[list[int]]]:
    """Training rows exactly as the official `preprocess_function_train` builds them.

    Each row becomes `prompt + [gMASK] <sop> + response + <eop>`, the prompt ids cut to max_source_length - 1 and
    the response ids to max_target_length - 2, right-padded to max_source_length + max_target_length. Labels are
    -100 before `<sop>`, then the ids from `<sop>` on; pads are -100. Rows whose prompt or response is empty are
    skipped, as the official code skips them. A row whose history is `[]` still gets `[Round 0]`: the official
    trainer numbers every row of a history column, unlike the official chat.

    Args:
        tokenizer: a `glm.Tokenizer`.
        rows: dicts with the prompt, response and optionally history columns (`read_rows` keeps their lines, for
            the errors).
        max_source_length, max_target_length: the official length limits.
        prompt_column, response_column: the column names.
        history_column: a column of [query, reply] rounds rendered before the prompt; None: no history.
        source_prefix: text put before every prompt (the official `--source_prefix`).
    Returns:
        (input_ids, labels): lists of lists of ints, each row max_source_length + max_target_length long.
    """
    if max_source_length < 1 or max_target_length < 2:
        raise DataError("max_source_length must be >= 1 and max_target_length >= 2 (room for [gMASK] <sop> <eop>)")
    rows = _rows(rows)
    seq_len = max_source_length + max_target_length
    pad = tokenizer.pad_id
    input_ids, labels, prompt_tokens = [], [], 0
    for _, prompt, answer in _pairs(rows, prompt_column, response_column, history_column, True, source_prefix):
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
    where = f"{rows.path}: " if rows.path is not None else ""
    if not input_ids:
        raise DataError(f"{where}no row has both a non-empty {prompt_column!r} and a non-empty {response_column!r}")
    if prompt_tokens == 0:
        raise DataError(f"{where}every prompt of column {prompt_column!r} is cut to nothing "
                        f"(max_source_length {max_source_length} keeps {max_source_length - 1} tokens): "
                        "raise --max-source-length")
    return input_ids, labels


def generation_rows(
    tokenizer,
    rows: Sequence[dict],
    *,
    max_source_length: int,
    max_target_length: int,
    prompt_column: str,
    response_column: str,
    history_column: str | None = None,
    source_prefix: str = "",
) -> tuple[list[list[int]], list[str]]:
    """Prompts to generate from and the reference texts, as the official `preprocess_function_eval` builds them.

    The prompt is the query alone when the row has no history (or `[]`, unlike training), else the chat template's
    rounds; its ids are cut to max_source_length - 2 and `[gMASK] <sop>` appended (the tokenizer's truncation
    counts the two special tokens). The reference is the response's ids cut to max_target_length - 2 (the official
    `--val_max_target_length`), decoded, stripped: what `generated_predictions.txt` calls `labels`.

    Returns:
        (prompts, references): one prompt (list of ids) and one text per row kept.
    """
    if max_source_length < 3 or max_target_length < 3:
        raise DataError("max_source_length and max_target_length must be >= 3 for generation (room for "
                        "[gMASK] <sop> and one token)")
    rows = _rows(rows)
    prompts, refs = [], []
    for _, prompt, answer in _pairs(rows, prompt_column, response_column, history_column, False, source_prefix):
        a = tokenizer.encode(prompt, add_special_tokens=False)[: max_source_length - 2]
        prompts.append(a + [tokenizer.gmask_id, tokenizer.bos_id])
        b = tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]
        refs.append(tokenizer.decode(b).strip())
    if not prompts:
        where = f"{rows.path}: " if rows.path is not None else ""
        raise DataError(f"{where}no row has both a non-empty {prompt_column!r} and a non-empty {response_column!r}")
    return prompts, refs


__all__ = ["IGNORE", "DataError", "Rows", "generation_rows", "preprocess_rows", "read_rows"]
