"""The reference ops against their definitions, written independently here."""

from __future__ import annotations

import math

import torch

from portaserve.core.batch import build_batch
from portaserve.devices import reference
from portaserve.plugins.device import KVCacheSpec


def test_rms_norm_definition():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=gen), torch.randn(16, generator=gen)
    y = reference.rms_norm(x, w, 1e-6)
    row = x[1]
    expected = row / math.sqrt(float((row**2).mean()) + 1e-6) * w
    torch.testing.assert_close(y[1], expected)


def test_rotary_preserves_norms_and_is_identity_at_position_zero():
    gen = torch.Generator().manual_seed(1)
    theta = torch.rand(10, 8, generator=gen) * 6.0
    cos_sin = torch.cat((theta.cos(), theta.sin()), dim=-1)  # [P, D] with D = 16
    q, k = torch.randn(3, 2, 16, generator=gen), torch.randn(3, 1, 16, generator=gen)
    cos_sin[0] = torch.cat((torch.ones(8), torch.zeros(8)))
    positions = torch.tensor([0, 4, 9])
    rq, rk = reference.rotary(positions, q, k, cos_sin)
    torch.testing.assert_close(rq[0], q[0])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # rotate-half: element i pairs with element i + D/2
    c, s = theta[4, 3].cos(), theta[4, 3].sin()
    torch.testing.assert_close(rk[1, 0, 3], k[1, 0, 3] * c - k[1, 0, 11] * s)


def test_silu_and_mul_and_linear():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, generator=gen)
    torch.testing.assert_close(reference.silu_and_mul(x), x[:, :5] * torch.sigmoid(x[:, :5]) * x[:, 5:])
    w, b = torch.randn(7, 10, generator=gen), torch.randn(7, generator=gen)
    torch.testing.assert_close(reference.linear(x, w, b), x @ w.T + b)


def test_paged_attention_equals_dense_attention_in_both_layouts():
    gen = torch.Generator().manual_seed(3)
    block_size, hk, hq, d = 4, 2, 4, 8
    seqs = {"a": (torch.randn(10, hk, d, generator=gen), torch.randn(10, hk, d, generator=gen)),
            "b": (torch.randn(3, hk, d, generator=gen), torch.randn(3, hk, d, generator=gen))}
    tables = {"a": [5, 1, 7], "b": [2]}
    new = {"a": 4, "b": 3}  # a has 6 cached tokens, b none
    items = [(r, [0] * new[r], len(seqs[r][0]) - new[r], tables[r], True) for r in seqs]
    batch = build_batch(items, block_size)
    attn = batch.attention_metadata(torch.device("cpu"))
    query = torch.randn(batch.num_tokens, hq, d, generator=gen)
    for layout in ("blocks_nhd", "blocks_hnd"):
        spec = KVCacheSpec(1, 8, block_size, hk, d, torch.float32)
        cache = reference.allocate_kv_cache(spec, torch.device("cpu"), layout)[0]
        for r, (k, v) in seqs.items():
            slots = torch.tensor([tables[r][p // block_size] * block_size + p % block_size for p in range(len(k))])
            reference.write_kv(k, v, cache, slots, kv_layout=layout)
        out = reference.paged_attention(query, cache, attn, 0.3, kv_layout=layout)
        start = 0
        for r, (k, v) in seqs.items():
            q = query[start : start + new[r]]
            s = len(k)
            for i in range(new[r]):
                pos = s - new[r] + i
                for h in range(hq):
                    kh, vh = k[: pos + 1, h // 2], v[: pos + 1, h // 2]
                    p = torch.softmax(kh @ q[i, h] * 0.3, dim=0)
                    torch.testing.assert_close(out[start + i, h], p @ vh, atol=1e-5, rtol=1e-5)
            start += new[r]


# -- fp8 KV cache -----------------------------------------------------------------------------

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def test_to_cache_dtype_saturates_and_rounds_to_nearest_even():
    x = torch.tensor([1000.0, -1000.0, 448.0, 464.0, float("inf"), -float("inf"), 1.0625, 1.1875,
                      2.0**-9, 2.0**-11, 0.0])
    got = reference.to_cache_dtype(x, torch.float8_e4m3fn).float()
    # 1.0625 lies halfway between 1.0 and 1.125 (3 mantissa bits): the even neighbour wins
    want = torch.tensor([448.0, -448.0, 448.0, 448.0, 448.0, -448.0, 1.0, 1.25, 2.0**-9, 0.0, 0.0])
    assert torch.equal(got, want)
    e5m2 = reference.to_cache_dtype(torch.tensor([60000.0, -1e9, 1.125, 1.375]), torch.float8_e5m2)
    assert e5m2.float().tolist() == [57344.0, -57344.0, 1.0, 1.5]
    half = torch.randn(7, generator=torch.Generator().manual_seed(4)).half()
    assert torch.equal(reference.to_cache_dtype(half, torch.float16), half)  # not fp8: a plain cast


def test_fp8_write_kv_and_paged_attention_in_both_layouts():
    gen = torch.Generator().manual_seed(5)
    block_size, hk, hq, d = 4, 2, 6, 16
    lens = {"a": (7, 3), "b": (0, 5), "c": (2, 1)}  # (cached, new) per request
    tables = {"a": [6, 0, 3], "b": [5, 1], "c": [4]}
    items = [(r, [0] * new, cached, tables[r], True) for r, (cached, new) in lens.items()]
    batch = build_batch(items, block_size)
    attn = batch.attention_metadata(torch.device("cpu"))
    query = torch.randn(batch.num_tokens, hq, d, generator=gen)
    for dtype in FP8:
        for layout in ("blocks_nhd", "blocks_hnd"):
            spec = KVCacheSpec(1, 7, block_size, hk, d, dtype)
            cache = reference.allocate_kv_cache(spec, torch.device("cpu"), layout)[0]
            for r, (cached, new) in lens.items():
                n = cached + new
                k = torch.randn(n, hk, d, generator=gen) * 2.0 ** torch.randint(-12, 10, (n, hk, d), generator=gen)
                v = torch.randn(n, hk, d, generator=gen)
                slots = torch.tensor([tables[r][p // block_size] * block_size + p % block_size
                                      for p in range(n)])
                reference.write_kv(k, v, cache, slots, kv_layout=layout)
                got_k, got_v = reference.gather_kv(cache, torch.tensor(tables[r]), n, layout)
                # the bytes of the saturated, rounded values, at the right slots
                assert torch.equal(got_k.view(torch.uint8), reference.to_cache_dtype(k, dtype).view(torch.uint8))
                assert torch.equal(got_v.view(torch.uint8), reference.to_cache_dtype(v, dtype).view(torch.uint8))
            # attention reads the fp8 values upcast: the same as over a float32 copy of them
            out = reference.paged_attention(query, cache, attn, 0.25, kv_layout=layout)
            wide = reference.paged_attention(query, cache.float(), attn, 0.25, kv_layout=layout)
            assert torch.equal(out, wide)


def test_fp8_cache_stores_nan_as_zero_and_saturates():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6, -3.0])
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        bound = torch.finfo(dtype).max
        assert reference.to_cache_dtype(x, dtype).float().tolist() == [0.0, bound, -bound, bound, -3.0]
