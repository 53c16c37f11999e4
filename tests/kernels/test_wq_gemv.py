"""The decode kernel against the torch reference (and the oracle) on small odd shapes, under the interpreter on CPU."""

import pytest
import torch
from kernel_cases import LAYOUTS, N, assert_output_close, make_case

from glm.kernels import wq_gemv_reference
from glm.kernels.wq_gemv import _tickets, _wq_gemv, wq_gemv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize(("bits", "group_size", "K"), LAYOUTS)
def test_gemv_matches_reference(device, bits, group_size, K, M, dtype):
    # Alternate bias and the scale dtype across the grid rather than multiplying the (slow, interpreted) cases.
    variant = (M + bits + K // 8) % 3
    scale_dtype = (torch.float32, torch.float16, torch.bfloat16)[variant]
    case = make_case(M, N, K, bits, group_size, dtype=dtype, scale_dtype=scale_dtype, bias=variant != 1, device=device)
    out = wq_gemv(*case.args)
    assert_output_close(out, wq_gemv_reference(*case.args))
    assert_output_close(out, case.oracle())


@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize(("bits", "group_size", "K"), [(8, None, 200), (4, None, 200), (4, 32, 224)])
def test_split_k_slices(device, bits, group_size, K, M, split_k):
    # Slices are whole 64-value units at 4 bits (32 at 8 bits): K=200 gives uneven slices and a short last one.
    case = make_case(M, N, K, bits, group_size, device=device)
    assert_output_close(_wq_gemv(*case.args, split_k=split_k), wq_gemv_reference(*case.args))


def test_split_k_counters_are_left_at_zero(device):
    # The last program of each tile resets its ticket counter, so the next launch can count again from zero.
    case = make_case(1, N, 256, 4, device=device)
    first = _wq_gemv(*case.args, split_k=4)
    second = _wq_gemv(*case.args, split_k=4)
    assert torch.equal(first, second)
    assert all(int(counters.abs().sum()) == 0 for counters in _tickets.values())


def test_empty_batch(device):
    case = make_case(0, N, 64, 8, device=device)
    assert wq_gemv(*case.args).shape == (0, N)
