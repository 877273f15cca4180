"""Small-batch (decode) GEMVs on packed weights: one Triton kernel for int4, int8, Q4_0, Q4_1,
Q8_0 (weight-only, x in its dtype) and fp8 (W8A8: x already quantized to fp8 with its scales).

``out[m, n] = sum_k x[m, k] * w[n, k]`` for ``M <= MAX_M`` rows of x, with no padding of M to a
matrix tile: each program owns ``BLOCK_N`` weight rows, streams their packed bytes once as 32-bit
words (coalesced, vectorized) and multiplies every row of x against them (x is tiny and stays in
L1/L2). Codes are expanded with integer bit operations rather than int-to-float conversions,
whose rate on Hopper (16 per SM per clock) is below what the memory delivers at 4 bits a
weight: a ``b``-bit code ``q`` goes into the mantissa of 1.0, which gives ``v = 1 + q / 2^b``
exactly, and the weight is one fused multiply-add ``v * a + c`` with per-block ``a, c``
(int4: ``a = 2^b s``, ``c = -(2^b + zero) s``); fp8 e4m3 bytes are moved into float32 bit
positions and rescaled by 2^120. Products accumulate in float32 per word position; the sum over
the tile is taken once, at the end.

When the row tiles alone give too few programs to keep every SM streaming, K is split over
``SPLIT_K`` programs per row tile: each stores its float32 partial sums, and the last one to
arrive (an atomic counter per tile, which that program resets) adds them in split order and
writes the output. One launch, deterministic, no host synchronization (CUDA-graph safe).

Tile sizes per format and M are in ``CONFIGS``. The kernel runs compiled on GPU tensors and in Triton's interpreter on CPU tensors
(``devices.cuda.launch``), which is how CI tests it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from portaserve.devices.cuda.launch import SUM, triton_kernel
from portaserve.quant.base import QuantizedWeight

#: Largest number of rows of x the GEMV serves (more rows: the tiled GEMM, or _scaled_mm).
MAX_M = 4
#: Kernel format ids; the 4-bit ones pack 8 codes in a 32-bit word, the others 4.
FORMAT_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "int4": 3, "int8": 4, "fp8": 5}
_MAX_SPLIT_K = 16


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """Tiles of one format's GEMV: ``block_n`` rows and ``block_k`` columns per step;
    K is split until the grid has about ``programs_per_sm`` programs per SM; ``num_stages`` > 1
    lets Triton prefetch the next steps' words into shared memory."""

    block_n: int
    block_k: int
    num_warps: int = 4
    programs_per_sm: int = 4
    num_stages: int = 1


#: Per format: (largest M, config) pairs, the first whose M covers the call's is used. Chosen
#: without a GPU from the compiled sm_90 code (``benchmarks/gemv_sass.py``: instructions per
#: weight in the main loop, at most 128 registers so that 4 programs of 4 warps fit an SM):
#: tall tiles while the registers allow, since a thread holding more rows reuses each x value
#: more. Not yet measured: retune with ``benchmarks/gpu_quant.py --kernels --sweep``.
CONFIGS: dict[str, tuple[tuple[int, GemvConfig], ...]] = {
    **dict.fromkeys(("Q4_0", "Q4_1", "int4"), (
        (2, GemvConfig(32, 512)), (MAX_M, GemvConfig(16, 512)))),
    **dict.fromkeys(("Q8_0", "int8"), ((2, GemvConfig(32, 256)), (MAX_M, GemvConfig(16, 256)))),
    "fp8": ((2, GemvConfig(16, 256)), (MAX_M, GemvConfig(8, 256))),
}


def config_for(fmt: str, m: int) -> GemvConfig:
    """The tuned ``GemvConfig`` of format ``fmt`` at ``m`` rows of x."""
    return next(cfg for max_m, cfg in CONFIGS[fmt] if m <= max_m)


@triton_kernel
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, xs_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    N, K, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_xs, stride_om,
    FMT: tl.constexpr, GROUP: tl.constexpr, CODES: tl.constexpr, NB: tl.constexpr,
    WPB: tl.constexpr, M_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``. A K step covers ``NB`` blocks of ``GROUP`` columns
    (one scale each; int8/fp8: one block, scales per row) of ``WPB`` words of ``CODES`` codes.
    ``SPLIT_K`` is a run-time value (Triton specializes the value 1: no split, no counters)."""
    # One row of x: two FMAs per code become one (a and c applied once per word), as fewer
    # instructions per byte is what bounds a 4-bit GEMV; with more rows, expanding w once wins.
    FOLD: tl.constexpr = M_ROWS == 1 and FMT != 5
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n[:, None, None]  # [BN, 1, 1]
    row_ok = rows < N
    blk = tl.arange(0, NB)[None, :, None]  # [1, NB, 1] block of the K step
    wrd = tl.arange(0, WPB)[None, None, :]  # [1, 1, WPB] word of the block
    num_steps = K // BLOCK_K
    per_split = (num_steps + SPLIT_K - 1) // SPLIT_K
    step_begin = pid_k * per_split
    step_end = tl.minimum(step_begin + per_split, num_steps)
    acc0 = tl.full((BLOCK_N, NB, WPB), 0.0, tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for step in tl.range(step_begin, step_end, num_stages=NUM_STAGES):
        k0 = step * BLOCK_K
        # [BN, NB, WPB] int32 (fp8: e4m3 values); rows past N load anything and are not stored
        words = tl.load(q_ptr + rows * stride_qn + k0 // CODES + blk * WPB + wrd, mask=row_ok)
        if FMT <= 3:  # a scale (and zero / min) per block of GROUP columns: [BN, NB, 1]
            sc_off = offs_n[:, None] * stride_sn + k0 // GROUP + tl.arange(0, NB)[None, :]
            sc_ok = n_ok[:, None]
            d = tl.load(s_ptr + sc_off, mask=sc_ok, other=0.0)[:, :, None].to(tl.float32)
            a = d * (256.0 if FMT == 2 else 16.0)
            if FMT == 0:  # Q4_0: d (q - 8)
                c = d * -24.0
            elif FMT == 1:  # Q4_1: d q + m
                c = tl.load(z_ptr + sc_off, mask=sc_ok, other=0.0)[:, :, None].to(tl.float32) - a
            elif FMT == 2:  # Q8_0: d q, q = u - 128 for the offset-binary byte u
                c = d * -384.0
            else:  # int4: s (q - zero)
                z = tl.load(z_ptr + sc_off, mask=sc_ok, other=0)[:, :, None].to(tl.float32)
                c = -(z + 16.0) * d
        if FMT == 4:  # int8: the code is 256 v - 384; the row's scale comes at the end
            a = 256.0
            c = -384.0
        for i in tl.static_range(CODES):
            if CODES == 8:  # nibble i (bits 4i..4i+3) -> mantissa bits 19..22 of 1.0
                moved = words << (19 - 4 * i) if 4 * i <= 19 else words >> (4 * i - 19)
                v = ((moved & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            elif FMT == 5:  # fp8: one e4m3 per "word" (CODES 1), converted by the hardware
                v = words.to(tl.float32)
            else:  # signed byte i, flipped to offset binary -> mantissa bits 15..22 of 1.0
                moved = words << (15 - 8 * i) if 8 * i <= 15 else words >> (8 * i - 15)
                v = ((moved & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)
            if FMT == 0 or FMT == 1:  # GGUF 4-bit: byte t of a block holds columns t and t + 16
                col = blk * 32 + wrd * 4 + (i // 2) + 16 * (i % 2)
            else:  # code i of word j is column CODES * j + i
                col = (blk * WPB + wrd) * CODES + i
            xp = x_ptr + k0 + col  # [1, NB, WPB]: shared by the tile's rows
            if FOLD:  # per word: p = sum of v x over its codes, s = sum of those x
                x0 = tl.load(xp).to(tl.float32)
                if i == 0:
                    p0, s0 = v * x0, x0
                else:
                    p0, s0 = p0 + v * x0, s0 + x0
            else:  # the weight expanded once, for every row of x
                w = v if FMT == 5 else v * a + c
                acc0 += w * tl.load(xp).to(tl.float32)
                if M_ROWS > 1:
                    acc1 += w * tl.load(xp + stride_xm).to(tl.float32)
                if M_ROWS > 2:
                    acc2 += w * tl.load(xp + 2 * stride_xm).to(tl.float32)
                if M_ROWS > 3:
                    acc3 += w * tl.load(xp + 3 * stride_xm).to(tl.float32)
        if FOLD:  # sum of w x over a word = a p + c s (w = a v + c, a and c per block)
            acc0 += p0 * a + s0 * c
    for m in tl.static_range(M_ROWS):
        if m == 0:
            acc = acc0
        elif m == 1:
            acc = acc1
        elif m == 2:
            acc = acc2
        else:
            acc = acc3
        total = tl.reduce(tl.reduce(acc, 2, SUM), 1, SUM)  # [BN]
        if FMT == 4 or FMT == 5:  # per-row (or one) weight scale
            total *= tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        if FMT == 5:  # the activation's scale (per token, or one)
            total *= tl.load(xs_ptr + m * stride_xs).to(tl.float32)
        if SPLIT_K == 1:
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + m * stride_om + offs_n, total.to(out_ptr.dtype.element_ty),
                     mask=n_ok)
        else:
            tl.store(part_ptr + (pid_k * M_ROWS + m) * N + offs_n, total, mask=n_ok)
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partials are stored before the counter moves
        arrived = tl.atomic_add(lock_ptr + pid_n, 1)  # acq_rel: the others' partials are seen
        if arrived == SPLIT_K - 1:  # the last program of this row tile sums, in split order
            for m in tl.static_range(M_ROWS):
                total = tl.full((BLOCK_N,), 0.0, tl.float32)
                for s in range(SPLIT_K):
                    total += tl.load(part_ptr + (s * M_ROWS + m) * N + offs_n, mask=n_ok,
                                     other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + m * stride_om + offs_n, total.to(out_ptr.dtype.element_ty),
                         mask=n_ok)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch


def _row_major(t: torch.Tensor) -> bool:
    """Each row's elements contiguous (rows may be strided)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def _operands(weight: QuantizedWeight) -> tuple[torch.Tensor, ...] | None:
    """(int32 words, scales, zeros-or-mins, group) of a weight, or None when not row-major."""
    data, fmt = weight.data, weight.format
    if fmt in ("Q4_0", "Q4_1", "Q8_0"):
        q, s, z, group = data["qs"], data["d"], data.get("m", data["d"]), 32
    elif fmt == "int4":
        q, s, z, group = data["qweight"], data["scales"], data["zeros"], int(weight.meta["group_size"])
    elif fmt == "int8":
        q, s, z, group = data["qweight"], data["scales"], data["scales"], 0
    else:  # fp8
        q, s, z, group = data["weight"], data["weight_scale"], data["weight_scale"], 0
    if not all(_row_major(t) for t in (q, s, z) if t.dim() > 0):
        return None
    if fmt == "fp8":
        return q, s, z, group
    try:
        words = q.view(torch.int32)
    except RuntimeError:  # a row not a whole number of words, or not aligned
        return None
    return words, s, z, group


_LOCKS: dict[torch.device, torch.Tensor] = {}
_NUM_SMS: dict[int, int] = {}


def _num_sms(x: torch.Tensor) -> int:
    if x.device.type != "cuda":
        return 2  # the interpreter: a small "GPU", so tests reach the split-K path
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def _locks(x: torch.Tensor, num_tiles: int) -> torch.Tensor | None:
    """The zeroed per-tile arrival counters of ``x``'s device (programs reset what they use);
    None when more are needed during a CUDA-graph capture (nothing may be allocated then)."""
    locks = _LOCKS.get(x.device)
    if locks is None or locks.numel() < num_tiles:
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        locks = torch.zeros(max(num_tiles, 1 << 14), dtype=torch.int32, device=x.device)
        _LOCKS[x.device] = locks
    return locks


def plan(weight: QuantizedWeight, m: int, config: GemvConfig | None = None) -> tuple | None:
    """(operands, block_k, group) when the GEMV serves this weight at ``m`` rows, else None."""
    if not 1 <= m <= MAX_M or weight.format not in FORMAT_IDS:
        return None
    ops = _operands(weight)
    if ops is None:
        return None
    k = weight.shape[1]
    cfg = config or config_for(weight.format, m)
    group = ops[3]
    smallest = max(group, 32)  # a K step holds whole blocks, and at least 8 words of a row
    block_k = max(cfg.block_k, smallest)
    while k % block_k and block_k > smallest:
        block_k //= 2
    if k % block_k or (group and block_k % group):
        return None
    return ops, block_k, group or block_k


def gemv(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None, *,
         x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         config: GemvConfig | None = None, split_k: int | None = None) -> torch.Tensor | None:
    """``x [M, K] @ dequant(weight).T (+ bias)`` -> [M, N], or None when this weight or M is not
    served (the caller falls back). fp8 weights take fp8 ``x`` with ``x_scale`` ([M] or a
    scalar) and give ``out_dtype``; ``config`` / ``split_k`` override the tuned choice."""
    m, k = x.shape
    n = weight.shape[0]
    planned = plan(weight, m, config)
    cfg = config or (config_for(weight.format, m) if planned is not None else None)
    if planned is None or x.stride(1) != 1:
        return None
    (words, s, z, _), block_k, group = planned
    fmt = FORMAT_IDS[weight.format]
    codes = 8 if fmt <= 1 or fmt == 3 else (1 if fmt == 5 else 4)
    num_tiles = triton.cdiv(n, cfg.block_n)
    if split_k is None:
        split_k, target = 1, _num_sms(x) * cfg.programs_per_sm
        while num_tiles * split_k < target and split_k * 2 <= min(k // block_k, _MAX_SPLIT_K):
            split_k *= 2
    locks = _locks(x, num_tiles) if split_k > 1 else None
    if locks is None:
        split_k = 1
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    parts = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    if x_scale is None:
        x_scale = s
    scalar_scale = s.dim() == 0
    _gemv_kernel.on(x)[(num_tiles, split_k)](
        x, words, s, z, x_scale, bias if bias is not None else out, out, parts,
        locks if locks is not None else out,
        n, k, split_k, x.stride(0), words.stride(0), 0 if scalar_scale else s.stride(0),
        0 if x_scale.dim() == 0 else x_scale.stride(0), out.stride(0),
        FMT=fmt, GROUP=group, CODES=codes, NB=block_k // group, WPB=group // codes, M_ROWS=m,
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    return out
