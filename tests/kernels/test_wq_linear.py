"""wq_linear's dispatch (GEMV for a few rows, GEMM above, the reference where kernels cannot run) and input errors."""

import pytest
import torch
from kernel_cases import assert_output_close, make_case

import glm.kernels.wq_gemm
import glm.kernels.wq_gemv
from glm.kernels import GEMV_MAX_ROWS, triton_available, wq_linear, wq_linear_reference
from glm.kernels.wq_gemm import wq_gemm
from glm.kernels.wq_gemv import wq_gemv


def test_triton_available():
    assert triton_available()


@pytest.mark.parametrize(
    ("lead", "M", "kernel"),
    [((), 1, "gemv"), ((2, 3), 1, "gemv"), ((4,), GEMV_MAX_ROWS // 4, "gemv"), ((GEMV_MAX_ROWS + 1,), 1, "gemm")],
)
def test_dispatch_by_rows(monkeypatch, device, lead, M, kernel):
    calls = []
    monkeypatch.setattr(glm.kernels.wq_gemv, "wq_gemv", lambda *a: calls.append("gemv") or wq_gemv(*a))
    monkeypatch.setattr(glm.kernels.wq_gemm, "wq_gemm", lambda *a: calls.append("gemm") or wq_gemm(*a))
    case = make_case(M, 37, 96, 4, 32, device=device, lead=lead)
    out = wq_linear(*case.args)
    assert calls == [kernel]
    assert out.shape == (*lead, M, 37)
    flat = wq_linear_reference(case.x.reshape(-1, 96), *case.args[1:])
    assert_output_close(out.reshape(-1, 37), flat)


def test_vector_input(device):
    case = make_case(1, 37, 64, 8, device=device)
    out = wq_linear(case.x[0], *case.args[1:])
    assert out.shape == (37,)
    assert_output_close(out, wq_linear_reference(*case.args)[0])


def test_float32_takes_the_reference(device):
    case = make_case(2, 37, 64, 4, dtype=torch.float32, device=device)
    assert torch.equal(wq_linear(*case.args), wq_linear_reference(*case.args))


def test_group_the_kernels_refuse_takes_the_reference(device):
    case = make_case(2, 37, 96, 8, 48, device=device)
    assert torch.equal(wq_linear(*case.args), wq_linear_reference(*case.args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors outside the interpreter only exist without CUDA")
def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case(2, 37, 64, 4)
    assert torch.equal(wq_linear(*case.args), wq_linear_reference(*case.args))
    with pytest.raises(ValueError, match="CUDA"):
        wq_gemv(*case.args)


def _bad(case, **changes):
    args = dict(zip(("x", "qweight", "scale", "bias", "bits", "group_size"), case.args))
    args.update(changes)
    return tuple(args.values())


BAD_ARGUMENTS = {  # id: (the change to a valid [2, 96] int4 g32 case, error, message)
    "bits": (lambda c: {"bits": 3}, ValueError, "bits must be 4 or 8"),
    "qweight-dtype": (lambda c: {"qweight": c.qweight.float()}, TypeError, "qweight must be int8"),
    "qweight-unpacked": (lambda c: {"qweight": c.q}, ValueError, r"expected \[N, 48\]"),
    "odd-k": (lambda c: {"x": c.x[:, :95], "qweight": c.qweight[:, :47]}, ValueError, "K must be even"),
    "x-1d": (lambda c: {"x": c.x[0]}, ValueError, "x must be 2-D"),
    "group-not-dividing-k": (lambda c: {"group_size": 64}, ValueError, "positive divisor of K=96"),
    "scale-shape": (lambda c: {"group_size": None}, ValueError, r"scale has shape \(37, 3\), expected \[37\]"),
    "scale-dtype": (lambda c: {"scale": c.scale.to(torch.int32)}, TypeError, "scale must be"),
    "bias-shape": (lambda c: {"bias": c.bias[:36]}, ValueError, r"bias has shape \(36,\)"),
}


@pytest.mark.parametrize("fn", [wq_linear_reference, wq_gemv, wq_gemm])
@pytest.mark.parametrize("bad", BAD_ARGUMENTS)
def test_bad_arguments(device, fn, bad):
    change, error, match = BAD_ARGUMENTS[bad]
    case = make_case(2, 37, 96, 4, 32, device=device)
    with pytest.raises(error, match=match):
        fn(*_bad(case, **change(case)))


@pytest.mark.parametrize("fn", [wq_gemv, wq_gemm])
def test_kernel_only_limits(device, fn):
    case = make_case(2, 37, 96, 8, 32, device=device)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        fn(*_bad(case, x=case.x.float()))
    case48 = make_case(2, 37, 96, 8, 48, device=device)
    assert_output_close(wq_linear_reference(*case48.args), case48.oracle())  # the reference takes any divisor
    with pytest.raises(ValueError, match="power of two >= 32"):
        fn(*case48.args)


def test_wq_linear_under_torch_compile_is_an_opaque_op():
    # Decoding with CUDA graphs compiles the model; the kernel launch must pass through torch.compile untouched.
    from glm.quant.primitives import pack_int4, quantize_per_channel

    q, s = quantize_per_channel(torch.randn(40, 96), 4)
    qp, x = pack_int4(q), torch.randn(1, 96).half()
    f = torch.compile(lambda x: wq_linear(x, qp, s, None, 4, None), fullgraph=True)
    assert torch.equal(f(x), wq_linear(x, qp, s, None, 4, None))
