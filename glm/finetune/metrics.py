"""The official scores of generated text: ROUGE-1/2/L F (jieba words, rouge_chinese) and BLEU-4 (nltk, characters,
smoothing method 3), each per row x100 rounded to 4 places, then averaged: `compute_metrics` of `ptuning/main.py`.

jieba, rouge-chinese and nltk are imported on first use (`pip install 'glm[finetune]'`); nltk needs no downloads
(sentence_bleu only).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import numpy as np

from glm.errors import DataError

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")  # the official names (and order) of the scores
PACKAGES = {"jieba": "jieba", "rouge_chinese": "rouge-chinese", "nltk": "nltk"}


def check_metric_packages() -> None:
    """Raise DataError (one line) when a package the scores need is missing; imports nothing."""
    missing = [pip for mod, pip in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise DataError(f"the official scores need {', '.join(missing)}: pip install 'glm[finetune]' "
                        f"(or pip install {' '.join(missing)})")


def score_rows(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The official scores of `predictions` against `references` (one text each, as generated_predictions.txt
    holds them): {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}, averages over the rows of per-row scores x100.

    A row whose prediction (or reference) has no word scores 0 ROUGE: rouge_chinese raises on an empty text, and the
    official script stops there ("Hypothesis is empty").
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return dict.fromkeys(KEYS, 0.0)
    check_metric_packages()
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # not "Building prefix dict ..." on every run
    rouge, smooth = Rouge(), SmoothingFunction().method3
    scores: dict[str, list[float]] = {k: [] for k in KEYS}
    for pred, ref in zip(predictions, references):
        try:
            result = rouge.get_scores(" ".join(jieba.cut(pred)), " ".join(jieba.cut(ref)))[0]
        except ValueError as e:  # "Hypothesis is empty." / "Reference is empty."
            if "empty" not in str(e):
                raise
            result = {k: {"f": 0.0} for k in KEYS[:3]}
        for k, v in result.items():
            scores[k].append(round(v["f"] * 100, 4))
        scores["bleu-4"].append(round(sentence_bleu([list(ref)], list(pred), smoothing_function=smooth) * 100, 4))
    return {k: float(np.mean(v)) for k, v in scores.items()}


__all__ = ["KEYS", "check_metric_packages", "score_rows"]
