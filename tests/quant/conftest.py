"""Fixtures of the quantization tests: the tiny checkpoints' state dicts, read once per session."""

import pytest
from ckpt import read_checkpoint


@pytest.fixture(scope="session")
def fp16_sd():
    return read_checkpoint("glm-tiny")


@pytest.fixture(scope="session")
def int8_sd():
    return read_checkpoint("glm-tiny-int8")


@pytest.fixture(scope="session")
def int4_sd():
    return read_checkpoint("glm-tiny-int4")
