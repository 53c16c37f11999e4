"""Prompt layout, 2D positions, the left-padded batch and the prompt checks."""

import pytest
from glm_testutil import FIXTURES, glm_tiny_cases

import glm
from glm.generation.inputs import prompt_positions

G, GT, PROMPTS, GREEDY = glm_tiny_cases()


def _ref_logits(case):
    return GT[case["logits"]]


def test_mask_infill_positions_follow_the_mask():
    case = next(c for c in G["cases"] if c["kind"] == "mask_infill")
    cfg = glm.GLMConfig.from_json(FIXTURES / "glm-tiny" / "config.json")
    pos, block = prompt_positions(case["input_ids"], cfg)
    mask_at = case["input_ids"].index(cfg.mask_token_id)
    assert pos[-1] == mask_at and block[-1] == 1 and block[0] == 0


def test_left_padded_batch(tiny):
    case = next(c for c in G["cases"] if c["kind"] == "batch")
    from glm.generation import Batch

    b = Batch.from_prompts(case["prompts"], tiny.config)
    assert b.ids.tolist() == case["padded_input_ids"]
    assert tiny.generate(case["prompts"], 24, stop_at_eos=False) == case["greedy_ids"]


def test_prompt_without_sop_is_a_clear_error(tiny):
    with pytest.raises(glm.GenerationError, match="<sop>"):
        tiny.generate([5, 6, 7], 3)


def test_prompt_over_max_length_is_a_clear_error(tiny):
    with pytest.raises(glm.GenerationError, match="max_length"):
        tiny.generate([5, 6, 1001, 1004], max_length=4)


