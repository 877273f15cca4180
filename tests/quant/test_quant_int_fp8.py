"""int8 / int4 weight-only and fp8 formats: quantizing, checkpoint layouts, the KV cache option."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from portaserve.devices import reference
from portaserve.errors import ConfigError, ModelError
from portaserve.quant.fp8 import (
    FP8_DTYPE,
    FP8Method,
    fp8_linear,
    fp8_linear_emulated,
    kv_cache_dtype,
)
from portaserve.quant.int_formats import Int4Method, Int8Method, to_awq, to_gptq


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_per_channel():
    w = torch.randn(48, 96, generator=gen(1)) * torch.linspace(0.01, 1.0, 48)[:, None]
    q = Int8Method().quantize(w)
    assert q.data["qweight"].dtype == torch.int8 and q.data["scales"].shape == (48,)
    assert q.data["qweight"].abs().amax(dim=1).eq(127).all()  # every row uses its full range
    assert rel_err(q.dequantize(), w) < 0.01
    assert q.nbytes == 48 * 96 + 48 * 4


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_groupwise(symmetric):
    w = torch.randn(32, 256, generator=gen(2)) + 0.3  # offset: asymmetric ranges matter
    q = Int4Method().quantize(w, group_size=64, symmetric=symmetric)
    assert q.meta == {"group_size": 64, "symmetric": symmetric}
    assert q.data["qweight"].shape == (32, 128) and q.data["scales"].shape == (32, 4)
    if symmetric:
        assert q.data["zeros"].eq(8).all()
    else:
        assert q.data["zeros"].ne(8).any()
    assert rel_err(q.dequantize(), w) < 0.12
    rows = torch.tensor([3, 1, 31])
    assert torch.equal(q.embedding(rows), q.dequantize()[rows])


def test_int4_group_size_falls_back_to_a_divisor():
    q = Int4Method().quantize(torch.randn(8, 576, generator=gen(3)), group_size=128)
    assert q.meta["group_size"] == 64  # 576 = 9 * 64


def test_gptq_layout_by_hand():
    """GPTQ words decoded by the documented rule, independent of our packer: qweight[i, n]
    holds rows 8i..8i+7 of column n at bits 4j; qzeros[g, w] holds columns 8w..8w+7 and
    stores zero - 1 (v1)."""

    def word(nibbles):
        v = sum(c << (4 * i) for i, c in enumerate(nibbles))
        return v - 2**32 if v >= 2**31 else v

    codes = [[3, 15, 0, 7, 9, 1, 12, 5], [0, 1, 2, 3, 4, 5, 6, 7]]  # columns 0 and 1, rows 0..7
    qweight = torch.zeros(1, 8, dtype=torch.int32)  # [K/8, N], N = 8
    qweight[0, 0], qweight[0, 1] = word(codes[0]), word(codes[1])
    zeros = [4, 9, 8, 8, 8, 8, 8, 8]
    qzeros = torch.tensor([[word([z - 1 for z in zeros])]], dtype=torch.int32)  # [1, N/8]
    scales = torch.full((1, 8), 0.5)
    scales[0, 1] = 0.25
    weight = Int4Method().from_gptq(qweight, qzeros, scales)
    dense = weight.dequantize()  # [N, K] = [8, 8]
    assert torch.equal(dense[0], torch.tensor([(c - 4) * 0.5 for c in codes[0]]))
    assert torch.equal(dense[1], torch.tensor([(c - 9) * 0.25 for c in codes[1]]))
    assert torch.equal(dense[2], torch.full((8,), -4.0))  # code 0, zero 8, scale 0.5


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_checkpoint_round_trip_through_safetensors(tmp_path, layout):
    w = torch.randn(64, 256, generator=gen(4))
    q = Int4Method().quantize(w, group_size=128)
    tensors = to_gptq(q) if layout == "gptq" else to_awq(q)
    path = tmp_path / "model.safetensors"
    save_file({f"model.layers.0.mlp.up_proj.{k}": v for k, v in tensors.items()}, str(path))
    loaded = {k.rsplit(".", 1)[1]: v for k, v in load_file(str(path)).items()}
    if layout == "gptq":
        assert loaded["qweight"].shape == (32, 64) and loaded["qzeros"].shape == (2, 8)
        back = Int4Method().from_gptq(loaded["qweight"], loaded["qzeros"], loaded["scales"],
                                      loaded["g_idx"])
    else:
        assert loaded["qweight"].shape == (256, 8) and loaded["qzeros"].shape == (2, 8)
        back = Int4Method().from_awq(loaded["qweight"], loaded["qzeros"], loaded["scales"])
    assert torch.equal(back.dequantize(), q.dequantize())


def test_gptq_act_order_is_refused():
    q = Int4Method().quantize(torch.randn(16, 128, generator=gen(5)), group_size=32)
    t = to_gptq(q)
    g_idx = t["g_idx"].flip(0)
    with pytest.raises(ModelError, match="act-order"):
        Int4Method().from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_weights(per_channel):
    w = torch.randn(40, 128, generator=gen(6)) * torch.linspace(0.1, 3.0, 40)[:, None]
    q = FP8Method().quantize(w, per_channel=per_channel)
    assert q.data["weight"].dtype == FP8_DTYPE
    assert q.data["weight_scale"].dim() == (1 if per_channel else 0)
    assert rel_err(q.dequantize(), w) < 0.04
    # a checkpoint with a [N, 1] scale and a static input scale loads to the same weight
    ckpt = FP8Method().from_tensors(q.data["weight"], q.data["weight_scale"].reshape(-1, 1),
                                    input_scale=torch.tensor([0.02]))
    assert ckpt.meta["activation"] == "static"
    assert torch.equal(ckpt.dequantize(), q.dequantize())


@pytest.mark.parametrize("activation", ["dynamic_per_token", "dynamic_per_tensor"])
def test_fp8_w8a8_scaled_mm_matches_emulation(activation):
    x = torch.randn(5, 128, generator=gen(7))
    q = FP8Method().quantize(torch.randn(24, 128, generator=gen(8)), activation=activation)
    emulated = fp8_linear_emulated(x, q)
    ref = reference.quant_linear(x, q)  # weight-only reference
    assert rel_err(emulated, ref) < 0.08  # activation quantization error only
    torch.testing.assert_close(fp8_linear(x, q), emulated, atol=1e-4, rtol=1e-4)


def test_fp8_fast_accum_is_a_cuda_only_flag(monkeypatch):
    """``PORTASERVE_FP8_FAST_ACCUM`` turns ``fp8.FAST_ACCUM`` on; on CPU tensors ``_scaled_mm``
    is called as without it (the flag is cuBLAS's), so the result is unchanged."""
    from portaserve import envs
    from portaserve.quant import fp8

    monkeypatch.delenv("PORTASERVE_FP8_FAST_ACCUM", raising=False)
    assert envs.fp8_fast_accum()  # on by default
    monkeypatch.setenv("PORTASERVE_FP8_FAST_ACCUM", "1")
    assert envs.fp8_fast_accum()
    monkeypatch.setenv("PORTASERVE_FP8_FAST_ACCUM", "0")
    assert not envs.fp8_fast_accum()
    x = torch.randn(5, 128, generator=gen(9))
    q = FP8Method().quantize(torch.randn(24, 128, generator=gen(10)), activation="dynamic_per_token")
    want = fp8_linear(x, q)
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(fp8, "FAST_ACCUM", True)
    assert torch.equal(fp8_linear(x, q), want)
    assert calls and not any("use_fast_accum" in c for c in calls)


def test_fp8_concat_rows():
    """Fused q|k|v: per-tensor scales become per-row unless all equal; the weight-only and the
    W8A8 results are the parts' side by side; differing schemes or static input scales do not
    fuse."""
    method = FP8Method()
    parts = [method.quantize(torch.randn(n, 64, generator=gen(n)) * s, per_channel=pc)
             for n, s, pc in ((32, 1.0, False), (16, 0.01, False), (16, 5.0, True))]
    fused = method.concat_rows(parts)
    assert fused.shape == (64, 64) and fused.data["weight_scale"].shape == (64,)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    x = torch.randn(3, 64, generator=gen(9))
    torch.testing.assert_close(fp8_linear_emulated(x, fused),
                               torch.cat([fp8_linear_emulated(x, p) for p in parts], dim=1))
    same = [method.from_tensors(p.data["weight"], torch.tensor(0.5)) for p in parts[:2]]
    assert method.concat_rows(same).data["weight_scale"].dim() == 0

    def static(p, input_scale):
        return method.from_tensors(p.data["weight"], p.data["weight_scale"],
                                   input_scale=torch.tensor(input_scale))

    assert method.concat_rows([static(parts[0], 0.1), static(parts[1], 0.2)]) is None
    assert method.concat_rows([static(parts[0], 0.1), parts[1]]) is None
    both = method.concat_rows([static(parts[0], 0.1), static(parts[1], 0.1)])
    assert both.meta["activation"] == "static" and torch.equal(both.data["input_scale"],
                                                              torch.tensor(0.1))


def test_fp8_errors():
    with pytest.raises(ModelError, match="weight_scale has 3 values"):
        FP8Method().from_tensors(torch.zeros(4, 8).to(FP8_DTYPE), torch.ones(3))
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
        kv_cache_dtype("int3")


def test_fp8_kv_cache_with_reference_ops():
    """An fp8 cache works through the reference write_kv / paged_attention within fp8 error."""
    from portaserve.plugins.device import AttentionMetadata, KVCacheSpec

    dtype = kv_cache_dtype("fp8_e4m3", torch.float32)
    assert dtype == FP8_DTYPE and kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    g = gen(9)
    num_tokens, hk, hq, d = 10, 2, 4, 16
    key, value = torch.randn(num_tokens, hk, d, generator=g), torch.randn(num_tokens, hk, d, generator=g)
    query = torch.randn(num_tokens, hq, d, generator=g)
    outs = []
    for cache_dtype in (torch.float32, dtype):
        spec = KVCacheSpec(1, 4, 4, hk, d, cache_dtype)
        cache = reference.allocate_kv_cache(spec, torch.device("cpu"), "blocks_nhd")[0]
        slots = torch.tensor([8 + i for i in range(num_tokens)])  # blocks 2, 3, 0(+wrap)
        slots = slots % 16
        reference.write_kv(key, value, cache, slots)
        attn = AttentionMetadata(
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
            context_lens=torch.tensor([0], dtype=torch.int32),
            block_tables=torch.tensor([[2, 3, 0]], dtype=torch.int32),
            slot_mapping=slots, max_query_len=num_tokens, max_seq_len=num_tokens, block_size=4)
        outs.append(reference.paged_attention(query, cache, attn, d**-0.5))
    assert spec.bytes_per_block * 4 == KVCacheSpec(1, 4, 4, hk, d, torch.float32).bytes_per_block
    assert rel_err(outs[1], outs[0]) < 0.08
    assert not torch.equal(outs[1], outs[0])


def test_fp8_concat_rows_keeps_each_products():
    """Fused q|k|v of fp8 weights: scales per channel (a per-tensor one is repeated), and the
    fused W8A8 output is the parts' outputs side by side."""
    method = FP8Method()
    parts = [method.quantize(torch.randn(n, 64, generator=gen(20 + n)), per_channel=n != 16)
             for n in (32, 16, 8)]
    fused = method.concat_rows(parts)
    assert fused.shape == (56, 64) and fused.data["weight_scale"].shape == (56,)
    x = torch.randn(3, 64, generator=gen(4))
    each = torch.cat([fp8_linear_emulated(x, p) for p in parts], dim=1)
    assert torch.allclose(fp8_linear_emulated(x, fused), each, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    other = method.quantize(torch.randn(8, 64, generator=gen(5)), activation="dynamic_per_tensor")
    assert method.concat_rows([parts[0], other]) is None  # activation schemes differ
