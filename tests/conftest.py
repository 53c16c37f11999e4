import random

import pytest
import torch
from glm_testutil import FIXTURES


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real glm-web server on 127.0.0.1 (one per test module), greedy, always stopped afterwards."""
    from test_web import WebServer

    # Decode steps paced to 25 ms (tests/slow_launch.py), so that a reply lasts about a second and can be stopped.
    srv = WebServer("--greedy", log=tmp_path_factory.mktemp("web") / "server.log", delay_ms=25)
    try:
        yield srv.wait()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def adapter_folders(tmp_path_factory):
    """3 LoRA adapters for chatglm-tiny (PEFT's fixture, and two of other ranks and targets) and 2 P-Tuning prefixes
    of different lengths (the training fixture's, 4, and one of 7), by name."""
    from glm_testutil import make_lora, make_prefix

    d = tmp_path_factory.mktemp("adapters")
    return {"a": FIXTURES / "chatglm-tiny-lora" / "adapter",
            "b": make_lora(d / "b", seed=1, r=8, alpha=16, targets=("query_key_value", "dense")),
            "c": make_lora(d / "c", seed=2, r=2, alpha=4, targets=("dense_h_to_4h", "dense_4h_to_h")),
            "p": FIXTURES / "chatglm-tiny-ptuning-train" / "prefix",
            "q": make_prefix(d / "q", 7, seed=3)}


@pytest.fixture(scope="session")
def adapter_alone(adapter_folders, chatglm_tiny):
    """chatglm-tiny with only one of `adapter_folders` added, by its name (None: the base alone)."""
    import glm

    engines = {None: chatglm_tiny}
    for name, folder in adapter_folders.items():
        engines[name] = glm.load(FIXTURES / "chatglm-tiny")
        engines[name].add_adapter(name, folder)
    return engines
