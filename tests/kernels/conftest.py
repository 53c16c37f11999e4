"""Triton kernel tests run on the GPU when there is one, else on Triton's CPU interpreter; without triton they are
skipped. The CPU kernel's tests (test_cpu_wq.py) need a C++ compiler instead; its `slow` tests (every other x86 code
path, one build each) run only when asked for: `pytest -m slow tests/kernels`."""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton is first imported: triton.jit picks the interpreter when a kernel is decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:
    collect_ignore = ["test_gpu.py", "test_wq_gemm.py", "test_wq_gemv.py", "test_wq_linear.py"]


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    if request.node.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU if present, else CPU tensors under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
