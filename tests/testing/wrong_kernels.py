"""Kernels that are wrong on purpose, as portaserve plugins overriding the cpu device.

The conformance suite must fail on each (tests/testing/test_conformance_suite.py).
"""

from __future__ import annotations

import torch

import portaserve
from portaserve.devices import reference
from portaserve.quant import fp8


def gptj_rotary(positions, q, k, cos_sin_cache):
    """Rotates interleaved pairs (GPT-J style) instead of halves (NeoX)."""
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(t):
        even, odd = t.float()[..., ::2], t.float()[..., 1::2]
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2).to(t.dtype)

    return rotate(q), rotate(k)


def leaky_attention(query, kv_cache, attn, scale):
    """A causal off-by-one: each new token also sees the token after it."""
    out = torch.empty_like(query)
    starts, seq_lens = attn.query_start_loc_cpu, attn.seq_lens_cpu
    for r, seq_len in enumerate(seq_lens):
        q = query[starts[r] : starts[r + 1]].float()  # [Q, Hq, D]
        k, v = reference.gather_kv(kv_cache, attn.block_tables[r], seq_len)
        group = q.shape[1] // k.shape[1]
        k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,shd->hqs", q, k) * scale
        q_pos = torch.arange(seq_len - q.shape[0], seq_len)
        scores = scores.masked_fill(torch.arange(seq_len)[None] > q_pos[:, None] + 1, float("-inf"))
        out[starts[r] : starts[r + 1]] = torch.einsum("hqs,shd->qhd", scores.softmax(-1), v).to(query.dtype)
    return out


def unrotated_keys_write(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping):
    """A fused rotary + write_kv that stores the keys before rotating them."""
    reference.write_kv(k, v, kv_cache, slot_mapping)
    return reference.rotary(positions, q, k, cos_sin_cache)[0]


def undeclared_w8a8(x, weight, bias=None):
    """fp8 W8A8 numerics (activations quantized too) without saying so: the suite then holds
    it to the weight-only reference, which it misses by the fp8 rounding of x (~3%)."""
    return fp8.fp8_linear_emulated(x, weight, bias)


def per_tensor_w8a8(x, weight, bias=None):
    """Declares W8A8 but quantizes x with one scale for the batch where the weight asks for
    one per token: right for a single token, off for several."""
    xq, xs = fp8.quantize_fp8(x, fp8.amax_scale(x.abs().amax())), fp8.amax_scale(x.abs().amax())
    ws = weight.data["weight_scale"].float()
    out = (xq.float() @ weight.data["weight"].float().t()) * xs * ws
    return (out if bias is None else out + bias.float()).to(x.dtype)


per_tensor_w8a8.quant_numerics = "w8a8"


class CpuOverride:
    """A plugin registering ``fn`` as the cpu device's ``op``."""

    PORTASERVE_PLUGIN_API = "1.0"

    def __init__(self, op: str, fn) -> None:
        self.op, self.fn = op, fn

    @portaserve.hookimpl
    def portaserve_register_kernels(self, register):
        register("cpu", self.op, self.fn)


def per_tensor_rms_norm_fp8(x, weight, eps, residual=None):
    """A fused rms_norm_fp8 that quantizes with one scale for the whole batch, not per token."""
    out = reference.rms_norm(x, weight, eps, residual)
    y = out[0] if residual is not None else out
    scale = fp8.amax_scale(y.abs().amax().float()).expand(y.shape[0], 1).contiguous()
    qa = fp8.QuantizedActivation(fp8.quantize_fp8(y, scale), scale, y.dtype)
    return (qa, out[1]) if residual is not None else qa


WRONG_ROTARY = CpuOverride("rotary", gptj_rotary)
PER_TENSOR_NORM_FP8 = CpuOverride("rms_norm_fp8", per_tensor_rms_norm_fp8)
LEAKY_ATTENTION = CpuOverride("paged_attention", leaky_attention)
UNROTATED_KEYS = CpuOverride("rotary_write_kv", unrotated_keys_write)


class QuantOverride:
    """A plugin registering ``fn`` as ``device``'s ``quant_linear`` for format ``fmt``. (The
    built-in quant plugin registers cpu's kernels first, and the first registration wins, so
    these wrong fp8 kernels go on ``triton-interpret``, whose own is dequantize + F.linear.)"""

    PORTASERVE_PLUGIN_API = "1.0"

    def __init__(self, device: str, fmt: str, fn) -> None:
        self.device, self.fmt, self.fn = device, fmt, fn

    @portaserve.hookimpl
    def portaserve_register_kernels(self, register):
        register(self.device, "quant_linear", self.fn, quant_format=self.fmt)


UNDECLARED_W8A8 = QuantOverride("triton-interpret", "fp8", undeclared_w8a8)
PER_TENSOR_W8A8 = QuantOverride("triton-interpret", "fp8", per_tensor_w8a8)
