"""Kernel tests run on the GPU when there is one, else on Triton's CPU interpreter; without triton they are skipped."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton is first imported: triton.jit picks the interpreter when a kernel is decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    if request.node.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU if present, else CPU tensors under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
