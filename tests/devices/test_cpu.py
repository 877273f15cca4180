"""The cpu device: its fast paths equal the reference, including the batched decode path."""

from __future__ import annotations

import pytest
import torch

from portaserve.core.batch import build_batch
from portaserve.devices import cpu, reference
from portaserve.plugins.device import KVCacheSpec


def filled_cache(gen, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float32):
    return torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_equals_per_request_and_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    block_size, num_blocks = 16, 30
    cache = filled_cache(gen, num_blocks, block_size, 2, 64, dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    # seq lens 1, 16 (block boundary), 17, 70: one new token each
    items = [("a", [1], 0, perm[0:1], True), ("b", [1], 15, perm[1:2], True),
             ("c", [1], 16, perm[2:4], True), ("d", [1], 69, perm[4:9], True)]
    attn = build_batch(items, block_size).attention_metadata(torch.device("cpu"))
    query = torch.randn(4, 8, 64, generator=gen).to(dtype)
    fast = cpu.paged_attention(query, cache, attn, 0.125)
    slow = torch.cat([cpu.paged_attention(query[r : r + 1], cache, _one(attn, r), 0.125) for r in range(4)])
    ref = reference.paged_attention(query, cache, attn, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(slow.float(), ref.float(), atol=tol, rtol=tol)
    assert fast.abs().mean() > 0.01  # real values, not an all-zero output


def _one(attn, r):
    items = [("x", [1], attn.seq_lens_cpu[r] - 1, attn.block_tables[r].tolist(), True)]
    return build_batch(items, attn.block_size).attention_metadata(torch.device("cpu"))


def test_prefill_with_prefix_and_empty_request():
    gen = torch.Generator().manual_seed(2)
    cache = filled_cache(gen, 12, 16, 1, 32)
    # request "z" schedules no new tokens this step; the others prefill after cached prefixes
    items = [("a", [1] * 5, 11, [3, 7], True), ("z", [], 4, [5], False), ("b", [1] * 20, 0, [9, 0], True)]
    attn = build_batch(items, 16).attention_metadata(torch.device("cpu"))
    query = torch.randn(25, 4, 32, generator=gen)
    torch.testing.assert_close(cpu.paged_attention(query, cache, attn, 0.2),
                               reference.paged_attention(query, cache, attn, 0.2), atol=1e-5, rtol=1e-5)


def test_write_kv_is_exact_and_touches_only_its_slots():
    gen = torch.Generator().manual_seed(3)
    cache = filled_cache(gen, 6, 4, 2, 8)
    before = cache.clone()
    slots = torch.tensor([22, 3, 9, 10])
    key, value = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    cpu.write_kv(key, value, cache, slots)
    expected = before.clone()
    reference.write_kv(key, value, expected, slots)
    assert torch.equal(cache, expected)
    assert torch.equal(cache[0, 5, 2], key[0]) and torch.equal(cache[1, 0, 3], value[1])


def test_rms_norm_residual_and_rotary_match_reference():
    gen = torch.Generator().manual_seed(4)
    x, res = torch.randn(6, 96, generator=gen), torch.randn(6, 96, generator=gen)
    w = torch.randn(96, generator=gen)
    y, r = cpu.rms_norm(x, w, 1e-6, res)
    ry, rr = reference.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(r, rr)
    positions = torch.tensor([0, 5, 9, 4000, 2, 1])
    cos_sin = torch.randn(4096, 64, generator=gen)
    q, k = torch.randn(6, 4, 64, generator=gen), torch.randn(6, 2, 64, generator=gen)
    for got, want in zip(cpu.rotary(positions, q, k, cos_sin), reference.rotary(positions, q, k, cos_sin), strict=True):
        torch.testing.assert_close(got, want)


def test_device_capabilities_threads_and_kv_cache(monkeypatch):
    device = cpu.CPUDevice()
    caps = device.capabilities()
    assert caps.dtypes[0] == torch.float32 and torch.float16 in caps.dtypes
    assert caps.kv_layout == "blocks_nhd" and caps.kv_block_sizes == (16,)
    assert device.num_threads == torch.get_num_threads() >= 1
    assert cpu.physical_cores() >= 1
    assert cpu.CPUDevice.probe().is_available
    spec = KVCacheSpec(num_layers=3, num_blocks=5, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    caches = device.allocate_kv_cache(spec)
    assert len(caches) == 3 and caches[0].shape == (2, 5, 16, 2, 8) and caches[0].dtype == torch.float16


def test_configure_threads_honours_env(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.setenv("PORTASERVE_NUM_THREADS", "1")
    monkeypatch.setattr(cpu, "_threads_configured", False)
    try:
        assert cpu.configure_threads() == 1
        assert cpu.configure_threads() == 1  # set once; a second call keeps it
    finally:
        torch.set_num_threads(previous)
