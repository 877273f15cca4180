"""Rotary position embedding (NeoX / rotate-half) of q and k as one Triton kernel, and the
fused ``rotary_write_kv`` that also stores the rotated keys and the values in the paged cache.

Semantics are ``portaserve.devices.reference.rotary``: ``cos_sin_cache[p] = cat(cos, sin)`` of
width D (the head dim, rotated in full); the rotation is computed in float32 and rounded to the
input dtype. Returns new tensors; q and k may be strided views (e.g. slices of a fused qkv
projection) as long as the head dim is contiguous.

``rotary_write_kv`` is ``rotary`` then ``write_kv`` (``reference.rotary_write_kv``) in one
launch instead of two: the rotated keys go straight to the cache (rounded to k's dtype first,
as the two-op path does), and are never written to memory on their own. At batch 1 on the
8B shape that is 32 launches fewer per decode step. An fp8 cache gets its bytes from the
encoder ``write_kv`` uses (``kv.store_cache``), from the same rounded keys.
"""

from __future__ import annotations

import torch
import triton.language as tl

from portaserve.devices.cuda.kv import (
    KV_LAYOUT,
    cache_geometry,
    cache_strides,
    cache_target,
    fp8_constexprs,
    has_encoder,
    require_encoder,
    store_cache,
)
from portaserve.devices.cuda.launch import next_pow2, pdl_options, triton_helper, triton_kernel
from portaserve.errors import DeviceError


@triton_helper
def rotate_half(x1, x2, cos, sin):
    """The NeoX rotation of a head's two halves (float32): (x1 cos - x2 sin, x2 cos + x1 sin).
    Shared with the GEMVs' fused epilogue (``store_rotary``), so both round the same sums."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton_helper
def tile_rows(pid_n, local, N, pair_half, BLOCK_N: tl.constexpr, PAIRED: tl.constexpr):
    """A GEMV's (weight rows, whether each exists) of program ``pid_n``'s tile positions ``local``:
    ``BLOCK_N`` consecutive rows; ``PAIRED`` (``ACT``, ``ROPE``): the rows come in blocks of
    ``2 pair_half`` (``ACT``: the whole gate|up weight, ``pair_half`` = I; ``ROPE``: a head,
    ``pair_half`` = D / 2), and a tile takes ``BLOCK_N / 2`` consecutive rows of a block's first
    half (positions below ``BLOCK_N / 2``) and the same rows of its second half."""
    if PAIRED:
        HALF: tl.constexpr = BLOCK_N // 2
        per_block = (pair_half + HALF - 1) // HALF
        j = (pid_n % per_block) * HALF + local % HALF
        rows = (pid_n // per_block) * 2 * pair_half + j + (local >= HALF).to(tl.int32) * pair_half
        return rows, (j < pair_half) & (rows < N)
    else:
        rows = pid_n * BLOCK_N + local
        return rows, rows < N


@triton_helper
def store_rotary(out_row_ptr, total, pid_n, pos, slot, cs_ptr, stride_cs, cache_ptr, half,
                 num_q_heads, num_kv_heads, block_size, s_kv, s_block, s_head, s_off,
                 BLOCK_N: tl.constexpr, FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr,
                 FP8_MAX: tl.constexpr, FP8_MAGIC: tl.constexpr):
    """A GEMV epilogue (``ROPE``): a tile's sums [BLOCK_N] (dims ``d`` of a head's first half, then the same of
    its second half; ``tile_rows``) of one token at position ``pos`` -> ``rotary``, then
    q heads to their columns of the output row ([Hq D]) and k and v heads to the paged cache at
    ``slot`` (negative: skipped), as ``rotary_write_kv`` would take them from the GEMV's
    output: each sum first rounded to out's dtype, the rotation in float32 rounded to it again,
    then to the cache's dtype (v: unrotated; an fp8 cache, seen as bytes, through
    ``kv.store_cache`` with FP8_* from ``kv.fp8_constexprs``)."""
    HALF: tl.constexpr = BLOCK_N // 2
    lo, hi = tl.split(tl.permute(tl.reshape(total, (2, HALF)), (1, 0)))
    dt = out_row_ptr.dtype.element_ty
    lo = lo.to(dt).to(tl.float32)
    hi = hi.to(dt).to(tl.float32)
    per_head = half // HALF
    head = pid_n // per_head
    d = (pid_n % per_head) * HALF + tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + d).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + half + d).to(tl.float32)
    rotate = head < num_q_heads + num_kv_heads  # (q and k heads; v heads go as they are)
    rot_lo, rot_hi = rotate_half(lo, hi, cos, sin)
    r_lo = tl.where(rotate, rot_lo, lo).to(dt)
    r_hi = tl.where(rotate, rot_hi, hi).to(dt)
    is_q = d < tl.where(head < num_q_heads, 2 * half, 0)  # (d < half: all or none)
    q_ptrs = out_row_ptr + head * 2 * half + d
    tl.store(q_ptrs, r_lo, mask=is_q)
    tl.store(q_ptrs + half, r_hi, mask=is_q)
    kv_head = tl.maximum(head - num_q_heads, 0)  # k heads, then v heads
    at = tl.maximum(slot, 0)
    c_ptrs = (cache_ptr + (kv_head // num_kv_heads) * s_kv + (at // block_size) * s_block
              + (at % block_size) * s_off + (kv_head % num_kv_heads) * s_head + d)
    to_cache = d < tl.where((head >= num_q_heads) & (slot >= 0), 2 * half, 0)
    store_cache(c_ptrs, r_lo, to_cache, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
    store_cache(c_ptrs + half, r_hi, to_cache, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)


def rotary_operands(rotary: tuple, x: torch.Tensor, n: int, block_n: int,
                    out_dtype: torch.dtype | None) -> dict | None:
    """For a GEMV with ``store_rotary`` in its epilogue (``rotary=(positions, cos_sin_cache,
    kv_cache, slot_mapping, num_heads, kv_layout)``, weight rows ``n``, ``block_n``-row tiles):
    ``{"args": the 13 kernel arguments (positions, slots, cos|sin, the cache as written through,
    D / 2, Hq, Hk, block size, cos|sin row stride, the cache's kv / block / head / offset
    strides), "q_size": Hq D, "fp8": the FP8_* constexprs}``; None where it does not serve: an
    8-bit cache of no fp8 format, a head dim the tiles' halves do not divide, a weight not
    q|k|v of the cache's heads, too few positions or slots, an output dtype not x's."""
    positions, cos_sin, kv_cache, slots, num_heads, kv_layout = rotary
    m = x.shape[0]
    block_size, num_kv_heads, head_dim = cache_geometry(kv_cache, kv_layout)
    half = head_dim // 2
    if (not has_encoder(kv_cache.dtype) or kv_cache.stride(-1) != 1 or head_dim % 2
            or cos_sin.shape[-1] != head_dim or cos_sin.stride(-1) != 1
            or n != (num_heads + 2 * num_kv_heads) * head_dim or block_n % 2 or half % (block_n // 2)
            or positions.shape[0] < m or slots.shape[0] < m or (out_dtype or x.dtype) != x.dtype):
        return None
    s_kv, s_block, s_head, s_off, _ = cache_strides(kv_cache, kv_layout)
    args = (positions, slots, cos_sin, cache_target(kv_cache), half, num_heads, num_kv_heads, block_size,
            cos_sin.stride(0), s_kv, s_block, s_head, s_off)
    return {"args": args, "q_size": num_heads * head_dim, "fp8": fp8_constexprs(kv_cache.dtype)}


#: The FP8_* constexprs of a GEMV launch that writes no cache.
NO_FP8 = fp8_constexprs(torch.float32)


@triton_kernel
def _rotary_kernel(
    pos_ptr, cs_ptr, slot_ptr,
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_dst_ptr,
    num_q_heads, num_k_heads, half, block_size,
    stride_cs, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh,
    stride_dt, stride_dh, stride_c_kv, stride_c_block, stride_c_off,
    WRITE_CACHE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAGIC: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid ``(T,)``: one program per token rotates all its q heads (to q_out) and k heads
    (heads x D/2 tiles). The rotated keys go to ``k_dst`` [T, Hk, D] (strides dt, dh), or with
    WRITE_CACHE to the paged cache ``k_dst`` at the token's slot with its values beside them
    (strides c_kv, c_block, dh = head, c_off); a negative slot (a padding row of a captured
    graph) writes nothing to the cache. An fp8 cache comes as ``kv.cache_target`` and its
    bytes from ``kv.store_cache`` (FP8_* from ``kv.fp8_constexprs``; FP8_MANT 0 otherwise)."""
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start; wait for the last
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
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
    r1, r2 = rotate_half(x1, x2, cos, sin)
    tl.store(dst, r1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, r2.to(q_out_ptr.dtype.element_ty), mask=mask)

    if WRITE_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        row = (slot // block_size) * stride_c_block + (slot % block_size) * stride_c_off
        write = slot >= 0
    else:
        row = t * stride_dt
        write = t >= 0
    if write:
        hk = tl.arange(0, BLOCK_HK)
        k_mask = (hk[:, None] < num_k_heads) & d_mask[None, :]
        k_src = k_ptr + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
        y1 = tl.load(k_src, mask=k_mask, other=0.0).to(tl.float32)
        y2 = tl.load(k_src + half, mask=k_mask, other=0.0).to(tl.float32)
        # rounded to k's dtype (what ``rotary`` returns, so a cache gets the same values the
        # two-op path writes), then to the destination's
        k1, k2 = rotate_half(y1, y2, cos, sin)
        k_dst = k_dst_ptr + row + hk[:, None] * stride_dh + d[None, :]
        store_cache(k_dst, k1.to(k_ptr.dtype.element_ty), k_mask, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
        store_cache(k_dst + half, k2.to(k_ptr.dtype.element_ty), k_mask, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
        if WRITE_CACHE:
            v_src = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
            v1 = tl.load(v_src, mask=k_mask, other=0.0)
            v2 = tl.load(v_src + half, mask=k_mask, other=0.0)
            store_cache(k_dst + stride_c_kv, v1, k_mask, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
            store_cache(k_dst + stride_c_kv + half, v2, k_mask, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)


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
    constexprs, options = pdl_options(q)
    _rotary_kernel.on(q)[(num_tokens,)](
        positions, cos_sin_cache, positions, q, k, k, q_out, k_out,
        num_q_heads, k.shape[1], half, 1,
        cos_sin_cache.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), 0, 0,
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), 0, 0, 0,
        WRITE_CACHE=False, BLOCK_HQ=next_pow2(num_q_heads), BLOCK_HK=next_pow2(k.shape[1]),
        BLOCK_HALF=next_pow2(half), **NO_FP8, num_warps=4, **constexprs, **options,
    )
    return q_out, k_out


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_layout: str = KV_LAYOUT,
) -> torch.Tensor:
    """positions [T]; q [T, Hq, D]; k, v [T, Hk, D] -> rotated q; rotated k and v go to the
    cache at ``slot_mapping`` [T] (negative slots skipped)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise DeviceError(
            f"cuda rotary_write_kv: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D] alike")
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_heads, cache_head_dim = cache_geometry(kv_cache, kv_layout)
    if v.shape != k.shape or k.shape[1:] != (num_heads, cache_head_dim):
        raise DeviceError(
            f"cuda rotary_write_kv: key {tuple(k.shape)} / value {tuple(v.shape)} do not match "
            f"the cache's {num_heads} heads x {cache_head_dim} dims")
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim:
        raise DeviceError(
            f"cuda rotary_write_kv: head dim {head_dim} must be even and match cos_sin_cache "
            f"{tuple(cos_sin_cache.shape)}")
    if slot_mapping.shape[0] < num_tokens:
        raise DeviceError(f"cuda rotary_write_kv: slot_mapping has {slot_mapping.shape[0]} "
                          f"slots for {num_tokens} tokens")
    if kv_cache.stride(-1) != 1:
        raise DeviceError("cuda rotary_write_kv: the cache's head dim must be contiguous")
    require_encoder(kv_cache, "rotary_write_kv")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    s_kv, s_block, s_head, s_off, _ = cache_strides(kv_cache, kv_layout)
    half = head_dim // 2
    constexprs, options = pdl_options(q)
    _rotary_kernel.on(q)[(num_tokens,)](
        positions, cos_sin_cache, slot_mapping, q, k, v, q_out, cache_target(kv_cache),
        num_q_heads, num_heads, half, block_size,
        cos_sin_cache.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), q_out.stride(0), q_out.stride(1),
        0, s_head, s_kv, s_block, s_off,
        WRITE_CACHE=True, BLOCK_HQ=next_pow2(num_q_heads), BLOCK_HK=next_pow2(num_heads),
        BLOCK_HALF=next_pow2(half), **fp8_constexprs(kv_cache.dtype), num_warps=4, **constexprs, **options,
    )
    return q_out
