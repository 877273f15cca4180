"""SiLU-and-multiply of the gated MLP, as one Triton kernel.

Semantics are ``portaserve.devices.reference.silu_and_mul``: ``silu(x[:, :I]) * x[:, I:]`` in
float32, rounded to the input dtype. Rows may be strided; the last dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.devices.cuda.launch import pdl_options, triton_kernel
from portaserve.errors import DeviceError


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
    out = gate / (1.0 + tl.exp(-gate)) * up
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
