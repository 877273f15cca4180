"""The paged KV cache of the cuda/rocm devices: its layout, and ``write_kv`` as a Triton kernel.

Layout ``blocks_hnd`` (one of the reference layouts, so reference ops and tests read it):
one tensor per layer ``[2, num_blocks, num_kv_heads, block_size, head_dim]``. One head's slice
of a block is contiguous (block_size * head_dim elements), so attention reads whole tiles
with unit stride. The kernels take strides, so ``blocks_nhd`` works as well.

``write_kv`` scatters each new token's K and V to ``slot = block_id * block_size + offset``;
a negative slot is skipped (padding rows of a captured CUDA graph use -1).
"""

from __future__ import annotations

import torch
import triton.language as tl

from portaserve.devices.cuda.launch import next_pow2, triton_kernel
from portaserve.errors import DeviceError

KV_LAYOUT = "blocks_hnd"


def cache_strides(kv_cache: torch.Tensor, kv_layout: str) -> tuple[int, int, int, int, int]:
    """(kv, block, head, offset-in-block, dim) element strides of a layer's cache."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise DeviceError(f"cuda kv cache: expected 5-d [2, ...] cache, got {tuple(kv_cache.shape)}")
    s = kv_cache.stride()
    if kv_layout == "blocks_hnd":
        return s[0], s[1], s[2], s[3], s[4]
    if kv_layout == "blocks_nhd":
        return s[0], s[1], s[3], s[2], s[4]
    raise DeviceError(f"cuda kv cache: unknown KV layout {kv_layout!r}")


def cache_store_limit(kv_cache: torch.Tensor) -> float:
    """The largest magnitude a store into this cache keeps (0.0: no clamp needed). fp8 casts
    of out-of-range values give NaN (e4m3fn) or inf (e5m2); kernels saturate instead."""
    if kv_cache.dtype.is_floating_point and kv_cache.dtype.itemsize == 1:
        return float(torch.finfo(kv_cache.dtype).max)
    return 0.0


def cache_geometry(kv_cache: torch.Tensor, kv_layout: str) -> tuple[int, int, int]:
    """(block_size, num_kv_heads, head_dim) of a layer's cache."""
    if kv_layout == "blocks_hnd":
        return kv_cache.shape[3], kv_cache.shape[2], kv_cache.shape[4]
    if kv_layout == "blocks_nhd":
        return kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    raise DeviceError(f"cuda kv cache: unknown KV layout {kv_layout!r}")


@triton_kernel
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    num_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_block, stride_c_head, stride_c_off,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(T, cdiv(Hk, BLOCK_H))``: one program stores BLOCK_H heads of one token's K and V."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        off = slot % block_size
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < num_heads) & (d[None, :] < head_dim)
        k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        dst = cache_ptr + block * stride_c_block + h[:, None] * stride_c_head + off * stride_c_off + d[None, :]
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_layout: str = KV_LAYOUT,
) -> None:
    """key, value [T, Hk, D] -> kv_cache at slot_mapping [T] (negative slots skipped)."""
    num_tokens = key.shape[0]
    block_size, num_heads, head_dim = cache_geometry(kv_cache, kv_layout)
    if key.shape != value.shape or key.shape[1:] != (num_heads, head_dim):
        raise DeviceError(
            f"cuda write_kv: key {tuple(key.shape)} / value {tuple(value.shape)} do not match the "
            f"cache's {num_heads} heads x {head_dim} dims")
    if slot_mapping.shape[0] < num_tokens:
        raise DeviceError(
            f"cuda write_kv: slot_mapping has {slot_mapping.shape[0]} slots for {num_tokens} tokens")
    if kv_cache.stride(-1) != 1:
        raise DeviceError("cuda write_kv: the cache's head dim must be contiguous")
    if num_tokens == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    s_kv, s_block, s_head, s_off, _ = cache_strides(kv_cache, kv_layout)
    block_d = next_pow2(head_dim)
    block_h = max(1, min(next_pow2(num_heads), 4096 // block_d))
    grid = (num_tokens, (num_heads + block_h - 1) // block_h)
    _write_kv_kernel.on(key)[grid](
        key, value, kv_cache, slot_mapping,
        num_heads, head_dim, block_size,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        s_kv, s_block, s_head, s_off,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
