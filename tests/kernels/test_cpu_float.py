"""The probe that picks bfloat16 or float16 for a large model on this CPU (dtype="auto")."""

import torch

from glm.kernels import cpu_float


def test_probe_picks_a_half_dtype_and_says_why(capsys, monkeypatch):
    dtype, times = cpu_float.fastest_cpu_half_dtype()
    assert dtype in (torch.bfloat16, torch.float16)
    assert set(times) == {"bf16_decode_ms", "bf16_prefill_ms", "fp16_decode_ms", "fp16_prefill_ms"}
    assert all(t > 0 for t in times.values())
    from glm.engine import resolve_dtype

    cpu_float.announce_cpu_half_dtype.cache_clear()
    assert resolve_dtype("auto", torch.device("cpu"), 6_000_000_000) == dtype
    assert "dtype='auto' on this CPU" in capsys.readouterr().err
    assert resolve_dtype("auto", torch.device("cpu"), 1000) == torch.float32  # small models stay exact


def test_float16_only_where_it_decodes_faster_without_prefilling_slower(monkeypatch):
    def fake(bf16_decode, fp16_decode, bf16_prefill, fp16_prefill):
        times = dict(bf16_decode_ms=bf16_decode, fp16_decode_ms=fp16_decode, bf16_prefill_ms=bf16_prefill,
                     fp16_prefill_ms=fp16_prefill)
        monkeypatch.setattr(cpu_float, "_probe_times", lambda: times)
        cpu_float.fastest_cpu_half_dtype.cache_clear()
        return cpu_float.fastest_cpu_half_dtype()[0]

    try:
        assert fake(1.0, 2.0, 1.0, 1.0) == torch.bfloat16  # AMX: bfloat16 at both
        assert fake(10.8, 4.7, 1.0, 5.0) == torch.bfloat16  # Zen 4: float16 decodes faster but prefills 5x slower
        assert fake(2.0, 1.0, 1.0, 1.0) == torch.float16
    finally:
        cpu_float.fastest_cpu_half_dtype.cache_clear()
