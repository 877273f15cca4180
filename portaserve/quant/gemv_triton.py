"""Small-batch (decode) GEMVs on packed weights: one Triton kernel for int4, int8, Q4_0, Q4_1,
Q8_0, Q4_K, Q5_K, Q6_K (weight-only, x in its dtype) and fp8 (W8A8: x already quantized to fp8
with its scales).

``out[m, n] = sum_k x[m, k] * w[n, k]`` for ``M <= MAX_M`` rows of x, with no padding of M to a
matrix tile: each program owns ``BLOCK_N`` weight rows, streams their packed bytes once as 32-bit
words (coalesced, vectorized) and multiplies every row of x against them (x is tiny and stays in
L1/L2). Codes are expanded with integer bit operations rather than int-to-float conversions,
whose rate on Hopper (16 per SM per clock) is below what the memory delivers at 4 bits a
weight: a ``b``-bit code ``q`` goes into the mantissa of 1.0, which gives ``v = 1 + q / 2^b``
exactly, and the weight is ``v * a + c`` with per-block ``a, c`` (int4: ``a = 2^b s``,
``c = -(2^b + zero) s``; K formats: from the super-block's d, dmin and 6-bit scales, the
5th / 5th-6th bits of Q5_K / Q6_K joined in from their high-bit planes). With one row of x the
kernel sums ``v x`` and ``x`` per word and applies ``a, c`` once a word. fp8 e4m3 goes through
the hardware's conversion. Products accumulate in float32 per word position; the sum over the
tile is taken once, at the end.

When the row tiles alone give too few programs to keep every SM streaming, K is split over
``SPLIT_K`` programs per row tile: each stores its float32 partial sums, and the last one to
arrive (an atomic counter per tile, which that program resets) adds them in split order and
writes the output. One launch, deterministic, no host synchronization (CUDA-graph safe).

Tile sizes per format and M are in ``CONFIGS``. The kernel runs compiled on GPU tensors and in
Triton's interpreter on CPU tensors (``devices.cuda.launch``), which is how CI tests it.
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
FORMAT_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "int4": 3, "int8": 4, "fp8": 5, "Q4_K": 6,
              "Q5_K": 7, "Q6_K": 8}
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
    **dict.fromkeys(("Q4_0", "Q4_1", "int4", "Q4_K"), (
        (2, GemvConfig(32, 512)), (MAX_M, GemvConfig(16, 512)))),
    "Q5_K": ((MAX_M, GemvConfig(16, 512)),),
    "Q6_K": ((MAX_M, GemvConfig(16, 256)),),
    **dict.fromkeys(("Q8_0", "int8"), ((2, GemvConfig(32, 256)), (MAX_M, GemvConfig(16, 256)))),
    "fp8": ((2, GemvConfig(16, 256)), (MAX_M, GemvConfig(8, 256))),
}


def config_for(fmt: str, m: int) -> GemvConfig:
    """The tuned ``GemvConfig`` of format ``fmt`` at ``m`` rows of x."""
    return next(cfg for max_m, cfg in CONFIGS[fmt] if m <= max_m)


@triton_kernel
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, k_ptr, h_ptr, xs_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    N, K, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_kn, stride_hn, stride_xs, stride_om,
    FMT: tl.constexpr, GROUP: tl.constexpr, CODES: tl.constexpr, NB: tl.constexpr,
    WPB: tl.constexpr, M_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``. A K step covers ``NB`` blocks of ``GROUP`` columns
    (one scale each; int8/fp8: one block, scales per row; K formats: a 64-column quarter of a
    super-block, two sub-blocks) of ``WPB`` words of ``CODES`` codes. Weights are ``v a + c``
    with (a0, c0) for even codes of a word and (a1, c1) for odd ones (they differ only in the
    K formats, whose two nibbles of a byte belong to different sub-blocks). ``SPLIT_K`` is a
    run-time value (Triton specializes the value 1: no split, no counters)."""
    # One row of x: two FMAs per code become one (a and c applied once per word), as fewer
    # instructions per byte is what bounds a 4-bit GEMV; with more rows, expanding w once wins.
    FOLD: tl.constexpr = M_ROWS == 1 and FMT != 5
    KQ: tl.constexpr = FMT >= 6  # Q4_K, Q5_K, Q6_K: super-blocks of 256 columns
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
            a0 = d * (256.0 if FMT == 2 else 16.0)
            if FMT == 0:  # Q4_0: d (q - 8)
                c0 = d * -24.0
            elif FMT == 1:  # Q4_1: d q + m
                c0 = tl.load(z_ptr + sc_off, mask=sc_ok, other=0.0)[:, :, None].to(tl.float32) - a0
            elif FMT == 2:  # Q8_0: d q, q = u - 128 for the offset-binary byte u
                c0 = d * -384.0
            else:  # int4: s (q - zero)
                z = tl.load(z_ptr + sc_off, mask=sc_ok, other=0)[:, :, None].to(tl.float32)
                c0 = -(z + 16.0) * d
            a1 = a0
            c1 = c0
        elif FMT == 4:  # int8: the code is 256 v - 384; the row's scale comes at the end
            a0 = 256.0
            c0 = -384.0
            a1 = a0
            c1 = c0
        elif KQ:
            sb2 = k0 // 256 + tl.arange(0, NB)[None, :] // 4  # [1, NB] super-block of each block
            sc_ok = n_ok[:, None]
            d = tl.load(s_ptr + offs_n[:, None] * stride_sn + sb2, mask=sc_ok, other=0.0).to(tl.float32)
            sb3 = k0 // 256 + blk // 4  # [1, NB, 1]
            if FMT == 8:  # Q6_K: 16-column sub-blocks with int8 scales; w = d sc (q - 32)
                half = (blk % 4) // 2
                qh = tl.load(h_ptr + rows * stride_hn + sb3 * 16 + 8 * half + wrd, mask=row_ok)
                # 32-column sub-block u = 4 half + 2 nibble + part: scales 2u + (word // 4)
                sp = k_ptr + rows * stride_kn + sb3 * 16 + 8 * half + 2 * (blk % 2) + wrd // 4
                ds0 = d[:, :, None] * tl.load(sp, mask=row_ok, other=0).to(tl.float32)
                ds1 = d[:, :, None] * tl.load(sp + 4, mask=row_ok, other=0).to(tl.float32)
                a0 = ds0 * 64.0
                c0 = ds0 * -96.0
                a1 = ds1 * 64.0
                c1 = ds1 * -96.0
            else:  # Q4_K / Q5_K: w = d sc q - dmin mn, six-bit sc / mn (gguf_formats.k_scale_min)
                dmin = tl.load(z_ptr + offs_n[:, None] * stride_sn + sb2, mask=sc_ok,
                               other=0.0).to(tl.float32)
                kp = k_ptr + offs_n[:, None] * stride_kn + sb2 * 12
                quarter = tl.arange(0, NB)[None, :] % 4
                for half in tl.static_range(2):  # sub-block 2 quarter (low nibbles), + 1 (high)
                    sub = 2 * quarter + half
                    j = sub % 4
                    bd = tl.load(kp + j, mask=sc_ok, other=0).to(tl.int32)
                    bm = tl.load(kp + 4 + j, mask=sc_ok, other=0).to(tl.int32)
                    bmd = tl.load(kp + 8 + j, mask=sc_ok, other=0).to(tl.int32)
                    sc = tl.where(sub < 4, bd & 63, (bmd & 15) | ((bd >> 2) & 48)).to(tl.float32)
                    mn = tl.where(sub < 4, bm & 63, (bmd >> 4) | ((bm >> 2) & 48)).to(tl.float32)
                    a = (d * sc * (16.0 if FMT == 6 else 32.0))[:, :, None]
                    c = -(a + (dmin * mn)[:, :, None])
                    if half == 0:
                        a0 = a
                        c0 = c
                    else:
                        a1 = a
                        c1 = c
                if FMT == 7:  # Q5_K: bit s of qh byte t is the fifth bit of sub-block s, column t
                    qh = tl.load(h_ptr + rows * stride_hn + sb3 * 8 + wrd, mask=row_ok)
        for i in tl.static_range(CODES):
            if FMT == 7:  # Q5_K: nibble -> bits 18..21, its fifth bit -> 22: 1 + code / 32
                moved = words << (18 - 4 * i) if 4 * i <= 18 else words >> (4 * i - 18)
                high = ((qh >> (8 * (i // 2) + 2 * (blk % 4) + i % 2)) & 1) << 22
                v = ((moved & 0x3C0000) | high | 0x3F800000).to(tl.float32, bitcast=True)
            elif FMT == 8:  # Q6_K: nibble -> bits 17..20, two high bits -> 21..22: 1 + code / 64
                moved = words << (17 - 4 * i) if 4 * i <= 17 else words >> (4 * i - 17)
                high = ((qh >> (8 * (i // 2) + 4 * (i % 2) + 2 * (blk % 2))) & 3) << 21
                v = ((moved & 0x1E0000) | high | 0x3F800000).to(tl.float32, bitcast=True)
            elif CODES == 8:  # nibble i (bits 4i..4i+3) -> mantissa bits 19..22 of 1.0
                moved = words << (19 - 4 * i) if 4 * i <= 19 else words >> (4 * i - 19)
                v = ((moved & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            elif FMT == 5:  # fp8: one e4m3 per "word" (CODES 1), converted by the hardware
                v = words.to(tl.float32)
            else:  # signed byte i, flipped to offset binary -> mantissa bits 15..22 of 1.0
                moved = words << (15 - 8 * i) if 8 * i <= 15 else words >> (8 * i - 15)
                v = ((moved & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)
            if FMT == 0 or FMT == 1:  # GGUF 4-bit: byte t of a block holds columns t and t + 16
                col = blk * 32 + wrd * 4 + (i // 2) + 16 * (i % 2)
            elif FMT == 6 or FMT == 7:  # byte t of a quarter: columns t (low) and t + 32 (high)
                col = blk * 64 + 32 * (i % 2) + 4 * wrd + i // 2
            elif FMT == 8:  # ql byte t of (half h, part p): columns 128 h + 32 p + t, and + 64
                col = ((blk // 4) * 256 + 128 * ((blk % 4) // 2) + 32 * (blk % 2) + 64 * (i % 2)
                       + 4 * wrd + i // 2)
            else:  # code i of word j is column CODES * j + i
                col = (blk * WPB + wrd) * CODES + i
            xp = x_ptr + k0 + col  # [1, NB, WPB]: shared by the tile's rows
            if FOLD:  # per word (and parity of i): p = sum of v x, s = sum of those x
                x0 = tl.load(xp).to(tl.float32)
                if i == 0:
                    p0, s0 = v * x0, x0
                elif i == 1 and KQ:
                    p1, s1 = v * x0, x0
                elif i % 2 == 1 and KQ:
                    p1, s1 = p1 + v * x0, s1 + x0
                else:
                    p0, s0 = p0 + v * x0, s0 + x0
            else:  # the weight expanded once, for every row of x
                if FMT == 5:
                    w = v
                elif i % 2 == 0:
                    w = v * a0 + c0
                else:
                    w = v * a1 + c1
                acc0 += w * tl.load(xp).to(tl.float32)
                if M_ROWS > 1:
                    acc1 += w * tl.load(xp + stride_xm).to(tl.float32)
                if M_ROWS > 2:
                    acc2 += w * tl.load(xp + 2 * stride_xm).to(tl.float32)
                if M_ROWS > 3:
                    acc3 += w * tl.load(xp + 3 * stride_xm).to(tl.float32)
        if FOLD:  # sum of w x over a word = a p + c s (w = a v + c)
            acc0 += p0 * a0 + s0 * c0
            if KQ:
                acc0 += p1 * a1 + s1 * c1
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


def _operands(weight: QuantizedWeight) -> tuple | None:
    """(codes, scales, zeros-or-mins, K-quant scale bytes, K-quant high bits, group) of a
    weight, codes and high bits as int32 words (fp8: its e4m3 values); None when not row-major.
    Operands a format does not have repeat one it has (never read)."""
    data, fmt = weight.data, weight.format
    if fmt in ("Q4_0", "Q4_1", "Q8_0"):
        q, s, z, group = data["qs"], data["d"], data.get("m", data["d"]), 32
    elif fmt == "int4":
        q, s, z, group = data["qweight"], data["scales"], data["zeros"], int(weight.meta["group_size"])
    elif fmt == "int8":
        q, s, z, group = data["qweight"], data["scales"], data["scales"], 0
    elif fmt == "fp8":
        q, s, z, group = data["weight"], data["weight_scale"], data["weight_scale"], 0
    else:  # K formats: a "block" is 64 columns, a quarter of a super-block
        q, s, group = data.get("qs", data.get("ql")), data["d"], 64
        z = data.get("dmin", s)
    k, h = data.get("scales", s) if fmt.endswith("_K") else s, data.get("qh", q)
    if not all(_row_major(t) for t in (q, s, z, k, h) if t.dim() > 0):
        return None
    if fmt == "fp8":
        return q, s, z, k, h, group
    try:
        return q.view(torch.int32), s, z, k, h.view(torch.int32), group
    except RuntimeError:  # a row not a whole number of words, or not aligned
        return None


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
    group = ops[5]
    # a K step holds whole blocks (K formats: super-blocks), and at least 8 words of a row
    smallest = 256 if weight.format.endswith("_K") else max(group, 32)
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
    (words, s, z, kb, qh, _), block_k, group = planned
    fmt = FORMAT_IDS[weight.format]
    codes = 4 if fmt in (2, 4) else (1 if fmt == 5 else 8)
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
        x, words, s, z, kb, qh, x_scale, bias if bias is not None else out, out, parts,
        locks if locks is not None else out,
        n, k, split_k, x.stride(0), words.stride(0), 0 if scalar_scale else s.stride(0),
        kb.stride(0) if kb.dim() else 0, qh.stride(0) if qh.dim() else 0,
        0 if x_scale.dim() == 0 else x_scale.stride(0), out.stride(0),
        FMT=fmt, GROUP=group, CODES=codes, NB=block_k // group, WPB=group // codes, M_ROWS=m,
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    return out
