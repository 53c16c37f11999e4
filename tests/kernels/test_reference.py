"""The torch references: unpacking, dequantizing and the matmul checked against the plain oracle of conftest."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import assert_output_close, make_case, pack_int4

from glm.kernels import dequantize, unpack_int4, wq_gemm_reference, wq_gemv_reference, wq_linear_reference

REPO = Path(__file__).resolve().parents[2]


def test_unpack_int4_known_bytes():
    # 0xF3: high nibble 0xF = -1 (even k), low 0x3 = 3 (odd k); 0x7F: 7, -1; 0x80: -8, 0; 0x08: 0, -8.
    packed = torch.tensor([[0xF3 - 256, 0x7F, 0x80 - 256, 0x08]], dtype=torch.int8)
    assert unpack_int4(packed).tolist() == [[-1, 3, 7, -1, -8, 0, 0, -8]]


def test_unpack_int4_inverts_the_official_packing():
    q = torch.randint(-8, 8, (37, 136), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize("group_size", [None, 32])
def test_dequantize_upcasts_the_scale(group_size):
    q = torch.randint(-128, 128, (5, 64), dtype=torch.int8)
    # An fp32 scale that float16 cannot hold: rounding it would show in the product.
    scale = torch.full((5,) if group_size is None else (5, 2), 1e-3 + 1e-9, dtype=torch.float32)
    w = dequantize(q, scale, 8, group_size)
    assert w.dtype == torch.float32
    assert torch.equal(w, q.float() * (1e-3 + 1e-9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (8, 32), (4, None), (4, 64)])
def test_reference_matches_plain_dequant_matmul(bits, group_size, dtype):
    case = make_case(3, 37, 192, bits, group_size, dtype=dtype, scale_dtype=torch.float16, bias=bits == 8)
    out = wq_linear_reference(*case.args)
    assert_output_close(out, case.oracle())
    assert torch.equal(wq_gemv_reference(*case.args), out) and torch.equal(wq_gemm_reference(*case.args), out)


def test_import_does_not_import_triton():
    code = "import sys, glm.kernels; assert 'triton' not in sys.modules, 'glm.kernels imported triton'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
