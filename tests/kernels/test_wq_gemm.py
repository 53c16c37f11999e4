"""The prefill kernel against the torch reference (and the oracle) on small odd shapes, under the interpreter on CPU."""

import pytest
import torch
from kernel_cases import LAYOUTS, N, assert_output_close, make_case

from glm.kernels import wq_gemm_reference
from glm.kernels.wq_gemm import wq_gemm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 17, 128])
@pytest.mark.parametrize(("bits", "group_size", "K"), LAYOUTS)
def test_gemm_matches_reference(device, bits, group_size, K, M, dtype):
    variant = (M + bits + K // 8) % 3
    scale_dtype = (torch.float32, torch.float16, torch.bfloat16)[variant]
    case = make_case(M, N, K, bits, group_size, dtype=dtype, scale_dtype=scale_dtype, bias=variant != 1, device=device)
    out = wq_gemm(*case.args)
    assert_output_close(out, wq_gemm_reference(*case.args))
    assert_output_close(out, case.oracle())


def test_gemm_many_row_and_column_blocks(device):
    # More row blocks than GROUP_M and several column blocks: exercises the grouped program order.
    case = make_case(150, 70, 64, 4, 32, device=device)
    assert_output_close(wq_gemm(*case.args), wq_gemm_reference(*case.args))


def test_gemm_takes_non_contiguous_x(device):
    case = make_case(20, N, 128, 8, device=device)
    x = torch.stack([case.x, case.x], dim=-1).flatten(1)[:, ::2]  # a strided view of the same values
    assert not x.is_contiguous() and torch.equal(x, case.x)
    assert_output_close(wq_gemm(x, *case.args[1:]), wq_gemm_reference(*case.args))


def test_empty_batch(device):
    case = make_case(0, N, 64, 4, device=device)
    assert wq_gemm(*case.args).shape == (0, N)
