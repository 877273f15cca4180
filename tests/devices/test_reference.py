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
