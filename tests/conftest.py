import json
import random
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def golden(name: str):
    """(golden.json as dict, golden.safetensors tensors) of a fixture folder."""
    from safetensors.torch import load_file

    folder = FIXTURES / name
    return json.loads((folder / "golden.json").read_text()), load_file(str(folder / "golden.safetensors"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_state():
    torch.manual_seed(0)
    random.seed(0)
    dt = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dt)


@pytest.fixture(scope="session")
def tiny():
    import glm

    return glm.load(FIXTURES / "glm-tiny")


@pytest.fixture(scope="session")
def chatglm_tiny():
    import glm

    return glm.load(FIXTURES / "chatglm-tiny")
