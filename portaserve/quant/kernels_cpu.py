"""``quant_linear`` kernels for the ``cpu`` device, one per format, exact against the reference.

Every format uses dequant-in-the-loop: the packed rows are expanded a chunk at a time
(``CHUNK_ELEMENTS`` weights, about 1 MiB of float32) into a per-thread buffer that is reused,
and each chunk is one BLAS matmul. The expanded weights are bit-identical to the reference
dequantization (the same float32 operations in the same order), no dense copy of the weight is
ever kept, and only the matmul's summation order differs from ``reference.quant_linear``.

Why not ATen's packed int4/int8 matmuls: ``_weight_int4pack_mm_for_cpu`` and
``_weight_int8pack_mm`` are vectorized for bfloat16 activations only (their float32 paths
are scalar and 10-100x slower than dense), and in bfloat16 they round the scales and the
output, so they are not exact against a float32 reference. They are used for bfloat16
activations (``x.dtype == torch.bfloat16``) on the formats that map losslessly onto them
(int8 per channel; int4, Q4_0, Q4_1 with 32-wide groups); the result then matches the
reference within bfloat16 tolerance, not bit for bit.
"""

from __future__ import annotations

import threading

import torch

from portaserve.quant import gguf_formats
from portaserve.quant.base import QuantizedWeight
from portaserve.quant.int_formats import unpack_nibbles

#: Weights expanded per chunk (float32 elements); about 1 MiB keeps the chunk in L2/L3.
CHUNK_ELEMENTS = 1 << 18

_local = threading.local()


def _buffer(numel: int) -> torch.Tensor:
    """A float32 scratch buffer of at least ``numel`` elements, reused per thread."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, CHUNK_ELEMENTS))
        _local.buf = buf
    return buf[:numel]


# -- per-format dequantization of rows [r0, r1) into a float32 buffer -------------------------


def _gguf_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    fmt = weight.format
    data = {k: v[r0:r1] for k, v in weight.data.items()}
    codes = gguf_formats.unpack_codes(fmt, data)  # [n, B, S, sub] uint8/int8
    w = _buffer(codes.numel()).view(codes.shape)
    w.copy_(codes)
    if fmt == "Q4_0":
        w.sub_(8.0).mul_(data["d"].float()[..., None, None])
    elif fmt == "Q4_1":
        w.mul_(data["d"].float()[..., None, None]).add_(data["m"].float()[..., None, None])
    elif fmt == "Q8_0":
        w.mul_(data["d"].float()[..., None, None])
    elif fmt in ("Q4_K", "Q5_K"):
        sc, mn = gguf_formats.k_scale_min(data["scales"])  # [n, B, 8]
        w.mul_((data["d"].float()[..., None] * sc.float())[..., None])
        w.sub_((data["dmin"].float()[..., None] * mn.float())[..., None])
    else:  # Q6_K: 16 sub-blocks of 16 per super-block
        w = w.view(*codes.shape[:2], 16, 16)
        w.sub_(32.0).mul_((data["d"].float()[..., None] * data["scales"].float())[..., None])
    return w.view(r1 - r0, -1)  # [n, K]


def _int8_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    q = weight.data["qweight"][r0:r1]
    w = _buffer(q.numel()).view(q.shape)
    return w.copy_(q).mul_(weight.data["scales"][r0:r1].float()[:, None])


def _int4_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
    g = weight.meta["group_size"]
    codes = unpack_nibbles(weight.data["qweight"][r0:r1])  # [n, K]
    n, k = codes.shape
    w = _buffer(codes.numel()).view(n, k // g, g)
    w.copy_(codes.view(n, k // g, g))
    w.sub_(weight.data["zeros"][r0:r1].float()[..., None])
    w.mul_(weight.data["scales"][r0:r1].float()[..., None])
    return w.view(n, k)


def _fp8_chunk(weight: QuantizedWeight, r0: int, r1: int) -> torch.Tensor:
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


def gguf_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ dequant(weight).T for the GGUF block formats -> [T, N]."""
    return _dequant_linear(_gguf_chunk, x, weight, bias)


def int8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.dtype == torch.bfloat16:
        out = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, weight.shape[1]), weight.data["qweight"], weight.data["scales"].to(x.dtype))
        return out if bias is None else out + bias.to(out.dtype)
    return _dequant_linear(_int8_chunk, x, weight, bias)


def int4_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _dequant_linear(_int4_chunk, x, weight, bias)


def fp8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only on cpu (the reference numerics); W8A8 is ``quant.fp8.fp8_linear``."""
    return _dequant_linear(_fp8_chunk, x, weight, bias)


#: quant format -> cpu kernel
CPU_QUANT_KERNELS = {
    **{fmt: gguf_linear for fmt in gguf_formats.GGUF_FORMATS},
    "int8": int8_linear,
    "int4": int4_linear,
    "fp8": fp8_linear,
}
