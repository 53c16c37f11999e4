"""The kernels on ChatGLM-6B's real layer shapes, on a GPU (skipped without CUDA)."""

import pytest
import torch
from kernel_cases import assert_output_close, make_case

from glm.kernels import wq_linear
from glm.kernels.wq_gemv import _wq_gemv

# (K, N): query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
SHAPES = [(4096, 12288), (4096, 4096), (4096, 16384), (16384, 4096)]
LAYOUTS = [(8, None), (4, None), (4, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group_size"), LAYOUTS)
@pytest.mark.parametrize("M", [1, 4, 128])
@pytest.mark.parametrize(("K", "N"), SHAPES)
def test_real_shapes(K, N, M, bits, group_size, dtype):
    # float16 scales, as in the released checkpoints. M = 1 and 4 take the GEMV, 128 the GEMM. Compared with the
    # float64 oracle rather than the float32 reference, which would pick up TF32 if a caller had enabled it.
    case = make_case(M, N, K, bits, group_size, dtype=dtype, scale_dtype=torch.float16, device="cuda")
    assert_output_close(wq_linear(*case.args), case.oracle())


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 3, 16])
def test_split_k_is_deterministic(split_k):
    # The last program sums the slices in a fixed order, so repeated launches agree bit for bit.
    case = make_case(1, 4096, 16384, 4, 128, device="cuda")
    first = _wq_gemv(*case.args, split_k=split_k)
    for _ in range(3):
        assert torch.equal(_wq_gemv(*case.args, split_k=split_k), first)
    assert_output_close(first, case.oracle())
