"""Triton kernels of the quant formats on ``cuda``: dequant-fused GEMMs for Q4_0, Q4_1, Q8_0,
int4 and int8, and fp8 W8A8 (activation quantization + ``torch._scaled_mm``).

``triton_quant_linear`` computes ``x [M, K] @ dequant(W)[N, K].T`` without ever writing the
dense weight. Up to ``gemv_triton.MAX_M`` rows it runs the GEMV of ``gemv_triton`` (decode:
weight bytes streamed once) where its ``CONFIGS`` has one for the format and M. Larger M (and
Q8_0 / int8 at the rows where the GEMV measured slower) runs ``_quant_gemm_kernel``: each program
computes a ``[BLOCK_M, BLOCK_N]`` output tile; every K step loads the packed codes of a
``[BLOCK_N, BLOCK_K]`` weight tile, expands them in registers with the format's scales (float32
math, the reference's formula), casts to x's dtype and feeds ``tl.dot`` with a float32
accumulator (``ieee`` precision for float32 x).

``fp8_quant_linear`` is W8A8 (``quant_numerics = "w8a8"``, checked against
``fp8.fp8_linear_emulated``): one Triton kernel quantizes x per token (or with the weight's
static / per-tensor scale), then up to ``FP8_GEMV_MAX_M`` rows the fp8 GEMV, else
``torch._scaled_mm`` on the tensor cores. No host synchronization, so decode steps capture in
CUDA graphs. K-quants (Q4_K, Q5_K, Q6_K) have the GEMV; larger M unpacks them for cuBLAS, as
the cuda device's ``dequant_linear`` does. Registered through
``portaserve.quant.builtin`` only when triton imports; the module is imported lazily.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from portaserve.devices.cuda.kv import KV_LAYOUT
from portaserve.devices.cuda.launch import MAX, fp8_codes_dtype, triton_kernel
from portaserve.quant import fp8, gemv_triton
from portaserve.quant.base import QuantizedActivation, QuantizedWeight
from portaserve.quant.fp8 import FP8_DTYPE, amax_scale, fp8_linear_emulated, scaled_mm

_FORMAT_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "int4": 3, "int8": 4}


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, n0, k0, N, K, FMT: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_K] weights of rows n0.., columns k0.. (K % BLOCK_K == 0).

    Packed bytes are loaded as contiguous row tiles and expanded in registers; scales are
    loaded once per group and broadcast."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n[:, None] < N
    NB: tl.constexpr = BLOCK_K // 32
    if FMT == 0 or FMT == 1:  # GGUF Q4_0 / Q4_1: qs [N, K/32, 16], d/m fp16 [N, K/32]
        offs_b = tl.arange(0, NB * 16)
        qs = tl.load(q_ptr + offs_n[:, None] * (K // 2) + k0 // 2 + offs_b[None, :], mask=n_ok,
                     other=0)  # [BN, NB*16] bytes
        qs = tl.reshape(qs, (BLOCK_N, NB, 16))
        lo = (qs & 15).to(tl.float32)
        hi = (qs >> 4).to(tl.float32)
        q = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (BLOCK_N, NB, 32))
        offs_g = k0 // 32 + tl.arange(0, NB)
        d = tl.load(s_ptr + offs_n[:, None] * (K // 32) + offs_g[None, :], mask=n_ok, other=0.0)
        d = d.to(tl.float32)[:, :, None]
        if FMT == 0:
            w = d * (q - 8.0)
        else:
            m = tl.load(z_ptr + offs_n[:, None] * (K // 32) + offs_g[None, :], mask=n_ok, other=0.0)
            w = d * q + m.to(tl.float32)[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    elif FMT == 2:  # GGUF Q8_0: qs int8 [N, K], d fp16 [N, K/32]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(q_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok, other=0)
        q = tl.reshape(q.to(tl.float32), (BLOCK_N, NB, 32))
        offs_g = k0 // 32 + tl.arange(0, NB)
        d = tl.load(s_ptr + offs_n[:, None] * (K // 32) + offs_g[None, :], mask=n_ok, other=0.0)
        w = tl.reshape(q * d.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))
    elif FMT == 3:  # int4: qweight [N, K/2] (even column low nibble), scales/zeros [N, K/G]
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        qb = tl.load(q_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=n_ok, other=0)
        q = tl.reshape(tl.join((qb & 15).to(tl.float32), (qb >> 4).to(tl.float32)),
                       (BLOCK_N, BLOCK_K // GROUP, GROUP))
        offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        gptr = offs_n[:, None] * (K // GROUP) + offs_g[None, :]
        sc = tl.load(s_ptr + gptr, mask=n_ok, other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(z_ptr + gptr, mask=n_ok, other=0).to(tl.float32)[:, :, None]
        w = tl.reshape((q - z) * sc, (BLOCK_N, BLOCK_K))
    else:  # int8: qweight [N, K], scales [N]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(q_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_ok, other=0)
        sc = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * sc[:, None]
    return w


@triton.jit
def _quant_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K,
                       stride_xm, stride_om,
                       FMT: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=offs_m[:, None] < M, other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, pid_n * BLOCK_N, k0, N, K, FMT, GROUP,
                          BLOCK_N, BLOCK_K).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _operands(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    data, fmt = weight.data, weight.format
    if fmt in ("Q4_0", "Q4_1"):
        return data["qs"], data["d"], data.get("m", data["d"]), 32
    if fmt == "Q8_0":
        return data["qs"], data["d"], data["d"], 32
    if fmt == "int4":
        return data["qweight"], data["scales"], data["zeros"], int(weight.meta["group_size"])
    return data["qweight"], data["scales"], data["scales"], 1  # int8


def triton_quant_linear(x: torch.Tensor, weight: QuantizedWeight,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``quant_linear`` for the weight-only formats of ``TRITON_FORMATS`` on a Triton device
    -> [M, N]. K formats have the GEMV only; above ``MAX_M`` rows they are unpacked for cuBLAS."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m <= gemv_triton.MAX_M:
        out = gemv_triton.gemv(x2, weight, bias)
        if out is not None:
            return out
    if weight.format not in _FORMAT_IDS:
        return torch.nn.functional.linear(x2, weight.dequantize(x.dtype), bias)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    q, s, z, group = _operands(weight)
    block_k = 128 if k % 128 == 0 else 64
    if weight.format == "int4":
        block_k = max(block_k, group)
    if k % block_k or block_k % group:  # shapes the tiles do not cover: dequantize, one GEMM
        out = torch.nn.functional.linear(x2, weight.dequantize(x.dtype))
        return out if bias is None else out + bias.to(out.dtype)
    block_m = 16 if m <= 16 else 64
    block_n = 32 if m <= 16 else 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _quant_gemm_kernel[grid](
        x2, q, s, z, out, m, n, k, x2.stride(0), out.stride(0),
        FMT=_FORMAT_IDS[weight.format], GROUP=group, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def triton_quant_linear_rms_norm(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                                 norm_weight: torch.Tensor, eps: float, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``triton_quant_linear``, then ``rms_norm`` with the residual, in the GEMV's launch (the
    fused op ``linear_rms_norm``; ``gemv_triton.FUSE_NORM``) -> (y, out + residual); None where
    the GEMV does not fuse it (more rows than ``MAX_M``, the tensor-core tiles, ...)."""
    return _fused_gemv(x, weight, bias, norm=(residual, norm_weight, eps))


def triton_quant_linear_silu_and_mul(x: torch.Tensor, weight: QuantizedWeight,
                                     bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``triton_quant_linear`` of a gate|up weight, then ``silu_and_mul``, in the GEMV's launch
    (the fused op ``linear_silu_and_mul``; ``gemv_triton.FUSE_SILU``) -> [M, I]; None where
    the GEMV does not fuse it."""
    return _fused_gemv(x, weight, bias, silu_and_mul=True)


def triton_quant_linear_rotary_write_kv(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                                        positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                        num_heads: int) -> torch.Tensor | None:
    """``triton_quant_linear`` of a q|k|v weight, then ``rotary_write_kv``, in the GEMV's launch
    (the fused op ``linear_rotary_write_kv``; ``gemv_triton.FUSE_ROTARY``; the cuda device's KV
    layout) -> q' [M, Hq, D]; None where the GEMV does not fuse it."""
    q = _fused_gemv(x, weight, bias, rotary=(positions, cos_sin_cache, kv_cache, slot_mapping, num_heads,
                                             KV_LAYOUT))
    return None if q is None else q.view(q.shape[0], num_heads, -1)


def _fused_gemv(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, **fused: Any) -> Any:
    """``gemv_triton.gemv`` with a fused epilogue over x's rows, or None (more rows than the
    GEMV takes, or ``gemv`` declines: its flags and tiles decide)."""
    x2 = x.reshape(-1, weight.shape[1])
    if x2.shape[0] > gemv_triton.MAX_M:
        return None
    return gemv_triton.gemv(x2.contiguous(), weight, bias, **fused)


#: weight-only formats ``triton_quant_linear`` serves (fp8 has ``fp8_quant_linear``)
TRITON_FORMATS = (*_FORMAT_IDS, "Q4_K", "Q5_K", "Q6_K")

# -- fp8 W8A8 --------------------------------------------------------------------------------

#: Rows of x up to which fp8 runs the Triton GEMV rather than _scaled_mm (measured on an H200).
FP8_GEMV_MAX_M = 4


@triton_kernel
def _fp8_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                      STATIC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(M,)``: row m of x -> e4m3 codes ``clamp(x / scale, +-448)``; the scale is the
    row's ``amax * fp32(1/448)`` (1 for a zero row; ``fp8.amax_scale``), stored at ``s_ptr[m]``,
    or with ``STATIC`` the one scale at ``s_ptr``. The codes divide with IEEE rounding, as
    torch's tensor division does, so they equal ``fp8.quantize_fp8``'s."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(s_ptr).to(tl.float32)
    else:
        amax = tl.full((BLOCK,), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.reduce(amax, 0, MAX) * (1.0 / 448.0)  # fp8.amax_scale: times fp32(1/448)
        scale = tl.where(scale > 0.0, scale, 1.0)
        tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_fp8_activation(x: torch.Tensor, weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (e4m3 [M, K], float32 scale [M] or a scalar) by the
    weight's activation scheme; the same values as ``fp8.quantize_activation``."""
    m, k = x.shape
    scheme = weight.meta.get("activation", "dynamic_per_token")
    xq = torch.empty(m, k, dtype=fp8_codes_dtype(x), device=x.device)
    if scheme == "dynamic_per_token":
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
    elif scheme == "static":
        scale = weight.data["input_scale"]
    else:  # dynamic_per_tensor: one amax over the batch first
        scale = amax_scale(x.abs().amax())
    block = min(triton.next_power_of_2(k), 4096)
    _fp8_quant_kernel.on(x)[(m,)](x, xq, scale, k, x.stride(0), xq.stride(0),
                                  STATIC=scheme != "dynamic_per_token", BLOCK=block,
                                  num_warps=4 if block >= 1024 else 1)
    return xq.to(FP8_DTYPE), scale


def fp8_quant_linear(x: torch.Tensor | QuantizedActivation, weight: QuantizedWeight,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``quant_linear`` for fp8 on ``cuda``: W8A8 (see the module docstring) -> [M, N]. x may
    come quantized already (a ``QuantizedActivation`` from a fused ``*_fp8`` op)."""
    n, k = weight.shape
    if not isinstance(x, QuantizedActivation):
        x = x.reshape(-1, k)
        if x.stride(-1) != 1:
            x = x.contiguous()
    if n % 16 or k % 16:  # shapes _scaled_mm does not take: the same numerics in torch
        return fp8_linear_emulated(x, weight, bias)
    if isinstance(x, QuantizedActivation):
        xq, scale, dtype = x.data, x.scale.reshape(-1), x.dtype
    else:
        (xq, scale), dtype = quantize_fp8_activation(x, weight), x.dtype
    out = None
    if xq.shape[0] <= FP8_GEMV_MAX_M:
        out = gemv_triton.gemv(xq, weight, bias, x_scale=scale, out_dtype=dtype)
    if out is None:
        out = scaled_mm(xq, scale, weight, dtype, fast_accum=fp8.FAST_ACCUM)
        if bias is not None:
            out = out + bias.to(out.dtype)
    return out

