"""The Triton kernels of the cuda/rocm devices against ``devices/reference.py``, in Triton's
interpreter without a GPU and compiled with ``PORTASERVE_TEST_DEVICE=cuda`` (tests/triton_device.py).
Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch
from triton_device import DEVICE, DTYPES, RTOL, launch_spy, rel_err, skip_module_without_device

pytest.importorskip("triton")
skip_module_without_device()

from portaserve.core.batch import build_batch  # noqa: E402
from portaserve.devices import reference as ref  # noqa: E402
from portaserve.devices.cuda import activation, attention, gemv, kv, norm, rotary  # noqa: E402
from portaserve.plugins.device import KVCacheSpec  # noqa: E402


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """Fresh inputs per test case, reproducible from the test id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


# --- rms_norm, rotary, silu_and_mul ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, with_residual: bool, gen: torch.Generator) -> None:
    x = randn(7, 2 * 200, dtype=dtype, gen=gen)[:, :200]  # strided rows, hidden not a power of 2
    weight = randn(200, dtype=dtype, gen=gen)
    residual = randn(7, 200, dtype=dtype, gen=gen) if with_residual else None
    x_before = x.clone()
    got = norm.rms_norm(x, weight, 1e-5, residual)
    want = ref.rms_norm(x, weight, 1e-5, residual)
    if with_residual:
        assert rel_err(got[1], want[1]) <= RTOL[dtype] / 10
        got, want = got[0], want[0]
    assert rel_err(got, want) <= RTOL[dtype]
    assert torch.equal(x, x_before)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_rotary(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, gen: torch.Generator) -> None:
    tokens, head_dim, max_pos = 9, 32, 64
    qkv = randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)  # strided views
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(
        tokens, num_kv_heads, head_dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(DEVICE)  # [P, D] float32
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    got_q, got_k = rotary.rotary(positions, q, k, cos_sin)
    want_q, want_k = ref.rotary(positions, q, k, cos_sin)
    assert rel_err(got_q, want_q) <= RTOL[dtype]
    assert rel_err(got_k, want_k) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 1100])  # 1100: more than one column block
def test_silu_and_mul(dtype: torch.dtype, inter: int, gen: torch.Generator) -> None:
    x = randn(5, 2 * inter, dtype=dtype, gen=gen) * 3
    assert rel_err(activation.silu_and_mul(x), ref.silu_and_mul(x)) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 1100])
def test_silu_and_mul_fp8_one_pass_equals_two_passes(
    dtype: torch.dtype, inter: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows up to ``ONE_PASS_MAX_INTER`` wide are read once and held in registers, wider ones
    in two passes of 1024 columns: the same codes and scales either way, and both the per-token
    fp8 quantization of silu_and_mul's output."""
    from portaserve.testing.test_conformance import assert_fp8_activation_close

    x = randn(6, 2 * inter, dtype=dtype, gen=gen) * 3
    x[2] = 0  # a zero row: scale 1, codes 0
    one = activation.silu_and_mul_fp8(x)
    monkeypatch.setattr(activation, "ONE_PASS_MAX_INTER", 0)
    two = activation.silu_and_mul_fp8(x)
    assert torch.equal(one.scale, two.scale)
    assert torch.equal(one.data.view(torch.uint8), two.data.view(torch.uint8))
    assert one.scale[2].item() == 1.0 and not one.data[2].view(torch.uint8).any()
    assert_fp8_activation_close(one, ref.silu_and_mul(x).cpu(), dtype, "silu_and_mul_fp8")


# --- write_kv ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["blocks_hnd", "blocks_nhd"])
def test_write_kv(dtype: torch.dtype, layout: str, gen: torch.Generator) -> None:
    spec = KVCacheSpec(num_layers=1, num_blocks=9, block_size=4, num_kv_heads=3, head_dim=20, dtype=dtype)
    cache = ref.allocate_kv_cache(spec, DEVICE, layout)[0]
    cache.copy_(randn(*cache.shape, dtype=dtype, gen=gen))
    expected = cache.clone()
    key = randn(11, 3, 20, dtype=dtype, gen=gen)
    value = randn(11, 3, 20, dtype=dtype, gen=gen)
    slots = torch.randperm(36, generator=gen)[:11].to(DEVICE)
    kv.write_kv(key, value, cache, slots, kv_layout=layout)
    ref.write_kv(key, value, expected, slots, kv_layout=layout)
    assert torch.equal(cache, expected)
    # Negative slots (padding of a captured graph) write nothing.
    before = cache.clone()
    kv.write_kv(key[:2] + 1, value[:2] + 1, cache, torch.tensor([-1, -1], device=DEVICE), kv_layout=layout)
    assert torch.equal(cache, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["blocks_hnd", "blocks_nhd"])
def test_rotary_write_kv_from_fused_qkv(dtype: torch.dtype, layout: str, gen: torch.Generator) -> None:
    """The fused kernel on q/k/v as the model hands them over (strided views of one qkv row)
    equals reference rotary + write_kv; a padding slot writes nothing."""
    hq, hk, d, tokens = 6, 2, 32, 9
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=dtype, gen=gen)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d :].view(tokens, hk, d)
    cos_sin = randn(64, d, dtype=dtype, gen=gen)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    spec = KVCacheSpec(num_layers=1, num_blocks=6, block_size=4, num_kv_heads=hk, head_dim=d, dtype=dtype)
    cache = ref.allocate_kv_cache(spec, DEVICE, layout)[0]
    cache.copy_(randn(*cache.shape, dtype=dtype, gen=gen))
    expected = cache.clone()
    slots = torch.randperm(24, generator=gen)[:tokens].to(DEVICE)
    slots[3] = -1
    out_q = rotary.rotary_write_kv(positions, q, k, v, cos_sin, cache, slots, kv_layout=layout)
    exp_q, exp_k = ref.rotary(positions, q, k, cos_sin)
    keep = slots >= 0
    ref.write_kv(exp_k[keep], v[keep], expected, slots[keep], kv_layout=layout)
    assert rel_err(out_q, exp_q) < RTOL[dtype]
    assert rel_err(cache, expected) < RTOL[dtype]
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots[keep].cpu()] = False  # slots nobody wrote keep their old bits
    nhd = cache if layout == "blocks_nhd" else cache.transpose(2, 3)
    exp_nhd = expected if layout == "blocks_nhd" else expected.transpose(2, 3)
    assert torch.equal(nhd.reshape(2, 24, -1)[:, untouched.to(DEVICE)],
                       exp_nhd.reshape(2, 24, -1)[:, untouched.to(DEVICE)])


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_kv_fp8_cache_equals_the_two_kernels(cache_dtype: torch.dtype, dtype: torch.dtype,
                                                          gen: torch.Generator) -> None:
    """Into an fp8 cache the fused kernel writes the bytes of ``rotary`` then ``write_kv`` (the
    keys rounded to their dtype, then encoded by the one fp8 encoder), q the same; values
    large enough to saturate, small enough to be subnormal, a NaN, and a padding slot."""
    hq, hk, d, tokens = 4, 2, 32, 7
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=dtype, gen=gen) * 4
    qkv[0, hq * d + 3] = float("nan")
    qkv[1, (hq + hk) * d : (hq + hk) * d + 8] *= 1e4
    qkv[2, (hq + hk) * d : (hq + hk) * d + 8] *= 1e-4
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d :].view(tokens, hk, d)
    cos_sin = randn(64, d, dtype=torch.float32, gen=gen)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    spec = KVCacheSpec(num_layers=1, num_blocks=6, block_size=4, num_kv_heads=hk, head_dim=d, dtype=cache_dtype)
    cache = ref.allocate_kv_cache(spec, DEVICE, "blocks_hnd")[0]
    cache.view(torch.uint8).copy_(torch.randint(0, 120, cache.shape, generator=gen, dtype=torch.uint8))
    expected = cache.clone()
    slots = torch.randperm(24, generator=gen)[:tokens].to(DEVICE)
    slots[4] = -1
    got_q = rotary.rotary_write_kv(positions, q, k, v, cos_sin, cache, slots)
    want_q, want_k = rotary.rotary(positions, q, k, cos_sin)
    kv.write_kv(want_k, v, expected, slots)
    assert torch.equal(got_q, want_q)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["16bit", "e4m3"])
def test_gemv_with_rotary_write_kv_equals_the_two_kernels(rows: int, cache_dtype: torch.dtype | None,
                                                          gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense GEMV with rotary and the KV write in its epilogue (``gemv(..., rotary=)``) over a
    q|k|v weight with a bias: q and the cache's bytes as the GEMV (+ bias) followed by the
    ``rotary_write_kv`` kernel store them (bit for bit in the interpreter), into a 16-bit and an
    fp8 cache, a padding slot skipped; declined when K is split, when off, and for a weight that
    is not q|k|v of the cache's heads; the ``linear`` hook the kernel table calls answers the same."""
    from portaserve.devices import cuda as cuda_device

    # on (off by default: measured slower for bf16), and the Triton GEMV chosen for this shape
    # whatever cuBLAS times on this GPU (a compiled run may find cuBLAS faster here)
    monkeypatch.setattr(gemv, "FUSE_ROTARY", True)
    monkeypatch.setattr(gemv, "faster_than_cublas", lambda x, weight: True)
    dtype = torch.float16
    hq, hk, d, k = 4, 2, 64, 96  # (a head's half a multiple of the GPU tiles' 32-row halves)
    n = (hq + 2 * hk) * d
    x = randn(rows, k, dtype=dtype, gen=gen)
    w = randn(n, k, dtype=dtype, gen=gen) * k**-0.5
    bias = randn(n, dtype=dtype, gen=gen) * 0.1
    cos_sin = randn(64, d, dtype=torch.float32, gen=gen)
    positions = torch.randint(0, 64, (rows,), generator=gen).to(DEVICE)
    spec = KVCacheSpec(num_layers=1, num_blocks=6, block_size=4, num_kv_heads=hk, head_dim=d,
                       dtype=cache_dtype or dtype)
    cache = ref.allocate_kv_cache(spec, DEVICE, "blocks_hnd")[0]
    cache.view(torch.uint8).copy_(torch.randint(0, 120, cache.view(torch.uint8).shape, generator=gen,
                                                dtype=torch.uint8))
    want_cache = cache.clone()
    slots = torch.randperm(24, generator=gen)[:rows].to(DEVICE)
    if rows > 1:
        slots[1] = -1
    rope = (positions, cos_sin, cache, slots, hq, "blocks_hnd")
    q = gemv.gemv(x, w, bias=bias, rotary=rope)
    assert q is not None and q.shape == (rows, hq * d)
    out = gemv.gemv(x, w, bias=bias)
    want_q = rotary.rotary_write_kv(positions, out[:, :hq * d].view(rows, hq, d),
                                    out[:, hq * d:(hq + hk) * d].view(rows, hk, d),
                                    out[:, (hq + hk) * d:].view(rows, hk, d), cos_sin, want_cache, slots)
    if DEVICE.type == "cpu":
        assert torch.equal(q.view(rows, hq, d), want_q)
        assert torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8))
    else:  # compiled, the two kernels may contract the rotation's products into FMAs apart
        assert rel_err(q.view(rows, hq, d), want_q) <= RTOL[dtype]
        assert rel_err(cache.float(), want_cache.float()) <= 1e-2
    hooked = cuda_device.linear.with_rotary_write_kv(x, w, bias, positions, cos_sin, cache, slots, hq)
    assert hooked is not None and torch.equal(hooked, q.view(rows, hq, d))
    split = {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1, "SPLIT_K": 2}
    assert gemv.gemv(x, w, config=split, rotary=rope) is None
    assert gemv.gemv(x, w[: n - d], rotary=rope) is None
    monkeypatch.setattr(gemv, "FUSE_ROTARY", False)
    assert gemv.gemv(x, w, rotary=rope) is None
    assert cuda_device.linear.with_rotary_write_kv(x, w, bias, positions, cos_sin, cache, slots, hq) is None


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gemv(dtype: torch.dtype, rows: int, gen: torch.Generator) -> None:
    """The decode GEMV on ragged shapes (N and K not multiples of the tiles, strided x rows)."""
    n, k = 77, 200
    x = randn(rows, 2 * k, dtype=dtype, gen=gen)[:, :k]
    w = randn(n, k, dtype=dtype, gen=gen) * k**-0.5
    assert gemv.supports(x, w)
    out = gemv.gemv(x, w)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_err(out, x.float() @ w.float().t()) < RTOL[dtype]
    from portaserve.devices.cuda import linear  # the device's linear routes small batches here

    bias = randn(n, dtype=dtype, gen=gen)
    assert rel_err(linear(x, w, bias), x.float() @ w.float().t() + bias.float()) < RTOL[dtype]
    assert not gemv.supports(randn(gemv.MAX_ROWS + 1, k, dtype=dtype, gen=gen), w)
    assert not gemv.supports(x.float(), w.float())
    # K split over programs (the last split's range ragged), the last to finish summing: twice,
    # so the counters must be back at zero after the first call
    split = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "SPLIT_K": 3}
    for _ in range(2):
        assert rel_err(gemv.gemv(x, w, config=split), x.float() @ w.float().t()) < RTOL[dtype]


# --- paged_attention ---------------------------------------------------------------------


def make_step(
    lens: list[tuple[int, int]],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    layout: str,
    gen: torch.Generator,
    cache_dtype: torch.dtype | None = None,
):
    """A random step: per request (cached tokens, new tokens); blocks drawn from a shuffled
    pool so block tables are not contiguous; cache filled with random K/V, new K/V written.
    ``cache_dtype`` (default ``dtype``) may be an fp8 format."""
    num_blocks = sum(-(-(c + q) // block_size) for c, q in lens) + 4
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    items = []
    for i, (cached, new) in enumerate(lens):
        blocks = [pool.pop() for _ in range(-(-(cached + new) // block_size))]
        items.append((f"r{i}", list(range(new)), cached, blocks, True))
    batch = build_batch(items, block_size)
    cache_dtype = cache_dtype or dtype
    spec = KVCacheSpec(1, num_blocks, block_size, num_kv_heads, head_dim, cache_dtype)
    cache = ref.allocate_kv_cache(spec, DEVICE, layout)[0]
    cache.copy_(ref.to_cache_dtype(randn(*cache.shape, dtype=dtype, gen=gen), cache_dtype))
    attn = batch.attention_metadata(DEVICE)
    tokens = batch.num_tokens
    query = randn(tokens, num_q_heads, head_dim, dtype=dtype, gen=gen)
    key = randn(tokens, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    value = randn(tokens, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    kv.write_kv(key, value, cache, attn.slot_mapping, kv_layout=layout)
    return query, cache, attn


# (cached tokens, new tokens) per request: mixed prefill (with and without a cached prefix),
# chunked prefill ending mid-block, decode rows, a request with nothing new this step.
MIXED = [(0, 7), (5, 3), (13, 1), (0, 1), (9, 12), (30, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("layout", ["blocks_hnd", "blocks_nhd"])
def test_paged_attention_mixed(dtype: torch.dtype, group: int, layout: str, gen: torch.Generator) -> None:
    num_kv_heads, head_dim, block_size = 2, 32, 4
    query, cache, attn = make_step(MIXED, group * num_kv_heads, num_kv_heads, head_dim, block_size,
                                   dtype, layout, gen)
    scale = head_dim**-0.5
    got = attention.paged_attention(query, cache, attn, scale, kv_layout=layout)
    want = ref.paged_attention(query, cache, attn, scale, kv_layout=layout)
    assert rel_err(got, want) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_paged_attention_mixed_decodes_first(dtype: torch.dtype, group: int, gen: torch.Generator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed step as the scheduler orders it (running decodes, then prompt chunks): the
    leading decode rows go through the decode kernel (split over the context), the rest through
    varlen; both parts, and the all-varlen path, match the reference."""
    lens = [(13, 1), (40, 1), (0, 1), (70, 1), (5, 3), (9, 12), (30, 1)]
    num_kv_heads, head_dim, block_size = 2, 32, 4
    query, cache, attn = make_step(lens, group * num_kv_heads, num_kv_heads, head_dim, block_size,
                                   dtype, "blocks_hnd", gen)
    assert attn.num_decodes == 4
    scale = head_dim**-0.5
    want = ref.paged_attention(query, cache, attn, scale, kv_layout="blocks_hnd")
    decoded: list[int] = []
    decode = attention._decode
    monkeypatch.setattr(attention, "_decode", lambda q, *a: decoded.append(q.shape[0]) or decode(q, *a))
    for num_decodes in (4, 0):
        got = attention.paged_attention(query, cache, dataclasses.replace(attn, num_decodes=num_decodes),
                                        scale, kv_layout="blocks_hnd", num_splits=4 if num_decodes else None)
        assert rel_err(got, want) <= RTOL[dtype], num_decodes
    assert decoded == [4]  # the decode kernel took the 4 leading rows once, not the varlen-only call


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_paged_attention_long_prefill_many_tiles(dtype: torch.dtype, gen: torch.Generator) -> None:
    # More query tokens than one program's tile, over a cached prefix; head_dim not a power of 2.
    query, cache, attn = make_step([(21, 40), (0, 35)], 4, 2, 24, 8, dtype, "blocks_hnd", gen)
    got = attention.paged_attention(query, cache, attn, 0.2)
    assert rel_err(got, ref.paged_attention(query, cache, attn, 0.2, kv_layout="blocks_hnd")) <= RTOL[dtype]


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
def test_varlen_unmasked_tiles_equal_the_mask_on_every_tile(cache_dtype: torch.dtype | None, gen: torch.Generator,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Key tiles that every row of a program sees run without the causal mask
    (``VARLEN_UNMASKED_TILES``): the same output as masking every tile (prompts over cached
    prefixes, so the programs' first tiles are whole and their last ones straddle the diagonal),
    and the reference's."""
    dtype = DTYPES[1] if cache_dtype is None else torch.float16
    query, cache, attn = make_step([(40, 37), (0, 50), (17, 9)], 8, 2, 32, 8, dtype, "blocks_hnd", gen,
                                   cache_dtype)
    monkeypatch.setattr(attention, "VARLEN_UNMASKED_TILES", True)
    got = attention.paged_attention(query, cache, attn, 0.2)
    monkeypatch.setattr(attention, "VARLEN_UNMASKED_TILES", False)
    every = attention.paged_attention(query, cache, attn, 0.2)
    assert torch.equal(got, every) if DEVICE.type == "cpu" else rel_err(got, every) <= RTOL[dtype] / 10
    assert rel_err(got, ref.paged_attention(query, cache, attn, 0.2, kv_layout="blocks_hnd")) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE.type != "cpu" else []))
@pytest.mark.parametrize("group", [1, 4])
def test_varlen_fp8_qk_is_attention_over_per_row_fp8_queries(dtype: torch.dtype, group: int, gen: torch.Generator,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``VARLEN_FP8_QK`` over an e4m3 cache computes attention whose queries are each (token,
    head) row quantized to e4m3 with its own scale (``quant.fp8.quantize_per_token``'s
    numerics): it matches the float32 reference given those queries, and differs from the
    unquantized one by fp8's rounding (so the path really ran). Decode rows keep their kernel."""
    from portaserve.quant.fp8 import quantize_per_token

    lens = [(13, 1), (40, 37), (0, 50), (17, 9)]
    head_dim = 32
    query, cache, attn = make_step(lens, 2 * group, 2, head_dim, 8, dtype, "blocks_hnd", gen, torch.float8_e4m3fn)
    query = query * 4  # scores of a few units, as a model's: the rounding shows in the output
    rows = quantize_per_token(query.reshape(-1, head_dim).float())
    q_fp8 = (rows.data.float() * rows.scale).view(query.shape)
    decode_rows = slice(0, 1)  # the (13, 1) request: one new token, through the decode kernel
    want = ref.paged_attention(q_fp8, cache.float(), attn, 0.2, kv_layout="blocks_hnd")
    want[decode_rows] = ref.paged_attention(query.float(), cache.float(), attn, 0.2, kv_layout="blocks_hnd")[decode_rows]
    monkeypatch.setattr(attention, "VARLEN_FP8_QK", True)
    got = attention.paged_attention(query, cache, attn, 0.2)
    assert rel_err(got, want) <= RTOL[dtype]
    monkeypatch.setattr(attention, "VARLEN_FP8_QK", False)
    plain = attention.paged_attention(query, cache, attn, 0.2)
    assert rel_err(plain, ref.paged_attention(query.float(), cache.float(), attn, 0.2,
                                              kv_layout="blocks_hnd")) <= RTOL[dtype]
    # the prompt rows took the fp8 q k^T: ~4% apart here, against ~0.1-0.4% of 16-bit rounding
    assert rel_err(got[1:], plain[1:]) > 1e-2
    assert torch.equal(got[decode_rows], plain[decode_rows])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("num_splits", [None, 1, 4] + ([32] if DEVICE.type != "cpu" else []))
def test_paged_attention_decode(dtype: torch.dtype, group: int, num_splits: int | None, gen: torch.Generator,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Every request has one new token: the split-K decode path, whose last split to finish
    # merges the others (32 splits: most are empty for these lengths, as in a captured graph).
    monkeypatch.setattr(attention, "DECODE_MIN_CHUNK", 0)  # split however short the context
    lens = [(0, 1), (6, 1), (37, 1), (70, 1), (15, 1)]
    query, cache, attn = make_step(lens, 2 * group, 2, 32, 8, dtype, "blocks_hnd", gen)
    want = ref.paged_attention(query, cache, attn, 0.17, kv_layout="blocks_hnd")
    for _ in range(2):  # the split counters are back at zero for the next launch
        got = attention.paged_attention(query, cache, attn, 0.17, num_splits=num_splits)
        assert rel_err(got, want) <= RTOL[dtype]
    from portaserve.devices.cuda.launch import split_counters

    assert int(split_counters(query.device, 1, "decode_attn").abs().sum()) == 0


def test_paged_attention_decode_mostly_empty_splits(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    # 32 splits for contexts of 1-70 keys, as in a graph captured for long contexts: most
    # programs have no keys, and the merge reads only the splits that have (interpreter: one case).
    monkeypatch.setattr(attention, "DECODE_MIN_CHUNK", 0)
    lens = [(0, 1), (6, 1), (37, 1), (70, 1), (15, 1)]
    query, cache, attn = make_step(lens, 6, 2, 32, 8, torch.float32, "blocks_hnd", gen)
    got = attention.paged_attention(query, cache, attn, 0.17, num_splits=32)
    assert rel_err(got, ref.paged_attention(query, cache, attn, 0.17, kv_layout="blocks_hnd")) <= 2e-5


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
def test_decode_merge_unrolled_equals_the_loop(cache_dtype: torch.dtype | None, gen: torch.Generator,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The split merge unrolled over all splits with the empty ones masked
    (``MERGE_UNROLLED``) gives the bits of the loop over the active splits only: 8 splits for
    contexts of 1-70 keys, so most requests have only some of them."""
    dtype = torch.float32 if cache_dtype is None else torch.float16
    lens = [(0, 1), (6, 1), (37, 1), (70, 1), (15, 1)]
    query, cache, attn = make_step(lens, 4, 2, 32, 8, dtype, "blocks_hnd", gen, cache_dtype)
    monkeypatch.setattr(attention, "DECODE_MIN_CHUNK", 0)
    outs = []
    for unrolled in (True, False):
        monkeypatch.setattr(attention, "MERGE_UNROLLED", unrolled)
        outs.append(attention.paged_attention(query, cache, attn, 0.17, num_splits=8))
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], ref.paged_attention(query, cache, attn, 0.17, kv_layout="blocks_hnd")) <= RTOL[dtype]


def test_decode_splits_agree_with_varlen_path(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    # The decode kernel with many splits and the varlen kernel compute the same function.
    monkeypatch.setattr(attention, "DECODE_MIN_CHUNK", 0)
    query, cache, attn = make_step([(90, 1), (3, 1)], 8, 2, 16, 16, torch.float32, "blocks_hnd", gen)
    split = attention.paged_attention(query, cache, attn, 0.3, num_splits=8)
    whole = ref.paged_attention(query, cache, attn, 0.3, kv_layout="blocks_hnd")
    assert rel_err(split, whole) <= RTOL[torch.float32]


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_splits", [4, 32])
def test_decode_short_contexts_finish_in_split_zero(cache_dtype: torch.dtype | None, num_splits: int,
                                                    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a minimum split length (``DECODE_MIN_CHUNK``, here 32 keys) a launch with a fixed
    split count (a captured graph's) finishes a request whose context fits one split in split 0,
    without the merge, and still splits the longer ones: one launch mixing both matches the
    reference, each short row equals the one-split kernel's bit for bit, and the counters are
    back at zero."""
    from portaserve.devices.cuda.launch import split_counters

    dtype = torch.float32 if cache_dtype is None else torch.float16
    lens = [(0, 1), (6, 1), (37, 1), (70, 1), (15, 1), (31, 1)]  # contexts 1, 7, 38, 71, 16, 32
    query, cache, attn = make_step(lens, 4, 2, 32, 8, dtype, "blocks_hnd", gen, cache_dtype)
    monkeypatch.setattr(attention, "DECODE_MIN_CHUNK", 32)
    want = ref.paged_attention(query, cache, attn, 0.17, kv_layout="blocks_hnd")
    got = attention.paged_attention(query, cache, attn, 0.17, num_splits=num_splits)
    assert rel_err(got, want) <= RTOL[dtype]
    one = attention.paged_attention(query, cache, attn, 0.17, num_splits=1)
    short = [i for i, (cached, new) in enumerate(lens) if cached + new <= 32]
    assert short == [0, 1, 4, 5] and torch.equal(got[short], one[short])
    assert int(split_counters(query.device, 1, "decode_attn").abs().sum()) == 0


def test_decode_num_splits_policy() -> None:
    # Short contexts get one split; long contexts at batch 1 fill the SMs; never above the cap.
    assert attention.decode_num_splits(1, 8, 100, num_sms=132) == 1
    assert attention.decode_num_splits(1, 8, 8192, num_sms=132) == 32
    assert attention.decode_num_splits(1, 8, 1024, num_sms=132) == 4
    assert attention.decode_num_splits(256, 8, 8192, num_sms=132) == 1
    assert attention.decode_num_splits(4, 8, 8192, num_sms=132) == 8


def test_interpreter_flag_does_not_leak() -> None:
    # Running on CPU tensors turns the interpreter on only while a kernel is wrapped.
    before = os.environ.get("TRITON_INTERPRET")
    x = torch.randn(2, 8)
    activation.silu_and_mul(x)
    assert os.environ.get("TRITON_INTERPRET") == before


@pytest.mark.parametrize("max_query_len", [1, 5])
def test_paged_attention_wide_group(max_query_len: int, gen: torch.Generator) -> None:
    # 24 query heads on one KV head: the group is wider than the smallest tile (rows padded to 32).
    lens = [(9, 1), (0, max_query_len), (20, 1)]
    query, cache, attn = make_step(lens, 24, 1, 16, 8, torch.float32, "blocks_hnd", gen)
    got = attention.paged_attention(query, cache, attn, 0.25)
    want = ref.paged_attention(query, cache, attn, 0.25, kv_layout="blocks_hnd")
    assert rel_err(got, want) <= RTOL[torch.float32]


def test_launch_shrinks_tiles_until_they_fit() -> None:
    from triton.runtime.errors import OutOfResources

    from portaserve.devices.cuda import launch

    launches: list[tuple[int, int]] = []

    def fake_kernel(*args, BLOCK_N: int, num_warps: int, num_stages: int) -> None:
        launches.append((BLOCK_N, num_stages))
        if num_stages > 1 or BLOCK_N > 32:
            raise OutOfResources(BLOCK_N * num_stages * 1024, 65536, "shared memory")

    class FakeKernel:
        __name__ = "fake_kernel_for_fit_test"

        def on(self, tensor: torch.Tensor):
            return {(1,): fake_kernel}

    x = torch.zeros(1)
    launch.launch_fitting(FakeKernel(), x, (1,), (), {"BLOCK_N": 128}, num_warps=4, num_stages=3)
    assert launches == [(128, 3), (128, 2), (128, 1), (64, 1), (32, 1)]
    launches.clear()  # the fitted config is remembered: one launch next time
    launch.launch_fitting(FakeKernel(), x, (1,), (), {"BLOCK_N": 128}, num_warps=4, num_stages=3)
    assert launches == [(32, 1)]


# --- fp8 KV cache ------------------------------------------------------------------------
# write_kv encodes fp8 itself (kv.py says why); attention loads fp8 and converts each tile.

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["e4m3", "e5m2"]


def fp8_probe_values(cache_dtype: torch.dtype) -> torch.Tensor:
    """float32 values that pin the encoding down: every float16 value (all exponents, the
    subnormals of both formats, the overflow range), and every midpoint between neighbouring
    fp8 values (a tie: rounds to the even code) with its float32 neighbours on either side."""
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[~halves.isnan()].float()
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(cache_dtype).float()
    grid = codes[codes.isfinite()].unique()  # sorted, -max..max
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float32
    up, down = torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)
    return torch.cat((halves, mids, up, down, torch.tensor([float("inf"), -float("inf")])))


@pytest.mark.parametrize("cache_dtype", FP8, ids=FP8_IDS)
def test_write_kv_fp8_encodes_every_value_as_torch_does(cache_dtype: torch.dtype) -> None:
    values = fp8_probe_values(cache_dtype)
    head_dim, num_heads = 128, 4
    per_token = head_dim * num_heads
    num_tokens = -(-values.numel() // per_token)
    values = torch.cat((values, torch.zeros(num_tokens * per_token - values.numel())))
    key = values.view(num_tokens, num_heads, head_dim).to(DEVICE)
    value = -key  # the other half of the cache gets the mirrored values
    block_size = 16
    spec = KVCacheSpec(1, -(-num_tokens // block_size), block_size, num_heads, head_dim, cache_dtype)
    cache = ref.allocate_kv_cache(spec, DEVICE, "blocks_hnd")[0]
    slots = torch.arange(num_tokens, device=DEVICE)
    kv.write_kv(key, value, cache, slots)
    stored = ref.gather_kv(cache, torch.arange(spec.num_blocks, device=DEVICE), num_tokens, "blocks_hnd")
    for got, x in zip(stored, (key, value), strict=True):
        want = ref.to_cache_dtype(x, cache_dtype)
        bad = got.view(torch.uint8) != want.view(torch.uint8)
        assert not bad.any(), (f"{int(bad.sum())} values encoded wrongly, e.g. {x[bad][:4].tolist()} "
                               f"-> {got[bad][:4].float().tolist()}, want {want[bad][:4].float().tolist()}")
    nan = torch.full((1, num_heads, head_dim), float("nan"), device=DEVICE)
    kv.write_kv(nan, nan, cache, slots[:1])
    assert bool((cache[:, 0, :, 0].view(torch.uint8) == 0).all())  # NaN is stored as +0 (finite caches)


@pytest.mark.parametrize("cache_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["blocks_hnd", "blocks_nhd"])
def test_write_kv_fp8_matches_reference(cache_dtype: torch.dtype, dtype: torch.dtype, layout: str,
                                        gen: torch.Generator) -> None:
    spec = KVCacheSpec(num_layers=1, num_blocks=9, block_size=4, num_kv_heads=3, head_dim=20,
                       dtype=cache_dtype)
    cache = ref.allocate_kv_cache(spec, DEVICE, layout)[0]
    cache.copy_(ref.to_cache_dtype(randn(*cache.shape, dtype=torch.float32, gen=gen), cache_dtype))
    expected = cache.clone()
    scale = 2.0 ** torch.randint(-14, 12, (11, 3, 20), generator=gen).to(DEVICE)  # from subnormal to saturated
    key = (randn(11, 3, 20, dtype=torch.float32, gen=gen) * scale).to(dtype)
    value = randn(11, 3, 20, dtype=dtype, gen=gen)
    slots = torch.randperm(36, generator=gen)[:11].to(DEVICE)
    kv.write_kv(key, value, cache, slots, kv_layout=layout)
    ref.write_kv(key, value, expected, slots, kv_layout=layout)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    before = cache.clone()
    kv.write_kv(key[:2], value[:2], cache, torch.tensor([-1, -1], device=DEVICE), kv_layout=layout)
    assert torch.equal(cache.view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize("cache_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["blocks_hnd", "blocks_nhd"])
def test_paged_attention_fp8_cache_mixed(cache_dtype: torch.dtype, dtype: torch.dtype, layout: str,
                                         gen: torch.Generator) -> None:
    # Prefill, chunked prefill over a cached prefix and decode rows in one varlen batch (GQA 3),
    # against the reference reading the same fp8 cache: upcasting is exact, so the compute
    # dtype's tolerance applies.
    query, cache, attn = make_step(MIXED, 6, 2, 32, 4, dtype, layout, gen, cache_dtype)
    got = attention.paged_attention(query, cache, attn, 0.2, kv_layout=layout)
    want = ref.paged_attention(query, cache, attn, 0.2, kv_layout=layout)
    assert rel_err(got, want) <= RTOL[dtype]


@pytest.mark.parametrize("cache_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_attention_fp8_cache_decode(cache_dtype: torch.dtype, dtype: torch.dtype,
                                          num_splits: int, gen: torch.Generator) -> None:
    lens = [(0, 1), (6, 1), (37, 1), (70, 1), (15, 1)]  # partial last blocks, block boundaries
    query, cache, attn = make_step(lens, 8, 2, 32, 8, dtype, "blocks_hnd", gen, cache_dtype)
    got = attention.paged_attention(query, cache, attn, 0.17, num_splits=num_splits)
    want = ref.paged_attention(query, cache, attn, 0.17, kv_layout="blocks_hnd")
    assert rel_err(got, want) <= RTOL[dtype]


MMA_DTYPES = [d for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("dtype", MMA_DTYPES)
@pytest.mark.parametrize("group,block_size", [(4, 16), (1, 32), (8, 16)])
@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize("ahead", ["none", "ids", "k"])
def test_fp8_decode_on_hand_built_mma_fragments(dtype: torch.dtype, group: int, block_size: int,
                                               num_splits: int, ahead: str, gen: torch.Generator,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The MMA decode over an e4m3 cache (compiled: fragments built in each lane by inline PTX;
    interpreter: the same per-lane sums in float32) against the reference: contexts of 1 to 334
    keys (a partial last chunk, a last step with one chunk, partial blocks), GQA 1 / 4 / 8, blocks
    of 16 and 32 keys, both cache layouts, splits merged by the last program; the block ids
    loaded in the step or one step ahead (``DECODE_FP8_MMA_IDS_AHEAD``), and the K words one step
    ahead (``DECODE_FP8_MMA_K_AHEAD``). On a GPU its one-time check holds too."""
    monkeypatch.setattr(attention, "DECODE_FP8_MMA", True)
    monkeypatch.setattr(attention, "DECODE_FP8_MMA_IDS_AHEAD", ahead == "ids")
    monkeypatch.setattr(attention, "DECODE_FP8_MMA_K_AHEAD", ahead == "k")
    monkeypatch.setattr(attention, "DECODE_MIN_CHUNK", 64 if num_splits == 4 else 0)  # 4: some finish alone
    seen = launch_spy(attention._decode_fp8_mma_kernel, monkeypatch)
    lens = [(0, 1), (15, 1), (16, 1), (47, 1), (129, 1), (70, 1), (333, 1)]
    layout = "blocks_nhd" if group == 1 else "blocks_hnd"  # (any strides: the layouts differ in them)
    query, cache, attn = make_step(lens, 2 * group, 2, 128, block_size, dtype, layout, gen,
                                   torch.float8_e4m3fn)
    got = attention.paged_attention(query, cache, attn, 0.09, kv_layout=layout, num_splits=num_splits)
    assert seen and seen[-1]["NUM_SPLITS"] == num_splits, "the MMA kernel did not run"
    assert (seen[-1]["IDS_AHEAD"], seen[-1]["K_AHEAD"]) == (ahead == "ids", ahead == "k")
    assert seen[-1]["ASM"] == (DEVICE.type != "cpu")
    want = ref.paged_attention(query, cache, attn, 0.09, kv_layout=layout)
    assert rel_err(got, want) <= RTOL[dtype]
    if DEVICE.type != "cpu":
        assert attention.fp8_mma_supported(query)


@pytest.mark.parametrize("case", ["e5m2", "head_dim_64", "group_16", "block_8", "float32"])
def test_fp8_mma_decode_declines_what_it_does_not_fit(case: str, gen: torch.Generator,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the MMA decode does not fit (another fp8 format, head dim, more than 8 query heads
    a KV head, blocks of fewer than 16 keys, float32 queries) the Triton kernel serves, right."""
    monkeypatch.setattr(attention, "DECODE_FP8_MMA", True)
    seen = launch_spy(attention._decode_fp8_mma_kernel, monkeypatch)
    heads, dim, block, dtype, fp8 = 8, 128, 16, torch.float16, torch.float8_e4m3fn
    if case == "e5m2":
        fp8 = torch.float8_e5m2
    elif case == "head_dim_64":
        dim = 64
    elif case == "group_16":
        heads = 32
    elif case == "block_8":
        block = 8
    else:
        dtype = torch.float32
    query, cache, attn = make_step([(20, 1), (3, 1)], heads, 2, dim, block, dtype, "blocks_hnd", gen, fp8)
    got = attention.paged_attention(query, cache, attn, 0.1)
    assert not seen
    assert rel_err(got, ref.paged_attention(query, cache, attn, 0.1, kv_layout="blocks_hnd")) <= RTOL[dtype]


def test_step_varying_arguments_compile_once() -> None:
    """Arguments that change from step to step (request counts, block-table widths, pointers
    into a mixed step's slices) are not specialized on: each new pattern would be a compile of
    about a second in the middle of a run (seen in the H200 throughput profile)."""
    for kernel, names in ((attention._varlen_attn_kernel, {"num_reqs", "stride_bt", "seq_lens_ptr"}),
                          (attention._decode_attn_kernel, {"stride_bt", "seq_lens_ptr", "block_tables_ptr"}),
                          (attention._decode_fp8_mma_kernel, {"stride_bt", "seq_lens_ptr", "block_tables_ptr"})):
        params = {p.name: p for p in kernel.on(torch.empty(0, device="meta")).params}
        for name in names:
            assert params[name].do_not_specialize and params[name].do_not_specialize_on_alignment, name
        assert not params["q_ptr"].do_not_specialize_on_alignment  # vector loads keep alignment


def test_outgrown_split_counters_stay_allocated() -> None:
    """A launch larger than any captured one grows the counters; graphs captured before still
    hold the old buffer's address, so it must never be freed (and reused by the allocator)."""
    from portaserve.devices.cuda import launch

    dev = torch.device("cpu")
    small = launch.split_counters(dev, 10, "test-grow")
    address = small.data_ptr()
    del small
    big = launch.split_counters(dev, 5000, "test-grow")
    assert big.numel() >= 5000 and launch.split_counters(dev, 10, "test-grow") is big
    assert any(t.data_ptr() == address for t in launch._RETIRED)


def test_fp8_mma_decode_checks_the_compiled_kernel_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the MMA decode runs only where its first run matched the Triton kernel (it relies
    on the lane layout Triton picks): checked once per GPU, never during a graph capture (the
    Triton kernel serves then), not at all below compute capability 8.9 (no e4m3 ``cvt``); a
    failing or throwing check keeps the Triton kernel. The interpreter always takes it."""
    import types

    calls: list[int] = []
    results = {0: True, 1: False}
    monkeypatch.setattr(attention, "_FP8_MMA_CHECKED", {})
    monkeypatch.setattr(attention, "is_interpreted", lambda tensor: False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0) if index < 2 else (8, 0))
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])

    def check(device):  # noqa: ANN001, ANN202
        calls.append(device.index)
        if device.index == 3:
            raise RuntimeError("ptxas refused it")
        return results[device.index]
    monkeypatch.setattr(attention, "_fp8_mma_matches", check)

    def on(index: int):  # noqa: ANN202
        return types.SimpleNamespace(device=torch.device("cuda", index))
    capturing[0] = True
    assert not attention.fp8_mma_supported(on(0)) and calls == []  # not checked during a capture
    capturing[0] = False
    assert attention.fp8_mma_supported(on(0)) and attention.fp8_mma_supported(on(0))
    assert not attention.fp8_mma_supported(on(1))
    assert not attention.fp8_mma_supported(on(2))  # compute capability 8.0: never tried
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert not attention.fp8_mma_supported(on(3))  # the check threw
    assert calls == [0, 1, 3]
    monkeypatch.setattr(attention, "is_interpreted", lambda tensor: True)
    assert attention.fp8_mma_supported(on(1))
