"""The device conformance suite: every op of a device's kernel table against the reference.

Run: ``pytest --portaserve-device NAME --pyargs portaserve.testing``. Inputs are fresh random
values (seeded per test) in each dtype the device declares; expected values are computed on the
host in float32 by ``portaserve.devices.reference`` (or, for attention, by the dense definition
in ``conformance.dense_causal_attention``), so a device is never compared with itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from portaserve.devices import reference
from portaserve.plugins.device import (
    FUSED_OPS,
    OP_NAMES,
    REFERENCE_KV_LAYOUTS,
    AttentionMetadata,
    KVCacheSpec,
)
from portaserve.testing.conformance import (
    FP8_KV_DTYPES,
    PAGED_SCENARIOS,
    PagedRequest,
    assert_close,
    dense_causal_attention,
    fp8_rounding_bound,
    randn,
    rel_err,
    scattered_block_tables,
    slots,
    tolerance,
)


def on(device, *tensors):
    """Host tensors -> the device under test."""
    moved = tuple(t.to(device.torch_device) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


# -- the device itself -----------------------------------------------------------------------


def test_probe_and_capabilities(portaserve_device):
    availability = type(portaserve_device).probe()
    assert availability.is_available, availability.reason
    caps = portaserve_device.capabilities()
    assert caps.dtypes, "a device declares at least one dtype"
    assert all(isinstance(d, torch.dtype) for d in caps.dtypes)
    assert caps.kv_block_sizes and all(b > 0 for b in caps.kv_block_sizes)
    assert all(isinstance(d, torch.dtype) and d not in caps.dtypes for d in caps.kv_cache_dtypes), \
        "kv_cache_dtypes lists cache dtypes beyond the compute dtypes"


def test_kernel_table_is_complete(portaserve_kernels):
    assert set(portaserve_kernels.sources) == set(OP_NAMES)
    for op in OP_NAMES:
        assert callable(portaserve_kernels.ops[op]), op
    assert set(portaserve_kernels.native_ops) | set(portaserve_kernels.fallback_ops) == set(OP_NAMES)
    assert set(portaserve_kernels.fused_sources) == set(FUSED_OPS)
    for op in FUSED_OPS:
        assert callable(getattr(portaserve_kernels, op)), op


# -- elementwise and dense ops ----------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,vocab,hidden", [(1, 50, 64), (13, 300, 96)])
def test_embedding(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, vocab, hidden):
    weight = randn(portaserve_gen, vocab, hidden).to(portaserve_dtype)
    ids = torch.randint(0, vocab, (num_tokens,), generator=portaserve_gen)
    out = portaserve_kernels.embedding(*on(portaserve_device, ids, weight))
    assert_close(out, reference.embedding(ids, weight), portaserve_dtype, "embedding")


@pytest.mark.parametrize("num_tokens,k,n", [(1, 64, 96), (5, 256, 128), (33, 96, 200)])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_linear(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, k, n, has_bias):
    x = randn(portaserve_gen, num_tokens, k).to(portaserve_dtype)
    weight = randn(portaserve_gen, n, k, scale=k**-0.5).to(portaserve_dtype)
    bias = randn(portaserve_gen, n).to(portaserve_dtype) if has_bias else None
    expected = reference.linear(x, weight, bias)
    args = on(portaserve_device, x, weight) + ((on(portaserve_device, bias),) if has_bias else (None,))
    assert_close(portaserve_kernels.linear(*args), expected, portaserve_dtype, f"linear {num_tokens}x{k}->{n}")


@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 576), (32, 128)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, hidden, with_residual):
    x = randn(portaserve_gen, num_tokens, hidden, scale=3.0).to(portaserve_dtype)
    weight = (1 + randn(portaserve_gen, hidden, scale=0.2)).to(portaserve_dtype)
    residual = randn(portaserve_gen, num_tokens, hidden).to(portaserve_dtype) if with_residual else None
    eps = 1e-5
    expected = reference.rms_norm(x, weight, eps, residual)
    dev_residual = on(portaserve_device, residual) if with_residual else None
    out = portaserve_kernels.rms_norm(*on(portaserve_device, x, weight), eps, dev_residual)
    if with_residual:
        assert isinstance(out, tuple) and len(out) == 2, "rms_norm with a residual returns (y, x + residual)"
        assert_close(out[0], expected[0], portaserve_dtype, "rms_norm(residual) y")
        assert_close(out[1], expected[1], portaserve_dtype, "rms_norm(residual) residual_out")
    else:
        assert_close(out, expected, portaserve_dtype, "rms_norm")


@pytest.mark.parametrize("num_tokens,num_q_heads,num_kv_heads,head_dim", [(1, 4, 4, 64), (9, 8, 2, 64), (20, 6, 1, 128)])
def test_rotary(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, num_q_heads, num_kv_heads, head_dim):
    max_pos = 4096
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)  # [P, D/2]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(portaserve_dtype)  # [P, D]
    positions = torch.randint(0, max_pos, (num_tokens,), generator=portaserve_gen)
    q = randn(portaserve_gen, num_tokens, num_q_heads, head_dim).to(portaserve_dtype)
    k = randn(portaserve_gen, num_tokens, num_kv_heads, head_dim).to(portaserve_dtype)
    exp_q, exp_k = reference.rotary(positions, q.clone(), k.clone(), cos_sin)
    out_q, out_k = portaserve_kernels.rotary(*on(portaserve_device, positions, q, k, cos_sin))
    assert_close(out_q, exp_q, portaserve_dtype, "rotary q")
    assert_close(out_k, exp_k, portaserve_dtype, "rotary k")


@pytest.mark.parametrize("num_tokens,inter", [(1, 64), (11, 1536)])
def test_silu_and_mul(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, inter):
    x = randn(portaserve_gen, num_tokens, 2 * inter, scale=2.0).to(portaserve_dtype)
    out = portaserve_kernels.silu_and_mul(on(portaserve_device, x))
    assert_close(out, reference.silu_and_mul(x), portaserve_dtype, "silu_and_mul")


def assert_fp8_activation_close(got, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """A fused ``*_fp8`` op's ``QuantizedActivation`` against the per-token fp8 quantization
    of the reference op's output ``expected``: the same dtype and shape, scales within the
    dtype's tolerance (the same row amax), and every dequantized value within one e4m3 step of
    the reference's (y's last bit, or the rounding of a code, may differ: Triton's interpreter
    rounds fp8 casts its own way). A per-tensor or wrong scale, or a skipped quantization,
    is off by far more."""
    from portaserve.quant.base import QuantizedActivation
    from portaserve.quant.fp8 import FP8_DTYPE, quantize_per_token

    assert isinstance(got, QuantizedActivation), f"{what}: returns {type(got).__name__}, not a QuantizedActivation"
    want = quantize_per_token(expected)
    assert got.dtype == dtype and got.data.dtype == FP8_DTYPE, f"{what}: dtypes {got.dtype}, {got.data.dtype}"
    assert tuple(got.data.shape) == tuple(expected.shape) and tuple(got.scale.shape) == (expected.shape[0], 1), (
        f"{what}: shapes {tuple(got.data.shape)}, scale {tuple(got.scale.shape)}")
    _, rtol = tolerance(dtype)
    got_scale = got.scale.detach().to("cpu", torch.float32)
    torch.testing.assert_close(got_scale, want.scale, atol=0.0, rtol=max(rtol, 1e-6),
                               msg=lambda m: f"{what} scales: {m}")
    got_values = got.data.detach().cpu().float() * got_scale
    want_codes = want.data.float()
    exponent = torch.floor(torch.log2(want_codes.abs().clamp_min(2.0**-6)))
    step = torch.exp2(exponent - 3) * want.scale  # e4m3: 3 mantissa bits; subnormals 2^-9
    diff = (got_values - want_codes * want.scale).abs()
    worst = (diff / step).max().item()
    assert worst <= 1.0 + 1e-3 + rtol * 16, f"{what}: a value is {worst:.2f} e4m3 steps from the reference's"


@pytest.mark.parametrize("num_tokens,hidden,with_residual", [(1, 64, False), (6, 320, True)])
def test_rms_norm_fp8(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, hidden,
                      with_residual):
    """The fused op (native or composed) equals rms_norm, then per-token fp8 quantization."""
    x = randn(portaserve_gen, num_tokens, hidden, scale=3.0).to(portaserve_dtype)
    x[0, :5] = 0.0
    weight = (1 + randn(portaserve_gen, hidden, scale=0.2)).to(portaserve_dtype)
    residual = randn(portaserve_gen, num_tokens, hidden).to(portaserve_dtype) if with_residual else None
    expected = reference.rms_norm(x, weight, 1e-5, residual)
    out = portaserve_kernels.rms_norm_fp8(*on(portaserve_device, x, weight), 1e-5,
                                          on(portaserve_device, residual) if with_residual else None)
    if with_residual:
        assert isinstance(out, tuple) and len(out) == 2, "rms_norm_fp8 with a residual returns (qa, x + residual)"
        assert_fp8_activation_close(out[0], expected[0], portaserve_dtype, "rms_norm_fp8(residual)")
        assert_close(out[1], expected[1], portaserve_dtype, "rms_norm_fp8 residual_out")
    else:
        assert_fp8_activation_close(out, expected, portaserve_dtype, "rms_norm_fp8")


@pytest.mark.parametrize("num_tokens,inter", [(1, 96), (5, 1100)])
def test_silu_and_mul_fp8(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, inter):
    """The fused op equals silu_and_mul, then per-token fp8 quantization (a zero row: scale 1)."""
    x = randn(portaserve_gen, num_tokens, 2 * inter, scale=2.0).to(portaserve_dtype)
    if num_tokens > 1:
        x[-1] = 0.0
    out = portaserve_kernels.silu_and_mul_fp8(on(portaserve_device, x))
    assert_fp8_activation_close(out, reference.silu_and_mul(x), portaserve_dtype, "silu_and_mul_fp8")


def projection_case(device, dtype, gen, num_tokens: int, n: int, weight_kind: str):
    """(x, weight and bias on the device, the reference projection ``x @ W.T + b`` on the host)
    for the fused projection ops: a dense weight [n, 256] (with a bias or not) or the same
    values packed as weight-only int4 (groups of 64)."""
    from portaserve.quant.int_formats import Int4Method

    k = 256
    w = randn(gen, n, k, scale=k**-0.5)
    x = randn(gen, num_tokens, k).to(dtype)
    bias = randn(gen, n).to(dtype) if weight_kind == "dense+bias" else None
    if weight_kind == "int4":
        weight = Int4Method().quantize(w, group_size=64)
        return on(device, x), weight.to(device.torch_device), None, reference.quant_linear(x, weight, None)
    weight = w.to(dtype)
    return (on(device, x), on(device, weight), None if bias is None else on(device, bias),
            reference.linear(x, weight, bias))


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("weight_kind", ["dense", "dense+bias", "int4"])
def test_linear_rms_norm(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens,
                         weight_kind):
    """The fused op (native or composed) equals linear (or weight-only int4 ``quant_linear``),
    then rms_norm with the residual: the normed rows and the new residual stream."""
    n = 96
    x, weight, bias, out = projection_case(portaserve_device, portaserve_dtype, portaserve_gen, num_tokens, n,
                                           weight_kind)
    residual = randn(portaserve_gen, num_tokens, n).to(portaserve_dtype)
    norm_w = (1 + randn(portaserve_gen, n, scale=0.2)).to(portaserve_dtype)
    want_y, want_res = reference.rms_norm(out, norm_w, 1e-5, residual)
    got = portaserve_kernels.linear_rms_norm(x, weight, bias, on(portaserve_device, norm_w), 1e-5,
                                             on(portaserve_device, residual))
    assert isinstance(got, tuple) and len(got) == 2, "linear_rms_norm returns (y, out + residual)"
    assert_close(got[1], want_res, portaserve_dtype, f"linear_rms_norm residual_out ({weight_kind})")
    assert_close(got[0], want_y, portaserve_dtype, f"linear_rms_norm y ({weight_kind})")


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("weight_kind", ["dense", "dense+bias", "int4"])
def test_linear_silu_and_mul(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens,
                             weight_kind):
    """The fused op (native or composed) equals linear (or weight-only int4 ``quant_linear``)
    of the gate|up weight [2I, K], then silu_and_mul."""
    x, weight, bias, out = projection_case(portaserve_device, portaserve_dtype, portaserve_gen, num_tokens, 2 * 48,
                                           weight_kind)
    got = portaserve_kernels.linear_silu_and_mul(x, weight, bias)
    assert_close(got, reference.silu_and_mul(out), portaserve_dtype, f"linear_silu_and_mul ({weight_kind})")


def test_all_reduce_single_rank(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen):
    x = randn(portaserve_gen, 5, 32).to(portaserve_dtype)
    out = portaserve_kernels.all_reduce(on(portaserve_device, x.clone()), None)
    assert_close(out, x, portaserve_dtype, "all_reduce without a group is the identity")


@pytest.mark.parametrize("num_tokens", [1, 6])
def test_quant_linear_native_formats(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens):
    """Each native quant kernel against the weight-only reference; a kernel that declares other
    numerics (``quant.base``: fp8 W8A8) against that format's emulation of them, with the
    dtype's tolerance, and against the reference within the error the format states."""
    from portaserve.plugins.manager import get_registry
    from portaserve.quant.base import WEIGHT_ONLY, kernel_numerics

    formats = sorted(portaserve_kernels.quant_ops)
    if not formats:
        pytest.skip(f"{portaserve_device.name} has no native quant_linear kernel (all formats use reference dequant)")
    checked = []
    for fmt in formats:
        method = get_registry().quant_methods.get(fmt)
        quantize = getattr(method, "quantize", None)
        if quantize is None:
            continue  # the format offers no way to pack a random weight here
        k, n = 256, 64
        weight = quantize(randn(portaserve_gen, n, k, scale=k**-0.5))
        x = randn(portaserve_gen, num_tokens, k).to(portaserve_dtype)
        expected = reference.quant_linear(x, weight, None)
        out = portaserve_kernels.quant_linear(on(portaserve_device, x), weight.to(portaserve_device.torch_device), None)
        numerics = kernel_numerics(portaserve_kernels.quant_ops[fmt])
        if numerics != WEIGHT_ONLY:
            declared = getattr(method, "numerics", {}).get(numerics)
            assert declared is not None, (
                f"quant_linear[{fmt}] declares numerics {numerics!r}, which format {fmt} does not "
                f"define (it defines {sorted(getattr(method, 'numerics', {}))})")
            for what, value in (("its emulation", declared.emulate(x, weight, None)), ("the kernel", out)):
                err = rel_err(value, expected)
                assert err <= declared.max_rel_error, (
                    f"quant_linear[{fmt}] ({numerics}, {portaserve_dtype}): {what} is {err:.4f} "
                    f"(relative) from the weight-only reference; {fmt} states at most "
                    f"{declared.max_rel_error}")
            expected = declared.emulate(x, weight, None)
            if rel_err(out, expected) <= declared.accumulation_rel_error:
                checked.append(fmt)  # within the reduced-precision accumulation it states
                continue
        assert_close(out, expected, portaserve_dtype, f"quant_linear[{fmt}] ({numerics})")
        checked.append(fmt)
    if not checked:
        pytest.skip(f"native quant formats {formats} have no quantize() to build test weights")


# -- paged KV cache: write_kv round trips and paged_attention ----------------------------------


class PagedStep:
    """A paged-attention step on the device: cache allocated, prefix written, metadata built."""

    def __init__(self, device, kernels, dtype, gen, requests, num_q_heads, num_kv_heads, head_dim, block_size,
                 cache_dtype=None):
        self.requests, self.block_size, self.dtype = requests, block_size, dtype
        self.tables, num_blocks = scattered_block_tables(gen, requests, block_size)
        spec = KVCacheSpec(1, num_blocks, block_size, num_kv_heads, head_dim, cache_dtype or dtype)
        self.cache = device.allocate_kv_cache(spec)[0]
        # per request: every key/value of the sequence, and the queries of the new tokens
        self.keys = [randn(gen, r.seq_len, num_kv_heads, head_dim).to(dtype) for r in requests]
        self.values = [randn(gen, r.seq_len, num_kv_heads, head_dim).to(dtype) for r in requests]
        self.queries = [randn(gen, r.num_new, num_q_heads, head_dim).to(dtype) for r in requests]
        self.device, self.kernels = device, kernels

    def write(self, which: str) -> None:
        """Write the cached prefixes (``"cached"``, an earlier step) or the new tokens."""
        keys, values, slot_ids = [], [], []
        for r, req, table in zip(range(len(self.requests)), self.requests, self.tables, strict=True):
            span = range(0, req.num_cached) if which == "cached" else range(req.num_cached, req.seq_len)
            keys.append(self.keys[r][span.start : span.stop])
            values.append(self.values[r][span.start : span.stop])
            slot_ids += slots(table, span, self.block_size)
        if not slot_ids:
            return
        slot_mapping = torch.tensor(slot_ids, dtype=torch.int64)
        self.kernels.write_kv(*on(self.device, torch.cat(keys), torch.cat(values)), self.cache,
                              on(self.device, slot_mapping))

    def metadata(self) -> AttentionMetadata:
        reqs = self.requests
        starts = [0]
        for req in reqs:
            starts.append(starts[-1] + req.num_new)
        max_blocks = max(len(t) for t in self.tables)
        tables = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
        for r, table in enumerate(self.tables):
            tables[r, : len(table)] = torch.tensor(table, dtype=torch.int32)
        slot_ids = [s for req, t in zip(reqs, self.tables, strict=True)
                    for s in slots(t, range(req.num_cached, req.seq_len), self.block_size)]
        as_int = lambda xs, dt=torch.int32: on(self.device, torch.tensor(xs, dtype=dt))  # noqa: E731
        return AttentionMetadata(
            query_start_loc=as_int(starts),
            seq_lens=as_int([r.seq_len for r in reqs]),
            context_lens=as_int([r.num_cached for r in reqs]),
            block_tables=on(self.device, tables),
            slot_mapping=as_int(slot_ids, torch.int64),
            max_query_len=max(r.num_new for r in reqs),
            max_seq_len=max(r.seq_len for r in reqs),
            block_size=self.block_size,
            num_decodes=next((i for i, r in enumerate(reqs) if r.num_new != 1), len(reqs)),
            query_start_loc_cpu=tuple(starts),
            seq_lens_cpu=tuple(r.seq_len for r in reqs),
            context_lens_cpu=tuple(r.num_cached for r in reqs),
        )


HEADS = [(4, 4, 64), (8, 2, 64), (4, 1, 128)]
HEAD_IDS = ["mha", "gqa4", "mqa-d128"]


def _block_sizes(device) -> tuple[int, ...]:
    return device.capabilities().kv_block_sizes[:2]


@pytest.mark.parametrize("scenario", sorted(PAGED_SCENARIOS))
def test_write_kv_round_trip(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, scenario):
    """Keys and values written at scattered slots read back exactly (reference layouts)."""
    layout = portaserve_device.capabilities().kv_layout
    if layout not in REFERENCE_KV_LAYOUTS:
        pytest.skip(f"layout {layout!r} is opaque; the attention tests read it back through the device")
    for block_size in _block_sizes(portaserve_device):
        step = PagedStep(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen,
                         PAGED_SCENARIOS[scenario], 4, 2, 64, block_size)
        step.write("cached")
        step.write("new")
        cache = step.cache.to("cpu")
        for r, req in enumerate(step.requests):
            table = torch.tensor(step.tables[r], dtype=torch.int32)
            k, v = reference.gather_kv(cache, table, req.seq_len, layout)
            assert torch.equal(k, step.keys[r]), f"write_kv keys of request {r} (block size {block_size})"
            assert torch.equal(v, step.values[r]), f"write_kv values of request {r} (block size {block_size})"


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("scenario", sorted(PAGED_SCENARIOS))
def test_paged_attention(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, scenario, heads):
    """write_kv then paged_attention over shuffled blocks equals dense causal attention."""
    num_q_heads, num_kv_heads, head_dim = heads
    scale = head_dim**-0.5
    for block_size in _block_sizes(portaserve_device):
        step = PagedStep(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen,
                         PAGED_SCENARIOS[scenario], num_q_heads, num_kv_heads, head_dim, block_size)
        step.write("cached")
        step.write("new")
        query = on(portaserve_device, torch.cat(step.queries))  # [T, Hq, D]
        out = portaserve_kernels.paged_attention(query, step.cache, step.metadata(), scale).to("cpu")
        start = 0
        for r, req in enumerate(step.requests):
            expected = dense_causal_attention(step.queries[r], step.keys[r], step.values[r], scale)
            got = out[start : start + req.num_new]
            assert_close(got, expected, portaserve_dtype,
                         f"paged_attention[{scenario}] request {r} ({req}, block size {block_size})")
            start += req.num_new


@pytest.mark.parametrize("num_tokens,heads", [(1, (8, 2, 64)), (7, (4, 4, 64)), (5, (4, 1, 128))])
def test_rotary_write_kv(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens, heads):
    """The fused op (native or composed) equals reference rotary + write_kv: the rotated queries,
    and the whole cache afterwards (scattered slots written, a padding slot -1 skipped, every
    other slot untouched)."""
    num_q_heads, num_kv_heads, head_dim = heads
    case = _rotary_cache_case(portaserve_device, portaserve_dtype, portaserve_gen, num_tokens, num_kv_heads, head_dim)
    q = randn(portaserve_gen, num_tokens, num_q_heads, head_dim).to(portaserve_dtype)
    k = randn(portaserve_gen, num_tokens, num_kv_heads, head_dim).to(portaserve_dtype)
    v = randn(portaserve_gen, num_tokens, num_kv_heads, head_dim).to(portaserve_dtype)
    exp_q, expected_cache = case.expect(q, k, v)
    out_q = portaserve_kernels.rotary_write_kv(*on(portaserve_device, case.positions, q, k, v, case.cos_sin),
                                               case.cache, on(portaserve_device, case.slots))
    assert_close(out_q, exp_q, portaserve_dtype, "rotary_write_kv q")
    assert_close(case.cache, expected_cache, portaserve_dtype, "rotary_write_kv cache")


@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("weight_kind", ["dense", "dense+bias", "int4"])
def test_linear_rotary_write_kv(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, num_tokens,
                                weight_kind):
    """The fused op (native or composed) equals linear (or weight-only int4 ``quant_linear``) of
    a q|k|v weight, then reference rotary + write_kv of its q, k and v (GQA, 4 query heads over
    2 KV heads of 64 dims; a padding slot skipped)."""
    num_q_heads, num_kv_heads, head_dim = 4, 2, 64
    x, weight, bias, out = projection_case(portaserve_device, portaserve_dtype, portaserve_gen, num_tokens,
                                           (num_q_heads + 2 * num_kv_heads) * head_dim, weight_kind)
    case = _rotary_cache_case(portaserve_device, portaserve_dtype, portaserve_gen, num_tokens, num_kv_heads, head_dim)
    out = out.to(portaserve_dtype)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = out[:, :q_size].reshape(num_tokens, num_q_heads, head_dim)
    k = out[:, q_size:q_size + kv_size].reshape(num_tokens, num_kv_heads, head_dim)
    v = out[:, q_size + kv_size:].reshape(num_tokens, num_kv_heads, head_dim)
    exp_q, expected_cache = case.expect(q, k, v)
    got = portaserve_kernels.linear_rotary_write_kv(
        x, weight, bias, *on(portaserve_device, case.positions, case.cos_sin), case.cache,
        on(portaserve_device, case.slots), num_q_heads)
    assert tuple(got.shape) == (num_tokens, num_q_heads, head_dim)
    assert_close(got, exp_q, portaserve_dtype, f"linear_rotary_write_kv q ({weight_kind})")
    assert_close(case.cache, expected_cache, portaserve_dtype, f"linear_rotary_write_kv cache ({weight_kind})")


@dataclass
class _RotaryCacheCase:
    """Positions, a cos|sin table, scattered slots (one a padding -1 when there are several
    tokens) and a device cache filled with random values, for the rotary + write_kv ops."""

    positions: torch.Tensor
    cos_sin: torch.Tensor
    slots: torch.Tensor
    before: torch.Tensor
    cache: Any
    layout: str

    def expect(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rotated q, the whole cache afterwards) by the reference ops."""
        written = self.slots >= 0
        expected_cache = self.before.clone()
        exp_q, exp_k = reference.rotary(self.positions, q, k, self.cos_sin)
        reference.write_kv(exp_k[written], v[written], expected_cache, self.slots[written], kv_layout=self.layout)
        return exp_q, expected_cache


def _rotary_cache_case(device, dtype, gen, num_tokens: int, num_kv_heads: int, head_dim: int) -> _RotaryCacheCase:
    layout = device.capabilities().kv_layout
    if layout not in REFERENCE_KV_LAYOUTS:
        pytest.skip(f"layout {layout!r} is opaque; the attention tests read it back through the device")
    block_size = _block_sizes(device)[0]
    num_blocks = 2 * num_tokens // block_size + 3
    max_pos = 2048
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    slot_ids = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    if num_tokens > 1:
        slot_ids[num_tokens // 2] = -1  # a padding row
    spec = KVCacheSpec(1, num_blocks, block_size, num_kv_heads, head_dim, dtype)
    cache = device.allocate_kv_cache(spec)[0]
    before = randn(gen, *cache.shape).to(dtype)
    cache.copy_(on(device, before))
    return _RotaryCacheCase(positions, cos_sin, slot_ids, before, cache, layout)


def test_paged_attention_chunked_prefill(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen):
    """One prompt prefilled in three chunks then decoded: each step sees exactly its prefix."""
    block_size = _block_sizes(portaserve_device)[0]
    total, chunks = 45, (16, 11, 17, 1)
    step = PagedStep(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen,
                     (PagedRequest(0, total),), 6, 2, 64, block_size)
    full_q = step.queries[0]
    done = 0
    for chunk in chunks:
        step.requests = (PagedRequest(done, chunk),)
        step.write("new")
        query = on(portaserve_device, full_q[done : done + chunk])
        out = portaserve_kernels.paged_attention(query, step.cache, step.metadata(), 0.125).to("cpu")
        expected = dense_causal_attention(full_q[done : done + chunk], step.keys[0][: done + chunk],
                                          step.values[0][: done + chunk], 0.125)
        assert_close(out, expected, portaserve_dtype, f"paged_attention chunk at {done}+{chunk}")
        done += chunk


# -- fp8 KV cache (devices that declare it in Capabilities.kv_cache_dtypes) --------------------


def _fp8_cache(device, name: str) -> torch.dtype:
    cache_dtype = FP8_KV_DTYPES[name]
    if cache_dtype not in device.capabilities().kv_cache_dtypes:
        pytest.skip(f"{device.name} does not declare a {cache_dtype} KV cache "
                    "(Capabilities.kv_cache_dtypes)")
    layout = device.capabilities().kv_layout
    if layout not in REFERENCE_KV_LAYOUTS:
        pytest.skip(f"layout {layout!r} is opaque; the fp8 checks read the cache back")
    return cache_dtype


def _read_back(step: PagedStep, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Request r's keys and values as the device stored them, upcast to float32 on the host."""
    layout = step.device.capabilities().kv_layout
    table = torch.tensor(step.tables[r], dtype=torch.int32)
    k, v = reference.gather_kv(step.cache.to("cpu"), table, step.requests[r].seq_len, layout)
    return k.float(), v.float()


@pytest.mark.parametrize("fp8", sorted(FP8_KV_DTYPES))
def test_write_kv_fp8_cache(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen, fp8):
    """write_kv into an fp8 cache stores each value saturated at the format's largest finite
    value and rounded to nearest: within half a unit in the last place (``fp8_rounding_bound``).
    Inputs span the subnormals to beyond the largest finite value."""
    cache_dtype = _fp8_cache(portaserve_device, fp8)
    bound = torch.finfo(cache_dtype).max
    big = min(2.5 * bound, torch.finfo(portaserve_dtype).max)  # past fp8's range, finite here
    step = PagedStep(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen,
                     PAGED_SCENARIOS["cached_prefix"], 4, 2, 64, _block_sizes(portaserve_device)[0],
                     cache_dtype)
    for r, keys in enumerate(step.keys):  # magnitudes from 2^-14 to 2^12 times normal values
        exponents = torch.randint(-14, 13, keys.shape, generator=portaserve_gen).float()
        wide = keys.float() * torch.exp2(exponents)
        wide.view(-1)[:2] = torch.tensor([big, -big])  # must saturate, never NaN/inf
        step.keys[r] = wide.to(portaserve_dtype)
    step.write("cached")
    step.write("new")
    nan = on(portaserve_device, torch.full((1, *step.keys[0].shape[1:]), float("nan"), dtype=portaserve_dtype))
    spare = min(set(range(step.cache.shape[1])) - {b for table in step.tables for b in table})
    portaserve_kernels.write_kv(nan, nan, step.cache, on(portaserve_device, torch.tensor([spare * step.block_size])))
    stored = reference.gather_kv(step.cache.to("cpu"), torch.tensor([spare], dtype=torch.int32), 1,
                                 portaserve_device.capabilities().kv_layout)
    assert all(torch.equal(x.float(), torch.zeros_like(x.float())) for x in stored), \
        f"write_kv[{fp8}] must store NaN as 0 (an fp8 cache holds only finite values), got {stored}"
    for r in range(len(step.requests)):
        got_k, got_v = _read_back(step, r)
        for name, got, sent in (("keys", got_k, step.keys[r]), ("values", got_v, step.values[r])):
            assert got.isfinite().all(), f"write_kv[{fp8}] stored NaN/inf {name} (request {r})"
            want = sent.float().clamp(-bound, bound)
            err = (got - want).abs()
            over = err > fp8_rounding_bound(want, cache_dtype)
            assert not over.any(), (
                f"write_kv[{fp8}] {name} of request {r}: {int(over.sum())} of {over.numel()} "
                f"values off by more than half an fp8 step, e.g. {want[over][:3].tolist()} "
                f"stored as {got[over][:3].tolist()}")


@pytest.mark.parametrize("fp8", sorted(FP8_KV_DTYPES))
@pytest.mark.parametrize("scenario", sorted(PAGED_SCENARIOS))
def test_paged_attention_fp8_cache(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen,
                                   scenario, fp8):
    """paged_attention over an fp8 cache equals the reference fed the same fp8 cache.

    The expected output is dense attention over the values the device stored (read back through
    the reference layout, upcast). Every e4m3/e5m2 value is exact in bf16, fp16 and fp32, so
    upcasting K/V loses nothing and the compute dtype's tolerance applies, not fp8's 2^-4: what
    fp8 costs in accuracy is decided by write_kv (checked above), not by the attention kernel.

    Every slot first holds what an earlier owner of the blocks wrote (large values, some NaN,
    which an fp8 cache stores as 0): the unwritten tails of the requests' last blocks keep it,
    and it must not reach the output.
    """
    cache_dtype = _fp8_cache(portaserve_device, fp8)
    num_q_heads, num_kv_heads, head_dim = HEADS[1]
    scale = head_dim**-0.5
    step = PagedStep(portaserve_device, portaserve_kernels, portaserve_dtype, portaserve_gen,
                     PAGED_SCENARIOS[scenario], num_q_heads, num_kv_heads, head_dim,
                     _block_sizes(portaserve_device)[0], cache_dtype)
    num_slots = step.cache.shape[1] * step.block_size
    stale = randn(portaserve_gen, 2, num_slots, num_kv_heads, head_dim) * 300.0
    stale[torch.rand(stale.shape, generator=portaserve_gen) < 0.05] = float("nan")
    portaserve_kernels.write_kv(*on(portaserve_device, stale[0].to(portaserve_dtype), stale[1].to(portaserve_dtype)),
                                step.cache, on(portaserve_device, torch.arange(num_slots)))
    step.write("cached")
    step.write("new")
    query = on(portaserve_device, torch.cat(step.queries))  # [T, Hq, D]
    out = portaserve_kernels.paged_attention(query, step.cache, step.metadata(), scale).to("cpu")
    start = 0
    for r, req in enumerate(step.requests):
        k, v = _read_back(step, r)
        expected = dense_causal_attention(step.queries[r], k, v, scale)
        assert_close(out[start : start + req.num_new], expected, portaserve_dtype,
                     f"paged_attention[{scenario}, {fp8} cache] request {r} ({req})")
        start += req.num_new


# -- end to end --------------------------------------------------------------------------------
# Greedy generation on the real model must give the same tokens on the device as on cpu. It runs
# once the engine (portaserve.core.llm) and the model fetch (portaserve.core.loaders.fetch) exist.
# Marked ``portaserve_e2e``: deselect with ``-m "not portaserve_e2e"`` for a kernels-only run.

E2E_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
E2E_MAX_TOKENS = 8


@pytest.mark.portaserve_e2e
def test_greedy_generation_matches_cpu(portaserve_device):
    llm_module = pytest.importorskip("portaserve.core.llm", reason="the engine is not built yet")
    fetch = pytest.importorskip("portaserve.core.loaders.fetch", reason="the model fetch is not built yet")
    if portaserve_device.name == "cpu":
        pytest.skip("cpu is the baseline of this comparison; the engine's own tests check it")
    from portaserve.core.sampling import SamplingParams

    model = str(fetch.resolve_model("smollm2-135m"))
    params = SamplingParams(temperature=0, max_tokens=E2E_MAX_TOKENS)
    device_spec = portaserve_device.describe()
    dtypes = portaserve_device.capabilities().dtypes
    dtype = "float32" if torch.float32 in dtypes else str(dtypes[0]).removeprefix("torch.")
    baseline = llm_module.LLM(model, device="cpu", dtype=dtype).generate(E2E_PROMPTS, params)
    outputs = llm_module.LLM(model, device=device_spec, dtype=dtype).generate(E2E_PROMPTS, params)
    for prompt, want, got in zip(E2E_PROMPTS, baseline, outputs, strict=True):
        want_ids, got_ids = want.outputs[0].token_ids, got.outputs[0].token_ids
        assert len(want_ids) > 0
        assert list(got_ids) == list(want_ids), f"greedy tokens differ on {device_spec} for {prompt!r}"
