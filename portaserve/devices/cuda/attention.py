"""Paged attention over the KV cache as Triton kernels: varlen prefill and split-K decode.

Semantics are ``portaserve.devices.reference.paged_attention``: query token i of request r sits
at position ``seq_len - q_len + i`` and attends (causally) to keys 0..that position, read from
the paged cache through the request's block table (any order of blocks; the last block may be
partial; padding entries past ``seq_len`` are never read). GQA: a program handles all query
heads of one KV head (the "q-head group"), so each K/V tile is loaded once for the group.

Two paths, both with float32 online softmax (exp2) and float32 accumulation:

- varlen (``_varlen_attn_kernel``): any batch, including mixed prefill + decode and prefill
  over a cached prefix. A program takes up to BLOCK_Q query tokens of one request times the
  GROUP heads of one KV head, as BLOCK_M = BLOCK_Q * GROUP (padded) rows of one tile.
- decode (``_decode_attn_kernel``): every request has exactly one new token (a whole decode
  step, or the leading ``attn.num_decodes`` requests of a mixed step, whose varlen programs
  would each walk a long context alone for one query row). Flash-decoding:
  the context of each (request, KV head) is cut into NUM_SPLITS chunks sized from that
  request's own length, each program keeps a partial softmax (output and log-sum-exp), and the
  last program of a (request, KV head) to finish merges the partials: each program bumps a
  counter after storing its partial (a CTA barrier, then an acq_rel atomic at GPU scope, the
  release pattern of a split-K semaphore), and the one that sees NUM_SPLITS - 1 reads the
  others' partials (past L1) and resets the counter for the next launch: one launch a layer
  instead of a decode kernel plus a reduce kernel. With one split the partials are skipped. Grids depend only on (requests,
  KV heads, NUM_SPLITS), never on lengths read from the device, so the launch can be captured
  in a CUDA graph.

Limits: head_dim up to 256 (padded to a power of two inside); block_size a power of two;
float32 inputs use IEEE dots (no TF32). The cache layout is given by ``kv_layout``
(``blocks_hnd`` by default; ``blocks_nhd`` works too).

An fp8 cache (e4m3fn or e5m2; ``kv.py`` writes it) is loaded as fp8, half the bytes of a bf16
cache. On a GPU with 16-bit queries (KV_FP8 == 1) the dots run in float16: each K/V tile takes
one hardware conversion fp8 -> fp16 (exact: both fp8 formats are subsets of fp16), and the
query is converted once (bf16 -> fp16 keeps every bit of a bf16 within fp16's range; beyond
+-65504 it saturates). Converting tiles to bf16 instead took fp8 -> f32 -> bf16, and an H200
batch-512 decode over an fp8 cache then ran no faster than over a bf16 one (conversion-bound).
Float32 queries and the interpreter (KV_FP8 == 2) convert through float32 to the query's
dtype: Triton's interpreter converts e5m2 -> float16 directly with errors, e5m2 -> float32
exactly. fp8 e4m3 needs an NVIDIA GPU of compute capability 8.9 or newer (Triton's fp8e4nv).

Over an fp8 cache (``FINITE`` in the kernels, i.e. KV_FP8 != 0) the tiles are read by whole
cache blocks: the unwritten tail of a request's last block is loaded like the rest, and its keys
get probability exactly 0 from the mask on the scores. That is sound because an fp8 cache never
holds NaN or inf (``kv.py`` saturates and stores NaN as 0), so 0 * v = 0 for whatever an earlier
owner left there; a 16-bit cache keeps NaN, and its loads stay masked key by key. A tile's block
ids are loaded one iteration ahead (see the decode loop). Together, on an H200 (same machine,
alternating runs), an fp8 decode at 512 requests x 1536 keys went from 0.566-0.580 to 0.495-0.497 ms a
layer (67% -> 78% of the copy bandwidth); either change alone measured no faster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton.language as tl

from portaserve.devices.cuda.kv import FP8_FORMATS, KV_LAYOUT, cache_geometry, cache_strides
from portaserve.devices.cuda.launch import (
    MAX,
    SUM,
    is_interpreted,
    launch_fitting,
    next_pow2,
    pdl_options,
    split_counters,
    triton_helper,
    triton_kernel,
)
from portaserve.errors import DeviceError

if TYPE_CHECKING:
    from portaserve.plugins.device import AttentionMetadata

_LOG2E = 1.4426950408889634
#: A decode split covers at least this many keys (fewer splits when contexts are short).
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 32

#: Tile configs on a GPU (the interpreter uses 16-wide tiles). BLOCK_M is the rows of a varlen
#: program (query tokens x heads of the group). ``benchmarks/gpu_kernels.py --tune`` times
#: alternatives; fp32 inputs (twice the bytes per element) use half the keys per tile and one
#: pipeline stage less, which keeps them within 64 KiB of shared memory (AMD MI300's LDS).
VARLEN_CONFIG: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
DECODE_CONFIG: dict[str, int] = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
#: Decode over an fp8 cache: two warps did best in the H200 sweeps at batch 512 x 1536 (0.62 ms vs
#: 0.87-1.07 ms a layer with four or eight, when the tiles went through float32; with fp16 tiles,
#: 2026-11-29: 0.552 ms with three stages vs 0.579 with two, 0.69-1.03 ms for BLOCK_N 128 or
#: 4-8 warps: 2.9 TB/s, 71% of the copy bandwidth, where the bf16 cache reaches ~100%).
DECODE_CONFIG_FP8: dict[str, int] = {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3}


@triton_kernel(no_specialize=("qsl_ptr", "seq_lens_ptr", "block_tables_ptr", "num_reqs", "stride_bt"))
def _varlen_attn_kernel(
    q_ptr, cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, block_tables_ptr,
    num_reqs, scale_log2, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_head, stride_c_off, stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IEEE: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(T // BLOCK_Q + R, Hk)``.

    Request r owns the program ids ``[qsl[r] // BLOCK_Q + r, qsl[r+1] // BLOCK_Q + r + 1)``
    (at least ``cdiv(q_len_r, BLOCK_Q)`` of them); a program finds its request by binary search
    over ``query_start_loc`` and exits when its tile lies past the request's query tokens.
    """
    FINITE: tl.constexpr = KV_FP8 != 0  # an fp8 cache holds only finite values (module docstring)
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start; wait for the last
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Largest r with qsl[r] // BLOCK_Q + r <= pid.
    lo = pid * 0
    hi = lo + num_reqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go_right = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    req = lo
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + req)
    if tile * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + req)
        context_len = seq_len - q_len
        rows = tl.arange(0, BLOCK_M)
        tok = tile * BLOCK_Q + rows // GROUP  # query token within the request
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        if KV_FP8 == 1:  # the dots run in fp16 over an fp8 cache
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        q_pos = context_len + tok  # [BLOCK_M]
        kv_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_Q)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        table = block_tables_ptr + req.to(tl.int64) * stride_bt
        head_base = cache_ptr + kv_head.to(tl.int64) * stride_c_head
        n_next = tl.arange(0, BLOCK_N)  # block ids one tile ahead (see _decode_attn_kernel)
        block_next = tl.load(table + n_next // BLOCK_SIZE, mask=(n_next // BLOCK_SIZE) * BLOCK_SIZE < kv_end,
                             other=0)
        for start in range(0, kv_end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < kv_end
            block = block_next.to(tl.int64)
            n_next = n + BLOCK_N
            block_next = tl.load(table + n_next // BLOCK_SIZE,
                                 mask=(n_next // BLOCK_SIZE) * BLOCK_SIZE < kv_end, other=0)
            kv_off = block * stride_c_block + (n % BLOCK_SIZE) * stride_c_off  # [BLOCK_N]
            if FINITE:  # whole blocks (see _decode_attn_kernel)
                kv_mask = ((n // BLOCK_SIZE) * BLOCK_SIZE < kv_end)[:, None] & d_ok[None, :]
            else:
                kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(head_base + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(head_base + stride_c_kv + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if KV_FP8 == 1:  # [BLOCK_N, BLOCK_D] fp8 -> fp16 (q is fp16 already)
                k = k.to(tl.float16)
                v = v.to(tl.float16)
            elif KV_FP8 == 2:  # through float32 to the query's dtype
                k = k.to(tl.float32).to(q.dtype)
                v = v.to(tl.float32).to(q.dtype)
            if IEEE:  # float32 inputs: exact products, not TF32
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [BLOCK_M, BLOCK_N]
            else:
                s = tl.dot(q, tl.trans(k)) * scale_log2
            visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, SUM)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton_kernel(no_specialize=("seq_lens_ptr", "block_tables_ptr", "stride_bt"))
def _decode_attn_kernel(
    q_ptr, cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    seq_lens_ptr, block_tables_ptr,
    scale_log2, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_head, stride_c_off, stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid ``(R, Hk, NUM_SPLITS)``: one new token of request r, the GROUP query heads of one
    KV head (padded to BLOCK_G >= 16 rows), and one chunk of its context.

    Chunk size is ``cdiv(cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N`` keys, so split 0 always
    has keys; a split without keys writes lse = -inf. With NUM_SPLITS == 1 the output is final;
    otherwise partial outputs go to part_out [R, Hq, NUM_SPLITS, D] (normalised) and
    part_lse [R, Hq, NUM_SPLITS] (log2 domain), and the last of the NUM_SPLITS programs of this
    (request, KV head) to arrive (counted in counter [R, Hk], zero between launches) merges the
    splits that have keys into out.
    """
    FINITE: tl.constexpr = KV_FP8 != 0  # an fp8 cache holds only finite values (module docstring)
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start; wait for the last
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    per_split = (seq_len + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    kv_start = split * chunk
    kv_end = tl.minimum(kv_start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + req * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if KV_FP8 == 1:  # the dots run in fp16 over an fp8 cache
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, dtype=tl.float32)
    table = block_tables_ptr + req * stride_bt
    head_base = cache_ptr + kv_head.to(tl.int64) * stride_c_head
    # A tile's block ids are loaded one iteration ahead, so its K/V addresses come from values the
    # loop carries rather than from a load in the same iteration: then Triton's pipeliner keeps
    # num_stages - 1 tiles of K/V in flight. With the ids loaded in the iteration it kept one
    # buffer whatever num_stages said, and each tile's load latency was exposed.
    n_next = kv_start + tl.arange(0, BLOCK_N)
    block_next = tl.load(table + n_next // BLOCK_SIZE, mask=(n_next // BLOCK_SIZE) * BLOCK_SIZE < kv_end,
                         other=0)
    for start in range(kv_start, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        block = block_next.to(tl.int64)
        n_next = n + BLOCK_N
        block_next = tl.load(table + n_next // BLOCK_SIZE, mask=(n_next // BLOCK_SIZE) * BLOCK_SIZE < kv_end,
                             other=0)
        kv_off = block * stride_c_block + (n % BLOCK_SIZE) * stride_c_off
        if FINITE:  # whole blocks: the unwritten tail of the last one holds finite values, and
            # its keys get probability exactly 0 (the where on s below), so it adds nothing to acc
            kv_mask = ((n // BLOCK_SIZE) * BLOCK_SIZE < kv_end)[:, None] & d_ok[None, :]
        else:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(head_base + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(head_base + stride_c_kv + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8 == 1:  # [BLOCK_N, BLOCK_D] fp8 -> fp16 (q is fp16 already)
            k = k.to(tl.float16)
            v = v.to(tl.float16)
        elif KV_FP8 == 2:  # through float32 to the query's dtype
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [BLOCK_G, BLOCK_N]
        else:
            s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, SUM)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / safe_l[:, None]
    mask = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + req * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        base = (req * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS  # [BLOCK_G]
        tl.store(part_out_ptr + (base + split)[:, None] * head_dim + d[None, :], out, mask=mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + base + split, lse, mask=g_ok)
        # every thread's partial is stored before one thread announces it (release at GPU scope)
        tl.debug_barrier()
        counter = counter_ptr + req * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:  # the last one: the others' partials are visible now
            tl.store(counter, 0)
            _merge_splits(part_out_ptr, part_lse_ptr, out_ptr + req * stride_ot, base, head, g_ok, d, mask,
                          (seq_len + chunk - 1) // chunk, head_dim, stride_oh, BLOCK_G, BLOCK_D)


@triton_helper
def _merge_splits(part_out_ptr, part_lse_ptr, out_row_ptr, base, head, g_ok, d, mask, num_active,
                  head_dim, stride_oh, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The decode kernels' last program of a (request, KV head): merges the partials of the
    ``num_active`` splits that have keys (their lse is finite) into the output row."""
    m_run = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    w_sum = tl.full([BLOCK_G], 0.0, dtype=tl.float32)
    merged = tl.full([BLOCK_G, BLOCK_D], 0.0, dtype=tl.float32)
    for s in range(0, num_active):
        lse_s = tl.load(part_lse_ptr + base + s, mask=g_ok, other=0.0, cache_modifier=".cg")
        part = tl.load(part_out_ptr + (base + s)[:, None] * head_dim + d[None, :],
                       mask=mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, lse_s)
        rescale = tl.exp2(m_run - m_new)
        w = tl.exp2(lse_s - m_new)
        merged = merged * rescale[:, None] + part * w[:, None]
        w_sum = w_sum * rescale + w
        m_run = m_new
    final = merged / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
    tl.store(out_row_ptr + head[:, None] * stride_oh + d[None, :], final.to(out_row_ptr.dtype.element_ty),
             mask=mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per (request, KV head): enough programs to fill about two waves of the SMs, no
    split shorter than ``_MIN_KEYS_PER_SPLIT`` keys; a power of two, at most ``_MAX_SPLITS``."""
    want = max(1, -(-2 * num_sms // max(1, num_reqs * num_kv_heads)))
    by_len = max(1, -(-max_seq_len // _MIN_KEYS_PER_SPLIT))
    splits = min(want, by_len, _MAX_SPLITS)
    return 1 << (splits.bit_length() - 1)  # round down to a power of two


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    *,
    kv_layout: str = KV_LAYOUT,
    num_splits: int | None = None,
) -> torch.Tensor:
    """query [T, Hq, D] -> [T, Hq, D]. ``num_splits`` forces the decode split count (tests,
    graph capture); by default it follows ``decode_num_splits``."""
    num_tokens, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads, cache_head_dim = cache_geometry(kv_cache, kv_layout)
    if cache_head_dim != head_dim or num_q_heads % num_kv_heads:
        raise DeviceError(
            f"cuda paged_attention: query {tuple(query.shape)} does not fit a cache of "
            f"{num_kv_heads} KV heads x {cache_head_dim} dims")
    if head_dim > 256 or block_size & (block_size - 1):
        raise DeviceError(
            f"cuda paged_attention: head_dim {head_dim} (max 256) / block_size {block_size} "
            f"(power of two) unsupported")
    if kv_cache.stride(-1) != 1:
        raise DeviceError("cuda paged_attention: the cache's head dim must be contiguous")
    query = query if query.stride(-1) == 1 else query.contiguous()
    out = torch.empty_like(query)
    num_reqs = attn.seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    s_kv, s_block, s_head, s_off, _ = cache_strides(kv_cache, kv_layout)
    interp = is_interpreted(query)
    ieee = query.dtype == torch.float32
    kv_fp8 = kv_cache.dtype.itemsize == 1
    if kv_fp8 and kv_cache.dtype not in FP8_FORMATS:
        raise DeviceError(f"cuda paged_attention: cannot read a {kv_cache.dtype} cache")
    if kv_fp8:  # 1: fp16 dots (GPU, 16-bit queries); 2: through float32 (see the docstring)
        kv_fp8 = 2 if interp or ieee else 1
    block_d = max(16, next_pow2(head_dim))
    scale_log2 = float(scale) * _LOG2E
    tables = attn.block_tables if attn.block_tables.stride(-1) == 1 else attn.block_tables.contiguous()

    args = _LaunchArgs(kv_cache, scale_log2, head_dim, group, block_d, block_size, ieee, kv_fp8,
                       interp, (s_kv, s_block, s_head, s_off, tables.stride(0)))
    if attn.max_query_len == 1 and num_tokens == num_reqs:
        _decode(query, out, attn.seq_lens, tables, attn.max_seq_len, args, num_splits)
        return out
    decodes = attn.num_decodes
    if 0 < decodes < num_reqs:  # mixed step: the leading decode rows through the decode kernel
        _decode(query[:decodes], out[:decodes], attn.seq_lens[:decodes], tables[:decodes],
                attn.max_seq_len, args, num_splits)
        _varlen(query[decodes:], out[decodes:], attn.query_start_loc[decodes:] - decodes,
                attn.seq_lens[decodes:], tables[decodes:], args)
    else:
        _varlen(query, out, attn.query_start_loc, attn.seq_lens, tables, args)
    return out


@dataclass(frozen=True, slots=True)
class _LaunchArgs:
    """What the decode and varlen launches of one ``paged_attention`` call share."""

    kv_cache: torch.Tensor
    scale_log2: float
    head_dim: int
    group: int
    block_d: int
    block_size: int
    ieee: bool
    kv_fp8: int
    interp: bool
    cache_strides: tuple[int, ...]  # kv, block, head, offset, block table row


def _decode(query: torch.Tensor, out: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor,
            max_seq_len: int, a: _LaunchArgs, num_splits: int | None) -> None:
    """Flash-decoding over requests with one query token each (rows of query = requests)."""
    num_reqs, num_q_heads, head_dim = query.shape
    num_kv_heads = num_q_heads // a.group
    cfg = DECODE_CONFIG_FP8 if a.kv_fp8 else DECODE_CONFIG
    if num_splits is None:
        sms = 4 if a.interp else _num_sms(query.device.index or 0)
        num_splits = decode_num_splits(num_reqs, num_kv_heads, max_seq_len, sms)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise DeviceError(f"cuda paged_attention: num_splits {num_splits} must be a power of two")
    if num_splits > 1:
        part_out = torch.empty((num_reqs, num_q_heads, num_splits, head_dim),
                               dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_reqs, num_q_heads, num_splits),
                               dtype=torch.float32, device=query.device)
        counters = split_counters(query.device, num_reqs * num_kv_heads, "decode_attn")
    else:
        part_out = part_lse = counters = out  # unused
    launch_fitting(
        _decode_attn_kernel, query, (num_reqs, num_kv_heads, num_splits),
        (query, a.kv_cache, out, part_out, part_lse, counters, seq_lens, tables, a.scale_log2,
         head_dim, query.stride(0), query.stride(1), out.stride(0), out.stride(1), *a.cache_strides),
        {"GROUP": a.group, "BLOCK_G": max(16, next_pow2(a.group)),
         "BLOCK_N": 16 if a.interp else cfg["BLOCK_N"] // (2 if a.ieee else 1),
         "BLOCK_D": a.block_d, "BLOCK_SIZE": a.block_size, "NUM_SPLITS": num_splits, "IEEE": a.ieee,
         "KV_FP8": a.kv_fp8, **pdl_options(query)[0]},
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _varlen(query: torch.Tensor, out: torch.Tensor, query_start_loc: torch.Tensor,
            seq_lens: torch.Tensor, tables: torch.Tensor, a: _LaunchArgs) -> None:
    """Any mix of query lengths (``query_start_loc`` indexes the rows of ``query``)."""
    num_tokens, _, head_dim = query.shape
    num_reqs = seq_lens.shape[0]
    num_kv_heads = query.shape[1] // a.group
    block_m = max(16 if a.interp else VARLEN_CONFIG["BLOCK_M"], next_pow2(a.group))
    block_q = block_m // a.group
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    launch_fitting(
        _varlen_attn_kernel, query, grid,
        (query, a.kv_cache, out, query_start_loc, seq_lens, tables, num_reqs, a.scale_log2,
         head_dim, query.stride(0), query.stride(1), out.stride(0), out.stride(1), *a.cache_strides),
        {"GROUP": a.group, "BLOCK_Q": block_q, "BLOCK_M": block_m,
         "BLOCK_N": 16 if a.interp else VARLEN_CONFIG["BLOCK_N"] // (2 if a.ieee else 1),
         "BLOCK_D": a.block_d, "BLOCK_SIZE": a.block_size, "IEEE": a.ieee, "KV_FP8": a.kv_fp8,
         **pdl_options(query)[0]},
        num_warps=VARLEN_CONFIG["num_warps"],
        num_stages=VARLEN_CONFIG["num_stages"] - (1 if a.ieee else 0),
    )
