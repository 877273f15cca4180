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
  instead of a decode kernel plus a reduce kernel. With one split the partials are skipped.
  Over an e4m3 cache ``DECODE_FP8_MMA`` switches to ``_decode_fp8_mma_kernel`` (same splits and
  merge; see its section below). Grids depend only on (requests,
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
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton.language as tl

from portaserve.devices.cuda.kv import (
    FP8_FORMATS,
    KV_LAYOUT,
    cache_geometry,
    cache_strides,
    fp8_code,
    fp8_constexprs,
)
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

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
#: A decode split covers at least this many keys (fewer splits when contexts are short).
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 32

#: Tile configs on a GPU (the interpreter uses 16-wide tiles). BLOCK_M is the rows of a varlen
#: program (query tokens x heads of the group). ``benchmarks/gpu_kernels.py --tune`` times
#: alternatives; fp32 inputs (twice the bytes per element) use half the keys per tile and one
#: pipeline stage less, which keeps them within 64 KiB of shared memory (AMD MI300's LDS).
VARLEN_CONFIG: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
#: The varlen kernel runs the key tiles that every row of a program sees in full (all but the
#: last one or two of a prompt tile) without the causal mask's compare and select. On an H100
#: (``benchmarks/gpu_kernels.py --sections tune``, 2026-12-07): 4 x 2048 new tokens 0.533 ms vs
#: 0.607 masking every tile, 2048 new over 6144 cached 0.707 vs 0.824.
VARLEN_UNMASKED_TILES = True
#: Prompt attention over an e4m3 cache (16-bit queries) with q k^T as an fp8 tensor-core dot:
#: each query row (token x head) quantized to e4m3 with its own scale in the kernel (the
#: numerics of ``quant.fp8.quantize_per_token``), the key tile used as the cache holds it instead
#: of converted to fp16 per tile; p v stays in fp16. FlashAttention-3 and TensorRT-LLM's fp8
#: context attention also take fp8 queries. Off until timed: on an H100 the 1000/1000 run's prompt
#: attention ran at ~150 TFLOP/s over the fp8 cache (stop 20) against ~260 over a bf16 one.
#: (Head dims padded to 32 or more: an fp8 MMA takes 32 along K.)
VARLEN_FP8_QK = False
#: The decode kernels' split merge (``_merge_splits``) unrolled over the splits, loads masked
#: past the active ones, so they go out ahead of the merge rather than one L2 trip a split (up
#: to 32 at batch 1 over a long context). Same bits; on an H100 (2026-12-07, ``gpu_kernels.py
#: --sections tune``) 32 splits at batch 1 over 32768 keys took 0.109 ms against 0.114 in a loop.
MERGE_UNROLLED = True
DECODE_CONFIG: dict[str, int] = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
#: A decode split covers at least this many keys whatever the launch's split count (rounded up
#: to whole key tiles; 0: no minimum), and a context that fits one split is finished by split 0
#: alone, without partials or a merge. The split count of a captured CUDA graph is fixed for the
#: longest context it serves (16 at batch 1 over 4096 tokens), so without this a short context
#: spread over the 16 programs and merged them. Same rule as ``decode_num_splits`` on the host,
#: so a replayed graph computes what the eager launch does wherever their chunks agree (every
#: context up to 256 keys; the int4 8B step at 144 keys: its logits equal one split's bit for
#: bit, against 5.3e-2 relative apart with the 16-way merge). Step time unchanged on an H100
#: (2026-12-07: 2.888 vs 2.883 ms, one split 2.873).
DECODE_MIN_CHUNK = _MIN_KEYS_PER_SPLIT
#: Decode over an fp8 cache: two warps did best in the H200 sweeps at batch 512 x 1536 (0.62 ms vs
#: 0.87-1.07 ms a layer with four or eight, when the tiles went through float32; with fp16 tiles,
#: 2026-11-29: 0.552 ms with three stages vs 0.579 with two, 0.69-1.03 ms for BLOCK_N 128 or
#: 4-8 warps: 2.9 TB/s, 71% of the copy bandwidth, where the bf16 cache reaches ~100%).
DECODE_CONFIG_FP8: dict[str, int] = {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3}
#: Decode over an fp8 e4m3 cache through ``_decode_fp8_mma_kernel`` where it fits
#: (``fp8_mma_fits``) and its compiled code checked out on this GPU (``fp8_mma_supported``).
#: On: timed on an H100 (sm_90, as the H200), 2026-12-07, against the Triton kernel above:
#: 0.235 vs 0.250 ms a layer at 256 x 1024, 0.595 vs 0.593 at 512 x 1536; fp8 1000/1000
#: offline 14,735 vs 14,584 output tok/s (docs/benchmarks.md, stop 20).
DECODE_FP8_MMA = True
#: Registers a thread of it may use (Triton's ``maxnreg``): sm_90 code (Triton 3.6) needs 179
#: for its loop without spilling; ptxas left to itself took 128 and spilled 13 values a step.
DECODE_FP8_MMA_MAXNREG: int | None = 192
#: ``_decode_fp8_mma_kernel`` loads a step's two block ids one step ahead (as ``_kv_tile`` does
#: for the Triton kernels, which took the fp8 decode from 67% to 78% of the copy bandwidth on an
#: H200): without, each 32-key step's K and V loads wait for a table load first. (Pipeline
#: stages change nothing in its code: Triton pipelines loads that feed ``tl.dot``, and this
#: kernel's feed inline PTX.) Implied by ``DECODE_FP8_MMA_K_AHEAD``.
DECODE_FP8_MMA_IDS_AHEAD = False
#: ... and a step's K words too, loaded by the step before once it has used its own (the ids then
#: two steps ahead; implies the ids ahead): one memory latency a step less to wait for, at 32
#: registers a lane more. On: timed on an H100, 2026-12-07 (``gpu_kernels.py --sections
#: tune_fp8``, trials in turns, median of 3), a layer's decode against loads in the step:
#: 256 x 1024 0.300 vs 0.302 ms, 512 x 1536 0.684 vs 0.699, 1024 x 1536 (the fp8 1000/1000 run's
#: batch) 1.226 vs 1.254 (ids ahead alone: 0.294, 0.697, 1.226); docs/benchmarks.md, stop 26.
DECODE_FP8_MMA_K_AHEAD = True


@triton_helper
def _kv_tile(q, head_base, table, start, kv_end, block_next, d, d_ok, stride_c_kv, stride_c_block,
             stride_c_off, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, FINITE: tl.constexpr,
             KV_FP8: tl.constexpr, RAW_K: tl.constexpr = False):
    """The K and V tile of keys ``start .. start + BLOCK_N`` of one KV head, in q's compute
    dtype -> (key positions n, n < kv_end, k, v [BLOCK_N, BLOCK_D], the next tile's block ids).
    ``block_next`` holds this tile's block ids, loaded one tile ahead by the caller's loop: then
    the K/V addresses come from values the loop carries rather than from a load in the same
    iteration, and Triton's pipeliner keeps num_stages - 1 tiles in flight (with the ids loaded
    in the iteration it kept one buffer whatever num_stages said). ``FINITE`` (an fp8 cache,
    which holds only finite values): whole blocks are loaded; the unwritten tail of the last
    holds finite values and the caller gives its keys probability exactly 0. ``RAW_K``: k is
    returned as the cache holds it (fp8 codes for ``FP8_QK``), only v converted."""
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < kv_end
    block = block_next.to(tl.int64)
    n_next = n + BLOCK_N
    block_next = tl.load(table + n_next // BLOCK_SIZE, mask=(n_next // BLOCK_SIZE) * BLOCK_SIZE < kv_end,
                         other=0)
    kv_off = block * stride_c_block + (n % BLOCK_SIZE) * stride_c_off  # [BLOCK_N]
    if FINITE:
        kv_mask = ((n // BLOCK_SIZE) * BLOCK_SIZE < kv_end)[:, None] & d_ok[None, :]
    else:
        kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(head_base + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(head_base + stride_c_kv + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if KV_FP8 == 1:  # [BLOCK_N, BLOCK_D] fp8 -> fp16 (q is fp16 already)
        if not RAW_K:
            k = k.to(tl.float16)
        v = v.to(tl.float16)
    elif KV_FP8 == 2:  # through float32 to the query's dtype
        if not RAW_K:
            k = k.to(tl.float32).to(q.dtype)
        v = v.to(tl.float32).to(q.dtype)
    return n, n_ok, k, v, block_next


@triton_helper
def _scores(q, k, scale_log2, IEEE: tl.constexpr):
    """q k^T scaled for exp2 (float32 inputs: exact products, not TF32)."""
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    else:
        return tl.dot(q, tl.trans(k)) * scale_log2


@triton_helper
def _fp8_rows(q, EMULATE: tl.constexpr, FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr,
              FP8_MAGIC: tl.constexpr):
    """q [M, D] -> (its rows as e4m3 codes, each row's float32 scale): the numerics of
    ``quant.fp8.quantize_per_token`` (scale ``amax * fp32(1/448)``, 1 for a zero row; division
    with IEEE rounding; saturated to +-448). ``EMULATE``: the codes' values as float32, rounded
    by the cache's encoder (``kv.fp8_code``, with e4m3's ``kv.fp8_constexprs``)."""
    qf = q.to(tl.float32)
    scale = tl.reduce(tl.abs(qf), 1, MAX) * (1.0 / 448.0)
    scale = tl.where(scale > 0.0, scale, 1.0)
    codes = tl.minimum(tl.maximum(tl.math.div_rn(qf, scale[:, None]), -448.0), 448.0)
    if EMULATE:  # the cache's encoder: the interpreter's own fp8 casts round some values wrongly
        bits = fp8_code(codes, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
        return bits.to(tl.float8e4nv, bitcast=True).to(tl.float32), scale
    return codes.to(tl.float8e4nv), scale


@triton_helper
def _scores_fp8(q8, k8, row_scale_log2, EMULATE: tl.constexpr):
    """e4m3 q codes times e4m3 keys, each row times its scale (times ``scale * log2 e``). On a
    GPU one fp8 tensor-core dot (no conversion of the key tile); ``EMULATE`` (the interpreter):
    the same products, exact in float32 (q8 comes as float32 values then)."""
    if EMULATE:
        s = tl.dot(q8, tl.trans(k8.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q8, tl.trans(k8))
    return s * row_scale_log2[:, None]


@triton_helper
def _online_softmax(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One tile of the online softmax: scores ``s`` (-inf where masked) and values ``v`` into
    the running max ``m_i``, sum ``l_i`` and output ``acc`` -> their new values."""
    m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, SUM)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton_kernel(no_specialize=("qsl_ptr", "seq_lens_ptr", "block_tables_ptr", "num_reqs", "stride_bt"))
def _varlen_attn_kernel(
    q_ptr, cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, block_tables_ptr,
    num_reqs, scale_log2, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_head, stride_c_off, stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IEEE: tl.constexpr, KV_FP8: tl.constexpr, UNMASKED_TILES: tl.constexpr, FP8_QK: tl.constexpr,
    FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAGIC: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid ``(T // BLOCK_Q + R, Hk)``.

    Request r owns the program ids ``[qsl[r] // BLOCK_Q + r, qsl[r+1] // BLOCK_Q + r + 1)``
    (at least ``cdiv(q_len_r, BLOCK_Q)`` of them); a program finds its request by binary search
    over ``query_start_loc`` and exits when its tile lies past the request's query tokens.
    ``FP8_QK`` (an e4m3 cache, ``VARLEN_FP8_QK``): q k^T as an fp8 dot, q quantized per row
    (``FP8_*``: e4m3's encoder constants, for the interpreter's form).
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
        if FP8_QK:  # q as e4m3 codes with a scale a row; the scores' scale folded into it
            q8, q_scale = _fp8_rows(q, KV_FP8 == 2, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
            row_scale_log2 = q_scale * scale_log2
        if KV_FP8 == 1:  # the dots run in fp16 over an fp8 cache
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        q_pos = context_len + tok  # [BLOCK_M]
        kv_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_Q)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        table = block_tables_ptr + req.to(tl.int64) * stride_bt
        head_base = cache_ptr + kv_head.to(tl.int64) * stride_c_head
        n_next = tl.arange(0, BLOCK_N)  # the first tile's block ids (then one tile ahead: _kv_tile)
        block_next = tl.load(table + n_next // BLOCK_SIZE, mask=(n_next // BLOCK_SIZE) * BLOCK_SIZE < kv_end,
                             other=0)
        # Keys before the tile's first query position + 1 are visible to every row: whole key
        # tiles up to there skip the causal mask (phase 0); the rest take it (phase 1).
        # (VARLEN_UNMASKED_TILES off: no phase 0, every tile takes the mask)
        unmasked_end = 0
        if UNMASKED_TILES:
            unmasked_end = (tl.minimum(kv_end, context_len + tile * BLOCK_Q + 1) // BLOCK_N) * BLOCK_N
        for phase in tl.static_range(0 if UNMASKED_TILES else 1, 2):
            lo = 0 if phase == 0 else unmasked_end
            hi = unmasked_end if phase == 0 else kv_end
            for start in range(lo, hi, BLOCK_N):
                n, n_ok, k, v, block_next = _kv_tile(
                    q, head_base, table, start, kv_end, block_next, d, d_ok, stride_c_kv, stride_c_block,
                    stride_c_off, BLOCK_N, BLOCK_SIZE, FINITE, KV_FP8, FP8_QK)
                if FP8_QK:
                    s = _scores_fp8(q8, k, row_scale_log2, KV_FP8 == 2)
                else:
                    s = _scores(q, k, scale_log2, IEEE)  # [BLOCK_M, BLOCK_N]
                if phase == 1:
                    visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
                    s = tl.where(visible, s, float("-inf"))
                m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, IEEE)
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
    PDL: tl.constexpr, MERGE_UNROLLED: tl.constexpr, MIN_CHUNK: tl.constexpr,
):
    """Grid ``(R, Hk, NUM_SPLITS)``: one new token of request r, the GROUP query heads of one
    KV head (padded to BLOCK_G >= 16 rows), and one chunk of its context.

    Chunk size is ``cdiv(cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N`` keys, at least
    ``MIN_CHUNK``, so split 0 always has keys; a split without keys writes lse = -inf. With
    NUM_SPLITS == 1, or a context within one chunk, split 0's output is final (the other splits
    of a short context do nothing); otherwise partial outputs go to part_out [R, Hq, NUM_SPLITS, D] (normalised) and
    part_lse [R, Hq, NUM_SPLITS] (log2 domain), and the last of the NUM_SPLITS programs of this
    (request, KV head) to arrive (counted in counter [R, Hk], zero between launches) merges the
    splits that have keys into out.
    """
    FINITE: tl.constexpr = KV_FP8 != 0  # an fp8 cache holds only finite values (module docstring)
    req, kv_head, split, seq_len, chunk, kv_start, kv_end = _decode_program(seq_lens_ptr, BLOCK_N, NUM_SPLITS,
                                                                            PDL, MIN_CHUNK)

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
    n_next = kv_start + tl.arange(0, BLOCK_N)  # the first tile's block ids (then one tile ahead: _kv_tile)
    block_next = tl.load(table + n_next // BLOCK_SIZE, mask=(n_next // BLOCK_SIZE) * BLOCK_SIZE < kv_end,
                         other=0)
    for start in range(kv_start, kv_end, BLOCK_N):
        n, n_ok, k, v, block_next = _kv_tile(
            q, head_base, table, start, kv_end, block_next, d, d_ok, stride_c_kv, stride_c_block,
            stride_c_off, BLOCK_N, BLOCK_SIZE, FINITE, KV_FP8)
        s = _scores(q, k, scale_log2, IEEE)  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, IEEE)
    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / safe_l[:, None]
    mask = g_ok[:, None] & d_ok[None, :]
    out_rows = out_ptr + req * stride_ot + head[:, None] * stride_oh + d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=mask)
    elif seq_len <= chunk:  # split 0 has every key (DECODE_MIN_CHUNK): its output is final
        if split == 0:
            tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=mask)
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
                          (seq_len + chunk - 1) // chunk, head_dim, stride_oh, BLOCK_G, BLOCK_D, NUM_SPLITS,
                          MERGE_UNROLLED)


@triton_helper
def _decode_program(seq_lens_ptr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
                    MIN_CHUNK: tl.constexpr):
    """A decode program's (request, KV head, split, seq_len, chunk, first key, end key): its
    split of the request's keys, whole tiles of ``BLOCK_N`` and at least ``MIN_CHUNK`` keys
    (``DECODE_MIN_CHUNK``; split 0 always has keys, and a context of at most ``chunk`` keys has
    them all in split 0). Under PDL (``launch.pdl``) it first lets the next kernel launch and
    waits for the one before."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    req = tl.program_id(0).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)
    per_split = (seq_len + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N, MIN_CHUNK)
    kv_start = tl.program_id(2) * chunk
    return req, tl.program_id(1), tl.program_id(2), seq_len, chunk, kv_start, tl.minimum(kv_start + chunk, seq_len)


@triton_helper
def _merge_split(part_out_ptr, part_lse_ptr, rows, rows_ok, d, head_dim, merged, w_sum, m_run):
    """One split's partials (rows ``rows`` of part_out / part_lse: normalised output and its
    log2-domain lse; a row not ``rows_ok`` weighs exactly 0) into the running merge."""
    lse_s = tl.load(part_lse_ptr + rows, mask=rows_ok, other=float("-inf"), cache_modifier=".cg")
    part = tl.load(part_out_ptr + rows[:, None] * head_dim + d[None, :],
                   mask=rows_ok[:, None] & (d < head_dim)[None, :], other=0.0, cache_modifier=".cg")
    m_new = tl.maximum(m_run, lse_s)
    rescale = tl.exp2(m_run - m_new)
    w = tl.exp2(lse_s - m_new)
    return merged * rescale[:, None] + part * w[:, None], w_sum * rescale + w, m_new


@triton_helper
def _merge_splits(part_out_ptr, part_lse_ptr, out_row_ptr, base, head, g_ok, d, mask, num_active,
                  head_dim, stride_oh, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, UNROLLED: tl.constexpr):
    """The decode kernels' last program of a (request, KV head): merges the partials of the
    ``num_active`` splits that have keys (their lse is finite) into the output row.
    ``UNROLLED`` (``MERGE_UNROLLED``): over all ``NUM_SPLITS`` with those past ``num_active``
    masked (lse -inf: weight 0 and a rescale of exactly 1, so the result is the active splits'
    alone, bit for bit), which lets the loads go out ahead of the running merge instead of one
    L2 trip a split."""
    m_run = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    w_sum = tl.full([BLOCK_G], 0.0, dtype=tl.float32)
    merged = tl.full([BLOCK_G, BLOCK_D], 0.0, dtype=tl.float32)
    if UNROLLED:
        for s in tl.static_range(NUM_SPLITS):
            active = tl.full([BLOCK_G], s, tl.int32) < num_active
            merged, w_sum, m_run = _merge_split(part_out_ptr, part_lse_ptr, base + s, g_ok & active, d, head_dim,
                                                merged, w_sum, m_run)
    else:
        for s in range(0, num_active):
            merged, w_sum, m_run = _merge_split(part_out_ptr, part_lse_ptr, base + s, g_ok, d, head_dim,
                                                merged, w_sum, m_run)
    final = merged / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
    tl.store(out_row_ptr + head[:, None] * stride_oh + d[None, :], final.to(out_row_ptr.dtype.element_ty),
             mask=mask)


# -- decode over an fp8 cache on hand-built MMA fragments ----------------------------------------
#
# Over an fp8 cache ``_decode_attn_kernel`` spends most of its instructions turning the value
# tile into the P @ V dot's operand: Triton gathers it byte by byte from shared memory (the
# operand pairs two keys of one dim where the cache holds rows of keys, and sm_90 has no
# transposing ``ldmatrix`` for 8-bit data). ``_decode_fp8_mma_kernel`` builds the
# ``mma.m16n8k16`` fragments itself, from global memory straight into each lane's registers:
# one warp a program, and tensors shaped [4 (t), 8 (g), ...], which Triton lays out with lane
# (g, t) of the MMA holding element [t, g] (``fp8_mma_supported`` checks the compiled kernel's
# answers once per GPU). Of a 16-key chunk (inside one cache block) a lane loads 32 bytes of K
# rows g and g + 8 and 16 bytes of V rows 2t, 2t + 1, 2t + 8, 2t + 9; the head dims are taken
# in an order that makes those bytes contiguous (the same order for q and K, whose dot product
# does not mind; V's output dims go back in place at the store). The scores leave the q K^T
# MMAs in the layout in which the P @ V MMAs take P.


def _qk_mma_asm() -> str:
    """PTX for one lane's two scores of an 8-key tile: row g of the q-head group against the
    tile's keys 2t and 2t + 1, 8 ``mma.m16n8k16`` over the 128 dims, f16 products, f32 sums.
    Operands: $0 / $1 the scores (out); $2..$9 the lane's 8 words of K (bytes 32 t .. 32 t + 31
    of the tile's key g: B fragments); $10..$25 its 16 pairs of q (dims 32 t + 2 i, + 1 of row
    g, f16: A fragments, rows g + 8 zero). Step c reads word c: its low two bytes stand for the
    step's dims (2t, 2t + 1), its high two for (2t + 8, 2t + 9)."""
    lines = ["{", ".reg .b16 l, h;", ".reg .b32 b0, b1, z;", ".reg .f32 d2, d3;", "mov.b32 z, 0;",
             "mov.f32 $0, 0f00000000;", "mov.f32 $1, 0f00000000;", "mov.f32 d2, 0f00000000;",
             "mov.f32 d3, 0f00000000;"]
    for c in range(8):
        lines += [f"mov.b32 {{l, h}}, ${2 + c};", "cvt.rn.f16x2.e4m3x2 b0, l;", "cvt.rn.f16x2.e4m3x2 b1, h;",
                  "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, d2, d3}, "
                  f"{{${10 + 2 * c}, z, ${11 + 2 * c}, z}}, {{b0, b1}}, {{$0, $1, d2, d3}};"]
    return "\n\t".join(lines + ["}"])


def _pv_mma_asm() -> str:
    """PTX for one lane's share of P @ V over a 16-key chunk for four output dims (word w of the
    V rows: bytes 16 g' + 4 w + i, i = 0..3, as loaded by lane g'): 4 ``mma.m16n8k16``, each
    adding to two of the lane's sums. Operands: $0..$7 the new sums, (i, e) in that order (out:
    row g, the dim stored at 16 (2 t + e) + 4 w + i); $8..$11 word w of the lane's V rows, keys
    2t, 2t + 1, 2t + 8, 2t + 9 of the chunk; $12 / $13 its P pairs (f16x2: keys (2t, 2t + 1)
    and (2t + 8, 2t + 9) of row g); $14..$21 the sums so far. A ``prmt`` puts each byte of key
    2t beside the same byte of key 2t + 1 (a B fragment pairs two keys of one dim), a ``cvt``
    makes two such bytes an f16 pair."""
    lines = ["{", ".reg .b32 x0, x1, y0, y1, b0, b1, z;", ".reg .b16 xl, xh, yl, yh;",
             ".reg .f32 d2, d3;", "mov.b32 z, 0;", "mov.f32 d2, 0f00000000;", "mov.f32 d3, 0f00000000;",
             "prmt.b32 x0, $8, $9, 0x5140;", "prmt.b32 x1, $8, $9, 0x7362;",
             "prmt.b32 y0, $10, $11, 0x5140;", "prmt.b32 y1, $10, $11, 0x7362;"]
    for i in range(4):
        x, y = ("x0", "y0") if i < 2 else ("x1", "y1")
        half = "l" if i % 2 == 0 else "h"
        if i % 2 == 0:
            lines += [f"mov.b32 {{xl, xh}}, {x};", f"mov.b32 {{yl, yh}}, {y};"]
        lines += [f"cvt.rn.f16x2.e4m3x2 b0, x{half};", f"cvt.rn.f16x2.e4m3x2 b1, y{half};",
                  "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                  f"{{${2 * i}, ${2 * i + 1}, d2, d3}}, {{$12, z, $13, z}}, {{b0, b1}}, "
                  f"{{${14 + 2 * i}, ${15 + 2 * i}, d2, d3}};"]
    return "\n\t".join(lines + ["}"])


_QK_MMA_ASM = tl.constexpr(_qk_mma_asm())
_PV_MMA_ASM = tl.constexpr(_pv_mma_asm())
_QK_MMA_CONSTRAINTS = tl.constexpr("=f,=f," + ",".join(["r"] * 24))
#: Two f32 -> one f16x2 word, the first in the high half.
_PACK_F16X2_ASM = tl.constexpr("cvt.rn.f16x2.f32 $0, $1, $2;")


@triton_helper
def _split4(x):
    """[4, 8, 2, 4] -> its four [4, 8, 2] slices of the last dim, in order (one thread's)."""
    b0, b1 = tl.split(tl.reshape(x, (4, 8, 2, 2, 2)))  # (0, 2), (1, 3)
    w0, w2 = tl.split(b0)
    w1, w3 = tl.split(b1)
    return w0, w1, w2, w3


@triton_helper
def _q_pairs(q_rows, g_ok, t, PIECE: tl.constexpr):
    """Of each lane's row g of q: dims 32 t + 8 PIECE .. + 7 as four f16 pairs [4, 8] (int32)."""
    e = tl.arange(0, 8)[None, None, :]
    v = tl.load(q_rows[:, :, None] + (32 * t[:, :, None] + 8 * PIECE + e), mask=g_ok[:, :, None], other=0.0)
    v = tl.minimum(tl.maximum(v.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    v = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo, hi = tl.split(tl.reshape(v, (4, 8, 4, 2)))
    even, odd = tl.split(tl.reshape(lo | (hi << 16), (4, 8, 2, 2)))  # pairs (0, 2), (1, 3)
    p0, p2 = tl.split(even)
    p1, p3 = tl.split(odd)
    return p0, p1, p2, p3


@triton_kernel(no_specialize=("seq_lens_ptr", "block_tables_ptr", "stride_bt"))
def _decode_fp8_mma_kernel(
    q_ptr, cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    seq_lens_ptr, block_tables_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_head, stride_c_off, stride_bt,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, ASM: tl.constexpr,
    PDL: tl.constexpr, MERGE_UNROLLED: tl.constexpr, MIN_CHUNK: tl.constexpr, IDS_AHEAD: tl.constexpr,
    K_AHEAD: tl.constexpr,
):
    """Grid ``(R, Hk, NUM_SPLITS)``, one warp: as ``_decode_attn_kernel`` (the same splits and
    merge), over an fp8 e4m3 cache with head dim 128, GROUP <= 8 and blocks of a multiple of 16
    keys; 32 keys (two 16-key chunks) a loop step. ``ASM`` False (the interpreter): the same
    sums per lane in float32 from whole rows of q, K and V, so the interpreter checks all but
    the fragments themselves. ``IDS_AHEAD`` (``DECODE_FP8_MMA_IDS_AHEAD``): a step's two block
    ids are loaded by the step before, so its K and V loads do not wait on a table load.
    ``K_AHEAD`` (``DECODE_FP8_MMA_K_AHEAD``): a step's K words too, right after the step before
    used its own (the ids then two steps ahead), so that their latency passes under that step's
    softmax and P @ V."""
    req, kv_head, split, seq_len, chunk, kv_start, kv_end = _decode_program(seq_lens_ptr, 32, NUM_SPLITS, PDL,
                                                                            MIN_CHUNK)

    t = tl.arange(0, 4)[:, None]  # [4, 1]: the lane's t
    g = tl.arange(0, 8)[None, :]  # [1, 8]: the lane's g, a row (q head) of the group
    g_ok = g < GROUP
    head = kv_head * GROUP + g
    q_rows = q_ptr + req * stride_qt + head * stride_qh  # [1, 8]
    d = tl.arange(0, 128)
    if ASM:
        q0, q1, q2, q3 = _q_pairs(q_rows, g_ok, t, 0)
        q4, q5, q6, q7 = _q_pairs(q_rows, g_ok, t, 1)
        q8, q9, q10, q11 = _q_pairs(q_rows, g_ok, t, 2)
        q12, q13, q14, q15 = _q_pairs(q_rows, g_ok, t, 3)
    else:  # whole rows, rounded to f16 as the fragments are: [1, 8, 1, 128]
        qf = tl.load(q_rows[:, :, None] + d[None, None, :], mask=g_ok[:, :, None], other=0.0)
        qf = tl.minimum(tl.maximum(qf.to(tl.float32), -65504.0), 65504.0).to(tl.float16).to(tl.float32)
        qf = qf[:, :, None, :]

    jj = tl.arange(0, 2)[None, None, :]  # [1, 1, 2]: the 8-key tile j of a chunk
    t3 = t[:, :, None]  # [4, 1, 1]
    m_i = tl.full([8], -1.0e30, dtype=tl.float32)
    l_i = tl.full([8], 0.0, dtype=tl.float32)
    acc00 = tl.full([4, 8, 4], 0.0, dtype=tl.float32)  # acc<i><e>: [t, g, w], see _pv_mma_asm
    acc01 = acc00
    acc10 = acc00
    acc11 = acc00
    acc20 = acc00
    acc21 = acc00
    acc30 = acc00
    acc31 = acc00
    table = block_tables_ptr + req * stride_bt
    head_base = cache_ptr + kv_head.to(tl.int64) * stride_c_head
    next_a = tl.load(table + kv_start // BLOCK_SIZE, mask=kv_start < kv_end, other=0)
    next_b = tl.load(table + (kv_start + 16) // BLOCK_SIZE, mask=kv_start + 16 < kv_end, other=0)
    if K_AHEAD:  # step 0's K words now, step 1's ids; then each step loads the next one's
        cur_a = next_a
        cur_b = next_b
        ka_lo, ka_hi, kb_lo, kb_hi = _k_step(head_base, cur_a, cur_b, kv_start, kv_end, g, jj, t3, d,
                                             stride_c_block, stride_c_off, BLOCK_SIZE, ASM)
        next_a = tl.load(table + (kv_start + 32) // BLOCK_SIZE, mask=kv_start + 32 < kv_end, other=0)
        next_b = tl.load(table + (kv_start + 48) // BLOCK_SIZE, mask=kv_start + 48 < kv_end, other=0)
    for start in range(kv_start, kv_end, 32):
        # -- the step's two chunks: block, scores (keys 8 j + 2 t + e of the chunk, [4, 8, 2] each)
        pos_a = start
        pos_b = start + 16
        if K_AHEAD:
            blk_a = cur_a.to(tl.int64)
            blk_b = cur_b.to(tl.int64)
        elif IDS_AHEAD:  # this step's ids came with the last step; the next step's go out now
            blk_a = next_a.to(tl.int64)
            blk_b = next_b.to(tl.int64)
            next_a = tl.load(table + (pos_a + 32) // BLOCK_SIZE, mask=pos_a + 32 < kv_end, other=0)
            next_b = tl.load(table + (pos_b + 32) // BLOCK_SIZE, mask=pos_b + 32 < kv_end, other=0)
        else:
            blk_a = tl.load(table + pos_a // BLOCK_SIZE).to(tl.int64)
            blk_b = tl.load(table + pos_b // BLOCK_SIZE, mask=pos_b < kv_end, other=0).to(tl.int64)
        rows_a = head_base + blk_a * stride_c_block + (pos_a % BLOCK_SIZE) * stride_c_off
        rows_b = head_base + blk_b * stride_c_block + (pos_b % BLOCK_SIZE) * stride_c_off
        if K_AHEAD:  # this step's K came with the last step; the next step's goes out after the MMAs
            if ASM:
                sa0, sa1 = _qk_mma(ka_lo, ka_hi, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13,
                                   q14, q15)
                sb0, sb1 = _qk_mma(kb_lo, kb_hi, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13,
                                   q14, q15)
            else:
                sa0, sa1 = _qk_float(qf, ka_lo, ka_hi)
                sb0, sb1 = _qk_float(qf, kb_lo, kb_hi)
            cur_a = next_a
            cur_b = next_b
            ka_lo, ka_hi, kb_lo, kb_hi = _k_step(head_base, cur_a, cur_b, start + 32, kv_end, g, jj, t3, d,
                                                 stride_c_block, stride_c_off, BLOCK_SIZE, ASM)
            next_a = tl.load(table + (start + 64) // BLOCK_SIZE, mask=start + 64 < kv_end, other=0)
            next_b = tl.load(table + (start + 80) // BLOCK_SIZE, mask=start + 80 < kv_end, other=0)
        elif ASM:
            sa0, sa1 = _qk_scores(rows_a, g, jj, t3, stride_c_off, q0, q1, q2, q3, q4, q5, q6, q7,
                                  q8, q9, q10, q11, q12, q13, q14, q15)
            sb0, sb1 = _qk_scores(rows_b, g, jj, t3, stride_c_off, q0, q1, q2, q3, q4, q5, q6, q7,
                                  q8, q9, q10, q11, q12, q13, q14, q15)
        else:
            sa0, sa1 = _qk_scores_float(rows_a, qf, jj, t3, d, stride_c_off)
            sb0, sb1 = _qk_scores_float(rows_b, qf, jj, t3, d, stride_c_off)
        key_a = pos_a + 8 * jj + 2 * t3  # [4, 1, 2]: key of the first score (+1: the second)
        key_b = key_a + 16
        sa0 = tl.where(key_a < kv_end, sa0 * scale_log2, float("-inf"))
        sa1 = tl.where(key_a + 1 < kv_end, sa1 * scale_log2, float("-inf"))
        sb0 = tl.where(key_b < kv_end, sb0 * scale_log2, float("-inf"))
        sb1 = tl.where(key_b + 1 < kv_end, sb1 * scale_log2, float("-inf"))
        # -- online softmax over the step's 32 keys (per row g: over t, j, e and both chunks)
        top = tl.maximum(tl.maximum(sa0, sa1), tl.maximum(sb0, sb1))
        top = tl.reduce(tl.reduce(top, 2, MAX), 0, MAX)  # [8]
        m_new = tl.maximum(m_i, top)
        alpha = tl.exp2(m_i - m_new)
        m3 = m_new[None, :, None]
        pa0 = tl.exp2(sa0 - m3)
        pa1 = tl.exp2(sa1 - m3)
        pb0 = tl.exp2(sb0 - m3)
        pb1 = tl.exp2(sb1 - m3)
        total = (pa0 + pa1) + (pb0 + pb1)
        l_i = l_i * alpha + tl.reduce(tl.reduce(total, 2, SUM), 0, SUM)
        m_i = m_new
        scale3 = alpha[None, :, None]
        acc00 *= scale3
        acc01 *= scale3
        acc10 *= scale3
        acc11 *= scale3
        acc20 *= scale3
        acc21 *= scale3
        acc30 *= scale3
        acc31 *= scale3
        # -- P @ V, chunk by chunk
        vrows_a = rows_a + stride_c_kv
        vrows_b = rows_b + stride_c_kv
        if ASM:
            acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31 = _pv_chunk(
                vrows_a, pa0, pa1, g, t, stride_c_off, acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31)
            acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31 = _pv_chunk(
                vrows_b, pb0, pb1, g, t, stride_c_off, acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31)
        else:
            acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31 = _pv_chunk_float(
                vrows_a, pa0, pa1, d, stride_c_off, acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31)
            acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31 = _pv_chunk_float(
                vrows_b, pb0, pb1, d, stride_c_off, acc00, acc01, acc10, acc11, acc20, acc21, acc30, acc31)

    # -- the lane's 32 sums of row g: dims 32 t + 16 e + 4 w + i, as [4, 8, 32]
    e0 = tl.reshape(tl.join(tl.join(acc00, acc20), tl.join(acc10, acc30)), (4, 8, 16))
    e1 = tl.reshape(tl.join(tl.join(acc01, acc21), tl.join(acc11, acc31)), (4, 8, 16))
    acc = tl.reshape(tl.permute(tl.join(e0, e1), (0, 1, 3, 2)), (4, 8, 32))
    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / safe_l[None, :, None]
    dims = 32 * t3 + tl.arange(0, 32)[None, None, :]  # [4, 1, 32]
    rows_ok = g_ok[:, :, None] & (dims < 128)
    out_rows = out_ptr + req * stride_ot + head[:, :, None] * stride_oh + dims
    if NUM_SPLITS == 1:
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=rows_ok)
    elif seq_len <= chunk:  # split 0 has every key (DECODE_MIN_CHUNK): its output is final
        if split == 0:
            tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=rows_ok)
    else:
        gg = tl.arange(0, 8)  # (g as a vector, for the per-row lse and the merge)
        base = (req * (GROUP * tl.num_programs(1)) + kv_head * GROUP + gg) * NUM_SPLITS  # [8]
        tl.store(part_out_ptr + (base + split)[None, :, None] * 128 + dims, out, mask=rows_ok)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(safe_l), float("-inf"))  # [8]
        tl.store(part_lse_ptr + base + split, lse, mask=gg < GROUP)
        tl.debug_barrier()
        counter = counter_ptr + req * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:  # the last one: the others' partials are visible now
            tl.store(counter, 0)
            _merge_splits(part_out_ptr, part_lse_ptr, out_ptr + req * stride_ot, base,
                          kv_head * GROUP + gg, gg < GROUP, d, (gg < GROUP)[:, None] & (d < 128)[None, :],
                          (seq_len + chunk - 1) // chunk, 128, stride_oh, 8, 128, NUM_SPLITS, MERGE_UNROLLED)


@triton_helper
def _k_step(head_base, blk_a, blk_b, start, kv_end, g, jj, t3, d, stride_c_block, stride_c_off,
            BLOCK_SIZE: tl.constexpr, ASM: tl.constexpr):
    """The K of the 32-key step at ``start`` (chunks in blocks ``blk_a`` / ``blk_b``), nothing
    loaded unless ``start < kv_end``: as ``_qk_mma`` takes it (two word tensors a chunk) or,
    ``ASM`` False, as float32 rows for ``_qk_float``."""
    rows_a = head_base + blk_a.to(tl.int64) * stride_c_block + (start % BLOCK_SIZE) * stride_c_off
    rows_b = head_base + blk_b.to(tl.int64) * stride_c_block + ((start + 16) % BLOCK_SIZE) * stride_c_off
    ok = ((t3 * 0 + jj * 0 + start) < kv_end)[:, :, :, None]  # (a tensor: the interpreter takes no scalar mask here)
    if ASM:
        pa = _k_word_ptrs(rows_a, g, jj, t3, stride_c_off)
        pb = _k_word_ptrs(rows_b, g, jj, t3, stride_c_off)
        a0 = tl.load(pa, mask=ok, other=0)
        a1 = tl.load(pa + 4, mask=ok, other=0)
        b0 = tl.load(pb, mask=ok, other=0)
        b1 = tl.load(pb + 4, mask=ok, other=0)
    else:
        pa = _k_row_ptrs(rows_a, jj, t3, d, stride_c_off)
        pb = _k_row_ptrs(rows_b, jj, t3, d, stride_c_off)
        a0 = tl.load(pa, mask=ok, other=0.0).to(tl.float32)
        a1 = tl.load(pa + stride_c_off, mask=ok, other=0.0).to(tl.float32)
        b0 = tl.load(pb, mask=ok, other=0.0).to(tl.float32)
        b1 = tl.load(pb + stride_c_off, mask=ok, other=0.0).to(tl.float32)
    return a0, a1, b0, b1


@triton_helper
def _k_word_ptrs(rows, g, jj, t3, stride_c_off):
    """Where a lane's K words of a chunk lie: [4, 8, 2, 4] int32 pointers (16 contiguous bytes a
    thread, lanes along t, then g; key g + 8 j), and 16 bytes further for the second half."""
    kp = (rows + ((g[:, :, None] + 8 * jj) * stride_c_off + 32 * t3)).to(tl.pointer_type(tl.int32))
    return kp[:, :, :, None] + tl.arange(0, 4)[None, None, None, :]


@triton_helper
def _qk_mma(kw_lo, kw_hi, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15):
    """A chunk's scores from its K words (loaded at ``_k_word_ptrs`` and 16 bytes on)."""
    k0, k1, k2, k3 = _split4(kw_lo)
    k4, k5, k6, k7 = _split4(kw_hi)
    return tl.inline_asm_elementwise(
        _QK_MMA_ASM, _QK_MMA_CONSTRAINTS,
        [k0, k1, k2, k3, k4, k5, k6, k7, q0[:, :, None], q1[:, :, None], q2[:, :, None], q3[:, :, None],
         q4[:, :, None], q5[:, :, None], q6[:, :, None], q7[:, :, None], q8[:, :, None], q9[:, :, None],
         q10[:, :, None], q11[:, :, None], q12[:, :, None], q13[:, :, None], q14[:, :, None],
         q15[:, :, None]],
        dtype=(tl.float32, tl.float32), is_pure=False, pack=1)


@triton_helper
def _k_row_ptrs(rows, jj, t3, d, stride_c_off):
    """Where a chunk's K rows of keys 8 j + 2 t lie ([4, 1, 2, 128]; one row on: keys + 1), the
    interpreter's form of ``_k_word_ptrs``."""
    return rows + ((8 * jj + 2 * t3) * stride_c_off)[:, :, :, None] + d[None, None, None, :]


@triton_helper
def _qk_float(qf, k0, k1):
    """``_qk_scores_float`` from K rows already loaded ([4, 1, 2, 128] float32 each)."""
    return tl.reduce(qf * k0, 3, SUM), tl.reduce(qf * k1, 3, SUM)  # [4, 8, 2]


@triton_helper
def _qk_scores(rows, g, jj, t3, stride_c_off, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12,
               q13, q14, q15):
    """A chunk's scores on the tensor cores: [4, 8, 2] for keys 8 j + 2 t and 8 j + 2 t + 1.
    The words load as [4, 8, 2, 4] tensors (16 contiguous bytes a thread), which is what makes
    Triton lay them out lanes along t, then g; the asm is not pure, so that Triton keeps it in
    that layout rather than recompute it in others."""
    kp = _k_word_ptrs(rows, g, jj, t3, stride_c_off)
    return _qk_mma(tl.load(kp), tl.load(kp + 4), q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14,
                   q15)


@triton_helper
def _qk_scores_float(rows, qf, jj, t3, d, stride_c_off):
    """``_qk_scores`` in float32 from whole rows (the interpreter)."""
    kp = _k_row_ptrs(rows, jj, t3, d, stride_c_off)
    return _qk_float(qf, tl.load(kp).to(tl.float32), tl.load(kp + stride_c_off).to(tl.float32))


@triton_helper
def _pv_chunk(vrows, p0, p1, g, t, stride_c_off, a00, a01, a10, a11, a20, a21, a30, a31):
    """A chunk's P @ V on the tensor cores, added to the lane's sums (``_pv_mma_asm``)."""
    p0a, p0b = tl.split(p0)  # [4, 8]: keys 2t (j = 0) and 8 + 2t (j = 1)
    p1a, p1b = tl.split(p1)  # keys 2t + 1 and 8 + 2t + 1
    pa = tl.inline_asm_elementwise(_PACK_F16X2_ASM, "=r,f,f", [p1a, p0a], dtype=tl.int32, is_pure=False, pack=1)
    pb = tl.inline_asm_elementwise(_PACK_F16X2_ASM, "=r,f,f", [p1b, p0b], dtype=tl.int32, is_pure=False, pack=1)
    vp = (vrows + (2 * t * stride_c_off + 16 * g)).to(tl.pointer_type(tl.int32))  # [4, 8]: key 2t
    vp = vp[:, :, None] + tl.arange(0, 4)[None, None, :]  # [4, 8, 4 (w)]
    row = stride_c_off // 4  # (in words)
    r0 = tl.load(vp)
    r1 = tl.load(vp + row)
    r2 = tl.load(vp + 8 * row)
    r3 = tl.load(vp + 9 * row)
    return tl.inline_asm_elementwise(
        _PV_MMA_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f,f,f,f,f",
        [r0, r1, r2, r3, pa[:, :, None], pb[:, :, None], a00, a01, a10, a11, a20, a21, a30, a31],
        dtype=(tl.float32,) * 8, is_pure=False, pack=1)


@triton_helper
def _pv_chunk_float(vrows, p0, p1, d, stride_c_off, a00, a01, a10, a11, a20, a21, a30, a31):
    """``_pv_chunk`` in float32 (the interpreter): row g's P over the chunk's 16 keys (key
    8 j + 2 t + e from the lanes t), times the V rows, regrouped as the lanes' sums."""
    p = tl.reshape(tl.permute(tl.join(p0, p1), (1, 2, 0, 3)), (8, 16))  # [g, 8 j + 2 t + e]
    p = p.to(tl.float16).to(tl.float32)  # (the fragments hold P in f16)
    key = tl.arange(0, 16)
    v = tl.load(vrows + (key * stride_c_off)[:, None] + d[None, :]).to(tl.float32)  # [16, 128]
    pv = tl.reduce(p[:, :, None] * v[None, :, :], 1, SUM)  # [8, 128]: dim 32 t + 16 e + 4 w + i
    pv = tl.permute(tl.reshape(pv, (8, 4, 2, 4, 2, 2)), (1, 0, 3, 2, 4, 5))  # [t, g, w, e, ih, il]
    even, odd = tl.split(pv)  # il
    e0, e2 = tl.split(even)  # ih: i = 0, 2
    e1, e3 = tl.split(odd)  # i = 1, 3
    s00, s01 = tl.split(e0)
    s10, s11 = tl.split(e1)
    s20, s21 = tl.split(e2)
    s30, s31 = tl.split(e3)
    return a00 + s00, a01 + s01, a10 + s10, a11 + s11, a20 + s20, a21 + s21, a30 + s30, a31 + s31


def fp8_mma_fits(query: torch.Tensor, a: _LaunchArgs) -> bool:
    """Whether ``_decode_fp8_mma_kernel`` serves this decode: an e4m3 cache, 16-bit queries,
    head dim 128, at most 8 query heads a KV head, cache blocks of a multiple of 16 keys, 16-byte
    aligned rows."""
    return (a.kv_cache.dtype == torch.float8_e4m3fn and query.dtype in (torch.float16, torch.bfloat16)
            and a.head_dim == 128 and a.group <= 8 and a.block_size % 16 == 0
            and a.kv_cache.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in a.cache_strides[:4]))


#: GPU index -> whether ``_decode_fp8_mma_kernel`` gave the Triton kernel's answers there.
_FP8_MMA_CHECKED: dict[int, bool] = {}


def fp8_mma_supported(query: torch.Tensor) -> bool:
    """Whether the hand-built MMA decode runs on ``query``'s device: always in the interpreter
    (its float32 stand-in); on a GPU, an NVIDIA one of compute capability 8.9+ (``cvt`` from
    e4m3) whose compiled kernel matched ``_decode_attn_kernel`` on a random step, checked once.
    It relies on the lane layout Triton picks for [4, 8, ...] tensors; a Triton that picks
    another gives wrong sums, which the check catches (the Triton kernel serves then)."""
    if is_interpreted(query):
        return True
    if query.device.type != "cuda" or torch.version.hip:
        return False
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    ok = _FP8_MMA_CHECKED.get(index)
    if ok is None:
        if torch.cuda.get_device_capability(index) < (8, 9):
            ok = False
        elif torch.cuda.is_current_stream_capturing():  # (nothing may run now: the Triton kernel)
            return False
        else:
            try:
                ok = _fp8_mma_matches(query.device)
            except Exception:  # e.g. a driver or Triton that refuses the PTX
                logger.warning("cuda decode attention: the fp8 MMA kernel failed on this GPU; using the "
                               "Triton kernel", exc_info=True)
                ok = False
        _FP8_MMA_CHECKED[index] = ok
    return ok


def _fp8_mma_matches(device: torch.device) -> bool:
    """The MMA decode against the Triton one on a random step over an fp8 cache: 4 requests of
    1-70 keys (partial last blocks), GQA 4, 2 KV heads, splits 1 and 4."""
    gen = torch.Generator().manual_seed(11)
    lens = [1, 17, 70, 33]
    blocks = torch.randperm(24, generator=gen).view(4, 6).to(torch.int32)
    cache = (torch.randn(2, 24, 2, 16, 128, generator=gen) * 2).to(torch.float8_e4m3fn).to(device)
    query = torch.randn(4, 8, 128, generator=gen).to(device=device, dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    tables = blocks.to(device)
    strides = (*cache_strides(cache, KV_LAYOUT)[:4], tables.stride(0))
    args = _LaunchArgs(cache, 0.09 * _LOG2E, 128, 4, 128, 16, False, 1, False, strides)
    err = 0.0
    for splits in (1, 4):
        want, got = torch.empty_like(query), torch.empty_like(query)
        _decode(query, want, seq_lens, tables, max(lens), args, splits, mma=False)
        _decode(query, got, seq_lens, tables, max(lens), args, splits, mma=True)
        err = max(err, ((got.float() - want.float()).norm() / want.float().norm()).item())
    ok = err <= 2e-3
    if not ok:
        logger.warning("cuda decode attention: the fp8 MMA kernel disagreed with the Triton kernel on this "
                       "GPU / Triton (rel. error %.2e); using the Triton kernel", err)
    return ok


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
            max_seq_len: int, a: _LaunchArgs, num_splits: int | None, mma: bool | None = None) -> None:
    """Flash-decoding over requests with one query token each (rows of query = requests).
    ``mma``: through ``_decode_fp8_mma_kernel`` (True; the caller checked ``fp8_mma_fits``) or
    the Triton kernel (False); None: as ``DECODE_FP8_MMA`` and the checks say."""
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
    if mma is None:
        mma = bool(a.kv_fp8) and DECODE_FP8_MMA and fp8_mma_fits(query, a) and fp8_mma_supported(query)
    if mma:
        constexprs, options = pdl_options(query)
        _decode_fp8_mma_kernel.on(query)[(num_reqs, num_kv_heads, num_splits)](
            query, a.kv_cache, out, part_out, part_lse, counters, seq_lens, tables, a.scale_log2,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1), *a.cache_strides,
            GROUP=a.group, BLOCK_SIZE=a.block_size, NUM_SPLITS=num_splits, ASM=not a.interp,
            MERGE_UNROLLED=MERGE_UNROLLED, MIN_CHUNK=_min_chunk(32), IDS_AHEAD=DECODE_FP8_MMA_IDS_AHEAD,
            K_AHEAD=DECODE_FP8_MMA_K_AHEAD,
            num_warps=1, num_stages=1, **constexprs, **options,
            **({"maxnreg": DECODE_FP8_MMA_MAXNREG} if DECODE_FP8_MMA_MAXNREG and not a.interp else {}))
        return
    block_n = 16 if a.interp else cfg["BLOCK_N"] // (2 if a.ieee else 1)
    launch_fitting(
        _decode_attn_kernel, query, (num_reqs, num_kv_heads, num_splits),
        (query, a.kv_cache, out, part_out, part_lse, counters, seq_lens, tables, a.scale_log2,
         head_dim, query.stride(0), query.stride(1), out.stride(0), out.stride(1), *a.cache_strides),
        {"GROUP": a.group, "BLOCK_G": max(16, next_pow2(a.group)), "BLOCK_N": block_n,
         "BLOCK_D": a.block_d, "BLOCK_SIZE": a.block_size, "NUM_SPLITS": num_splits, "IEEE": a.ieee,
         "KV_FP8": a.kv_fp8, "MERGE_UNROLLED": MERGE_UNROLLED, "MIN_CHUNK": _min_chunk(block_n),
         **pdl_options(query)[0]},
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _min_chunk(tile: int) -> int:
    """``DECODE_MIN_CHUNK`` in whole key tiles of a decode kernel (a split starts on a tile)."""
    return -(-DECODE_MIN_CHUNK // tile) * tile


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
         "UNMASKED_TILES": VARLEN_UNMASKED_TILES,
         "FP8_QK": VARLEN_FP8_QK and a.kv_cache.dtype == torch.float8_e4m3fn and not a.ieee and a.block_d >= 32,
         **fp8_constexprs(torch.float8_e4m3fn), **pdl_options(query)[0]},
        num_warps=VARLEN_CONFIG["num_warps"],
        num_stages=VARLEN_CONFIG["num_stages"] - (1 if a.ieee else 0),
    )
