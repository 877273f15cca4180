"""RMSNorm with an optional fused residual add, as one Triton kernel.

Semantics are ``portaserve.devices.reference.rms_norm``: with a residual, ``s = x + residual``
is rounded to the input dtype, returned, and normalised; the sum of squares is in float32.
Inputs are not modified. Limits: the hidden size fits one tile (up to 65536 elements); rows may
be strided, the last dimension must be contiguous. ``rms_norm_fp8`` (a fused op) writes y
quantized to fp8 per token instead, for a W8A8 linear next.
"""

from __future__ import annotations

from typing import Any

import torch
import triton.language as tl

from portaserve.devices.cuda.launch import (
    MAX,
    SUM,
    fp8_codes_dtype,
    next_pow2,
    pdl_options,
    triton_helper,
    triton_kernel,
)
from portaserve.errors import DeviceError
from portaserve.quant.base import QuantizedActivation
from portaserve.quant.fp8 import FP8_DTYPE

_MAX_HIDDEN = 65536


@triton_helper
def rms_norm_row(x_ptr, res_ptr, w_ptr, res_out_ptr, hidden, eps, HAS_RESIDUAL: tl.constexpr,
                 BLOCK: tl.constexpr, UNCACHED: tl.constexpr):
    """One row of ``hidden`` (<= ``BLOCK``) values: with ``HAS_RESIDUAL``, ``x + residual``
    rounded to x's dtype and stored at ``res_out_ptr``; returns it normalised and scaled by the
    weight, rounded to x's dtype ([BLOCK], zeros past ``hidden``). ``UNCACHED``: x is read past
    L1 (``.cg``), for x that other programs of the same kernel just wrote (a GEMV's epilogue,
    ``quant.gemv_triton``)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    if UNCACHED:
        x = tl.load(x_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.reduce(xf * xf, 0, SUM) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (xf * inv * w).to(x_ptr.dtype.element_ty)


@triton_kernel
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, s_ptr,
    hidden, eps,
    stride_x, stride_res, stride_y, stride_res_out,
    HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(T,)``: one program per row, the whole row in one tile of ``BLOCK`` >= hidden.

    With FP8_OUT, y (rounded to x's dtype, as ``rms_norm`` returns it) is stored quantized to
    fp8 with the row's scale ``amax * fp32(1/448)`` at ``s_ptr[row]`` (1 for a zero row): the
    values of ``quant.fp8.quantize_per_token`` (division with IEEE rounding, as torch's)."""
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start; wait for the last
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    y = rms_norm_row(x_ptr + row * stride_x, res_ptr + row * stride_res, w_ptr,
                     res_out_ptr + row * stride_res_out, hidden, eps, HAS_RESIDUAL, BLOCK, False)
    if FP8_OUT:
        yf = y.to(tl.float32)
        scale = tl.reduce(tl.where(mask, tl.abs(yf), 0.0), 0, MAX) * (1.0 / 448.0)
        scale = tl.where(scale > 0.0, scale, 1.0)
        tl.store(s_ptr + row, scale)
        y = tl.minimum(tl.maximum(tl.math.div_rn(yf, scale), -448.0), 448.0)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise DeviceError(f"cuda rms_norm: {name} must be [T, H], got shape {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y`` or ``(y, x + residual)``; x, residual, y: [T, H]; weight: [H]."""
    return _rms_norm(x, weight, eps, residual, fp8=False)


def rms_norm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> QuantizedActivation | tuple[QuantizedActivation, torch.Tensor]:
    """``rms_norm`` with y quantized per token to fp8 in the same pass (the fused op
    ``rms_norm_fp8``): y is written once, at one byte a value, for a W8A8 linear."""
    return _rms_norm(x, weight, eps, residual, fp8=True)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
              *, fp8: bool) -> Any:
    x = _rows(x, "x")
    num_tokens, hidden = x.shape
    if hidden > _MAX_HIDDEN:
        raise DeviceError(f"cuda rms_norm: hidden size {hidden} exceeds {_MAX_HIDDEN}")
    if weight.shape != (hidden,):
        raise DeviceError(f"cuda rms_norm: weight shape {tuple(weight.shape)} != ({hidden},)")
    y = torch.empty(x.shape, dtype=fp8_codes_dtype(x) if fp8 else x.dtype, device=x.device)
    scale = torch.empty((num_tokens, 1), dtype=torch.float32, device=x.device) if fp8 else y
    has_residual = residual is not None
    if residual is not None:
        residual = _rows(residual, "residual")
        if residual.shape != x.shape:
            raise DeviceError(
                f"cuda rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        res_out = torch.empty_like(x)
    else:
        residual, res_out = x, x  # unused by the kernel
    if num_tokens == 0:
        out = QuantizedActivation(y.to(FP8_DTYPE), scale, x.dtype) if fp8 else y
        return (out, res_out) if has_residual else out
    block = next_pow2(hidden)
    constexprs, options = pdl_options(x)
    _rms_norm_kernel.on(x)[(num_tokens,)](
        x, residual, weight.contiguous(), y, res_out, scale,
        hidden, float(eps),
        x.stride(0), residual.stride(0), y.stride(0), res_out.stride(0),
        HAS_RESIDUAL=has_residual, FP8_OUT=fp8, BLOCK=block,
        num_warps=min(16, max(1, block // 512)), **constexprs, **options,
    )
    out = QuantizedActivation(y.to(FP8_DTYPE), scale, x.dtype) if fp8 else y
    return (out, res_out) if has_residual else out
