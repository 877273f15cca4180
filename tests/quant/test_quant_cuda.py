"""The cuda quant kernels (``quant.kernels_triton``, ``quant.gemv_triton``) on a CUDA GPU.

Models fuse q|k|v and gate|up through each format's ``concat_rows``; the cuda ``quant_linear``
must give the reference result on such weights in float32 and bfloat16, at decode sizes (the
GEMV) and prefill sizes (the tiled GEMM). fp8 is W8A8: its activation codes equal torch's
``quantize_activation`` bit for bit, its output equals ``fp8_linear_emulated``. Both capture in
a CUDA graph (no host synchronization; the split-K GEMV's counters reset themselves).
"""

from __future__ import annotations

import pytest
import torch

from portaserve.devices import reference
from portaserve.quant import registry
from portaserve.quant.fp8 import (
    W8A8_ACCUMULATION_REL_ERROR,
    FP8Method,
    fp8_linear_emulated,
    quantize_activation,
)

CUDA = torch.device("cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)"),
]


FUSED = [(fmt, torch.bfloat16, m) for fmt in ("int4", "int8", "Q4_0", "Q4_1", "Q8_0") for m in (1, 3, 37)]
FUSED += [(fmt, torch.float32, m) for fmt in ("int4", "Q8_0") for m in (1, 37)]
FUSED += [(fmt, torch.bfloat16, m) for fmt in ("Q4_K", "Q5_K", "Q6_K") for m in (1, 4, 37)]


@pytest.mark.parametrize("fmt,dtype,m", FUSED)
def test_fused_weights_match_the_reference(fmt: str, dtype: torch.dtype, m: int) -> None:
    pytest.importorskip("triton")
    from portaserve.quant.kernels_triton import triton_quant_linear

    gen = torch.Generator().manual_seed(0)
    parts = [registry.quantize(torch.randn(n, 4096, generator=gen) * 0.02, fmt)
             for n in (4096, 1024, 1024)]
    fused = parts[0].method.concat_rows(parts)
    assert fused is not None and fused.shape == (6144, 4096)
    x = torch.randn(m, 4096, generator=gen)
    ref = reference.quant_linear(x, fused, None)
    out = triton_quant_linear(x.to("cuda", dtype), fused.to(torch.device("cuda"))).float().cpu()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), err


def fp8_weight(n: int, k: int, scheme: str, per_channel: bool, gen: torch.Generator):
    method = FP8Method()
    w = torch.randn(n, k, generator=gen) * k**-0.5
    if scheme != "static":
        return method.quantize(w, per_channel=per_channel, activation=scheme)
    q = method.quantize(w, per_channel=per_channel).data
    return method.from_tensors(q["weight"], q["weight_scale"], input_scale=torch.tensor(0.02))


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "dynamic_per_tensor", "static"])
@pytest.mark.parametrize("m", [1, 4, 7, 300])
def test_fp8_activation_codes_equal_torchs(scheme: str, m: int) -> None:
    from portaserve.quant.kernels_triton import quantize_fp8_activation

    gen = torch.Generator().manual_seed(m)
    weight = fp8_weight(64, 4096, scheme, True, gen).to(CUDA)
    x = (torch.randn(m, 4096, generator=gen) * torch.rand(m, 1, generator=gen) * 8).to(CUDA, torch.bfloat16)
    xq, xs = quantize_fp8_activation(x, weight)
    want_q, want_s = quantize_activation(x, weight)
    assert torch.equal(xs.reshape(-1), want_s.reshape(-1))
    assert torch.equal(xq.view(torch.uint8), want_q.view(torch.uint8))


W8A8 = [(s, pc, torch.bfloat16, m) for s in ("dynamic_per_token", "dynamic_per_tensor", "static")
        for pc in (True, False) for m in (1, 4, 7, 300)]
W8A8 += [("dynamic_per_token", True, dt, m) for dt in (torch.float32, torch.float16) for m in (1, 300)]


@pytest.mark.parametrize("scheme,per_channel,dtype,m", W8A8)
def test_fp8_w8a8_matches_the_emulation(scheme: str, per_channel: bool, dtype: torch.dtype, m: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sums promoted to float32 along K (fast accumulation off; its own test below)."""
    from portaserve.quant import fp8
    from portaserve.quant.kernels_triton import fp8_quant_linear

    monkeypatch.setattr(fp8, "FAST_ACCUM", False)
    gen = torch.Generator().manual_seed(m + 1000 * per_channel)
    weight = fp8_weight(1024, 4096, scheme, per_channel, gen)
    x = torch.randn(m, 4096, generator=gen).to(dtype)
    bias = torch.randn(1024, generator=gen).to(dtype)
    want = fp8_linear_emulated(x, weight, bias).float()
    got = fp8_quant_linear(x.to(CUDA), weight.to(CUDA), bias.to(CUDA))
    assert got.dtype == dtype
    err = ((got.float().cpu() - want).norm() / want.norm()).item()
    # float32 output: beyond 4 rows this is torch._scaled_mm, whose fp8 tensor-core products
    # accumulate with fewer bits than float32 on Hopper (the format's stated allowance), where
    # the GEMV's float32 FMAs are at the 1e-7 level; a wrong scale or code is ~1e-2.
    tol = {torch.float32: 1e-5 if m <= 4 else W8A8_ACCUMULATION_REL_ERROR, torch.float16: 2e-3,
           torch.bfloat16: 1e-2}
    assert err < tol[dtype], err


@pytest.mark.parametrize("k", [4096, 14336])
def test_fp8_fast_accumulation_stays_near_the_emulation(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PORTASERVE_FP8_FAST_ACCUM`` (``fp8.FAST_ACCUM``) passes ``use_fast_accum`` to
    ``_scaled_mm``: the sums stay in the tensor cores' precision along all of K (the down
    projection's 14336 included). The result may move from the emulation by more than the
    promoted sums' allowance, but stays within ``W8A8_FAST_ACCUMULATION_REL_ERROR``, below the
    ~1e-2 of a wrong scale or code."""
    from portaserve.quant import fp8
    from portaserve.quant.kernels_triton import fp8_quant_linear

    gen = torch.Generator().manual_seed(k)
    weight = fp8_weight(1024, k, "dynamic_per_token", True, gen)
    x = torch.randn(300, k, generator=gen).to(torch.bfloat16)
    want = fp8_linear_emulated(x, weight, None).float()
    calls: list[dict] = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(fp8, "FAST_ACCUM", True)
    got = fp8_quant_linear(x.to(CUDA), weight.to(CUDA)).float().cpu()
    assert calls and all(c.get("use_fast_accum") for c in calls)
    err = ((got - want).norm() / want.norm()).item()
    assert err < fp8.W8A8_FAST_ACCUMULATION_REL_ERROR, err


# K formats above the GEMV's rows are unpacked for cuBLAS inside the graph (no host tensors there).
GRAPHED = [(fmt, m) for fmt in ("fp8", "int4", "Q4_0") for m in (1, 4, 16)]
GRAPHED += [(fmt, 37) for fmt in ("Q4_K", "Q5_K", "Q6_K")]


@pytest.mark.parametrize("fmt,m", GRAPHED)
def test_quant_linear_replays_in_a_cuda_graph(fmt: str, m: int) -> None:
    from portaserve.quant.kernels_triton import fp8_quant_linear, triton_quant_linear

    fn = fp8_quant_linear if fmt == "fp8" else triton_quant_linear
    gen = torch.Generator().manual_seed(7)
    weight = registry.quantize(torch.randn(4096, 4096, generator=gen) * 0.02, fmt).to(CUDA)
    x = torch.randn(m, 4096, generator=gen).to(CUDA, torch.bfloat16)
    fn(x, weight)  # compile and allocate outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x, weight)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, weight)
    for _ in range(3):  # fresh inputs each replay
        x.copy_(torch.randn(m, 4096, generator=gen).to(CUDA, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn(x, weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 300])
def test_fused_fp8_activations_equal_quantizing_in_the_linear(dtype: torch.dtype, m: int) -> None:
    """cuda's rms_norm_fp8 / silu_and_mul_fp8 write the codes and scales the fp8 linear would
    have computed from rms_norm's / silu_and_mul's output, so W8A8 through them gives the same
    result (the GEMV at 1 row, _scaled_mm beyond)."""
    pytest.importorskip("triton")
    from portaserve.devices.cuda.activation import silu_and_mul, silu_and_mul_fp8
    from portaserve.devices.cuda.norm import rms_norm, rms_norm_fp8
    from portaserve.quant.kernels_triton import fp8_quant_linear, quantize_fp8_activation
    from portaserve.testing.test_conformance import assert_fp8_activation_close

    gen = torch.Generator().manual_seed(m)
    weight = FP8Method().quantize(torch.randn(1024, 4096, generator=gen) * 0.02).to(CUDA)
    x = torch.randn(m, 4096, generator=gen).to(CUDA, dtype)
    res = torch.randn(m, 4096, generator=gen).to(CUDA, dtype)
    norm_w = (1 + 0.1 * torch.randn(4096, generator=gen)).to(CUDA, dtype)
    qa, new_res = rms_norm_fp8(x, norm_w, 1e-5, res)
    y, want_res = rms_norm(x, norm_w, 1e-5, res)
    assert torch.equal(new_res, want_res)
    if dtype == torch.float32:
        # No bf16 rounding of y hides the two kernels' differing FMA contraction here: y's last
        # bits may differ, so the scales by an ulp and a code by at most one e4m3 step.
        assert_fp8_activation_close(qa, y.cpu(), dtype, "rms_norm_fp8")
        torch.testing.assert_close(fp8_quant_linear(qa, weight), fp8_quant_linear(y, weight),
                                   atol=1e-2, rtol=1e-2)
    else:
        codes, scale = quantize_fp8_activation(y, weight)
        assert torch.equal(qa.scale.view(-1), scale)
        assert torch.equal(qa.data.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(fp8_quant_linear(qa, weight), fp8_quant_linear(y, weight))
    gate_up = torch.randn(m, 2 * 4096, generator=gen).to(CUDA, dtype)
    qa = silu_and_mul_fp8(gate_up)
    codes, scale = quantize_fp8_activation(silu_and_mul(gate_up), weight)
    torch.testing.assert_close(qa.scale.view(-1), scale, atol=0.0, rtol=0 if dtype == torch.bfloat16 else 1e-6)
    assert (qa.data.view(torch.uint8) != codes.view(torch.uint8)).float().mean() < 1e-3  # FMA contraction
