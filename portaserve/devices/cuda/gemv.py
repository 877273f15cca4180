"""Dense GEMV for decode batches: a few rows of x against a bf16/fp16 weight, as one Triton kernel.

At batch 1 a decode step is nothing but weight reads, and cuBLAS's choice for some of these
shapes leaves bandwidth behind: on the H200 (``benchmarks/gpu_gemv.py``, three machines) it
read the 8B shape's o projection at ~60% of the copy bandwidth and q|k|v at ~75%, where this
kernel reaches ~70% (~74% with K split in four) and ~80%; for the wide gate|up it was sometimes
ahead, sometimes behind. So the device times both once per weight shape
(``faster_than_cublas``) and keeps the faster.

Each program owns BLOCK_N output columns and streams their weight rows over K (or over one of
SPLIT_K ranges of K, when there are too few column blocks to keep every SM streaming; the
last split to finish sums the float32 partials, so it is still one launch). The weight tile
is the left operand of ``tl.dot`` ("swap AB": ``out^T = W x^T``), so the rows of x only pad the
16-wide right operand, and Triton pipelines the weight loads (``num_stages``) as it does for any
dot operand. Accumulation is float32; the tile config is picked per weight shape (``tile_config``).

Tried and dropped: folding ``rms_norm`` or ``silu_and_mul`` into the GEMV's input (every program
recomputing its input tile) measured 2-4x slower than the separate kernel + GEMV, because the
computed operand is no longer a plain pipelined load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from portaserve.devices.cuda.launch import (
    SUM,
    is_interpreted,
    pdl_options,
    prefetch_l2,
    split_counters,
    triton_kernel,
)
from portaserve.devices.cuda.rotary import NO_FP8, rotary_operands, store_rotary, tile_rows
from portaserve.errors import DeviceError

#: Weight tiles each program prefetches into L2 before waiting for the kernel before it, when
#: launched with PDL (``launch.pdl``, on by default on sm_90+). Not yet tuned on a GPU.
PDL_PREFETCH_TILES = 2

#: Whether ``gemv(..., rotary=)`` fuses (the cuda ``linear_rotary_write_kv`` op for 16-bit
#: weights, as ``gemv_triton.FUSE_ROTARY`` does for packed ones, where it took 2.5% off the int4
#: step). Off: on an H200 (2026-12-07, stop 24) the bf16 batch-1 step took 4.670 ms with it and
#: 4.612 ms without (the epilogue's rotation costs the q|k|v GEMV more than the rotary launch it
#: saves); on that day's H100 cuBLAS served q|k|v, so it was never taken there.
FUSE_ROTARY = False

#: Most rows of x the GEMV takes (the right operand of the dot is 16 wide). Larger batches go
#: to cuBLAS, whose tiles use the tensor cores fully.
MAX_ROWS = 8


@triton_kernel
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr, counter_ptr, bias_ptr, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    pos_ptr, slot_ptr, cs_ptr, cache_ptr, rope_half, num_q_heads, num_kv_heads, block_size,
    stride_cs, s_kv, s_block, s_head, s_off,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr,
    ROPE: tl.constexpr, ROPE_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAGIC: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: output columns n0..n0+BLOCK_N of all M (<= BLOCK_M)
    rows, over the K range ``[split * k_per_split, ...)``.

    With SPLIT_K > 1 each program stores its float32 partial to part [SPLIT_K, BLOCK_M, N] and
    bumps the column block's counter; the last to arrive sums the partials into out and resets
    the counter (the release pattern of ``attention._decode_attn_kernel``).

    ``ROPE`` (``gemv(..., rotary=)``, SPLIT_K 1, ``ROPE_ROWS`` = M rows): the weight is q|k|v
    and a tile's rows are dims of a head's first half and the same dims of its second
    (``rotary.tile_rows``); each row's sums (with ``HAS_BIAS`` rounded to out's dtype and the
    bias added in it, as ``out + bias`` rounds) go through
    ``rotary.store_rotary``: the rotated q to out [M, Hq D], the rotated k and v to the paged
    cache at the row's slot, as the GEMV followed by ``rotary_write_kv`` would store them."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_n, n_ok = tile_rows(pid, tl.arange(0, BLOCK_N), N, rope_half, BLOCK_N, ROPE)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PDL:  # programmatic dependent launch (launch.pdl): the next kernel may start
        tl.extra.cuda.gdc_launch_dependents()
        # The weight is read-only: while the kernel before finishes, pull this program's first
        # PREFETCH tiles of it into L2, one prefetch per 128-byte line (LINES per tile row).
        for t in tl.static_range(PREFETCH):
            col = k_start + t * BLOCK_K + tl.arange(0, LINES) * (BLOCK_K // LINES)
            ok = n_ok[:, None] & (col[None, :] < k_end)
            prefetch_l2(tl.where(ok, w_rows + col[None, :], w_ptr))
        tl.extra.cuda.gdc_wait()  # x (and the counters) are the kernel before's to finish
    acc = tl.full([BLOCK_N, BLOCK_M], 0.0, dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(w, tl.trans(x))
    if ROPE:
        dt = out_ptr.dtype.element_ty
        bias = tl.load(bias_ptr + offs_n, mask=n_ok & HAS_BIAS, other=0.0).to(dt)
        for m in tl.static_range(ROPE_ROWS):  # (the tile's sums of row m: [BLOCK_N])
            total = tl.reduce(tl.where(offs_m[None, :] == m, acc, 0.0), 1, SUM)
            if HAS_BIAS:  # rounded, then the bias added in out's dtype, as ``out + bias`` does
                total = (total.to(dt) + bias).to(tl.float32)
            store_rotary(out_ptr + m * stride_om, total, pid, tl.load(pos_ptr + m), tl.load(slot_ptr + m),
                         cs_ptr, stride_cs, cache_ptr, rope_half, num_q_heads, num_kv_heads, block_size,
                         s_kv, s_block, s_head, s_off, BLOCK_N, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
    else:
        out_mask = m_ok[:, None] & n_ok[None, :]
        out_off = offs_m[:, None] * stride_om + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptr + out_off, tl.trans(acc).to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            part_off = offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N] of one split
            tl.store(part_ptr + split * BLOCK_M * N + part_off, tl.trans(acc), mask=out_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                tl.store(counter_ptr + pid, 0)
                total = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(part_ptr + s * BLOCK_M * N + part_off, mask=out_mask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=out_mask)


def tile_config(n: int, k: int) -> dict[str, int]:
    """(BLOCK_N, BLOCK_K, warps, stages, SPLIT_K) for a weight [N, K], from H200 sweeps of
    ``benchmarks/gpu_gemv.py --sweep`` on the Llama-3-8B shapes (docs/benchmarks.md): 64-row
    tiles of 128 columns throughout; few output rows (o, down: 128 or fewer column blocks for
    132 SMs) split K in four; wide weights (gate|up, lm_head) have programs enough and a short
    pipeline."""
    if n >= 16384:
        return {"BLOCK_N": 64 if n > 65536 else 32, "BLOCK_K": 128, "num_warps": 4,
                "num_stages": 3, "SPLIT_K": 1}
    if n <= 4096 and k >= 4096:
        return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 4}
    return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 5, "SPLIT_K": 1}


#: (weight shape, dtype, device) -> whether the Triton GEMV beat cuBLAS on it here.
_FASTER: dict[tuple, bool] = {}


def faster_than_cublas(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` beats ``F.linear`` for this weight on this GPU, timed once per weight
    shape (a few replays of each, at the first product) and remembered.

    Which wins differs by shape and by machine: on three H200s cuBLAS's gate|up ranged from 89%
    to 98% of copy bandwidth against a steady 94% here, while o and q|k|v were always faster
    here. Interpreted (CPU) tensors always take the kernel, so tests exercise it; during graph
    capture, where nothing may be timed, an unmeasured shape takes the kernel too."""
    key = (tuple(weight.shape), weight.dtype, x.device)
    if key in _FASTER:
        return _FASTER[key]
    if is_interpreted(x) or torch.cuda.is_current_stream_capturing():
        return True
    import torch.nn.functional as F

    # In a decode step every weight streams from HBM once; timing one weight over and over
    # would time the L2 cache instead (o, q|k|v fit in it). So each timed call follows a
    # write over more bytes than the L2 holds, which also keeps the GPU busy while the host
    # launches the call, so launch latency stays out of the time.
    try:
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=x.device)
    except torch.OutOfMemoryError:
        flush = None

    def best_of(fn, flush: torch.Tensor | None) -> float:
        fn()
        times = []
        for _ in range(5):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return min(times)

    _FASTER[key] = (best_of(lambda: gemv(x, weight), flush)
                    < best_of(lambda: F.linear(x, weight), flush))
    return _FASTER[key]


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` takes this product: at most ``MAX_ROWS`` rows of 2-D x, and a 16-bit
    weight of x's dtype with contiguous rows."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS
            and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and weight.dim() == 2 and weight.stride(-1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: dict[str, int] | None = None, *,
         bias: torch.Tensor | None = None, rotary: tuple | None = None) -> torch.Tensor | None:
    """``x @ weight.T`` for x [M <= 16, K], weight [N, K] -> [M, N] in x's dtype (``bias`` is
    added after, by torch).

    ``rotary=(positions [M], cos_sin_cache [P, D], kv_cache, slot_mapping [M], num_heads,
    kv_layout)``: ``weight`` is q|k|v [(Hq + 2 Hk) D, K] and the answer ``rotary_write_kv`` of
    the product (plus ``bias``, before the rotation): the rotated q [M, Hq D], the rotated k and
    v stored in the cache, in the GEMV's launch (``FUSE_ROTARY``). None where that does not
    serve: off, K split over programs (the tile config of the shape), or what
    ``rotary.rotary_operands`` declines."""
    num_rows, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    if x.dim() != 2 or x.shape[1] != k or num_rows > 16:
        raise DeviceError(f"cuda gemv: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                          "(at most 16 rows)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = dict(tile_config(n, k) if config is None else config)
    if is_interpreted(x):
        cfg.update(BLOCK_N=16, BLOCK_K=32, num_stages=1)
    block_n, block_k = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    split_k = cfg.pop("SPLIT_K", 1)
    # each split's K range is whole tiles, so only the last split has a ragged end
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    rope = None
    if rotary is not None:
        if not FUSE_ROTARY or split_k > 1 or (bias is not None and bias.shape != (n,)):
            return None
        rope = rotary_operands(rotary, x, n, block_n, None)
        if rope is None:
            return None
    out = torch.empty((num_rows, n if rope is None else rope["q_size"]), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    num_blocks = triton.cdiv(n, block_n)
    if split_k > 1:
        part = torch.empty((split_k, 16, n), dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, num_blocks, "gemv")
    else:
        part = counters = out  # unused
    from triton.runtime.errors import OutOfResources

    stages = cfg.pop("num_stages")
    constexprs, options = pdl_options(x)
    while True:  # fewer pipeline stages where shared memory is smaller (MI300: 64 KiB)
        try:
            _gemv_kernel.on(x)[(num_blocks, split_k)](
                x, weight, out, part, counters, bias if rope is not None and bias is not None else out,
                num_rows, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
                *(rope["args"] if rope is not None else (out,) * 4 + (0,) * 9),
                SPLIT_K=split_k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                PREFETCH=PDL_PREFETCH_TILES if constexprs["PDL"] else 0,
                LINES=max(1, block_k * x.element_size() // 128),
                ROPE=rope is not None, ROPE_ROWS=num_rows if rope is not None else 0,
                HAS_BIAS=rope is not None and bias is not None, **(rope["fp8"] if rope is not None else NO_FP8),
                num_stages=stages, **cfg, **constexprs, **options,
            )
            return out if rope is not None or bias is None else out + bias
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
