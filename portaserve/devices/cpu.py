"""The ``cpu`` device: torch on the host, with fast paths where torch has them.

Native ops: ``F.linear``/``F.embedding`` (oneDNN/MKL), ``F.rms_norm`` with the residual add
fused in front, rotary in float32, silu-and-mul, ``write_kv`` as one ``index_copy_`` on the
flattened cache, and ``paged_attention`` over gathered blocks with torch SDPA (GQA through
``enable_gqa``). Where ``portaserve.devices.cpu_native`` could be built (a C compiler is on
PATH), one-token rows of ``paged_attention`` run natively over the block table (no gather), and
small batches on GGUF (Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K), int8 and int4 weights run the
native packed linears, so GGUF models stay packed in float32 too (``Capabilities.keep_packed_weights``);
without it, decode batches go through one padded SDPA call. Other quantized matmuls use the quant plugin's cpu kernels.
An fp8 KV cache (e4m3fn or e5m2, ``Capabilities.kv_cache_dtypes``) is written through ``uint8``
views and upcast to the query's dtype after the gather; the native decode step and native
attention read only float32 caches, so with fp8 every step runs op by op.
Limits: one process, no NUMA pinning; threads are set once, to ``PORTASERVE_NUM_THREADS`` or
the physical cores.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from portaserve import envs
from portaserve.devices import cpu_native, reference
from portaserve.plugins.device import (
    AttentionMetadata,
    Availability,
    Capabilities,
    Device,
    KernelFn,
    KVCacheSpec,
)

logger = logging.getLogger(__name__)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)  # [T, H]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)  # [T, N]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if (x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
            and weight.dtype == torch.float32 and weight.is_contiguous()
            and (residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()
                                      and residual.shape == x.shape))
            and cpu_native.library() is not None):
        return cpu_native.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual  # the new residual stream, in x's dtype
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    return y if residual is None else (y, x)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if (q.dtype == k.dtype == cos_sin_cache.dtype == torch.float32 and positions.dtype == torch.int64
            and cos_sin_cache.is_contiguous() and positions.is_contiguous()
            and cpu_native._heads_dense(q) and cpu_native._heads_dense(k)
            and cpu_native.library() is not None):
        return cpu_native.rotary(positions, q, k, cos_sin_cache)
    cos, sin = cos_sin_cache.index_select(0, positions).float().unsqueeze(1).chunk(2, dim=-1)

    def rotate(t: torch.Tensor) -> torch.Tensor:  # [T, H, D], rotate-half in float32
        t1, t2 = t.float().chunk(2, dim=-1)
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1).to(t.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if (key.dtype == value.dtype == kv_cache.dtype == torch.float32 and kv_cache.is_contiguous()
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and cpu_native._heads_dense(key) and cpu_native._heads_dense(value)
            and cpu_native.library() is not None):
        return cpu_native.write_kv(key, value, kv_cache, slot_mapping)
    if bool((slot_mapping < 0).any()):  # padding rows write nothing
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])  # [2, num_blocks * block_size, Hk, D]
    key = reference.to_cache_dtype(key, kv_cache.dtype)
    value = reference.to_cache_dtype(value, kv_cache.dtype)
    if reference.is_fp8(kv_cache.dtype):  # index_copy_ has no fp8 CPU kernel: copy the bytes
        flat, key, value = flat.view(torch.uint8), key.view(torch.uint8), value.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, key)
    flat[1].index_copy_(0, slot_mapping, value)


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float
) -> torch.Tensor:
    starts = attn.query_start_loc_cpu or tuple(attn.query_start_loc.tolist())
    seq_lens = attn.seq_lens_cpu or tuple(attn.seq_lens.tolist())
    native = _native_attention(query, kv_cache)
    if tuple(starts) == tuple(range(len(seq_lens) + 1)):  # all decode
        if native:
            return cpu_native.paged_decode_attention(query, kv_cache, attn.block_tables,
                                                     attn.seq_lens, scale)
        if len(seq_lens) > 1:
            return _decode_attention(query, kv_cache, attn.block_tables, seq_lens, scale)
    out = torch.empty_like(query)
    block_size = kv_cache.shape[2]
    decode_rows = [r for r in range(len(seq_lens)) if starts[r + 1] - starts[r] == 1] if native else []
    if decode_rows:  # the one-token rows of a mixed batch: one native call
        rows = torch.tensor(decode_rows)
        tokens = torch.tensor([starts[r] for r in decode_rows])
        out[tokens] = cpu_native.paged_decode_attention(
            query[tokens], kv_cache, attn.block_tables[rows], attn.seq_lens[rows], scale)
    for r, seq_len in enumerate(seq_lens):
        num_q = starts[r + 1] - starts[r]
        if num_q == 0 or (native and num_q == 1):
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = kv_cache[:, attn.block_tables[r, :num_blocks].long()]  # [2, nb, BS, Hk, D]
        kv = blocks.flatten(1, 2)[:, :seq_len].transpose(1, 2).to(query.dtype)  # [2, Hk, S, D]
        q = query[starts[r] : starts[r + 1]].transpose(0, 1)  # [Hq, Q, D]
        mask = None
        if num_q > 1 and num_q != seq_len:  # causal with a cached prefix: bottom-right aligned
            q_pos = torch.arange(seq_len - num_q, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]  # [Q, S]
        o = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=mask, is_causal=num_q > 1 and mask is None,
            scale=scale, enable_gqa=True)  # [Hq, Q, D]
        out[starts[r] : starts[r + 1]] = o.transpose(0, 1)
    return out


def _native_attention(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Decode rows go to ``cpu_native`` for float32 queries over a contiguous float32 cache."""
    return (query.dtype == torch.float32 and kv_cache.dtype == torch.float32
            and kv_cache.is_contiguous() and query.shape[1] % kv_cache.shape[3] == 0
            and cpu_native.library() is not None)


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: tuple[int, ...],
    scale: float,
) -> torch.Tensor:
    """All requests have one new token: one SDPA call over keys padded to the longest."""
    block_size = kv_cache.shape[2]
    max_len = max(seq_lens)
    num_blocks = -(-max_len // block_size)
    blocks = kv_cache[:, block_tables[:, :num_blocks].long()]  # [2, R, nb, BS, Hk, D]
    kv = blocks.flatten(2, 3)[:, :, :max_len].transpose(2, 3).to(query.dtype)  # [2, R, Hk, S, D]
    lens = torch.tensor(seq_lens, device=query.device)
    mask = torch.arange(max_len, device=query.device)[None, :] < lens[:, None]  # [R, S]
    q = query.unsqueeze(2)  # [R, Hq, 1, D]
    o = F.scaled_dot_product_attention(
        q, kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return o.squeeze(2)  # [R, Hq, D]


def all_reduce(x: torch.Tensor, group: object | None = None) -> torch.Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(x, group=group)  # type: ignore[arg-type]
    return x


KERNELS: dict[str, KernelFn] = {
    "embedding": embedding,
    "linear": linear,
    "rms_norm": rms_norm,
    "rotary": rotary,
    "silu_and_mul": silu_and_mul,
    "write_kv": write_kv,
    "paged_attention": paged_attention,
    "all_reduce": all_reduce,
}


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores)


_threads_configured = False


def configure_threads() -> int:
    """Set torch's intra-op threads once per process; returns the count in use."""
    global _threads_configured
    if not _threads_configured:
        threads = envs.num_threads() or physical_cores()
        torch.set_num_threads(threads)
        _threads_configured = True
        logger.info("cpu device: %d torch threads", threads)
    return torch.get_num_threads()


def _supports_bf16() -> bool:
    """bf16 is worth offering where the ISA has vector bf16 (AVX-512 BF16, AMX) or NEON."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith(("AVX512", "SVE")) or "NEON" in capability:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class CPUDevice(Device):
    """The host CPU through torch. Always available where torch imports."""

    name = "cpu"
    priority = 10

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        self.num_threads = configure_threads()

    @classmethod
    def probe(cls) -> Availability:
        isa = torch.backends.cpu.get_cpu_capability()
        return Availability(True, f"torch {torch.__version__}, {physical_cores()} cores, {isa}")

    def capabilities(self) -> Capabilities:
        native = cpu_native.library() is not None
        dtypes = (torch.float32, torch.bfloat16, torch.float16) if _supports_bf16() else (
            torch.float32, torch.float16)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=(torch.float8_e4m3fn, torch.float8_e5m2),
            kv_block_sizes=(16,),
            kv_layout="blocks_nhd",
            default_max_num_seqs=64,
            default_max_num_batched_tokens=1024,
            default_kv_cache_bytes=4 << 30,  # the host's memory is shared with everything else
            quant_formats=tuple(cpu_native.FORMATS) if native else (),
            # packed GGUF weights beat dense float32 on the native kernels: keep them packed
            keep_packed_weights=True if native else None,
            dist_backend="gloo",
            extra={"isa": torch.backends.cpu.get_cpu_capability(), "threads": self.num_threads,
                   "native_kernels": "yes" if native else f"no ({cpu_native.unavailable_reason()})"},
        )

    def kernels(self) -> dict[str, KernelFn]:
        return dict(KERNELS)

    def allocate_kv_cache(self, spec: KVCacheSpec) -> list[torch.Tensor]:
        return reference.allocate_kv_cache(spec, torch.device("cpu"), "blocks_nhd")

    def compile(self, model: Any, kv_caches: list[Any]) -> Any:
        """The native decode executor (``cpu_native.executor``) where the model qualifies;
        otherwise None, and every step runs op by op."""
        from portaserve.devices.cpu_native.executor import build_executor

        executor, reason = build_executor(model, kv_caches)
        logger.info("cpu device: native decode step %s", "on" if executor else f"off ({reason})")
        return executor
