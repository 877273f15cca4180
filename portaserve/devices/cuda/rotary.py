"""Rotary position embedding (NeoX / rotate-half) of q and k, as one Triton kernel.

Semantics are ``portaserve.devices.reference.rotary``: ``cos_sin_cache[p] = cat(cos, sin)`` of
width D (the head dim, rotated in full); the rotation is computed in float32 and rounded to the
input dtype. Returns new tensors; q and k may be strided views (e.g. slices of a fused qkv
projection) as long as the head dim is contiguous.
"""

from __future__ import annotations

import torch
import triton.language as tl

from portaserve.devices.cuda.launch import next_pow2, triton_kernel
from portaserve.errors import DeviceError


@triton_kernel
def _rotary_kernel(
    pos_ptr, cs_ptr,
    q_ptr, k_ptr, q_out_ptr, k_out_ptr,
    num_q_heads, num_k_heads, half,
    stride_cs, stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Grid ``(T,)``: one program per token rotates all its q and k heads (heads x D/2 tiles)."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    mask = (hq[:, None] < num_q_heads) & d_mask[None, :]
    src = q_ptr + t * stride_qt + hq[:, None] * stride_qh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = q_out_ptr + t * stride_qot + hq[:, None] * stride_qoh + d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)

    hk = tl.arange(0, BLOCK_HK)
    mask = (hk[:, None] < num_k_heads) & d_mask[None, :]
    src = k_ptr + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = k_out_ptr + t * stride_kot + hk[:, None] * stride_koh + d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(k_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(k_out_ptr.dtype.element_ty), mask=mask)


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T]; q [T, Hq, D]; k [T, Hk, D]; cos_sin_cache [P, D] -> (q', k')."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise DeviceError(
            f"cuda rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D] alike")
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim:
        raise DeviceError(
            f"cuda rotary: head dim {head_dim} must be even and match cos_sin_cache "
            f"{tuple(cos_sin_cache.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel.on(q)[(num_tokens,)](
        positions, cos_sin_cache, q, k, q_out, k_out,
        num_q_heads, k.shape[1], half,
        cos_sin_cache.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        BLOCK_HQ=next_pow2(num_q_heads), BLOCK_HK=next_pow2(k.shape[1]),
        BLOCK_HALF=next_pow2(half), num_warps=4,
    )
    return q_out, k_out
