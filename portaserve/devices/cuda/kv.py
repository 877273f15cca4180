"""The paged KV cache of the cuda/rocm devices: its layout, and ``write_kv`` as a Triton kernel.

Layout ``blocks_hnd`` (one of the reference layouts, so reference ops and tests read it):
one tensor per layer ``[2, num_blocks, num_kv_heads, block_size, head_dim]``. One head's slice
of a block is contiguous (block_size * head_dim elements), so attention reads whole tiles
with unit stride. The kernels take strides, so ``blocks_nhd`` works as well.

``write_kv`` scatters each new token's K and V to ``slot = block_id * block_size + offset``;
a negative slot is skipped (padding rows of a captured CUDA graph use -1).

fp8 caches (``torch.float8_e4m3fn``, ``torch.float8_e5m2``; ``EngineConfig.kv_cache_dtype``):
``write_kv`` saturates at the format's largest finite value and rounds to nearest even, as
``reference.to_cache_dtype`` does, stores NaN as 0 (an fp8 cache holds only finite values, which
lets attention read whole blocks: see ``attention.py``), and stores the bytes through a
``uint8`` view of the cache.
It encodes them itself with integer arithmetic on the float32 bits rather than by
``.to(float8)``: Triton's interpreter rounds float32 -> fp8 wrongly near and below the smallest
normal value (Triton 3.9), and this way the interpreter checks the exact code the GPU runs.
Encoding costs a few integer ops per element of a kernel that is all memory traffic. Attention
reads the fp8 cache with plain loads (``attention.py``).
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from portaserve.devices.cuda.launch import next_pow2, pdl_options, triton_helper, triton_kernel
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


def cache_geometry(kv_cache: torch.Tensor, kv_layout: str) -> tuple[int, int, int]:
    """(block_size, num_kv_heads, head_dim) of a layer's cache."""
    if kv_layout == "blocks_hnd":
        return kv_cache.shape[3], kv_cache.shape[2], kv_cache.shape[4]
    if kv_layout == "blocks_nhd":
        return kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    raise DeviceError(f"cuda kv cache: unknown KV layout {kv_layout!r}")


#: fp8 cache formats: torch dtype -> (exponent bits, mantissa bits). Both are IEEE-like
#: (bias 2^(E-1) - 1, subnormals); e4m3fn has no infinity and one NaN code per sign.
FP8_FORMATS: dict[torch.dtype, tuple[int, int]] = {
    torch.float8_e4m3fn: (4, 3),
    torch.float8_e5m2: (5, 2),
}


@functools.cache
def fp8_constexprs(cache_dtype: torch.dtype) -> dict[str, int | float]:
    """The constants ``store_cache`` encodes a cache dtype with (FP8_MANT 0: not fp8), for the
    kernels that write the cache (``write_kv``, ``rotary.rotary_write_kv``, the GEMVs' rotary
    epilogue ``rotary.store_rotary``); they store through ``cache_target``. Computed once per
    dtype; the dict is shared, read it only."""
    if cache_dtype not in FP8_FORMATS:
        return {"FP8_MANT": 0, "FP8_BIAS": 0, "FP8_MAX": 0.0, "FP8_MAGIC": 0.0}
    exp_bits, mant = FP8_FORMATS[cache_dtype]
    bias = (1 << (exp_bits - 1)) - 1
    # A float32 whose unit in the last place is fp8's smallest subnormal, 2^(1 - bias - mant).
    magic = 2.0 ** (24 - mant - bias)
    return {"FP8_MANT": mant, "FP8_BIAS": bias, "FP8_MAX": float(torch.finfo(cache_dtype).max),
            "FP8_MAGIC": magic}


def has_encoder(cache_dtype: torch.dtype) -> bool:
    """Whether the cache-writing kernels can store this dtype: a 16/32-bit one, or an 8-bit one
    of ``FP8_FORMATS`` (``store_cache`` encodes those)."""
    return cache_dtype.itemsize != 1 or cache_dtype in FP8_FORMATS


def require_encoder(kv_cache: torch.Tensor, op: str) -> None:
    """``has_encoder`` for op ``op``'s cache, or a DeviceError that names the dtype."""
    if not has_encoder(kv_cache.dtype):
        raise DeviceError(f"cuda {op}: no encoder for a {kv_cache.dtype} cache "
                          f"(fp8 formats: {', '.join(map(str, FP8_FORMATS))})")


def cache_target(kv_cache: torch.Tensor) -> torch.Tensor:
    """What a cache-writing kernel stores through: an fp8 cache as ``uint8`` (same strides; the
    bytes come from ``store_cache``), any other cache as it is."""
    return kv_cache.view(torch.uint8) if kv_cache.dtype in FP8_FORMATS else kv_cache


@triton_helper
def fp8_code(x, FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
             FP8_MAGIC: tl.constexpr):
    """float32 x -> its fp8 bits (uint8): saturated, rounded to nearest even, sign kept, NaN -> +0."""
    bits = x.to(tl.int32, bitcast=True)
    sign = ((bits >> 31) & 1) << 7
    mag = tl.minimum(tl.abs(x), FP8_MAX)  # inf saturates too
    mag_bits = mag.to(tl.int32, bitcast=True)
    # Normal results: rebias the exponent and drop 23 - FP8_MANT mantissa bits, adding just
    # under half of the dropped unit plus the kept last bit (ties to even).
    shift = 23 - FP8_MANT
    normal = (mag_bits + ((FP8_BIAS - 127) << 23) + ((1 << (shift - 1)) - 1)
              + ((mag_bits >> shift) & 1)) >> shift
    # Subnormal results (below 2^(1 - bias)): a float32 add rounds mag to a multiple of fp8's
    # smallest subnormal; the low bits of the sum are then the fp8 code.
    magic_bits = (127 + 24 - FP8_MANT - FP8_BIAS) << 23
    subnormal = (mag + FP8_MAGIC).to(tl.int32, bitcast=True) - magic_bits
    code = tl.where(mag_bits < ((128 - FP8_BIAS) << 23), subnormal, normal)
    return tl.where(x != x, 0, code | sign).to(tl.uint8)


@triton_helper
def store_cache(ptrs, x, mask, FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
                FP8_MAGIC: tl.constexpr):
    """Store x into a cache seen through ``cache_target``: fp8 bytes (``FP8_MANT`` > 0, from
    ``fp8_constexprs``) encoded from x's float32 value, or x in the cache's dtype."""
    if FP8_MANT > 0:
        tl.store(ptrs, fp8_code(x.to(tl.float32), FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton_kernel
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    num_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_block, stride_c_head, stride_c_off,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAGIC: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid ``(T, cdiv(Hk, BLOCK_H))``: one program stores BLOCK_H heads of one token's K and V
    (an fp8 cache as its bytes: ``store_cache``)."""
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start; wait for the last
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
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
        store_cache(dst, k, mask, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
        store_cache(dst + stride_c_kv, v, mask, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)


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
    require_encoder(kv_cache, "write_kv")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    s_kv, s_block, s_head, s_off, _ = cache_strides(kv_cache, kv_layout)
    block_d = next_pow2(head_dim)
    block_h = max(1, min(next_pow2(num_heads), 4096 // block_d))
    grid = (num_tokens, (num_heads + block_h - 1) // block_h)
    constexprs, options = pdl_options(key)
    _write_kv_kernel.on(key)[grid](
        key, value, cache_target(kv_cache), slot_mapping,
        num_heads, head_dim, block_size,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        s_kv, s_block, s_head, s_off,
        BLOCK_H=block_h, BLOCK_D=block_d, **fp8_constexprs(kv_cache.dtype), num_warps=4, **constexprs, **options,
    )
