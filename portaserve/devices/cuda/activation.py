"""SiLU-and-multiply of the gated MLP, as one Triton kernel.

Semantics are ``portaserve.devices.reference.silu_and_mul``: ``silu(x[:, :I]) * x[:, I:]`` in
float32, rounded to the input dtype. Rows may be strided; the last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.devices.cuda.launch import (
    MAX,
    fp8_codes_dtype,
    pdl_options,
    triton_helper,
    triton_kernel,
)
from portaserve.errors import DeviceError
from portaserve.quant.base import QuantizedActivation
from portaserve.quant.fp8 import FP8_DTYPE


@triton_helper
def silu_mul(gate, up):
    """``silu(gate) * up`` in float32, as every silu kernel here computes it (the quant GEMV's
    epilogue too, ``quant.gemv_triton``), so that fused and separate launches agree."""
    return gate / (1.0 + tl.exp(-gate)) * up


@triton_kernel
def _silu_and_mul_kernel(
    x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(T, cdiv(I, BLOCK))``: one program per row and ``BLOCK`` columns of the output."""
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start; wait for the last
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = silu_mul(gate, up)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> [T, I]."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise DeviceError(f"cuda silu_and_mul: x must be [T, 2I], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    constexprs, options = pdl_options(x)
    _silu_and_mul_kernel.on(x)[(num_tokens, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4, **constexprs, **options,
    )
    return out


#: Widest I that ``silu_and_mul_fp8`` keeps in one program's registers (16 warps; one read of
#: the row); wider rows take two passes, amax then codes, reading the row twice (the L2 does not
#: keep a prompt chunk's rows between them: 0.434 vs 0.293 ms at 8192 x 14336 on an H100).
ONE_PASS_MAX_INTER = 16384


@triton_helper
def _silu_mul_cols(x_ptr, row, stride_x, inter, cols):
    """``silu(gate) * up`` at columns ``cols`` of a row (past ``inter``: 0), rounded to x's dtype
    as ``silu_and_mul`` returns it, in float32."""
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    return silu_mul(gate, up).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton_helper
def _store_fp8_scale(s_ptr, row, amax):
    """The row's scale ``amax / 448`` (1 for a zero row), stored and returned."""
    scale = amax * (1.0 / 448.0)
    scale = tl.where(scale > 0.0, scale, 1.0)
    tl.store(s_ptr + row, scale)
    return scale


@triton_helper
def _store_fp8_codes(q_ptr, row, stride_q, inter, cols, y, scale):
    """``y / scale`` saturated to +-448, stored as fp8 codes at columns ``cols`` (< ``inter``)."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -448.0), 448.0)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < inter)


@triton_kernel
def _silu_and_mul_fp8_kernel(
    x_ptr, q_ptr, s_ptr, inter, stride_x, stride_q, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid ``(T,)``: one program per row: the row's amax of ``silu(gate) * up`` rounded to x's
    dtype (as ``silu_and_mul`` returns it), then the values quantized to fp8 with the scale
    ``amax * fp32(1/448)`` (stored at ``s_ptr[row]``; 1 for a zero row):
    ``quant.fp8.quantize_per_token``'s values. ``ONE_PASS`` (BLOCK >= I): the row is read once
    and held in registers; otherwise two passes of ``BLOCK`` columns, amax then codes."""
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start; wait for the last
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        y = _silu_mul_cols(x_ptr, row, stride_x, inter, cols)
        scale = _store_fp8_scale(s_ptr, row, tl.reduce(tl.abs(y), 0, MAX))
        _store_fp8_codes(q_ptr, row, stride_q, inter, cols, y, scale)
    else:
        amax = tl.full((BLOCK,), 0.0, tl.float32)
        for c0 in range(0, inter, BLOCK):  # pass 1: the row's amax
            amax = tl.maximum(amax, tl.abs(_silu_mul_cols(x_ptr, row, stride_x, inter, c0 + tl.arange(0, BLOCK))))
        scale = _store_fp8_scale(s_ptr, row, tl.reduce(amax, 0, MAX))
        for c0 in range(0, inter, BLOCK):  # pass 2: the codes
            cols = c0 + tl.arange(0, BLOCK)
            _store_fp8_codes(q_ptr, row, stride_q, inter, cols, _silu_mul_cols(x_ptr, row, stride_x, inter, cols),
                             scale)


def silu_and_mul_fp8(x: torch.Tensor) -> QuantizedActivation:
    """``silu_and_mul`` quantized per token to fp8 in the same kernel (the fused op
    ``silu_and_mul_fp8``): x [T, 2I] -> fp8 [T, I] and scales [T, 1]."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise DeviceError(f"cuda silu_and_mul_fp8: x must be [T, 2I], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=fp8_codes_dtype(x), device=x.device)
    scale = torch.empty((num_tokens, 1), dtype=torch.float32, device=x.device)
    if num_tokens and inter:
        constexprs, options = pdl_options(x)
        width = triton.next_power_of_2(inter)
        one_pass = width <= ONE_PASS_MAX_INTER
        block = width if one_pass else 1024
        _silu_and_mul_fp8_kernel.on(x)[(num_tokens,)](
            x, out, scale, inter, x.stride(0), out.stride(0), BLOCK=block, ONE_PASS=one_pass,
            num_warps=min(16, max(4, block // 1024)), **constexprs, **options,
        )
    return QuantizedActivation(out.to(FP8_DTYPE), scale, x.dtype)
