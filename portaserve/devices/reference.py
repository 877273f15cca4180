"""The torch reference of every op in the kernel table: the oracle all kernels are checked against.

Written for clarity, not speed: plain torch, float32 accumulation, Python loops over requests
where that is the clearest statement of the semantics. It runs on any torch device, so an op a
device lacks falls back to this on the device's own tensors.

The KV cache may hold a narrower type than the compute dtype (an fp8 cache,
``EngineConfig.kv_cache_dtype``): ``write_kv`` stores ``to_cache_dtype(x)`` (fp8: scale 1.0,
saturated, rounded to nearest even) and ``paged_attention`` upcasts what it reads to float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from portaserve.errors import DeviceError

if TYPE_CHECKING:
    from portaserve.plugins.device import AttentionMetadata, KVCacheSpec
    from portaserve.quant.base import QuantizedWeight


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight[ids]  # [T, H]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ weight.float().t()  # [T, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quant_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return linear(x, weight.dequantize(torch.float32), bias)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, x)


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t.float().chunk(2, dim=-1)  # [T, H, D/2]
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1).to(t.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def allocate_kv_cache(spec: KVCacheSpec, device: torch.device, layout: str) -> list[torch.Tensor]:
    if layout == "blocks_nhd":
        shape = (2, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    elif layout == "blocks_hnd":
        shape = (2, spec.num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
    else:
        raise DeviceError(f"reference: unknown KV layout {layout!r}")
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a one-byte float (an fp8 KV cache format)."""
    return dtype.is_floating_point and dtype.itemsize == 1


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a KV cache of ``dtype`` stores it. fp8 has no scale (1.0) and saturates: values
    beyond the format's largest finite value (448 for e4m3fn, 57344 for e5m2) are stored as
    that value. The clamp comes before the cast because a cast alone may give NaN (e4m3fn has
    no infinity) or inf (e5m2). NaN is stored as 0: an fp8 cache holds only finite values, so a
    kernel may read the unwritten tail of a request's last block (whatever an earlier owner of
    the block left there) and cancel it with a probability of exactly 0 instead of masking each
    key. (A NaN key or value comes from a NaN hidden state, which already makes that token's own
    output NaN.)"""
    if is_fp8(dtype):
        bound = torch.finfo(dtype).max
        return x.clamp(-bound, bound).nan_to_num(nan=0.0).to(dtype)
    return x.to(dtype)


def _as_nhd(kv_cache: torch.Tensor, kv_layout: str) -> torch.Tensor:
    """View the cache as [2, num_blocks, block_size, Hk, D] (writes go through the view)."""
    if kv_layout == "blocks_nhd":
        return kv_cache
    if kv_layout == "blocks_hnd":
        return kv_cache.transpose(2, 3)
    raise DeviceError(f"reference: unknown KV layout {kv_layout!r}")


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_layout: str = "blocks_nhd",
) -> None:
    cache = _as_nhd(kv_cache, kv_layout)  # [2, NB, BS, Hk, D]
    block_size = cache.shape[2]
    if bool((slot_mapping < 0).any()):  # padding rows write nothing
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    key, value = to_cache_dtype(key, cache.dtype), to_cache_dtype(value, cache.dtype)
    if is_fp8(cache.dtype):  # indexed stores into fp8 lack CPU kernels in some torch releases
        cache, key, value = cache.view(torch.uint8), key.view(torch.uint8), value.view(torch.uint8)
    cache[0, blocks, offsets] = key
    cache[1, blocks, offsets] = value


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, kv_layout: str = "blocks_nhd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence in order: ([seq_len, Hk, D], [seq_len, Hk, D])."""
    cache = _as_nhd(kv_cache, kv_layout)
    num_kv_heads = cache.shape[3]
    block_size = cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    k = cache[0, ids].reshape(-1, num_kv_heads, cache.shape[-1])[:seq_len]
    v = cache[1, ids].reshape(-1, num_kv_heads, cache.shape[-1])[:seq_len]
    return k, v


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    *,
    kv_layout: str = "blocks_nhd",
) -> torch.Tensor:
    num_kv_heads = _as_nhd(kv_cache, kv_layout).shape[3]
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query)
    starts = attn.query_start_loc_cpu or tuple(attn.query_start_loc.tolist())
    seq_lens = attn.seq_lens_cpu or tuple(attn.seq_lens.tolist())
    for r, seq_len in enumerate(seq_lens):
        q = query[starts[r] : starts[r + 1]].float()  # [Q, Hq, D]
        num_q = q.shape[0]
        if num_q == 0:
            continue
        k, v = gather_kv(kv_cache, attn.block_tables[r], seq_len, kv_layout)  # cache dtype
        k = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,shd->hqs", q, k) * scale  # [Hq, Q, S]
        # query i sits at position seq_len - num_q + i and sees keys 0..that position
        q_pos = torch.arange(seq_len - num_q, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] > q_pos[:, None]  # [Q, S]
        scores = scores.masked_fill(mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[r] : starts[r + 1]] = torch.einsum("hqs,shd->qhd", probs, v).to(query.dtype)
    return out


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_layout: str = "blocks_nhd",
) -> torch.Tensor:
    """The fused op ``rotary_write_kv`` by definition: ``rotary``, then ``write_kv`` of the
    rotated keys; returns the rotated queries. (Kernel tables compose it from the device's own
    ops; this is what conformance compares a native fused kernel with.)"""
    q, k = rotary(positions, q, k, cos_sin_cache)
    write_kv(k, v, kv_cache, slot_mapping, kv_layout=kv_layout)
    return q


def all_reduce(x: torch.Tensor, group: object | None = None) -> torch.Tensor:
    if group is None:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=group)  # type: ignore[arg-type]
    return x


#: op name -> reference function; the fallback for every device.
REFERENCE_OPS = {
    "embedding": embedding,
    "linear": linear,
    "quant_linear": quant_linear,
    "rms_norm": rms_norm,
    "rotary": rotary,
    "silu_and_mul": silu_and_mul,
    "write_kv": write_kv,
    "paged_attention": paged_attention,
    "all_reduce": all_reduce,
}
