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
