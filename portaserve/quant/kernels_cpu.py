"""``quant_linear`` kernels for the ``cpu`` device, one per format, exact against the reference.

Small batches (up to ``cpu_native.MAX_TOKENS`` tokens) of float32 activations on the GGUF
formats, int8, int4 and fp8 go to the native kernels of ``portaserve.devices.cpu_native`` when
they could be built: they expand each packed block in registers or an L1 buffer (the
reference's values) and read the weights once per step; larger batches expand chunks natively
and multiply them with BLAS. Everything else takes the paths below.

Every format uses dequant-in-the-loop: the packed rows are expanded a chunk at a time
(``CHUNK_ELEMENTS`` weights, 4 MiB of float32) into a per-thread buffer that is reused,
and each chunk is one BLAS matmul. The expanded weights are bit-identical to the reference
dequantization (the same float32 operations in the same order), no dense copy of the weight is
ever kept, and only the matmul's summation order differs from ``reference.quant_linear``.

Why not ATen's packed int4/int8 matmuls: ``_weight_int4pack_mm_for_cpu`` and
``_weight_int8pack_mm`` are vectorized for bfloat16 activations only (their float32 paths
are scalar and 10-100x slower than dense), and in bfloat16 they round the scales and the
output, so they are not exact against a float32 reference. They are used for bfloat16
activations (``x.dtype == torch.bfloat16``) on the formats whose weights they express exactly
up to the bf16 rounding of scales (int8 per channel; int4, Q4_0, Q4_1, Q4_K as
``(q - 8) * scale + zero`` with 32-wide groups, Q8_0 as two such matmuls over its high and
low nibbles; repacked once and cached in ``weight.meta``,
which adds about the packed size again); the result then matches the reference within
bfloat16 tolerance, not bit for bit.
"""

from __future__ import annotations

import threading

import torch

from portaserve.devices import cpu_native
from portaserve.quant import gguf_formats
from portaserve.quant.base import QuantizedWeight
from portaserve.quant.int_formats import unpack_nibbles

#: Weights expanded per chunk (float32 elements): 4 MiB, large enough that each chunk is one
#: efficient BLAS call at prefill sizes (1 MiB chunks made 512-token prefill 25% slower).
CHUNK_ELEMENTS = 1 << 20

_local = threading.local()


def _buffer(numel: int) -> torch.Tensor:
    """A float32 scratch buffer of at least ``numel`` elements, reused per thread."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(max(numel, CHUNK_ELEMENTS))
        _local.buf = buf
    return buf[:numel]


# -- per-format dequantization of rows [r0, r1) into a float32 buffer -------------------------


def _nibble_halves(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..., W] -> (low nibbles, high nibbles) uint8 [..., W], masked four bytes at a time."""
    if qs.shape[-1] % 4 == 0 and qs.is_contiguous():
        words = qs.view(torch.int32)
        return ((words & 0x0F0F0F0F).view(torch.uint8),
                ((words >> 4) & 0x0F0F0F0F).view(torch.uint8))
    return qs & 0x0F, qs >> 4


def _gguf_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) in float32, bit-identical to ``gguf_formats.dequantize_data``: the same
    products and sums, with the code->float conversion fused into the first multiply."""
    fmt = weight.format
    if _native_ok(weight):  # the same values, expanded natively
        return _native_chunk(weight, r0, r1)
    data = {k: v[r0:r1] for k, v in weight.data.items()}
    n = r1 - r0
    if fmt in ("Q4_0", "Q4_1"):
        lo, hi = _nibble_halves(data["qs"])  # [n, B, 16] each: elements 0..15 and 16..31
        w = _buffer(lo.numel() * 2).view(*lo.shape[:2], 2, 16)
        d = data["d"].float()[..., None]  # [n, B, 1]
        if fmt == "Q4_0":  # d * (q - 8), with q - 8 exact in int8
            torch.mul(lo.view(torch.int8) - 8, d, out=w[:, :, 0])
            torch.mul(hi.view(torch.int8) - 8, d, out=w[:, :, 1])
        else:  # d * q + m
            torch.mul(lo, d, out=w[:, :, 0])
            torch.mul(hi, d, out=w[:, :, 1])
            w.add_(data["m"].float()[..., None, None])
        return w.view(n, -1)  # [n, K]
    if fmt == "Q8_0":
        qs = data["qs"]  # [n, B, 32] int8
        w = _buffer(qs.numel()).view(qs.shape)
        return torch.mul(qs, data["d"].float()[..., None], out=w).view(n, -1)
    codes = gguf_formats.unpack_codes(fmt, data)  # [n, B, S, sub] uint8
    w = _buffer(codes.numel()).view(codes.shape)
    if fmt in ("Q4_K", "Q5_K"):  # d*sc * q - dmin*m
        sc, mn = gguf_formats.k_scale_min(data["scales"])  # [n, B, 8]
        torch.mul(codes, (data["d"].float()[..., None] * sc.float())[..., None], out=w)
        w.sub_((data["dmin"].float()[..., None] * mn.float())[..., None])
    else:  # Q6_K: d*sc * (q - 32), 16 sub-blocks of 16 per super-block
        q = (codes.view(torch.int8) - 32).view(*codes.shape[:2], 16, 16)
        w = w.view(q.shape)
        torch.mul(q, (data["d"].float()[..., None] * data["scales"].float())[..., None], out=w)
    return w.view(n, -1)  # [n, K]


def _native_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    k = weight.shape[1]
    return cpu_native.dequant_rows(weight, r0, r1, _buffer((r1 - r0) * k).view(r1 - r0, k))


def _int8_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    if _native_ok(weight):
        return _native_chunk(weight, r0, r1)
    q = weight.data["qweight"][r0:r1]
    w = _buffer(q.numel()).view(q.shape)
    return torch.mul(q, weight.data["scales"][r0:r1].float()[:, None], out=w)


def _int4_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    if _native_ok(weight):
        return _native_chunk(weight, r0, r1)
    g = weight.meta["group_size"]
    codes = unpack_nibbles(weight.data["qweight"][r0:r1])  # [n, K]
    n, k = codes.shape
    w = _buffer(codes.numel()).view(n, k // g, g)
    w.copy_(codes.view(n, k // g, g))
    w.sub_(weight.data["zeros"][r0:r1].float()[..., None])
    w.mul_(weight.data["scales"][r0:r1].float()[..., None])
    return w.view(n, k)


def _fp8_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    if _native_ok(weight):
        return _native_chunk(weight, r0, r1)
    q = weight.data["weight"][r0:r1]
    w = _buffer(q.numel()).view(q.shape)
    w.copy_(q)
    scale = weight.data["weight_scale"].float()
    return w.mul_(scale[r0:r1, None] if scale.dim() == 1 else scale)


def _dequant_linear(chunk_fn, x: torch.Tensor, weight: QuantizedWeight,
                    bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    xf = x.float().reshape(-1, k)
    rows = max(1, min(n, CHUNK_ELEMENTS // k))
    out_t = torch.empty(n, xf.shape[0])  # [N, T]: each chunk writes contiguous rows
    xt = xf.t()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(chunk_fn(weight, r0, r1), xt, out=out_t[r0:r1])
    out = out_t.t()  # [T, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).contiguous()


# -- bfloat16 activations: ATen's int4 weight-packed matmul ------------------------------------

_INT4PACK_FORMATS = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "int4")


def _int4pack(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, scales_and_zeros bf16 [K/G, N, 2], G) for ATen's int4 matmul, built once
    and cached in ``weight.meta``. ATen computes ``w = (q - 8) * scale + zero``; each format's
    ``w`` is rewritten in that form exactly (only the bf16 rounding of scale and zero differs)."""
    cached = weight.meta.get("_cpu_int4pack")
    if cached is not None:
        return cached
    n, k = weight.shape
    data, fmt = weight.data, weight.format
    if fmt == "int4":
        codes, group = unpack_nibbles(data["qweight"]), weight.meta["group_size"]
        scale = data["scales"].float()  # [N, G]
        zero = (8.0 - data["zeros"].float()) * scale  # (q - z) s = (q - 8) s + (8 - z) s
    else:
        codes, group = gguf_formats.unpack_codes(fmt, data).reshape(n, k), 32
        if fmt == "Q4_K":
            sc, mn = gguf_formats.k_scale_min(data["scales"])  # [N, B, 8]
            scale = (data["d"].float()[..., None] * sc.float()).reshape(n, -1)
            zero = 8.0 * scale - (data["dmin"].float()[..., None] * mn.float()).reshape(n, -1)
        else:
            scale = data["d"].float()  # [N, K/32]
            zero = torch.zeros_like(scale) if fmt == "Q4_0" else data["m"].float() + 8.0 * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
    weight.meta["_cpu_int4pack"] = (packed, scales_zeros, group)
    return packed, scales_zeros, group


def _q8_0_int4pack(weight: QuantizedWeight) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Q8_0 as two int4 matmuls: q = 16 * (q >> 4) + (q & 15), so with h = (q >> 4) + 8 and
    l = q & 15 (both 0..15): ``d q = 16d (h - 8) + d (l - 8) + 8d``. Cached in ``weight.meta``."""
    cached = weight.meta.get("_cpu_int4pack")
    if cached is not None:
        return cached
    n, k = weight.shape
    q = weight.data["qs"].reshape(n, k).to(torch.int32)  # [N, K], -128..127
    d = weight.data["d"].float().t()  # [K/32, N]
    halves = []
    for codes, scale, zero in (((q >> 4) + 8, 16.0 * d, torch.zeros_like(d)), (q & 15, d, 8.0 * d)):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        halves.append((packed, torch.stack((scale, zero), dim=-1).to(torch.bfloat16).contiguous()))
    weight.meta["_cpu_int4pack"] = tuple(halves)
    return weight.meta["_cpu_int4pack"]


def _int4pack_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, weight.shape[1])
    if weight.format == "Q8_0":
        (hi, hi_sz), (lo, lo_sz) = _q8_0_int4pack(weight)
        out = (torch.ops.aten._weight_int4pack_mm_for_cpu(x2, hi, 32, hi_sz).float()
               + torch.ops.aten._weight_int4pack_mm_for_cpu(x2, lo, 32, lo_sz).float()).to(x.dtype)
    else:
        packed, scales_zeros, group = _int4pack(weight)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scales_zeros)  # [T, N]
    return out if bias is None else out + bias.to(out.dtype)


def _native_ok(weight: QuantizedWeight) -> bool:
    """Whether the native kernels serve this weight (format, contiguous arrays); cached."""
    ok = weight.meta.get("_cpu_native")
    if ok is None:
        ok = (weight.format in cpu_native.FORMATS and weight.shape[1] % 32 == 0
              and weight.meta.get("group_size", 32) % 32 == 0
              and all(t.is_contiguous() and t.device.type == "cpu" for t in weight.data.values())
              and cpu_native.library() is not None)
        weight.meta["_cpu_native"] = ok
    return ok


def gguf_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ dequant(weight).T for the GGUF block formats -> [T, N]."""
    if x.dtype == torch.bfloat16 and weight.format in _INT4PACK_FORMATS:
        return _int4pack_linear(x, weight, bias)
    out = _native_linear(x, weight, bias)
    if out is not None:
        return out
    return _dequant_linear(_gguf_chunk, x, weight, bias)


def _native_linear(x: torch.Tensor, weight: QuantizedWeight,
                   bias: torch.Tensor | None) -> torch.Tensor | None:
    """The native kernel's result for small float32 batches, or None (take another path)."""
    n, k = weight.shape
    if x.dtype != torch.float32 or x.numel() > cpu_native.MAX_TOKENS * k or not _native_ok(weight):
        return None
    return cpu_native.linear(x.reshape(-1, k), weight, bias).view(*x.shape[:-1], n)


def int8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = _native_linear(x, weight, bias)
    if out is not None:
        return out
    if x.dtype == torch.bfloat16:
        out = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, weight.shape[1]), weight.data["qweight"], weight.data["scales"].to(x.dtype))
        return out if bias is None else out + bias.to(out.dtype)
    return _dequant_linear(_int8_chunk, x, weight, bias)


def int4_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = _native_linear(x, weight, bias)
    if out is not None:
        return out
    if x.dtype == torch.bfloat16 and weight.meta["group_size"] in (32, 64, 128, 256):
        return _int4pack_linear(x, weight, bias)
    return _dequant_linear(_int4_chunk, x, weight, bias)


def fp8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only on cpu (the reference numerics); W8A8 is ``quant.fp8.fp8_linear``."""
    out = _native_linear(x, weight, bias)
    if out is not None:
        return out
    return _dequant_linear(_fp8_chunk, x, weight, bias)


#: quant format -> cpu kernel
CPU_QUANT_KERNELS = {
    **{fmt: gguf_linear for fmt in gguf_formats.GGUF_FORMATS},
    "int8": int8_linear,
    "int4": int4_linear,
    "fp8": fp8_linear,
}
