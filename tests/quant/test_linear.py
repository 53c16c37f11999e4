"""QuantLinear: official state dict layout, loading, dispatch and accuracy of every path."""

import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from quant_ckpt import fp16_sd, int4_sd, int8_sd, linear_prefixes, module_state

import glm.quant.linear as qlinear
from glm.kernels.cpu_wq import cpu_kernels
from glm.quant import QuantEmbedding, QuantLinear, dequantize, paths, quantize_per_channel, set_cpu_kernel, stock

HAS_CPU_KERNEL = cpu_kernels() is not None
HALF = (torch.bfloat16, torch.float16)
# Half-precision paths, relative to mag = |x| @ |W|^T + |b| (which bounds |y|): a half input, a half weight and a
# half output each round by at most 2^-8 of their share of mag (bf16's unit roundoff; float16's is 2^-11), and the
# roundings do not line up, so 2^-7 holds with margin in every case here. A half-precision bound, not the float32
# parity of 1e-4: the float32 paths below are held to 1e-6 of mag.
HALF_TOL = 2**-7
CASES = [(8, None), (4, None), (4, 32), (4, 128), (8, 128)]


def _linear(k, n, bias=True, dtype=torch.float32):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin.to(dtype)


def _truth(m: QuantLinear, x: torch.Tensor):
    """fp64 `F.linear(x, q * scale, b)` and the matching magnitude `|x| @ |W|^T + |b|` (the scale of rounding)."""
    w = m.dequantized_weight(torch.float64)
    b = None if m.bias is None else m.bias.double()
    x64 = x.double()
    mag = F.linear(x64.abs(), w.abs(), None if b is None else b.abs())
    return F.linear(x64, w, b), mag


def _expected_forward(bits, group_size):
    """The forward a CPU layer chooses (`forward_path`)."""
    if HAS_CPU_KERNEL and (group_size is None or group_size % 32 == 0):
        return "cpu_exact"
    return "dequant" if bits == 8 and group_size else f"int{bits}_stock"  # torch's int8 operator: per-channel only


def _expected_path(bits, group_size, dtype, rows):
    """The forward that computes `rows` rows of `dtype`: the chosen one, or "dequant" past its limits."""
    chosen = _expected_forward(bits, group_size)
    if chosen == "cpu_exact":
        return chosen if rows <= QuantLinear.exact_max_rows else "dequant"
    if dtype == torch.float32 or rows > stock._STOCK_MAX_ROWS[bits]:
        return "dequant"
    return chosen


@pytest.fixture
def no_cpu_kernel(monkeypatch):
    """As on a machine without a compiler: QuantLinear keeps the official tensor and torch's stock operators."""
    monkeypatch.setattr(qlinear, "cpu_kernels", lambda: None)


@pytest.fixture
def ran(monkeypatch):
    """`ran(m, x)`: `m(x)` and the name of the forward that computed it, the one `m` chose (`forward_path`) or
    "dequant" where that one handed the call over (past its row limit, or an input dtype it does not take)."""
    calls = []
    real = paths.forward_dequant

    def counted(layer, x2):
        calls.append(x2.shape[0])
        return real(layer, x2)

    monkeypatch.setattr(paths, "forward_dequant", counted)

    def run(m, x):
        calls.clear()
        y = m(x)
        return y, "dequant" if calls else m.forward_path

    return run


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("rows", [1, 5, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits,group_size", CASES)
def test_forward_matches_dequantize_then_linear(ran, bits, group_size, dtype, rows):
    k, n = 256, 384
    m = QuantLinear.from_linear(_linear(k, n), bits, group_size)
    assert m.forward_path == _expected_forward(bits, group_size)
    x = torch.randn(rows, k).to(dtype)
    y, path = ran(m, x.view(1, rows, k))
    assert y.shape == (1, rows, n) and y.dtype == dtype
    assert path == _expected_path(bits, group_size, dtype, rows)
    y = y.view(rows, n).double()
    truth, mag = _truth(m, x)
    if dtype == torch.float32:
        # Exactly F.linear(x, q * scale, b) up to fp32 summation order: what the golden-logit tests need.
        ref = F.linear(x, m.dequantized_weight(), m.bias)
        assert (y - ref.double()).abs().max().item() <= 1e-5
        assert ((y - truth).abs() <= 1e-6 * mag).all()
    elif path == "cpu_exact":
        # fp32 arithmetic on the half input, rounded once: within one rounding of the output dtype.
        assert ((y - truth).abs() <= 2**-8 * truth.abs() + 1e-5 * mag).all()
    else:
        assert ((y - truth).abs() <= HALF_TOL * mag).all()


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the CPU kernel could not be built here")
@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("bits,group_size", CASES)
def test_fast_cpu_kernel_is_close_to_exact(ran, bits, group_size, rows):
    """int8 activations per block of 32 cost about 40 dB on random inputs, far below the weight noise (16-41 dB)."""
    from glm.quant import sqnr

    m = QuantLinear.from_linear(_linear(256, 384), bits, group_size)
    x = torch.randn(rows, 256).bfloat16()
    exact = m(x)
    set_cpu_kernel(m, "fast")
    fast, path = ran(m, x)
    assert m.forward_path == path == "cpu_fast" and fast.dtype == torch.bfloat16
    truth, _ = _truth(m, x)
    assert sqnr(truth, fast) > 35 and sqnr(truth, exact) > 45
    with pytest.raises(ValueError, match="cpu_kernel must be one of exact, fast"):
        set_cpu_kernel(m, "turbo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,group_size,k,n", [(8, None, 40, 64), (4, None, 48, 8), (4, 16, 64, 40)])
def test_odd_shapes(ran, bits, group_size, k, n, dtype):
    """K not a multiple of 32 and N not of 16 are padded for the kernel; a group of 16 it does not take."""
    m = QuantLinear.from_linear(_linear(k, n), bits, group_size)
    x = torch.randn(2, k).to(dtype)
    y, path = ran(m, x)
    y = y.double()
    kernel = HAS_CPU_KERNEL and group_size is None
    assert path == ("cpu_exact" if kernel else "dequant")
    truth, mag = _truth(m, x)
    assert ((y - truth).abs() <= (1e-6 if dtype == torch.float32 else HALF_TOL) * mag).all()


def test_float64_inputs_stay_float64(ran):
    m = QuantLinear.from_linear(_linear(64, 32), 4, 32)
    x = torch.randn(3, 64, dtype=torch.float64)
    y, path = ran(m, x)
    assert y.dtype == torch.float64 and path == "dequant"
    assert (y - F.linear(x, m.dequantized_weight(torch.float64), m.bias.double())).abs().max().item() <= 1e-12


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the CPU kernel could not be built here")
@pytest.mark.parametrize("group_size", [None, 32])
def test_many_rows_dequantize_the_kernel_copy_in_chunks(monkeypatch, ran, group_size):
    """Past `exact_max_rows` the exact path dequantizes slices of the kernel's copy and runs a GEMM."""
    monkeypatch.setattr(paths, "_DEQUANT_CHUNK_BYTES", 4 * 256 * 64)  # 64-row chunks: 64 + 64 + 48 rows
    m = QuantLinear.from_linear(_linear(256, 176), 4, group_size).prepare()
    assert m.weight is None and m.forward_path == "cpu_exact"
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(QuantLinear.exact_max_rows + 1, 256).to(dtype)
        y, path = ran(m, x)
        y = y.double()
        assert path == "dequant"
        truth, mag = _truth(m, x)
        assert ((y - truth).abs() <= (1e-6 if dtype == torch.float32 else HALF_TOL) * mag).all()


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the CPU kernel could not be built here")
def test_exact_kernel_is_used_up_to_exact_max_rows(ran):
    m = QuantLinear.from_linear(_linear(256, 384), 4)
    limit = QuantLinear.exact_max_rows
    assert ran(m, torch.randn(limit, 256))[1] == "cpu_exact"
    assert ran(m, torch.randn(limit + 1, 256))[1] == "dequant"
    m.exact_max_rows = 0  # per-module retuning
    assert ran(m, torch.randn(1, 256))[1] == "dequant"


@pytest.mark.parametrize("bits,group_size,n", [(8, None, 384), (4, None, 2112), (4, 32, 384)])
def test_without_a_compiler_torch_stock_operators_serve(no_cpu_kernel, ran, bits, group_size, n):
    m = QuantLinear.from_linear(_linear(256, n), bits, group_size).prepare()
    official = m.weight
    assert official is not None and m._tiles is None
    x = torch.randn(3, 256).bfloat16()
    y, path = ran(m, x)
    y = y.double()
    has_op = hasattr(torch.ops.aten, "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm_for_cpu")
    assert m.forward_path == path == (f"int{bits}_stock" if has_op else "dequant")
    truth, mag = _truth(m, x)
    assert ((y - truth).abs() <= HALF_TOL * mag).all()
    assert m.weight is official and torch.equal(m.state_dict()["weight"], official)


def test_the_forward_is_chosen_when_built_loaded_moved_or_its_mode_set():
    kernel = "cpu_exact" if HAS_CPU_KERNEL else "int4_stock"
    with torch.device("meta"):
        m = QuantLinear(256, 384, 4)
    assert m.forward_path == "dequant"  # nothing loaded yet
    m.load_state_dict(QuantLinear.from_linear(_linear(256, 384), 4).state_dict(), assign=True)
    assert m.forward_path == kernel
    if HAS_CPU_KERNEL:
        m.cpu_kernel = "fast"
        assert m.forward_path == "cpu_fast"
        m.half()  # a move chooses again, in the mode set
        assert m.forward_path == "cpu_fast"
    with pytest.raises(ValueError, match="cpu_kernel must be one of exact, fast"):
        m.cpu_kernel = "turbo"
    m.to("meta")
    assert m.forward_path == "dequant"


def test_a_failed_build_warns_once_and_returns_none():
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu_kernels("no-such-cpu") is None


# ---------------------------------------------------------------------------------- layout and loading


def test_from_linear_matches_the_official_checkpoints_and_frees_the_float_weight():
    for bits, ref in ((8, int8_sd()), (4, int4_sd())):
        for p in linear_prefixes(ref):
            w = fp16_sd()[p + ".weight"]
            lin = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float16)
            lin.weight.data, lin.bias.data = w, fp16_sd()[p + ".bias"]
            m = QuantLinear.from_linear(lin, bits)
            assert lin.weight is None
            sd = m.state_dict()
            assert set(sd) == {"weight", "weight_scale", "bias"}
            for key in sd:
                assert sd[key].dtype == ref[f"{p}.{key}"].dtype and torch.equal(sd[key], ref[f"{p}.{key}"]), (p, key)


@pytest.mark.parametrize("bits", [8, 4])
def test_meta_construction_then_assign_loading_of_the_official_checkpoint(bits):
    ref = int8_sd() if bits == 8 else int4_sd()
    for p in linear_prefixes(ref):
        state = module_state(ref, p)
        n, k = state["weight"].shape[0], state["weight"].shape[1] * 8 // bits
        with torch.device("meta"):
            m = QuantLinear(k, n, bits, dtype=torch.float16)  # the loader passes the model dtype
        m.load_state_dict(state, assign=True, strict=True)
        assert not any(t.is_meta for t in m.state_dict().values())
        assert m.weight_scale.dtype == torch.float32  # as stored, not the module's fp16
        x = torch.randn(3, k)
        q = state["weight"] if bits == 8 else None
        w = dequantize(state["weight"], state["weight_scale"], bits)
        if q is not None:
            assert torch.equal(w, q.float() * state["weight_scale"][:, None])
        ref_y = F.linear(x, w, state["bias"].float())
        assert (m(x) - ref_y).abs().max().item() <= 1e-5


def test_copy_loading_keeps_the_stored_scale_dtype():
    p = linear_prefixes(int4_sd())[0]
    state = module_state(int4_sd(), p)
    m = QuantLinear(state["weight"].shape[1] * 2, state["weight"].shape[0], 4, dtype=torch.float16)
    m.load_state_dict(state)  # no assign: copying into an fp16 buffer would round the fp32 scales
    assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, state["weight_scale"])


@pytest.mark.parametrize("bits,group_size", CASES)
def test_state_dict_round_trip_is_exact(bits, group_size):
    m = QuantLinear.from_linear(_linear(256, 384), bits, group_size)
    official = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 256)
    y32, y16 = m(x), m(x.bfloat16())  # the bf16 call may repack the weight and drop the official tensor
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].shape == (384, 256 * bits // 8) and sd["weight"].dtype == torch.int8
    assert all(torch.equal(sd[k], official[k]) for k in official)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    with torch.device("meta"):
        m2 = QuantLinear(256, 384, bits, group_size)
    m2.load_state_dict(torch.load(buf, weights_only=True), assign=True)
    assert torch.equal(m2(x), y32) and torch.equal(m2(x.bfloat16()), y16)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the CPU kernel could not be built here")
@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 32), (8, None)])
def test_the_kernel_copy_replaces_the_official_tensor(bits, group_size):
    """One packed copy in memory; the official tensor is rebuilt exactly for saving, moving or reloading."""
    n, k = 2112, 64  # more rows than one conversion slice, and a short last tile
    m = QuantLinear.from_linear(_linear(k, n), bits, group_size)
    official = m.weight.clone()
    m.prepare()
    assert m.weight is None and m._tiles.numel() == n * k * bits // 8
    assert torch.equal(m.state_dict()["weight"], official)
    assert torch.equal(m.packed_weight(), official)
    x = torch.randn(1, k).bfloat16()
    truth, mag = _truth(m, x)
    assert ((m(x).double() - truth).abs() <= HALF_TOL * mag).all()
    m.float()  # moving the module restores the official tensor and drops the copy
    assert torch.equal(m.weight, official) and m._tiles is None
    m.prepare()
    other = QuantLinear.from_linear(_linear(k, n), bits, group_size)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m.weight, other.weight)
    assert torch.equal(m(x), other(x))


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, None), (8, 32)])
def test_rows_of_a_tied_quantized_embedding(bits, group_size, prepared):
    m = QuantLinear.from_linear(_linear(64, 100, bias=False), bits, group_size)
    if prepared:
        m.prepare()
    emb = QuantEmbedding(m, torch.bfloat16)
    ids = torch.tensor([[3, 99, 0], [7, 7, 42]])
    out = emb(ids)
    assert out.shape == (2, 3, 64) and out.dtype == torch.bfloat16
    assert torch.equal(out, m.dequantized_weight()[ids].bfloat16())
    assert emb.half()(ids).dtype == torch.float16 and not dict(emb.named_parameters())


def test_fp16_scales_are_used_as_stored():
    """The released files hold fp16 scales: the result is `q * scale_fp16`, upcast, in every path."""
    p = linear_prefixes(int8_sd())[0]
    state = dict(module_state(int8_sd(), p))
    state["weight_scale"] = state["weight_scale"].half()
    n, k = state["weight"].shape
    with torch.device("meta"):
        m = QuantLinear(k, n, 8)
    m.load_state_dict(state, assign=True)
    assert m.weight_scale.dtype == torch.float16
    x = torch.randn(4, k)
    w16 = state["weight"].float() * state["weight_scale"].float()[:, None]
    assert (m(x) - F.linear(x, w16, state["bias"].float())).abs().max().item() <= 1e-5
    truth = F.linear(x.bfloat16().double(), w16.double(), state["bias"].double())
    mag = F.linear(x.bfloat16().double().abs(), w16.double().abs(), state["bias"].double().abs())
    assert ((m(x.bfloat16()).double() - truth).abs() <= HALF_TOL * mag).all()
    assert m.state_dict()["weight_scale"].dtype == torch.float16


def test_dtype_conversions_never_touch_the_scale_dtype():
    m = QuantLinear.from_linear(_linear(64, 32), 4)
    s = m.weight_scale.clone()
    m.half()
    assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, s)
    assert m.bias.dtype == torch.float16 and m.weight.dtype == torch.int8
    m.to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, s)
    assert m.bias.dtype == torch.bfloat16


def test_from_linear_quantizes_in_fp32():
    lin = _linear(128, 64, dtype=torch.float16)
    w = lin.weight.detach().clone()
    m = QuantLinear.from_linear(lin, 8)
    q, s = quantize_per_channel(w.float(), 8)
    assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, s) and torch.equal(m.weight, q)
    assert m.bias.dtype == torch.float16
    m4 = QuantLinear.from_linear(_linear(128, 64, bias=False), 4)
    assert m4.bias is None and m4.weight.shape == (64, 64) and set(m4.state_dict()) == {"weight", "weight_scale"}


def test_constructor_checks():
    with pytest.raises(ValueError):
        QuantLinear(64, 32, 3)
    with pytest.raises(ValueError):
        QuantLinear(64, 32, 4, group_size=48)
    with pytest.raises(ValueError):
        QuantLinear(63, 32, 4)
    m = QuantLinear(256, 32, 4, group_size=128, bias=False, device="meta")
    assert m.weight.shape == (32, 128) and m.weight_scale.shape == (32, 2) and m.bias is None
    assert "bits=4" in repr(m)


def test_importing_glm_quant_does_not_import_triton():
    code = "import sys, glm.quant; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size", CASES)
def test_cuda_forward_matches_dequantize(bits, group_size):
    m = QuantLinear.from_linear(_linear(256, 384), bits, group_size).cuda()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(5, 256, device="cuda").to(dtype)
        y = m(x).double()
        truth, mag = _truth(m, x)
        if dtype != torch.float32:
            tol = HALF_TOL
        else:  # a triton kernel may multiply fp32 in TF32 (10-bit mantissa); the dequant fallback is plain fp32
            tol = 2**-9 if m.forward_path == "triton" else 1e-5
        assert ((y - truth).abs() <= tol * mag).all(), (dtype, m.forward_path)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the CPU kernel could not be built here")
@pytest.mark.parametrize("cpu_kernel", ["exact", "fast"])
def test_cpu_forward_traces_in_one_graph(cpu_kernel):
    """torch.compile (a compiled decode step) sees the kernel as one op: no graph break, same result."""
    m = QuantLinear.from_linear(_linear(256, 384), 4).prepare()
    m.cpu_kernel = cpu_kernel
    x = torch.randn(2, 256).bfloat16()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), m(x))


# ---------------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,group_size", CASES)
def test_backward_gives_the_input_its_gradient_and_the_frozen_weight_none(bits, group_size, dtype):
    # P-Tuning trains through frozen quantized layers: dL/dx = g @ (q * scale), rows dequantized a slice at a time.
    k, n = 256, 8256  # n over one 8 MiB slice of rows at k = 256, and not a multiple of it
    m = QuantLinear.from_linear(_linear(k, n), bits, group_size)
    x = torch.randn(2, 3, k).to(dtype).requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref = g.double().view(-1, n) @ m.dequantized_weight(torch.float64)
    mag = g.double().abs().view(-1, n) @ m.dequantized_weight(torch.float64).abs()
    tol = 1e-6 if dtype == torch.float32 else HALF_TOL
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert ((x.grad.double().view(-1, k) - ref).abs() <= tol * mag).all()
    assert m.bias.grad is None and not m.weight_scale.requires_grad
    with torch.no_grad():
        assert torch.equal(m(x), y.detach())  # the same forward with and without autograd
