"""Small-batch (decode) GEMVs on packed weights, as two Triton kernels: an FMA kernel for int4,
int8, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K (weight-only, x in its dtype) and fp8 (W8A8: x already
quantized to fp8 with its scales), and a tensor-core kernel for int4, int8, Q4_0, Q4_1, Q8_0 and
fp8. ``CONFIGS`` picks one per format and number of rows, from H200 measurements.

``out[m, n] = sum_k x[m, k] * w[n, k]`` for ``M <= MAX_M`` rows of x.

The FMA kernel (``_gemv_kernel``) pads nothing: each program owns ``BLOCK_N`` weight rows,
streams their packed bytes once as 32-bit words (coalesced, vectorized) and multiplies every row
of x against them (x is tiny and stays in L1/L2). Codes are expanded with integer bit operations
rather than int-to-float conversions, whose rate on Hopper (16 per SM per clock) is below what
the memory delivers at 4 bits a weight: a ``b``-bit code ``q`` goes into the mantissa of 1.0,
which gives ``v = 1 + q / 2^b`` exactly, and the weight is ``v * a + c`` with per-block ``a, c``
(int4: ``a = 2^b s``, ``c = -(2^b + zero) s``; K formats: from the super-block's d, dmin and
6-bit scales, the 5th / 5th-6th bits of Q5_K / Q6_K joined in from their high-bit planes). With
one row of x the kernel sums ``v x`` and ``x`` per word and applies ``a, c`` once a word. fp8
e4m3 goes through the hardware's conversion. Products accumulate in float32 per word position;
the sum over the tile is taken once, at the end. Each extra row of x costs its own FMAs.

int4, Q4_0 and Q4_K at one row of bf16 x take a packed path (``GemvConfig.packed``): each 32-bit
word goes through one inline-PTX block in bf16x2 arithmetic (``_INT4_BF16X2_ASM``: pairs of
codes as ``128 + code`` by a magic-number OR, one FMA subtracting ``128 + zero`` exactly, one
accumulating against x paired the same way by ``prmt``), ~3 instructions a weight where the
float32 path needs ~5 (ncu on the H200: 8 issued a weight, issue-bound at 28% of DRAM). bf16,
not fp16, so that x keeps its range; each product and each word's four pair sums round to bf16
(~3e-3 relative, far below the 4-bit codes' own error). The next step's words, scales and x are
loaded before the current step's math (int4, Q4_0; Q4_K runs inside the general loop, its two
nibbles of a byte in different sub-blocks summed apart by ``_CODES_BF16X2_ASM``, codes centred
on 8 so that the sums stay small beside the mins' correction).

int4 and Q4_0 at one row of bf16 x can take the packed path in fp16x2 instead
(``GemvConfig.f16``; ``_int4_f16x2_asm``): fp16's 10-bit mantissa holds a nibble in place, so
``word & 0x00F000F0`` OR 0x6400 is 1024 + 16 code and one FMA by 1/16 leaves code - zero (one
shift a word instead of three), and four words of a row add into one fp16x2 accumulator before
a single float32 sum (~13 instructions a word against ~20; sm_90 SASS: 2.95 against 3.37 a
weight), which did not make it faster on an H100 (``GemvConfig.f16``). x must fit fp16 for
that: each program scales its share of x by a power of two from the largest exponent in it
(``_x_exponent``), |x| < 2^8, and its sums back; products and 16-product sums round to 11
bits (the bf16x2 path: 8).

int4 at one row of bf16 x can take its products to the tensor cores inside the FMA kernel
(``GemvConfig.mma``; ``_int4_mma_asm``): a 16-row tile is the A operand of ``mma.m16n8k16``,
each lane unpacking its own words straight into its fragment registers (no trip through shared
memory, which is what makes ``tl.dot`` slow here), x the B operand in all eight columns, float32
sums, so the products are exact (no bf16 rounding) at ~2 instructions a weight against ~3.4.
It relies on the lanes Triton assigns (t, then g of the MMA along the lanes); a one-time check
per GPU and tiles (``mma_supported``) keeps the bf16x2 path where a Triton lays them out
otherwise.

The tensor-core kernel (``_dot_gemv_kernel``) feeds the unpacked weight tile as the left
operand of ``tl.dot`` against x padded to 16 columns ("swap AB", as ``devices.cuda.gemv`` does
for bf16), so Triton stages the packed tiles, x, scales and zero points in shared memory with
asynchronous copies (``num_stages``), and 2-4 rows of x cost what one does. Unpacking takes a
shift and a mask per pair of codes (see its docstring).

Measured on the H200 (docs/benchmarks.md, section 4, 2026-11-29): at one row the FMA kernel is
as fast as or faster than the tensor-core one for int4, Q4_0, Q8_0 and int8, and neither reads
more than ~30% (4-bit) / ~50% (8-bit) of the copy bandwidth; at 2-4 rows the tensor-core kernel
is 1.4-2.6x faster for the 4-bit formats, Q8_0 and fp8. ncu (2026-11-30) found the one-row FMA
kernel instruction-bound; the packed path reads 41% (int4) / 34% (Q4_0) of the copy bandwidth
over a layer and is now latency-bound (long-scoreboard stalls: too few bytes in flight per SM
with the words held in registers).

When the row tiles alone give too few programs to keep every SM streaming, K is split over
``SPLIT_K`` programs per row tile: each stores its float32 partial sums, and the last one to
arrive (an atomic counter per tile, which that program resets) adds them in split order and
writes the output. One launch, deterministic, no host synchronization (CUDA-graph safe).

Both kernels run compiled on GPU tensors and in Triton's interpreter on CPU tensors
(``devices.cuda.launch``), which is how CI tests them.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from portaserve.devices.cuda.activation import silu_mul
from portaserve.devices.cuda.launch import (
    MAX,
    SUM,
    is_interpreted,
    next_pow2,
    pdl_options,
    prefetch_l2,
    triton_helper,
    triton_kernel,
)
from portaserve.devices.cuda.norm import rms_norm_row
from portaserve.devices.cuda.rotary import NO_FP8, rotary_operands, store_rotary, tile_rows
from portaserve.quant.base import QuantizedWeight

try:  # host-side TMA descriptors (Triton 3.4+); older Triton runs without ``GemvConfig.tma``
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

#: Largest number of rows of x the GEMV serves (more rows: the tiled GEMM, or _scaled_mm).
MAX_M = 4
#: Kernel format ids; the 4-bit ones pack 8 codes in a 32-bit word, the others 4.
FORMAT_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "int4": 3, "int8": 4, "fp8": 5, "Q4_K": 6,
              "Q5_K": 7, "Q6_K": 8}
_MAX_SPLIT_K = 16
#: The last program of a split row tile loads every split's partials at once (``_sum_splits``
#: unrolled to ``_MAX_SPLIT_K`` masked loads, one trip to L2) rather than in a run-time loop (a
#: trip a split: 4-8 of them for the small decode weights). On by default from the sm_90 SASS
#: (all loads ahead of the first add) and the H100 times of ``gpu_int4_stream.py`` (the small
#: GEMVs' excess over their reads grew with their split count). Timed on an H100 (2026-12-07):
#: o 8.6 vs 9.1 us, down 18.5 vs 19.0 with the loop; the int4 8B step 2.974 vs 2.982 ms
#: (``gpu_quant.py --decode-variant serial_tails`` puts the loop back).
SPLIT_SUM_UNROLLED = True
#: Whether the GEMVs launch with programmatic dependent launch where ``launch.pdl`` allows it
#: (the other decode kernels do). Off: slower on a lent H100 (2026-12-07, int4 8B step at one
#: row, same method as ``FUSE_NORM``): 3.258 ms without, 3.368 prefetching 2 lines a row,
#: 5.246 prefetching 8 (the prefetches of a whole GEMV crowd the L2). Again on a lent H100
#: (2026-12-08, ``gpu_pending.sh pdl``, variants in turns): 2.865 ms without, 2.810 prefetching
#: 2 lines (logits identical), 2.717 with ``PDL_LATE`` but its logits NaN (see there): still off.
GEMV_PDL = False
#: 128-byte lines of each of its rows that a GEMV program launched with PDL pulls into L2
#: before it waits for the kernel before it.
PDL_PREFETCH_LINES = 2
#: With ``GEMV_PDL``, where a GEMV lets the next kernel launch and what it reads before it
#: waits. False (as timed above): at its start, every kernel of the decode step doing so, so
#: that the launches cascade, each kernel's programs parked on the SMs ahead of the one that
#: runs; the L2 prefetch of ``PDL_PREFETCH_LINES`` lines. True: once its programs are past
#: their loop (the split tails, norm, activation or rotary still to come), and the paths that
#: load a step ahead by hand (int4 / Q4_0 packed, MMA) load their first step's words and
#: scales into registers before they wait: the weight's first bytes arrive under the kernel
#: before's tail, and at most one kernel waits ahead of the one running. The int4 8B step at
#: one row on a lent H100 (2026-12-08): 2.717 ms against 2.865 without PDL (-5.2%), but the
#: logits came out NaN (the GPU tests of two chained GEMVs under it pass, bit for bit); which
#: part breaks the model's step (the trigger's place, the early loads, x through
#: ``ld.global.nc`` while the kernel before still writes it, the fused epilogues) is what the
#: variants ``pdl_late_wait_first``, ``pdl_late_coherent``, ``pdl_late_wait_first_coherent``
#: and ``unfused`` of ``gpu_quant.py`` bisect (``ci/gpu_pending.sh pdlnan``). Only read where
#: ``GEMV_PDL`` is on; False until the NaN is understood, so that turning ``GEMV_PDL`` on gives
#: the form whose logits were exact.
PDL_LATE = False
#: With ``PDL_LATE``: the first step's words and scales loaded before the wait (False: the
#: wait first, only the trigger late).
PDL_EARLY_WORDS = True
#: With ``PDL_LATE``, the packed path reads x with plain (coherent) loads rather than
#: ``ld.global.nc``, whose data must not change while the kernel runs (under PDL it does: the
#: kernel before writes x while this one loads its first words).
PDL_X_COHERENT = False

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """Tiles of one format's GEMV: ``block_n`` rows and ``block_k`` columns per step;
    K is split until the grid has about ``programs_per_sm`` programs per SM; ``num_stages`` > 1
    lets Triton prefetch the next steps' words into shared memory (the packed and MMA paths,
    which load ahead by hand: the words two steps ahead in registers, not one; for the packed
    path slower on a lent H100, 2026-12-08: 64 x 256 us o 9.6 / 8.5, qkv 11.5 / 11.0, gate_up
    31.8 / 28.5, down 19.4 / 18.3 against one ahead); ``dot`` picks the
    tensor-core kernel (formats of ``DOT_FORMATS``; its step is whole groups of the format)
    and ``scale_tile`` how it applies group scales."""

    block_n: int
    block_k: int
    num_warps: int = 4
    programs_per_sm: int = 4
    num_stages: int = 1
    dot: bool = False
    #: Tensor-core kernel, group-scaled formats: scale the unpacked tile before the dot (one
    #: chained dot per step) rather than scaling each group's dot result (see the kernel).
    scale_tile: bool = False
    #: FMA kernel, one row of bf16 x over ``PACKED_FORMATS``: packed bf16x2 arithmetic.
    packed: bool = True
    #: With ``packed`` (int4, Q4_0): the words come through a TMA descriptor, so that
    #: ``num_stages`` can pipeline them through shared memory rather than registers. Timed on
    #: the H200 (2026-11-30): no faster than the register prefetch (64.4 vs 64.3 us a layer at
    #: 3 stages, slower deeper), so off; kept as a sweep candidate.
    tma: bool = False
    #: With ``packed``, int4 in groups of 32, 64 or 128, and 16-row tiles at least one a warp:
    #: the products on the tensor cores (``_int4_mma_asm``) rather than in bf16x2 FMAs; there
    #: ``num_stages`` 2 loads the words two K steps ahead (1: one). Not chosen: on a lent H100
    #: (2026-12-07) the int4 8B step at one row took 3.538 ms with 128 x 128 MMA tiles against
    #: 3.258 for the packed 64 x 128, and its logits differed from the packed path's by 6.5e-2
    #: (relative; both pass the GEMV tests, MMA at 1e-4 of the float32 reference, the packed
    #: bf16x2 products at 4e-3, so the packed path is the likelier one to move the logits; the
    #: float32-accumulating yardstick is ``gpu_quant.py --decode-variant int4=tiled``).
    mma: bool = False
    #: With ``mma``: the zero points taken off after the MMAs, from the group sums of x (one MMA
    #: more per word position and thread, one FMA fewer per pair of codes and row).
    mma_xsum: bool = False
    #: With ``packed`` (int4, Q4_0): the products in fp16x2 rather than bf16x2
    #: (``_int4_f16x2_asm``), four words of a row to one accumulator: the 10-bit mantissa takes
    #: a nibble shifted by four (one shift a word, not three) and sums of 16 products without
    #: losing the codes, so the per-word float32 sum goes too (~14 instructions a word against
    #: ~20). x is scaled into fp16's range by a power of two per program (``_x_exponent``).
    #: Not chosen: on a lent H100 (2026-12-07) no faster where it counts (64 x 256 tiles, us:
    #: o 8.7 / 8.7, qkv 10.8 / 10.9, gate_up 30.9 / 28.5, down 18.9 / 18.6 against bf16x2; the
    #: 8B step at 128 x 128 3.227 ms against 2.880): the loop waits on its loads, not on issue.
    #: Kept for its precision (11-bit products) and as a sweep candidate.
    f16: bool = False


#: Per format: (largest M, config) pairs, the first whose M covers the call's is used. From
#: H200 sweeps (``benchmarks/gpu_quant.py --kernels --sweep``, the four Llama-3-8B layer GEMVs,
#: 2026-11-29; us per layer, FMA vs tensor-core kernel): one row keeps the FMA kernel for int4
#: (104.5 vs 107.4), Q4_0 (105.7 vs 159.6), Q8_0 (123.6 vs 244.4) and int8 (99.7 vs 191.3);
#: fp8 takes the dot (111.4 vs 117.8). At two rows the dot wins for int4 (116.7 vs 165.8) and
#: fp8 (142.2 vs 204.2), not for Q4_0 (198.6 vs 154.8), Q8_0 (252.3 vs 183.6) or int8 (226.7
#: vs 108.9); at four for int4 (128.8 vs 303.5), Q4_0 (185.9 vs 265.3), Q8_0 (237.3 vs 335.1)
#: and fp8 (141.5 vs 336.8), not for int8 (225.2 vs 168.6). The tiled GEMM of
#: ``kernels_triton`` (the caller's fallback: a ``None`` config here) beats both for Q8_0 from
#: two rows (~159 us a layer at any M <= 4) and int8 beyond two (~133). Three rows (not
#: measured) go with four. Q4_1 follows Q4_0; the K formats have only the FMA kernel (tiles
#: from the compiled code's instruction counts, ``benchmarks/gemv_sass.py``). One row of int4
#: and Q4_0 in bf16 takes the packed path (2026-11-30 sweep, us per layer: int4 64 x 128 66.8,
#: 32 x 512 float32 106.0; Q4_0 32 x 128 83.4, 16 x 512 float32 107.1; Q4_K packed 16 x 512
#: 107.3, 32 x 512 169.5, float32 32 x 512 171.7). int4 at one row moved to 64 x 256 tiles at
#: two programs an SM on a lent H100 (2026-12-07, ``benchmarks/gpu_int4_stream.py`` and a
#: config sweep, us per layer): 67.2 against 75.5 for 64 x 128 at four (gate_up 28.7 vs 36.2:
#: fewer K splits, and twice the words a thread to overlap with the unpacking); the 8B step at
#: one row 2.946 ms against 3.218.
_DOT = GemvConfig(128, 128, programs_per_sm=3, num_stages=4, dot=True)
CONFIGS: dict[str, tuple[tuple[int, GemvConfig | None], ...]] = {
    "int4": ((1, GemvConfig(64, 256, programs_per_sm=2)), (MAX_M, _DOT)),
    "Q4_0": ((1, GemvConfig(32, 128)), (2, GemvConfig(32, 512)), (MAX_M, _DOT)),
    "Q4_1": ((1, GemvConfig(16, 512)), (2, GemvConfig(32, 512)), (MAX_M, _DOT)),
    "Q8_0": ((1, GemvConfig(16, 256)), (MAX_M, None)),
    "int8": ((2, GemvConfig(32, 256)), (MAX_M, None)),
    "fp8": ((MAX_M, GemvConfig(64, 128, programs_per_sm=4, num_stages=4, dot=True)),),
    "Q4_K": ((1, GemvConfig(16, 512)), (2, GemvConfig(32, 512)), (MAX_M, GemvConfig(16, 512))),
    "Q5_K": ((MAX_M, GemvConfig(16, 512)),),
    "Q6_K": ((MAX_M, GemvConfig(16, 256)),),
}


#: Formats with the packed bf16x2 path at one row of bf16 x (``GemvConfig.packed``).
PACKED_FORMATS = frozenset({"int4", "Q4_0", "Q4_K"})
#: Their one-row tiles where x is not bf16 (the float32 path): the configs measured for it
#: before the packed path (2026-11-29 sweep), kept rather than untimed new ones.
UNPACKED_ONE_ROW = {"int4": GemvConfig(32, 512), "Q4_0": GemvConfig(16, 512), "Q4_K": GemvConfig(32, 512)}
#: Formats with the tensor-core kernel (``_dot_gemv_kernel``); a config with ``dot`` picks it.
DOT_FORMATS = frozenset({"int4", "int8", "Q4_0", "Q4_1", "Q8_0", "fp8"})
#: The FMA kernel's tiles for a weight the dot kernel does not take (scales not in whole words).
FMA_FALLBACK = GemvConfig(16, 256)


#: Weights at least this tall (the vocab projection) take the tensor-core kernel for one row of
#: int4 too: 158.5 vs 191.5 us for the 128256 x 4096 lm_head on the H200 (the same sweep; from
#: before the packed path, which is not yet timed there).
WIDE_DOT_N = {"int4": 65536}


def tuned_config(weight: QuantizedWeight, x: torch.Tensor) -> GemvConfig | None:
    """``config_for`` this weight and x; one row of x that the packed path does not take (not
    bf16) keeps the tiles measured for the float32 path."""
    return _tuned(weight, x)[0]


def _tuned(weight: QuantizedWeight, x: torch.Tensor) -> tuple[GemvConfig | None, torch.Tensor | None]:
    """``tuned_config`` and, where the packed path runs with it, x as 32-bit words."""
    cfg = config_for(weight.format, x.shape[0], weight.shape[0])
    if cfg is None or cfg.dot or x.shape[0] != 1:
        return cfg, None
    x32 = _packed_x(x, weight, cfg)
    return (cfg, x32) if x32 is not None else (UNPACKED_ONE_ROW.get(weight.format, cfg), None)


def config_for(fmt: str, m: int, n: int = 0) -> GemvConfig | None:
    """The tuned ``GemvConfig`` of format ``fmt`` at ``m`` rows of x against ``n`` weight rows;
    None where the caller's other kernel is faster (the GEMV declines then)."""
    if m == 1 and n >= WIDE_DOT_N.get(fmt, 1 << 62):
        return _DOT
    return next(cfg for max_m, cfg in CONFIGS[fmt] if m <= max_m)


#: Four pairs of int4 codes of a 32-bit word times four bf16x2 pairs of x, in packed bf16x2
#: arithmetic (sm_80+): pair i is nibbles i and i + 4, ``(word >> 4i) & 0x000F000F``; OR-ing
#: 0x4300 into both halves makes them 128 + code exactly, one FMA by 1.0 adds the pair's
#: ``-(128 + zero)`` (exact: small integers), one FMA accumulates the products. The two halves'
#: sums are added in float32. ~20 instructions for 8 weights, where float32 math needs ~5 a weight.
_INT4_BF16X2_ASM = tl.constexpr("""{
.reg .b32 t, v, acc, one, negzero, mask, magic;
.reg .f32 lo, hi;
mov.b32 one, 0x3F803F80;
mov.b32 negzero, 0x80008000;
mov.b32 mask, 0x000F000F;
mov.b32 magic, 0x43004300;
lop3.b32 v, $1, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, $2;
fma.rn.bf16x2 acc, v, $3, negzero;
shr.u32 t, $1, 4;
lop3.b32 v, t, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, $2;
fma.rn.bf16x2 acc, v, $4, acc;
shr.u32 t, $1, 8;
lop3.b32 v, t, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, $2;
fma.rn.bf16x2 acc, v, $5, acc;
shr.u32 t, $1, 12;
lop3.b32 v, t, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, $2;
fma.rn.bf16x2 acc, v, $6, acc;
shl.b32 t, acc, 16;
and.b32 acc, acc, 0xFFFF0000;
mov.b32 lo, t;
mov.b32 hi, acc;
add.f32 lo, lo, hi;
mov.b32 $0, lo;
}""")


def _int4_mma_asm(v: int, zero_after: bool = False) -> str:
    """PTX for one group of an int4 weight on the tensor cores (sm_80+), the ``MMA`` path:
    lane (g, t) of a warp holds, of rows g and g + 8, the ``v`` words t v .. t v + v - 1 of
    the group ($2.. the rows g, then the rows g + 8). Each word position is the A fragment of
    two ``mma.m16n8k16`` (rows g and g + 8; columns 2t, 2t + 1 and 2t + 8, 2t + 9 of the 16
    the MMA adds up across the four lanes t): pair i of a word = nibbles i and i + 4, made
    128 + code by the magic OR as in ``_INT4_BF16X2_ASM`` and less ``128 + zero`` exactly (the
    two rows' ``-(128 + zero)`` in both bf16 halves after the words). Pairs 0, 1 go through one
    MMA, 2, 3 through the next, against B = x paired the same way (four words per position,
    last), which is the same in every lane of a t: x fills all eight columns of B, so every
    lane ends with its rows' sums of the group, in float32 ($0: row g, $1: row g + 8). About 12
    instructions a word position and row, one MMA for 16 weights."""
    lo, hi = 2, 2 + v
    nz_lo, nz_hi = 2 + 2 * v, 3 + 2 * v
    lines = [".reg .b32 t, a0, a1, a2, a3, one, mask, magic;", ".reg .f32 d0, d1, d2, d3, zero;",
             "mov.b32 one, 0x3F803F80;", "mov.b32 mask, 0x000F000F;", "mov.b32 magic, 0x43004300;",
             "mov.f32 zero, 0f00000000;"]
    for w in range(v):
        x = 4 + 2 * v + 4 * w  # this position's four x pairs
        for mma, shifts in enumerate(((0, 4), (8, 12))):
            for reg, (row, nz), shift in (("a0", (lo, nz_lo), shifts[0]), ("a1", (hi, nz_hi), shifts[0]),
                                          ("a2", (lo, nz_lo), shifts[1]), ("a3", (hi, nz_hi), shifts[1])):
                src = f"${row + w}"
                if shift:
                    lines.append(f"shr.u32 t, {src}, {shift};")
                    src = "t"
                lines.append(f"lop3.b32 {reg}, {src}, mask, magic, 0xEA;")
                lines.append(f"fma.rn.bf16x2 {reg}, {reg}, one, ${nz};")
            acc = "{zero, zero, zero, zero}" if w == 0 and mma == 0 else "{d0, d1, d2, d3}"
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0, d1, d2, d3}, "
                         f"{{a0, a1, a2, a3}}, {{${x + 2 * mma}, ${x + 2 * mma + 1}}}, {acc};")
    lines += ["mov.b32 $0, d0;", "mov.b32 $1, d2;"]
    if zero_after:  # 128 + code, unshifted: the zero points come off after the MMAs
        lines = [ln for ln in lines if not ln.startswith("fma.rn.bf16x2")]
    return "{\n" + "\n".join(lines) + "\n}"


def _x_sum_mma_asm(v: int) -> str:
    """PTX for the sum of x over a group on the tensor cores: the ``v`` word positions' x pairs
    of ``_int4_mma_asm`` ($1..) against an A of ones, so every lane ends with the group's sum
    ($0). With it the MMAs can take 128 + code as is and the zero points come off in float32
    (``MMA_XSUM``): one MMA per word position and thread instead of an FMA per pair and row."""
    lines = [".reg .b32 one;", ".reg .f32 d0, d1, d2, d3, zero;", "mov.b32 one, 0x3F803F80;",
             "mov.f32 zero, 0f00000000;"]
    for w in range(v):
        for mma in range(2):
            x = 1 + 4 * w + 2 * mma
            acc = "{zero, zero, zero, zero}" if w == 0 and mma == 0 else "{d0, d1, d2, d3}"
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0, d1, d2, d3}, "
                         f"{{one, one, one, one}}, {{${x}, ${x + 1}}}, {acc};")
    lines.append("mov.b32 $0, d0;")
    return "{\n" + "\n".join(lines) + "\n}"


#: ``_int4_mma_asm`` for one, two and four words a lane (groups of 32, 64 and 128 columns).
_INT4_MMA_ASM_1 = tl.constexpr(_int4_mma_asm(1))
_INT4_MMA_ASM_2 = tl.constexpr(_int4_mma_asm(2))
_INT4_MMA_ASM_4 = tl.constexpr(_int4_mma_asm(4))
#: The same without the zero points, and the group sums of x they then need (``MMA_XSUM``).
_INT4_MMA_RAW_ASM_1 = tl.constexpr(_int4_mma_asm(1, zero_after=True))
_INT4_MMA_RAW_ASM_2 = tl.constexpr(_int4_mma_asm(2, zero_after=True))
_INT4_MMA_RAW_ASM_4 = tl.constexpr(_int4_mma_asm(4, zero_after=True))
_X_SUM_ASM_1 = tl.constexpr(_x_sum_mma_asm(1))
_X_SUM_ASM_2 = tl.constexpr(_x_sum_mma_asm(2))
_X_SUM_ASM_4 = tl.constexpr(_x_sum_mma_asm(4))
#: Four 32-bit words from one 16-byte aligned address (read-only data: x).
_LD_V4_ASM = tl.constexpr("ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];")
#: Two from one 8-byte aligned address.
_LD_V2_ASM = tl.constexpr("ld.global.nc.v2.u32 {$0, $1}, [$2];")
#: The sums of code * x over a word's low nibbles (codes 0, 2, 4, 6) and over its high ones, in
#: bf16x2 as ``_INT4_BF16X2_ASM`` (zero point 0): the two halves of a Q4_K byte belong to
#: different sub-blocks. $2 the word, $3..$6 x paired as its nibbles i and i + 4.
_CODES_BF16X2_ASM = tl.constexpr("""{
.reg .b32 t, v, lo, hi, one, negzero, mask, magic, off;
.reg .f32 f, g;
mov.b32 one, 0x3F803F80;
mov.b32 negzero, 0x80008000;
mov.b32 mask, 0x000F000F;
mov.b32 magic, 0x43004300;
mov.b32 off, 0xC308C308;
lop3.b32 v, $2, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, off;
fma.rn.bf16x2 lo, v, $3, negzero;
shr.u32 t, $2, 4;
lop3.b32 v, t, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, off;
fma.rn.bf16x2 hi, v, $4, negzero;
shr.u32 t, $2, 8;
lop3.b32 v, t, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, off;
fma.rn.bf16x2 lo, v, $5, lo;
shr.u32 t, $2, 12;
lop3.b32 v, t, mask, magic, 0xEA;
fma.rn.bf16x2 v, v, one, off;
fma.rn.bf16x2 hi, v, $6, hi;
shl.b32 t, lo, 16;
and.b32 lo, lo, 0xFFFF0000;
mov.b32 f, t;
mov.b32 g, lo;
add.f32 f, f, g;
mov.b32 $0, f;
shl.b32 t, hi, 16;
and.b32 hi, hi, 0xFFFF0000;
mov.b32 f, t;
mov.b32 g, hi;
add.f32 f, f, g;
mov.b32 $1, f;
}""")
#: Two bf16x2 words from two: (a.lo, b.lo) and (a.hi, b.hi).
_PRMT_ASM = tl.constexpr("prmt.b32 $0, $2, $3, 0x5410;\n\tprmt.b32 $1, $2, $3, 0x7632;")


def _int4_f16x2_asm(words: int) -> str:
    """PTX for ``words`` 32-bit words of int4 codes of one row (one group) times x, in fp16x2
    (sm_53+; ``GemvConfig.f16``), into one float32 ($0). Word j is $(1 + j); $(words + 1) and
    $(words + 2) hold ``-(1024 + zero)`` and ``-(64 + zero)`` in both fp16 halves; x pair i of
    word j (fp16x2, ``_F16_PAIRS_ASM``) is $(words + 3 + 4 j + i). Pair i is nibbles i and i + 4, as in
    ``_INT4_BF16X2_ASM``, but fp16's 10-bit mantissa takes a nibble where it lies: OR-ing
    0x6400 (1024) into ``word & 0x000F000F`` gives 1024 + code, into ``word & 0x00F000F0``
    1024 + 16 code; one add (``-(1024 + zero)``) or FMA (by 1/16, ``-(64 + zero)``) leaves
    code - zero exactly, and ``word >> 8`` serves pairs 2 and 3 the same way: 13 instructions a
    word (bf16x2: 15, plus 5 to sum each word in float32). Every product of the words goes into
    one fp16x2 accumulator (|code - zero| <= 15 and |x| < 2^8 keep a half's 16 products below
    61440, inside fp16's range), whose halves are added in float32 once at the end."""
    lines = [".reg .b32 t, v, acc, mlo, mhi, magic, sixteenth;", ".reg .b16 h0, h1;", ".reg .f32 f0, f1;",
             "mov.b32 mlo, 0x000F000F;", "mov.b32 mhi, 0x00F000F0;", "mov.b32 magic, 0x64006400;",
             "mov.b32 sixteenth, 0x2C002C00;", "mov.b32 acc, 0;"]
    c_lo, c_hi = f"${words + 1}", f"${words + 2}"
    for j in range(words):
        w = f"${1 + j}"
        x = [f"${words + 3 + 4 * j + i}" for i in range(4)]
        for src, pairs in ((w, (0, 1)), ("t", (2, 3))):
            if src == "t":
                lines.append(f"shr.u32 t, {w}, 8;")
            lines += [f"lop3.b32 v, {src}, mlo, magic, 0xEA;", f"add.rn.f16x2 v, v, {c_lo};",
                      f"fma.rn.f16x2 acc, v, {x[pairs[0]]}, acc;",
                      f"lop3.b32 v, {src}, mhi, magic, 0xEA;", f"fma.rn.f16x2 v, v, sixteenth, {c_hi};",
                      f"fma.rn.f16x2 acc, v, {x[pairs[1]]}, acc;"]
    lines += ["mov.b32 {h0, h1}, acc;", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", "add.f32 f0, f0, f1;",
              "mov.b32 $0, f0;"]
    return "{\n" + "\n".join(lines) + "\n}"


#: ``_int4_f16x2_asm`` for the four words of a row a call takes.
_INT4_F16X2_ASM_4 = tl.constexpr(_int4_f16x2_asm(4))
#: Two bf16x2 words a, b ($2, $3) times a float32 power of two ($4) -> two fp16x2 words,
#: ``(a.lo, b.lo)`` and ``(a.hi, b.hi)`` (``_PRMT_ASM``'s pairs, converted; round to nearest).
_F16_PAIRS_ASM = tl.constexpr("""{
.reg .b32 t;
.reg .f32 al, ah, bl, bh;
shl.b32 t, $2, 16;
mov.b32 al, t;
and.b32 t, $2, 0xFFFF0000;
mov.b32 ah, t;
shl.b32 t, $3, 16;
mov.b32 bl, t;
and.b32 t, $3, 0xFFFF0000;
mov.b32 bh, t;
mul.f32 al, al, $4;
mul.f32 ah, ah, $4;
mul.f32 bl, bl, $4;
mul.f32 bh, bh, $4;
cvt.rn.f16x2.f32 $0, bl, al;
cvt.rn.f16x2.f32 $1, bh, ah;
}""")


@triton_helper
def _quads(t):
    """Words 4 a, 4 a + 1, 4 a + 2, 4 a + 3 of t's last dim (a multiple of 4), as four tensors
    with that dim a quarter as long (in registers where a thread holds four consecutive words,
    as the packed loads do: 16-byte vectors)."""
    shape: tl.constexpr = t.shape
    r = tl.reshape(t, (shape[0], shape[1], shape[2] // 4, 2, 2))
    even, odd = tl.split(r)  # 4 a + 2 b + c: on c
    w0, w2 = tl.split(even)  # then on b
    w1, w3 = tl.split(odd)
    return w0, w1, w2, w3


@triton_helper
def _f16_pairs(a, b, scale, ASM: tl.constexpr):
    """``_F16_PAIRS_ASM`` (the interpreter: the same conversions in Triton)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_F16_PAIRS_ASM, "=r,=r,r,r,r", [a, b, scale],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        lo = _f16_pair((a << 16).to(tl.float32, bitcast=True) * scale, (b << 16).to(tl.float32, bitcast=True) * scale)
        hi = _f16_pair((a & -65536).to(tl.float32, bitcast=True) * scale,
                       (b & -65536).to(tl.float32, bitcast=True) * scale)
    return lo, hi


@triton_helper
def _f16_pair(lo, hi):
    """Two float32 tensors rounded to fp16, as one word of fp16x2 bits (lo in the low half)."""
    lo_bits = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi_bits = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo_bits | (hi_bits << 16)


@triton_helper
def _f16_half(p, HIGH: tl.constexpr):
    """One fp16 half of a fp16x2 word, as float32 (the interpreter's stand-in)."""
    bits = (p >> 16) if HIGH else p
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton_helper
def _int4_f16_quad(w0, w1, w2, w3, zero, x0, x1, x2, x3, ASM: tl.constexpr):
    """Four words of int4 codes of a row times x, x given as each word's four fp16x2 pairs
    (x0: word w0's ``(p0, p1, p2, p3)``...): ``_INT4_F16X2_ASM_4``, whose zero-point constants
    come from ``zero`` (int32); the interpreter sums the same products in float32."""
    if ASM:  # -(1024 + zero) is 0xE400 + zero in fp16, -(64 + zero) 0xD400 + 16 zero
        c_lo = (0xE400 + zero) * 0x10001
        c_hi = (0xD400 + 16 * zero) * 0x10001
        return tl.inline_asm_elementwise(
            _INT4_F16X2_ASM_4, "=r" + ",r" * 22,
            [w0, w1, w2, w3, c_lo, c_hi, x0[0], x0[1], x0[2], x0[3], x1[0], x1[1], x1[2], x1[3],
             x2[0], x2[1], x2[2], x2[3], x3[0], x3[1], x3[2], x3[3]],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        z = zero.to(tl.float32)
        return (_int4_f16_word(w0, z, x0) + _int4_f16_word(w1, z, x1)) + (_int4_f16_word(w2, z, x2)
                                                                       + _int4_f16_word(w3, z, x3))


@triton_helper
def _int4_f16_word(w, z, x):
    """The interpreter's sum over one word: nibble i against the low half of pair i, nibble
    i + 4 against its high half (the pairing ``_int4_f16x2_asm`` relies on)."""
    total = tl.full(w.shape, 0.0, tl.float32)
    for i in tl.static_range(4):
        total += (((w >> (4 * i)) & 15).to(tl.float32) - z) * _f16_half(x[i], False)
        total += (((w >> (4 * i + 16)) & 15).to(tl.float32) - z) * _f16_half(x[i], True)
    return total


@triton_helper
def _x_exponent(x32_ptr, first, count, WORDS: tl.constexpr):
    """The largest binary exponent (biased, 8 <= e <= 255) among x's bf16 values in ``count``
    steps of ``WORDS`` 32-bit words from word ``first``: ``GemvConfig.f16`` scales x by 2^(134
    - e), so that every |x| < 2^8 (16 products of codes below 16 stay in fp16), and the sums
    back by 2^(e - 134); the exponent field alone decides it (integer max, no float compare)."""
    emax = tl.full((WORDS,), 0, tl.int32)
    for step in range(0, count):
        xw = tl.load(x32_ptr + first + step * WORDS + tl.arange(0, WORDS))
        emax = tl.maximum(emax, tl.maximum(xw & 0x7F800000, (xw & 0x7F80) << 16))
    return tl.maximum(tl.reduce(emax, 0, MAX) >> 23, 8)


@triton_helper
def _prefetch_rows(q_ptr, rows, rows_ok, stride_qn, first, span, LINES: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetch of ``LINES`` lines (``LINE`` elements of q each) of every row of ``rows``,
    from element ``first`` of the row, within ``span`` elements."""
    if LINES > 0:
        col = tl.arange(0, LINES) * LINE
        ok = rows_ok[:, None] & (col[None, :] < span)
        prefetch_l2(tl.where(ok, q_ptr + rows[:, None].to(tl.int64) * stride_qn + first + col[None, :], q_ptr))


@triton_helper
def _store_silu_mul(out_row_ptr, total, pid_n, N, BLOCK_N: tl.constexpr):
    """``ACT``: a tile's sums [BLOCK_N] (gate rows, then up rows) -> ``silu(gate) * up`` at
    columns ``pid_n * BLOCK_N / 2 ..`` of the output row, each sum first rounded to out's
    dtype (what the GEMV alone would store and the silu kernel read)."""
    HALF: tl.constexpr = BLOCK_N // 2
    gate, up = tl.split(tl.permute(tl.reshape(total, (2, HALF)), (1, 0)))
    dt = out_row_ptr.dtype.element_ty
    y = silu_mul(gate.to(dt).to(tl.float32), up.to(dt).to(tl.float32))
    cols = pid_n * HALF + tl.arange(0, HALF)
    tl.store(out_row_ptr + cols, y.to(dt), mask=cols < N // 2)


@triton_helper
def _sum_splits(ptrs, split_stride, mask, SPLIT_K, UNROLL: tl.constexpr):
    """``sum(ptrs[s * split_stride] for s < SPLIT_K)`` in split order (the split-K partials of
    a tile, float32). ``UNROLL`` > 0: unrolled to that many masked loads, independent of one
    another and of the sums, so they go out together (one trip to L2; see
    ``SPLIT_SUM_UNROLLED``); 0: a run-time loop, a trip a split. Same sums either way."""
    total = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    if UNROLL > 0:
        for s in tl.static_range(1, UNROLL):
            ok = mask & (tl.full(mask.shape, s, tl.int32) < SPLIT_K)
            total += tl.load(ptrs + s * split_stride, mask=ok, other=0.0, cache_modifier=".cg")
    else:
        for s in range(1, SPLIT_K):
            total += tl.load(ptrs + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton_helper
def _norm_when_last(out_ptr, nres_ptr, nw_ptr, ny_ptr, nres_out_ptr, lock_ptr, N, stride_om,
                    stride_nm, eps, M_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Called by a GEMV program once its row tile of out is complete: the last of the grid's
    tiles to complete runs ``rms_norm`` with the residual over every row of out (``NORM``)."""
    tl.debug_barrier()  # every thread's stores of out are issued before the counter moves
    count_ptr = lock_ptr + tl.num_programs(0)  # (past the split-K counters of the row tiles)
    done = tl.atomic_add(count_ptr, 1)  # acq_rel: the other tiles' stores are seen
    if done == tl.num_programs(0) - 1:
        for m in tl.static_range(M_ROWS):
            y = rms_norm_row(out_ptr + m * stride_om, nres_ptr + m * stride_nm, nw_ptr,
                             nres_out_ptr + m * stride_nm, N, eps, True, BLOCK, True)
            cols = tl.arange(0, BLOCK)
            tl.store(ny_ptr + m * stride_nm + cols, y, mask=cols < N)
        tl.atomic_xchg(count_ptr, 0)  # ready for the next launch


@triton_kernel
def _gemv_kernel(
    x_ptr, x32_ptr, q_ptr, q_desc, s_ptr, z_ptr, k_ptr, h_ptr, xs_ptr, bias_ptr, out_ptr, part_ptr,
    lock_ptr, nres_ptr, nw_ptr, ny_ptr, nres_out_ptr, N, K, SPLIT_K, stride_xm, stride_qn,
    stride_sn, stride_kn, stride_hn, stride_xs, stride_om, stride_nm, norm_eps,
    pos_ptr, slot_ptr, cs_ptr, cache_ptr, rope_half, num_q_heads, num_kv_heads, block_size,
    stride_cs, s_kv, s_block, s_head, s_off,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, ACT: tl.constexpr, ROPE: tl.constexpr,
    FMT: tl.constexpr, GROUP: tl.constexpr, CODES: tl.constexpr, NB: tl.constexpr,
    WPB: tl.constexpr, M_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PACKED: tl.constexpr, ASM: tl.constexpr, TMA: tl.constexpr, MMA: tl.constexpr,
    MMA_XSUM: tl.constexpr, PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, Q_BYTES: tl.constexpr,
    PDL_LATE: tl.constexpr, SPLIT_SUM: tl.constexpr, F16: tl.constexpr,
    FP8_MANT: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MAGIC: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``. A K step covers ``NB`` blocks of ``GROUP`` columns
    (one scale each; int8/fp8: one block, scales per row; K formats: a 64-column quarter of a
    super-block, two sub-blocks) of ``WPB`` words of ``CODES`` codes. Weights are ``v a + c``
    with (a0, c0) for even codes of a word and (a1, c1) for odd ones (they differ only in the
    K formats, whose two nibbles of a byte belong to different sub-blocks). ``SPLIT_K`` is a
    run-time value (Triton specializes the value 1: no split, no counters).

    ``PACKED`` (int4, Q4_0, Q4_K; one row of bf16 x, ``x32_ptr`` the same x as 32-bit words): each word's
    eight products in packed bf16x2 arithmetic (``_INT4_BF16X2_ASM``; ``ASM`` False: the same
    products in float32, for the interpreter), times the block's scale in float32. ``F16``
    (int4, Q4_0; ``GemvConfig.f16``): four words of a row at a time in fp16x2 instead
    (``_int4_f16_quad``), x scaled by a power of two per program (``_x_exponent`` over the
    program's share of K).

    ``PDL``: launched with programmatic dependent launch (``launch.pdl``); each program first
    pulls ``PREFETCH_LINES`` 128-byte lines of each of its rows (from its split's first step;
    ``Q_BYTES`` the size of q's elements) into L2, then waits for the kernel before it.

    ``NORM`` (``gemv(..., norm=)``): the ``rms_norm`` after the GEMV with a residual, in the
    same launch. The program that completes the last row tile (counted at ``lock_ptr[grid
    width]``, as split K counts a tile's splits) adds ``nres_ptr`` to each row of out, stores
    that at ``nres_out_ptr`` and the row normalised and scaled by ``nw_ptr`` at ``ny_ptr``
    (rows ``stride_nm`` apart): ``devices.cuda.norm.rms_norm_row``, the norm kernel's own code,
    so the result is the two ops' exactly.

    ``ACT`` (``gemv(..., silu_and_mul=True)``): the weight is gate|up ([2 I, K]) and out [M, I]
    is ``silu_and_mul`` of the product: a program's tile is ``BLOCK_N / 2`` rows of the gate
    half and the same rows of the up half (``rotary.tile_rows``), each rounded to out's dtype as the
    GEMV would store it, then ``activation.silu_mul`` (the silu kernel's code).

    ``ROPE`` (``gemv(..., rotary=)``): the weight is q|k|v ([(Hq + 2 Hk) D, K]); out [M, Hq D]
    gets the rotated queries and the paged cache ``cache_ptr`` the rotated keys and the values
    at each row's slot (``slot_ptr``; position ``pos_ptr``, cos|sin rows ``cs_ptr``): a tile is
    ``BLOCK_N / 2`` dims of a head's first half and the same of its second (``rotary.tile_rows``), so
    that the completing program rotates them (``rotary.store_rotary``)."""
    # One row of x: two FMAs per code become one (a and c applied once per word), as fewer
    # instructions per byte is what bounds a 4-bit GEMV; with more rows, expanding w once wins.
    FOLD: tl.constexpr = M_ROWS == 1 and FMT != 5
    KQ: tl.constexpr = FMT >= 6  # Q4_K, Q5_K, Q6_K: super-blocks of 256 columns
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PAIRED: tl.constexpr = ACT or ROPE
    pair_half = rope_half if ROPE else N // 2
    offs_n, n_ok = tile_rows(pid_n, tl.arange(0, BLOCK_N), N, pair_half, BLOCK_N, PAIRED)
    rows = offs_n[:, None, None]  # [BN, 1, 1]
    row_ok = n_ok[:, None, None]
    blk = tl.arange(0, NB)[None, :, None]  # [1, NB, 1] block of the K step
    wrd = tl.arange(0, WPB)[None, None, :]  # [1, 1, WPB] word of the block
    num_steps = K // BLOCK_K
    per_split = (num_steps + SPLIT_K - 1) // SPLIT_K
    step_begin = pid_k * per_split
    step_end = tl.minimum(step_begin + per_split, num_steps)
    # PDL_LATE (bits: 1 the trigger after the loop, 2 the first words early, 4 x coherent):
    # this program's first step of words and scales goes into registers before the
    # wait (paths that load a step ahead by hand), and the next kernel may launch only once
    # every program is past its loop
    EARLY: tl.constexpr = PDL and (PDL_LATE & 2) != 0 and (MMA or (PACKED and FMT != 6 and not TMA))
    if PDL and not PDL_LATE:  # the next kernel may launch now; the weight is read-only, so its
        # first lines can be fetched while the kernel before finishes (x, the counters and out cannot)
        tl.extra.cuda.gdc_launch_dependents()
        _prefetch_rows(q_ptr, offs_n, n_ok, stride_qn, step_begin * (BLOCK_K // CODES),
                       (step_end - step_begin) * (BLOCK_K // CODES), PREFETCH_LINES, 128 // Q_BYTES)
    if PDL and not EARLY:
        tl.extra.cuda.gdc_wait()
    acc0 = tl.full((BLOCK_N, NB, WPB), 0.0, tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    if MMA:  # int4, one row of bf16 x, on the tensor cores (``_int4_mma_asm``); the next
        # step's loads go out before the current step's math. A 16-row tile is one MMA's rows:
        # lane (g, t) of a warp holds rows g and g + 8 ("lo" / "hi") and, of the K step (one
        # group), the V words t V .. t V + V - 1: [4 (t), 8 (g), RT, V] tensors, which Triton
        # lays out with V words a thread (one vector load), the lanes along t, then g (its
        # first dims after the contiguous one) and the warps along RT; every tensor the MMAs
        # read has that layout (a K step of one group: no dim of the scales is contiguous).
        # ``mma_supported`` checks the compiled kernel's answers once per GPU.
        RT: tl.constexpr = BLOCK_N // 16
        V: tl.constexpr = GROUP // 32
        t4 = tl.arange(0, 4)[:, None, None, None]
        # (with ACT a half tile is whole 16-row tiles, so row g + 8 is row g's next-but-7 too)
        lo_local = tl.arange(0, 8)[None, :, None, None] + 16 * tl.arange(0, RT)[None, None, :, None]
        row_lo, lo_ok = tile_rows(pid_n, lo_local, N, pair_half, BLOCK_N, PAIRED)  # [1, 8, RT, 1]
        hi_ok = tile_rows(pid_n, lo_local + 8, N, pair_half, BLOCK_N, PAIRED)[1]
        wcol = t4 * V + tl.arange(0, V)[None, None, None, :]  # [4, 1, 1, V] word of a step
        lo_ptrs = q_ptr + row_lo * stride_qn + wcol
        hi_ptrs = lo_ptrs + 8 * stride_qn
        x_ptrs = x32_ptr + wcol * 4  # x's columns 8 c .. 8 c + 7 of word c: 16 bytes
        # a scale and a zero per row and step, read by the four lanes t: [4, 8, RT]
        s_local = (tl.arange(0, 8)[None, :, None] + 16 * tl.arange(0, RT)[None, None, :]
                   + 0 * tl.arange(0, 4)[:, None, None])
        srow, s_lo_ok = tile_rows(pid_n, s_local, N, pair_half, BLOCK_N, PAIRED)
        s_hi_ok = tile_rows(pid_n, s_local + 8, N, pair_half, BLOCK_N, PAIRED)[1]
        s_lo_ptrs = s_ptr + srow * stride_sn
        z_lo_ptrs = z_ptr + srow * stride_sn
        step_n = tl.minimum(step_begin, num_steps - 1)  # (a split past the end: unused)
        k_n = step_n * BLOCK_K
        wlo_n = tl.load(lo_ptrs + k_n // 8, mask=lo_ok, other=0)
        whi_n = tl.load(hi_ptrs + k_n // 8, mask=hi_ok, other=0)
        if NUM_STAGES > 1:  # the words two steps ahead (more bytes in flight than registers
            # for one step hold), the scales and x one
            k_nn = tl.minimum(step_begin + 1, num_steps - 1) * BLOCK_K
            wlo_nn = tl.load(lo_ptrs + k_nn // 8, mask=lo_ok, other=0)
            whi_nn = tl.load(hi_ptrs + k_nn // 8, mask=hi_ok, other=0)
        slo_n = tl.load(s_lo_ptrs + k_n // GROUP, mask=s_lo_ok, other=0.0)
        shi_n = tl.load(s_lo_ptrs + 8 * stride_sn + k_n // GROUP, mask=s_hi_ok, other=0.0)
        zlo_n = tl.load(z_lo_ptrs + k_n // GROUP, mask=s_lo_ok, other=0)
        zhi_n = tl.load(z_lo_ptrs + 8 * stride_sn + k_n // GROUP, mask=s_hi_ok, other=0)
        if EARLY:  # (the weight's loads above are out; x is the kernel before's to write)
            tl.extra.cuda.gdc_wait()
        if ASM:
            u0_n, u1_n, u2_n, u3_n = tl.inline_asm_elementwise(
                _LD_V4_ASM, "=r,=r,=r,=r,l", [x_ptrs + k_n // 2], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        else:
            u0_n = tl.load(x_ptrs + k_n // 2)
            u1_n = tl.load(x_ptrs + k_n // 2 + 1)
            u2_n = tl.load(x_ptrs + k_n // 2 + 2)
            u3_n = tl.load(x_ptrs + k_n // 2 + 3)
        acc_lo = tl.full((4, 8, RT), 0.0, tl.float32)
        acc_hi = acc_lo
        for step in tl.range(step_begin, step_end, num_stages=1):  # (prefetched by hand)
            wlo, whi, slo, shi, zlo, zhi = wlo_n, whi_n, slo_n, shi_n, zlo_n, zhi_n
            u0, u1, u2, u3 = u0_n, u1_n, u2_n, u3_n
            k_n = tl.minimum(step + 1, num_steps - 1) * BLOCK_K  # (the last: reloaded, unused)
            if NUM_STAGES > 1:
                wlo_n, whi_n = wlo_nn, whi_nn
                k_nn = tl.minimum(step + 2, num_steps - 1) * BLOCK_K
                wlo_nn = tl.load(lo_ptrs + k_nn // 8, mask=lo_ok, other=0)
                whi_nn = tl.load(hi_ptrs + k_nn // 8, mask=hi_ok, other=0)
            else:
                wlo_n = tl.load(lo_ptrs + k_n // 8, mask=lo_ok, other=0)
                whi_n = tl.load(hi_ptrs + k_n // 8, mask=hi_ok, other=0)
            slo_n = tl.load(s_lo_ptrs + k_n // GROUP, mask=s_lo_ok, other=0.0)
            shi_n = tl.load(s_lo_ptrs + 8 * stride_sn + k_n // GROUP, mask=s_hi_ok, other=0.0)
            zlo_n = tl.load(z_lo_ptrs + k_n // GROUP, mask=s_lo_ok, other=0)
            zhi_n = tl.load(z_lo_ptrs + 8 * stride_sn + k_n // GROUP, mask=s_hi_ok, other=0)
            if ASM:
                u0_n, u1_n, u2_n, u3_n = tl.inline_asm_elementwise(
                    _LD_V4_ASM, "=r,=r,=r,=r,l", [x_ptrs + k_n // 2], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
            else:
                u0_n = tl.load(x_ptrs + k_n // 2)
                u1_n = tl.load(x_ptrs + k_n // 2 + 1)
                u2_n = tl.load(x_ptrs + k_n // 2 + 2)
                u3_n = tl.load(x_ptrs + k_n // 2 + 3)
            if ASM:  # the group's sums of rows g and g + 8 in every lane: the V word positions
                # chained through the MMAs' accumulators; x paired as the codes are
                p0, p1 = tl.inline_asm_elementwise(
                    _PRMT_ASM, "=r,=r,r,r", [u0, u2], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                p2, p3 = tl.inline_asm_elementwise(
                    _PRMT_ASM, "=r,=r,r,r", [u1, u3], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                # -(128 + zero) in both bf16 halves of a word: 0xC300 | zero (zero < 16)
                if MMA_XSUM:  # (not read)
                    nz_lo = zlo.to(tl.int32)
                    nz_hi = nz_lo
                else:
                    nz_lo = (zlo.to(tl.int32) | 0xC300) * 0x10001
                    nz_hi = (zhi.to(tl.int32) | 0xC300) * 0x10001
                if V == 1:
                    q0 = tl.reshape(p0, (4, 1, 1))
                    q1 = tl.reshape(p1, (4, 1, 1))
                    q2 = tl.reshape(p2, (4, 1, 1))
                    q3 = tl.reshape(p3, (4, 1, 1))
                    c_lo, c_hi = tl.inline_asm_elementwise(
                        _INT4_MMA_RAW_ASM_1 if MMA_XSUM else _INT4_MMA_ASM_1, "=r,=r" + ",r" * 8,
                        [tl.reshape(wlo, (4, 8, RT)), tl.reshape(whi, (4, 8, RT)), nz_lo, nz_hi, q0, q1, q2, q3],
                        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                    if MMA_XSUM:
                        xsum = tl.inline_asm_elementwise(_X_SUM_ASM_1, "=r" + ",r" * 4, [q0, q1, q2, q3],
                                                         dtype=tl.float32, is_pure=True, pack=1)
                elif V == 2:
                    wl_0, wl_1 = tl.split(wlo)
                    wh_0, wh_1 = tl.split(whi)
                    p0_0, p0_1 = tl.split(p0)
                    p1_0, p1_1 = tl.split(p1)
                    p2_0, p2_1 = tl.split(p2)
                    p3_0, p3_1 = tl.split(p3)
                    c_lo, c_hi = tl.inline_asm_elementwise(
                        _INT4_MMA_RAW_ASM_2 if MMA_XSUM else _INT4_MMA_ASM_2, "=r,=r" + ",r" * 14,
                        [wl_0, wl_1, wh_0, wh_1, nz_lo, nz_hi, p0_0, p1_0, p2_0, p3_0, p0_1, p1_1, p2_1, p3_1],
                        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                    if MMA_XSUM:
                        xsum = tl.inline_asm_elementwise(
                            _X_SUM_ASM_2, "=r" + ",r" * 8, [p0_0, p1_0, p2_0, p3_0, p0_1, p1_1, p2_1, p3_1],
                            dtype=tl.float32, is_pure=True, pack=1)
                else:  # V = 4: halves of halves (word 2 i + j: split on j, then on i)
                    wl_0, wl_1 = tl.split(tl.reshape(wlo, (4, 8, RT, 2, 2)))
                    wh_0, wh_1 = tl.split(tl.reshape(whi, (4, 8, RT, 2, 2)))
                    p0_0, p0_1 = tl.split(tl.reshape(p0, (4, 1, 1, 2, 2)))
                    p1_0, p1_1 = tl.split(tl.reshape(p1, (4, 1, 1, 2, 2)))
                    p2_0, p2_1 = tl.split(tl.reshape(p2, (4, 1, 1, 2, 2)))
                    p3_0, p3_1 = tl.split(tl.reshape(p3, (4, 1, 1, 2, 2)))
                    wl_00, wl_10 = tl.split(wl_0)
                    wl_01, wl_11 = tl.split(wl_1)
                    wh_00, wh_10 = tl.split(wh_0)
                    wh_01, wh_11 = tl.split(wh_1)
                    p0_00, p0_10 = tl.split(p0_0)
                    p0_01, p0_11 = tl.split(p0_1)
                    p1_00, p1_10 = tl.split(p1_0)
                    p1_01, p1_11 = tl.split(p1_1)
                    p2_00, p2_10 = tl.split(p2_0)
                    p2_01, p2_11 = tl.split(p2_1)
                    p3_00, p3_10 = tl.split(p3_0)
                    p3_01, p3_11 = tl.split(p3_1)
                    c_lo, c_hi = tl.inline_asm_elementwise(
                        _INT4_MMA_RAW_ASM_4 if MMA_XSUM else _INT4_MMA_ASM_4, "=r,=r" + ",r" * 26,
                        [wl_00, wl_01, wl_10, wl_11, wh_00, wh_01, wh_10, wh_11, nz_lo, nz_hi,
                         p0_00, p1_00, p2_00, p3_00, p0_01, p1_01, p2_01, p3_01,
                         p0_10, p1_10, p2_10, p3_10, p0_11, p1_11, p2_11, p3_11],
                        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                    if MMA_XSUM:
                        xsum = tl.inline_asm_elementwise(
                            _X_SUM_ASM_4, "=r" + ",r" * 16,
                            [p0_00, p1_00, p2_00, p3_00, p0_01, p1_01, p2_01, p3_01,
                             p0_10, p1_10, p2_10, p3_10, p0_11, p1_11, p2_11, p3_11],
                            dtype=tl.float32, is_pure=True, pack=1)
                if MMA_XSUM:  # the zero points off: sum (128 + q) x - (128 + zero) sum x
                    zc_lo = ((zlo.to(tl.int32) | 0x4300) << 16).to(tl.float32, bitcast=True)
                    zc_hi = ((zhi.to(tl.int32) | 0x4300) << 16).to(tl.float32, bitcast=True)
                    c_lo = c_lo - zc_lo * xsum
                    c_hi = c_hi - zc_hi * xsum
            else:  # the interpreter runs no assembly: each lane's products in float32, summed
                # over the group's four lanes t as the MMAs do (every lane holds the sums)
                c_lo = tl.full((4, 8, RT, V), 0.0, tl.float32)
                c_hi = c_lo
                zl = zlo.to(tl.float32)[:, :, :, None]
                zh = zhi.to(tl.float32)[:, :, :, None]
                for i in tl.static_range(8):  # nibble i: column 8 c + i, half i % 2 of x word i // 2
                    u = u0 if i < 2 else (u1 if i < 4 else (u2 if i < 6 else u3))
                    xi = ((u << 16) if i % 2 == 0 else (u & -65536)).to(tl.float32, bitcast=True)
                    c_lo += (((wlo >> (4 * i)) & 15).to(tl.float32) - zl) * xi
                    c_hi += (((whi >> (4 * i)) & 15).to(tl.float32) - zh) * xi
                zero = tl.full((4, 8, RT), 0.0, tl.float32)
                c_lo = tl.reduce(tl.reduce(c_lo, 3, SUM), 0, SUM)[None, :, :] + zero
                c_hi = tl.reduce(tl.reduce(c_hi, 3, SUM), 0, SUM)[None, :, :] + zero
            acc_lo += c_lo * slo.to(tl.float32)
            acc_hi += c_hi * shi.to(tl.float32)
        # every lane t of a row holds its sums: keep lane 0's; rows 16 r + 8 h + g
        lane0 = tl.arange(0, 4)[:, None, None] == 0
        tot_lo = tl.reduce(tl.where(lane0, acc_lo, 0.0), 0, SUM)  # [8, RT]
        tot_hi = tl.reduce(tl.where(lane0, acc_hi, 0.0), 0, SUM)
        mma_total = tl.reshape(tl.permute(tl.join(tot_lo, tot_hi), (1, 2, 0)), (BLOCK_N,))
    elif PACKED and FMT != 6:  # int4 / Q4_0, one row of bf16 x; the next step's loads go out first
        w_ptrs = q_ptr + rows * stride_qn + blk * WPB + wrd  # [BN, NB, WPB] words of step 0
        sc_ptrs = offs_n[:, None] * stride_sn + tl.arange(0, NB)[None, :]  # [BN, NB] blocks
        # x's columns of word j as bf16 pairs (32-bit words u0..u3), [1, NB, WPB] pointers:
        # int4, columns 8 j .. 8 j + 7 (one 16-byte load); Q4_0, columns 4 j .. 4 j + 3 (u0, u1)
        # and 4 j + 16 .. 4 j + 19 (u2, u3) of the 32-column block (two 8-byte loads)
        if FMT == 3:
            x_ptrs = x32_ptr + (blk * WPB + wrd) * 4
        else:
            x_ptrs = x32_ptr + blk * 16 + wrd * 2
        step_n = tl.minimum(step_begin, num_steps - 1)  # (a split past the end: unused)
        k_n = step_n * BLOCK_K
        # NUM_STAGES > 1 without TMA: the words two steps ahead by hand (twice the bytes in
        # flight a thread), the scales and x one; with TMA, Triton's pipelining of its loads
        AHEAD2: tl.constexpr = NUM_STAGES > 1 and not TMA
        LOOP_STAGES: tl.constexpr = NUM_STAGES if TMA else 1
        # x through the non-coherent path (``ld.global.nc``, inline PTX), but with PDL_LATE's
        # bit 4 (x through plain coherent loads)
        X_NC: tl.constexpr = ASM and not (PDL and (PDL_LATE & 4) != 0)
        if not TMA:  # (TMA: each step loads its own words, in the loop)
            words_n = tl.load(w_ptrs + k_n // 8, mask=row_ok)
        if AHEAD2:
            words_nn = tl.load(w_ptrs + tl.minimum(step_begin + 1, num_steps - 1) * BLOCK_K // 8, mask=row_ok)
        d_n = tl.load(s_ptr + sc_ptrs + k_n // GROUP, mask=n_ok[:, None], other=0.0)
        z_n = tl.load(z_ptr + sc_ptrs + k_n // GROUP, mask=n_ok[:, None], other=0) if FMT == 3 else d_n
        if EARLY:  # (as in the MMA path)
            tl.extra.cuda.gdc_wait()
        if X_NC and FMT == 3:  # (x32_ptr is 16-byte aligned)
            u0_n, u1_n, u2_n, u3_n = tl.inline_asm_elementwise(
                _LD_V4_ASM, "=r,=r,=r,=r,l", [x_ptrs + k_n // 2], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        elif X_NC:
            u0_n, u1_n = tl.inline_asm_elementwise(
                _LD_V2_ASM, "=r,=r,l", [x_ptrs + k_n // 2], dtype=(tl.int32,) * 2, is_pure=True, pack=1)
            u2_n, u3_n = tl.inline_asm_elementwise(
                _LD_V2_ASM, "=r,=r,l", [x_ptrs + k_n // 2 + 8], dtype=(tl.int32,) * 2, is_pure=True, pack=1)
        else:
            u0_n = tl.load(x_ptrs + k_n // 2)
            u1_n = tl.load(x_ptrs + k_n // 2 + 1)
            u2_n = tl.load(x_ptrs + k_n // 2 + (2 if FMT == 3 else 8))
            u3_n = tl.load(x_ptrs + k_n // 2 + (3 if FMT == 3 else 9))
        if F16:  # x times 2^(134 - e) into fp16, the sums times 2^(e - 134) (``_x_exponent``)
            e = _x_exponent(x32_ptr, step_begin * (BLOCK_K // 2), step_end - step_begin, BLOCK_K // 2)
            x_to_f16 = ((261 - e) << 23).to(tl.float32, bitcast=True)
            x_back = ((e - 7) << 23).to(tl.float32, bitcast=True)
            accq = tl.full((BLOCK_N, NB, WPB // 4), 0.0, tl.float32)
        for step in tl.range(step_begin, step_end, num_stages=LOOP_STAGES):
            u0, u1, u2, u3 = u0_n, u1_n, u2_n, u3_n
            if TMA:  # this step's words through the tensor memory accelerator, which the
                # pipeliner stages NUM_STAGES deep in shared memory (rows past N read as zeros)
                words = tl.reshape(q_desc.load([pid_n * BLOCK_N, step * (BLOCK_K // 8)]), (BLOCK_N, NB, WPB))
            else:
                words = words_n
            d = d_n[:, :, None].to(tl.float32)  # [BN, NB, 1]
            z = z_n[:, :, None].to(tl.float32) if FMT == 3 else 8.0
            if F16:  # (this step's; the next step's come in below)
                zq = z_n[:, :, None].to(tl.int32) if FMT == 3 else tl.full((BLOCK_N, NB, 1), 8, tl.int32)
            step_n = tl.minimum(step + 1, num_steps - 1)  # (the last: reloaded, unused)
            k_n = step_n * BLOCK_K
            if AHEAD2:
                words_n = words_nn
                words_nn = tl.load(w_ptrs + tl.minimum(step + 2, num_steps - 1) * BLOCK_K // 8, mask=row_ok)
            elif not TMA:
                words_n = tl.load(w_ptrs + k_n // 8, mask=row_ok)
            d_n = tl.load(s_ptr + sc_ptrs + k_n // GROUP, mask=n_ok[:, None], other=0.0)
            z_n = tl.load(z_ptr + sc_ptrs + k_n // GROUP, mask=n_ok[:, None], other=0) if FMT == 3 else d_n
            if X_NC and FMT == 3:  # (x32_ptr is 16-byte aligned)
                u0_n, u1_n, u2_n, u3_n = tl.inline_asm_elementwise(
                    _LD_V4_ASM, "=r,=r,=r,=r,l", [x_ptrs + k_n // 2], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
            elif X_NC:
                u0_n, u1_n = tl.inline_asm_elementwise(
                    _LD_V2_ASM, "=r,=r,l", [x_ptrs + k_n // 2], dtype=(tl.int32,) * 2, is_pure=True, pack=1)
                u2_n, u3_n = tl.inline_asm_elementwise(
                    _LD_V2_ASM, "=r,=r,l", [x_ptrs + k_n // 2 + 8], dtype=(tl.int32,) * 2, is_pure=True, pack=1)
            else:
                u0_n = tl.load(x_ptrs + k_n // 2)
                u1_n = tl.load(x_ptrs + k_n // 2 + 1)
                u2_n = tl.load(x_ptrs + k_n // 2 + (2 if FMT == 3 else 8))
                u3_n = tl.load(x_ptrs + k_n // 2 + (3 if FMT == 3 else 9))
            if F16:  # x paired as the codes are (below), in fp16; four words of a row a call
                if FMT == 3:
                    p0, p1 = _f16_pairs(u0, u2, x_to_f16, ASM)
                    p2, p3 = _f16_pairs(u1, u3, x_to_f16, ASM)
                else:
                    p0, p2 = _f16_pairs(u0, u1, x_to_f16, ASM)
                    p1, p3 = _f16_pairs(u2, u3, x_to_f16, ASM)
                w0, w1, w2, w3 = _quads(words)
                a0, a1, a2, a3 = _quads(p0)
                b0, b1, b2, b3 = _quads(p1)
                c0, c1, c2, c3 = _quads(p2)
                e0, e1, e2, e3 = _quads(p3)
                zq = zq + tl.full(w0.shape, 0, tl.int32)
                accq += _int4_f16_quad(w0, w1, w2, w3, zq, (a0, b0, c0, e0), (a1, b1, c1, e1),
                                       (a2, b2, c2, e2), (a3, b3, c3, e3), ASM) * (d * x_back)
            elif ASM:  # x paired as the codes are: p_i the columns of nibbles i and i + 4
                if FMT == 3:  # columns 8 j + i and 8 j + i + 4
                    p0, p1 = tl.inline_asm_elementwise(
                        _PRMT_ASM, "=r,=r,r,r", [u0, u2], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                    p2, p3 = tl.inline_asm_elementwise(
                        _PRMT_ASM, "=r,=r,r,r", [u1, u3], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                else:  # byte t: columns t (low nibble) and t + 16 (high): 4 j + i // 2 (+ 16)
                    p0, p2 = tl.inline_asm_elementwise(
                        _PRMT_ASM, "=r,=r,r,r", [u0, u1], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                    p1, p3 = tl.inline_asm_elementwise(
                        _PRMT_ASM, "=r,=r,r,r", [u2, u3], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                # -(128 + zero) in both bf16 halves of a word
                neg_zero = (-(z + 128.0)).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                acc0 += tl.inline_asm_elementwise(
                    _INT4_BF16X2_ASM, "=r,r,r,r,r,r,r", [words, neg_zero | (neg_zero << 16), p0, p1, p2, p3],
                    dtype=tl.float32, is_pure=True, pack=1) * d
            else:  # the interpreter runs no assembly: the same products, summed in float32
                for i in tl.static_range(8):  # nibble i: bf16 (half) of x word (u)
                    if FMT == 3:  # column 8 j + i: word i // 2, half i % 2
                        u = u0 if i < 2 else (u1 if i < 4 else (u2 if i < 6 else u3))
                        half = i % 2
                    else:  # byte i // 2, +16 columns if high: word (i // 4) (+2), half (i // 2) % 2
                        u = (u0 if i < 4 else u1) if i % 2 == 0 else (u2 if i < 4 else u3)
                        half = (i // 2) % 2
                    xi = ((u << 16) if half == 0 else (u & -65536)).to(tl.float32, bitcast=True)
                    code = ((words >> (4 * i)) & 15).to(tl.float32)
                    acc0 += (code - z) * xi * d
    else:
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
            if PACKED:  # Q4_K (FMT 6), one row of bf16 x: sums of code * x in bf16x2 per word,
                # the low nibbles' (sub-block 2 quarter) and the high nibbles' (+ 1) apart; with
                # v = 1 + q / 16, w = a v + c = (a / 16) q + (a + c), so each half adds
                # (a / 16) sum(q x) + (a + c) sum(x). Byte t of a quarter: columns t and t + 32,
                # so x's words are u0, u1 = columns 4 j .. 4 j + 3 and u2, u3 = 4 j + 32 .. + 35
                xw = x32_ptr + (k0 + blk * 64) // 2 + wrd * 2  # [1, NB, WPB]
                u0 = tl.load(xw)
                u1 = tl.load(xw + 1)
                u2 = tl.load(xw + 16)
                u3 = tl.load(xw + 17)
                xa = (u0 << 16).to(tl.float32, bitcast=True)  # columns 4 j .. 4 j + 3
                xb = (u0 & -65536).to(tl.float32, bitcast=True)
                xc = (u1 << 16).to(tl.float32, bitcast=True)
                xd = (u1 & -65536).to(tl.float32, bitcast=True)
                xe = (u2 << 16).to(tl.float32, bitcast=True)  # columns 4 j + 32 .. 4 j + 35
                xf = (u2 & -65536).to(tl.float32, bitcast=True)
                xg = (u3 << 16).to(tl.float32, bitcast=True)
                xh = (u3 & -65536).to(tl.float32, bitcast=True)
                if ASM:  # nibbles i and i + 4 pair up: columns 4 j + i // 2 (+ 32 for odd i), + 2
                    p0, p2 = tl.inline_asm_elementwise(
                        _PRMT_ASM, "=r,=r,r,r", [u0, u1], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                    p1, p3 = tl.inline_asm_elementwise(
                        _PRMT_ASM, "=r,=r,r,r", [u2, u3], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                    qx_lo, qx_hi = tl.inline_asm_elementwise(
                        _CODES_BF16X2_ASM, "=r,=r,r,r,r,r,r", [words, p0, p1, p2, p3],
                        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                else:  # the interpreter runs no assembly: the same products in float32
                    qx_lo = (((words & 15) - 8).to(tl.float32) * xa + (((words >> 8) & 15) - 8).to(tl.float32) * xb
                             + (((words >> 16) & 15) - 8).to(tl.float32) * xc
                             + (((words >> 24) & 15) - 8).to(tl.float32) * xd)
                    qx_hi = ((((words >> 4) & 15) - 8).to(tl.float32) * xe + (((words >> 12) & 15) - 8).to(tl.float32) * xf
                             + (((words >> 20) & 15) - 8).to(tl.float32) * xg
                             + (((words >> 28) & 15) - 8).to(tl.float32) * xh)
                x_lo = (xa + xb) + (xc + xd)
                x_hi = (xe + xf) + (xg + xh)
                acc0 += (qx_lo * (a0 * 0.0625) + x_lo * (a0 * 1.5 + c0)) + (qx_hi * (a1 * 0.0625) + x_hi * (a1 * 1.5 + c1))
            for i in tl.static_range(0 if PACKED else CODES):
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
            if FOLD and not PACKED:  # sum of w x over a word = a p + c s (w = a v + c)
                acc0 += p0 * a0 + s0 * c0
                if KQ:
                    acc0 += p1 * a1 + s1 * c1
    if PDL and PDL_LATE > 0:  # the words are read: the next kernel's programs may take the SMs
        # this one leaves and load their own first words while the split tails finish
        tl.extra.cuda.gdc_launch_dependents()
    for m in tl.static_range(M_ROWS):
        if m == 0:
            acc = acc0
        elif m == 1:
            acc = acc1
        elif m == 2:
            acc = acc2
        else:
            acc = acc3
        if MMA:
            total = mma_total
        elif PACKED and F16:
            total = tl.reduce(tl.reduce(accq, 2, SUM), 1, SUM)
        else:
            total = tl.reduce(tl.reduce(acc, 2, SUM), 1, SUM)  # [BN]
        if FMT == 4 or FMT == 5:  # per-row (or one) weight scale
            total *= tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        if FMT == 5:  # the activation's scale (per token, or one)
            total *= tl.load(xs_ptr + m * stride_xs).to(tl.float32)
        if SPLIT_K == 1:
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if ACT:
                _store_silu_mul(out_ptr + m * stride_om, total, pid_n, N, BLOCK_N)
            elif ROPE:
                store_rotary(out_ptr + m * stride_om, total, pid_n, tl.load(pos_ptr + m), tl.load(slot_ptr + m),
                              cs_ptr, stride_cs, cache_ptr, rope_half, num_q_heads, num_kv_heads,
                              block_size, s_kv, s_block, s_head, s_off, BLOCK_N,
                              FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
            else:
                tl.store(out_ptr + m * stride_om + offs_n, total.to(out_ptr.dtype.element_ty),
                         mask=n_ok)
        else:
            tl.store(part_ptr + (pid_k * M_ROWS + m) * N + offs_n, total, mask=n_ok)
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partials are stored before the counter moves
        arrived = tl.atomic_add(lock_ptr + pid_n, 1)  # acq_rel: the others' partials are seen
        if arrived == SPLIT_K - 1:  # the last program of this row tile sums, in split order
            for m in tl.static_range(M_ROWS):
                total = _sum_splits(part_ptr + m * N + offs_n, M_ROWS * N, n_ok, SPLIT_K, SPLIT_SUM)
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                if ACT:
                    _store_silu_mul(out_ptr + m * stride_om, total, pid_n, N, BLOCK_N)
                elif ROPE:
                    store_rotary(out_ptr + m * stride_om, total, pid_n, tl.load(pos_ptr + m),
                                  tl.load(slot_ptr + m), cs_ptr, stride_cs, cache_ptr, rope_half,
                                  num_q_heads, num_kv_heads, block_size, s_kv, s_block, s_head, s_off,
                                  BLOCK_N, FP8_MANT, FP8_BIAS, FP8_MAX, FP8_MAGIC)
                else:
                    tl.store(out_ptr + m * stride_om + offs_n, total.to(out_ptr.dtype.element_ty),
                             mask=n_ok)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch
            if NORM:
                _norm_when_last(out_ptr, nres_ptr, nw_ptr, ny_ptr, nres_out_ptr, lock_ptr, N,
                                stride_om, stride_nm, norm_eps, M_ROWS, NORM_BLOCK)
    elif NORM:  # every program completes its tile
        _norm_when_last(out_ptr, nres_ptr, nw_ptr, ny_ptr, nres_out_ptr, lock_ptr, N, stride_om,
                        stride_nm, norm_eps, M_ROWS, NORM_BLOCK)


@triton_kernel
def _dot_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, xs_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_zn, stride_xs, stride_om,
    FMT: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, M_ROWS: tl.constexpr, DOT_T: tl.constexpr,
    MAGIC: tl.constexpr, OFFSET: tl.constexpr, S_T: tl.constexpr, S_BITS: tl.constexpr,
    SCALE_TILE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, Q_BYTES: tl.constexpr, PDL_LATE: tl.constexpr,
    SPLIT_SUM: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``; int4, int8, Q4_0, Q4_1, Q8_0 and fp8 on the tensor
    cores. A K step is ``NG`` groups of ``GROUP`` columns (int8 / fp8: one "group", the step).

    Per group the weight tile is the left operand of ``tl.dot`` against x padded to 16 columns
    (``out^T = W x^T``), so Triton stages the packed tiles in shared memory ``NUM_STAGES`` deep.
    A 32-bit word of codes becomes pairs of ``DOT_T`` values with one shift and one mask each:
    ``(word >> 4i) & 0x000F000F`` holds codes i and i + 4 (8-bit: bytes i and i + 2), and OR-ing
    ``MAGIC`` into both halves makes them ``OFFSET + code`` exactly (fp16 0x6400: 1024 + code;
    bf16 0x4300: 128 + code; float32 converts plainly, ``OFFSET`` 0). The rows of x are loaded
    in that same column order, so the dot needs no shuffles. With ``D = dot(tile, x)`` and ``xs``
    the group's sums of x, the group adds ``a D + c xs``: ``a`` the scale, ``c`` what the zero
    point, minimum and ``OFFSET`` contribute (w = a (OFFSET + code) + c). With ``SCALE_TILE``
    the tile becomes the weights themselves first, ``a (tile - OFFSET - zero) (+ m)`` in
    ``DOT_T`` (the subtraction exact, one rounding), and every group's dot chains into one
    accumulator: no wait on each group's result, ~1 packed instruction a weight more (sm_90
    SASS: 4.45 vs 3.18 a weight for int4; timed on the H200: int4 one layer at one row 101.4
    vs 104.8 us, too little for the extra rounding, so ``CONFIGS`` leaves it off). fp8 tiles convert to
    ``DOT_T`` by the hardware (exact). Scales and zero points are read as 32-bit words, so that
    they are staged too (``S_T``: the scales' dtype inside the words). ``PDL``: as in
    ``_gemv_kernel``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, 16)
    m_ok = offs_m < M
    CODES: tl.constexpr = 8 if (FMT == 0 or FMT == 1 or FMT == 3) else (4 if FMT != 5 else 1)
    PAIRS: tl.constexpr = CODES // 2  # pairs of codes per word
    WORDS: tl.constexpr = GROUP // CODES  # per row and group
    # x is loaded in its own order ([16, GROUP], contiguous, so Triton stages it like the
    # weights) and permuted to the tile's: word j, pair i, half p hold code i + PAIRS p
    x_rows = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # [16, GROUP]
    rows = offs_n[:, None]
    num_steps = K // (GROUP * NG)
    per_split = (num_steps + SPLIT_K - 1) // SPLIT_K
    step_begin = pid_k * per_split
    step_end = tl.minimum(step_begin + per_split, num_steps)
    if PDL:  # (as in _gemv_kernel; PDL_LATE: the trigger after the loop, nothing loaded early)
        if not PDL_LATE:
            tl.extra.cuda.gdc_launch_dependents()
            _prefetch_rows(q_ptr, offs_n, n_ok, stride_qn, step_begin * (GROUP * NG // CODES),
                           (step_end - step_begin) * (GROUP * NG // CODES), PREFETCH_LINES, 128 // Q_BYTES)
        tl.extra.cuda.gdc_wait()
    acc = tl.full((BLOCK_N, 16), 0.0, tl.float32)
    ONE_ROW: tl.constexpr = M_ROWS == 1
    corr = tl.full((BLOCK_N,), 0.0, tl.float32)  # one row of x: the zero points' part of acc
    for step in tl.range(step_begin, step_end, num_stages=NUM_STAGES):
        for g in tl.static_range(NG):
            gi = step * NG + g  # group index along the row
            k0 = gi * GROUP
            xg = tl.load(x_rows + k0, mask=m_ok[:, None], other=0.0)  # [16, GROUP]
            if FMT <= 1:  # GGUF 4-bit: column 16 i0 + 4 j + 2 p + i1 of a block, code 2 i1 + i0
                xg = tl.reshape(xg, (16, GROUP // 32, 2, 4, 2, 2))
                xg = tl.permute(xg, (0, 1, 3, 5, 2, 4))
            elif FMT != 5:  # column CODES j + code
                xg = tl.permute(tl.reshape(xg, (16, WORDS, 2, PAIRS)), (0, 1, 3, 2))
            xg = tl.trans(tl.reshape(xg, (16, GROUP)))  # [GROUP, 16]
            if FMT == 5:  # fp8: [BN, GROUP] e4m3 -> DOT_T
                w8 = tl.load(q_ptr + rows * stride_qn + k0 + tl.arange(0, GROUP)[None, :],
                             mask=n_ok[:, None])
                if DOT_T == tl.float32:  # (the interpreter converts through float32 only)
                    tile = w8.to(tl.float32)
                    xg = xg.to(tl.float32)
                else:
                    tile = w8.to(DOT_T)
                    xg = xg.to(DOT_T)
                acc = tl.dot(tile, xg, acc, input_precision="ieee" if DOT_T == tl.float32 else None)
            else:
                words = tl.load(q_ptr + rows * stride_qn + k0 // CODES + tl.arange(0, WORDS)[None, :],
                                mask=n_ok[:, None], other=0)  # [BN, WORDS]
                shift = tl.arange(0, PAIRS)[None, None, :] * (32 // CODES)
                if CODES == 8:
                    t = (words[:, :, None] >> shift) & 0x000F000F  # [BN, WORDS, PAIRS]
                else:  # signed bytes to offset binary (code + 128)
                    t = ((words[:, :, None] >> shift) & 0x00FF00FF) ^ 0x00800080
                if DOT_T == tl.float32:
                    pair = tl.join(t & 0xFFFF, t >> 16).to(tl.float32)
                else:
                    t = t | MAGIC
                    pair = tl.join(t.to(tl.int16), (t >> 16).to(tl.int16)).to(DOT_T, bitcast=True)
                tile = tl.reshape(pair, (BLOCK_N, GROUP))  # [BN, GROUP], columns as ``col``
                if DOT_T == tl.float32:
                    xg = xg.to(tl.float32)
                else:
                    if x_ptr.dtype.element_ty != DOT_T:  # bf16 x, fp16 tiles: saturate at 65504
                        xg = tl.minimum(tl.maximum(xg.to(tl.float32), -65504.0), 65504.0)
                    xg = xg.to(DOT_T)
                if FMT != 4:  # the group's scale a (32-bit words hold 32 // S_BITS scales), and
                    # w = a (tile - sub) + mn: sub the offset and zero point, mn Q4_1's minimum
                    sw = tl.load(s_ptr + offs_n * stride_sn + gi // (32 // S_BITS),
                                 mask=n_ok, other=0)
                    if S_BITS == 16:
                        sw = (sw >> (16 * (gi % 2))).to(tl.int16)
                    a = sw.to(S_T, bitcast=True).to(tl.float32)
                    mn = tl.full((BLOCK_N,), 0.0, tl.float32)
                    if FMT == 0:  # Q4_0: d (q - 8)
                        sub = tl.full((BLOCK_N,), OFFSET + 8.0, tl.float32)
                    elif FMT == 1:  # Q4_1: d q + m (m: the scales' dtype, in words)
                        mw = tl.load(z_ptr + offs_n * stride_zn + gi // 2, mask=n_ok, other=0)
                        mn = (mw >> (16 * (gi % 2))).to(tl.int16).to(S_T, bitcast=True).to(tl.float32)
                        sub = tl.full((BLOCK_N,), OFFSET, tl.float32)
                    elif FMT == 2:  # Q8_0: d q, q = u - 128
                        sub = tl.full((BLOCK_N,), OFFSET + 128.0, tl.float32)
                    else:  # int4: s (q - zero), four uint8 zeros a word
                        zw = tl.load(z_ptr + offs_n * stride_zn + gi // 4, mask=n_ok, other=0)
                        sub = OFFSET + ((zw >> (8 * (gi % 4))) & 0xFF).to(tl.float32)
                if SCALE_TILE:  # the weights themselves in DOT_T: tile - sub is exact (small
                    # integers), one rounding for the scale; the dots chain in one accumulator
                    w = (tile - sub.to(DOT_T)[:, None]) * a.to(DOT_T)[:, None]
                    if FMT == 1:
                        w = w + mn.to(DOT_T)[:, None]
                    if DOT_T == tl.float32:
                        acc = tl.dot(w, xg, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(w, xg, acc)
                else:
                    if DOT_T == tl.float32:
                        d = tl.dot(tile, xg, input_precision="ieee")
                    else:
                        d = tl.dot(tile, xg)
                    if ONE_ROW:  # the sum of x's only row: a scalar, the correction a [BN] vector
                        xs = tl.reduce(tl.reduce(xg.to(tl.float32), 0, SUM), 0, SUM)
                    else:
                        xs = tl.reduce(xg.to(tl.float32), 0, SUM)[None, :]  # [1, 16]
                    if FMT == 4:  # int8: the row's scale comes at the end
                        acc += d
                        if ONE_ROW:
                            corr += -(OFFSET + 128.0) * xs
                        else:
                            acc += -(OFFSET + 128.0) * xs
                    else:  # w = a (OFFSET + code) + c
                        c = mn - sub * a
                        acc += a[:, None] * d
                        if ONE_ROW:
                            corr += c * xs
                        else:
                            acc += c[:, None] * xs
    if PDL and PDL_LATE > 0:  # (as in _gemv_kernel)
        tl.extra.cuda.gdc_launch_dependents()
    if ONE_ROW:
        acc += corr[:, None]  # (columns past the first are not stored)
    if FMT == 4 or FMT == 5:  # per-row (or one) weight scale
        acc *= tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if FMT == 5:  # the activation's scale (per token, or one)
        acc *= tl.load(xs_ptr + offs_m * stride_xs, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = n_ok[:, None] & m_ok[None, :]
    out_off = offs_m[None, :] * stride_om + offs_n[:, None]  # [BN, 16]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_off = offs_m[None, :] * N + offs_n[:, None]  # [BN, 16] of one split's [M, N]
        tl.store(part_ptr + pid_k * M * N + part_off, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are stored before the counter moves
        arrived = tl.atomic_add(lock_ptr + pid_n, 1)  # acq_rel: the others' partials are seen
        if arrived == SPLIT_K - 1:  # the last program of this row tile sums, in split order
            total = _sum_splits(part_ptr + part_off, M * N, out_mask, SPLIT_K, SPLIT_SUM)
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=out_mask)
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
    """(operands, block_k, group) when the FMA GEMV serves this weight at ``m`` rows, else None."""
    if not 1 <= m <= MAX_M or weight.format not in FORMAT_IDS:
        return None
    ops = _operands(weight)
    if ops is None:
        return None
    k = weight.shape[1]
    cfg = config or config_for(weight.format, m, weight.shape[0]) or FMA_FALLBACK
    group = ops[5]
    # a K step holds whole blocks (K formats: super-blocks), and at least 8 words of a row
    smallest = 256 if weight.format.endswith("_K") else max(group, 32)
    block_k = max(cfg.block_k, smallest)
    while k % block_k and block_k > smallest:
        block_k //= 2
    if k % block_k or (group and block_k % group):
        return None
    return ops, block_k, group or block_k


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` [N, ...] as int32 words per row, or None when its rows are not whole aligned words."""
    t = t.reshape(t.shape[0], -1)
    try:
        return t.view(torch.int32) if _row_major(t) else None
    except RuntimeError:
        return None


def _dot_plan(weight: QuantizedWeight, x: torch.Tensor, config: GemvConfig) -> dict | None:
    """Operands and constexprs of ``_dot_gemv_kernel`` for this weight and x, or None when its
    tensors are not whole 32-bit words per row (the FMA kernel takes it then)."""
    fmt, data, k = weight.format, weight.data, weight.shape[1]
    if fmt in ("int8", "fp8"):  # one scale per row: the "group" is the K step
        group = max(32, min(config.block_k, triton.next_power_of_2(k)))
        while k % group and group > 32:
            group //= 2
        q = data["qweight" if fmt == "int8" else "weight"]
        s = data["scales" if fmt == "int8" else "weight_scale"]
        words = _words(q) if fmt == "int8" else (q if _row_major(q) else None)
        scales, extra = s, s
    else:
        if fmt == "int4":
            q, s, z, group = data["qweight"], data["scales"], data["zeros"], int(weight.meta["group_size"])
        else:  # Q4_0, Q4_1, Q8_0
            q, s, z, group = data["qs"], data["d"], data.get("m", data["d"]), 32
        words, scales, extra = _words(q), _words(s), _words(z)
        if scales is None or extra is None or group & (group - 1) or group < 16:
            return None
    if words is None or k % group:
        return None
    num_groups = max(1, config.block_k // group)
    while (k // group) % num_groups:
        num_groups //= 2
    if x.dtype == torch.float32 or (fmt == "fp8" and is_interpreted(x)):
        dot_t, magic, offset = tl.float32, 0, 0.0
    elif x.dtype == torch.bfloat16 and fmt in ("int4", "Q4_0", "Q4_1"):
        dot_t, magic, offset = tl.bfloat16, 0x43004300, 128.0
    else:  # 8-bit codes need fp16's 10-bit mantissa (bf16 x is saturated to fp16's range)
        dot_t, magic, offset = tl.float16, 0x64006400, 1024.0
    s_dtype = s.dtype if fmt not in ("int8", "fp8") else torch.float32
    # scaled tiles only where the dot's dtype is x's (or float32): w in fp16 for bf16 x could
    # leave bf16's range or lose small weights to fp16's subnormals
    scale_tile = (config.scale_tile and fmt not in ("int8", "fp8")
                  and (dot_t == tl.float32 or _TL_DTYPES.get(x.dtype) == dot_t))
    return {"words": words, "scales": scales, "extra": extra, "num_steps": k // (group * num_groups),
            "FMT": FORMAT_IDS[fmt], "GROUP": group, "NG": num_groups, "DOT_T": dot_t,
            "MAGIC": magic, "OFFSET": offset, "S_T": _TL_DTYPES[s_dtype],
            "S_BITS": s_dtype.itemsize * 8, "SCALE_TILE": scale_tile}


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _split(x: torch.Tensor, num_tiles: int, num_steps: int, cfg: GemvConfig,
           split_k: int | None) -> tuple[int, torch.Tensor | None]:
    """(split_k, counters): K split until the grid has ``cfg.programs_per_sm`` programs per SM.
    A ``split_k`` given is checked: the last program sums at most ``_MAX_SPLIT_K`` partials."""
    if split_k is not None and not 1 <= split_k <= _MAX_SPLIT_K:
        raise ValueError(f"gemv: split_k={split_k} is out of range 1..{_MAX_SPLIT_K}")
    if split_k is None:
        split_k, target = 1, _num_sms(x) * cfg.programs_per_sm
        while num_tiles * split_k < target and split_k * 2 <= min(num_steps, _MAX_SPLIT_K):
            split_k *= 2
    locks = _locks(x, num_tiles) if split_k > 1 else None
    return (split_k, locks) if locks is not None else (1, None)


def gemv(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None, *,
         x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         config: GemvConfig | None = None, split_k: int | None = None,
         norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
         silu_and_mul: bool = False, rotary: tuple | None = None) -> Any:
    """``x [M, K] @ dequant(weight).T (+ bias)`` -> [M, N], or None when this weight or M is not
    served (the caller falls back). fp8 weights take fp8 ``x`` with ``x_scale`` ([M] or a
    scalar) and give ``out_dtype``; ``config`` / ``split_k`` override the tuned choice.

    ``norm=(residual [M, N], weight [N], eps)``: ``rms_norm(out, weight, eps, residual)`` in the
    same launch (the FMA kernel's ``NORM``) -> ``(y, out + residual)``; None where the tiles
    chosen are the tensor-core kernel's, or the norm does not fit (see ``_norm_operands``).
    ``silu_and_mul``: ``weight`` is gate|up [2 I, K] and the answer ``silu_and_mul`` of the
    product, [M, I] (the FMA kernel's ``ACT``); None for the tensor-core tiles, TMA, an odd N,
    or MMA tiles whose halves are not whole 16-row tiles.
    ``rotary=(positions [M], cos_sin_cache [P, D], kv_cache, slot_mapping [M], num_heads,
    kv_layout)``: ``weight`` is q|k|v [(Hq + 2 Hk) D, K] and the answer ``rotary_write_kv`` of
    the product's q, k, v: the rotated q [M, Hq D], the rotated k and v stored in the cache (the
    FMA kernel's ``ROPE``; an fp8 cache gets ``write_kv``'s bytes); None for the tensor-core or
    MMA tiles, TMA, an 8-bit cache of no fp8 format, heads the tiles do not divide (``block_n / 2`` must divide D / 2), a weight not of the cache's heads."""
    m, k = x.shape
    if not 1 <= m <= MAX_M or weight.format not in FORMAT_IDS or x.stride(1) != 1:
        return None
    if norm is not None and not FUSE_NORM or silu_and_mul and not FUSE_SILU or rotary is not None and not FUSE_ROTARY:
        return None
    if rotary is not None and (norm is not None or silu_and_mul):
        return None
    cfg, x32 = (config, None) if config is not None else _tuned(weight, x)
    x32_known = config is None  # (the tuned choice has already looked at the packed path)
    if cfg is None:
        return None
    if norm is not None and cfg.dot and weight.format in DOT_FORMATS:
        return None
    if silu_and_mul and (cfg.dot and weight.format in DOT_FORMATS or cfg.tma
                         or weight.shape[0] % 2 or norm is not None):
        return None
    if rotary is not None and (cfg.dot or cfg.tma or cfg.mma):
        return None
    if cfg.dot and weight.format in DOT_FORMATS:
        planned = _dot_plan(weight, x, cfg)
        if planned is not None:
            return _dot_gemv(x, weight, bias, x_scale, out_dtype, cfg, split_k, planned)
        cfg, x32_known = FMA_FALLBACK, False
    planned = plan(weight, m, cfg)
    if planned is None:
        return None
    (words, s, z, kb, qh, _), block_k, group = planned
    fmt = FORMAT_IDS[weight.format]
    codes = 4 if fmt in (2, 4) else (1 if fmt == 5 else 8)
    if not x32_known:
        x32 = _packed_x(x, weight, cfg)
    mma = (cfg.mma and x32 is not None and fmt == 3 and group in (32, 64, 128)
           and cfg.block_n % 16 == 0 and cfg.block_n // 16 >= cfg.num_warps and mma_supported(x, group, cfg))
    if mma:  # a K step is one group
        block_k = group
    n = weight.shape[0]
    if silu_and_mul and (cfg.block_n % 2 or (mma and cfg.block_n % 32)):
        return None
    rope = rotary_operands(rotary, x, n, cfg.block_n, out_dtype) if rotary is not None else None
    if rotary is not None and rope is None:
        return None
    # (ACT: a tile is half gate rows, half up rows, and writes half as many outputs; ROPE: its
    # tiles cover whole heads, and it writes only q)
    num_tiles = triton.cdiv(n // 2, cfg.block_n // 2) if silu_and_mul else triton.cdiv(n, cfg.block_n)
    out_n = n // 2 if silu_and_mul else (rope["q_size"] if rope is not None else n)
    out = torch.empty(m, out_n, dtype=out_dtype or x.dtype, device=x.device)
    if norm is not None:
        fused = _norm_operands(out, norm, num_tiles)
        if fused is None:
            return None
        res, nw, y, res_out, norm_locks = fused
    split_k, locks = _split(x, num_tiles, k // block_k, cfg, split_k)
    if norm is not None:
        locks = norm_locks
    parts = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    if x_scale is None:
        x_scale = s
    scalar_scale = s.dim() == 0
    desc = _words_descriptor(words, cfg, block_k) if x32 is not None and fmt in (0, 3) and not mma else None
    _gemv_kernel.on(x)[(num_tiles, split_k)](
        x, x32 if x32 is not None else x, words, desc if desc is not None else words, s, z, kb, qh, x_scale,
        bias if bias is not None else out, out, parts, locks if locks is not None else out,
        *((res, nw, y, res_out) if norm is not None else (out,) * 4),
        n, k, split_k, x.stride(0), words.stride(0), 0 if scalar_scale else s.stride(0),
        kb.stride(0) if kb.dim() else 0, qh.stride(0) if qh.dim() else 0,
        0 if x_scale.dim() == 0 else x_scale.stride(0), out.stride(0),
        y.stride(0) if norm is not None else 0, float(norm[2]) if norm is not None else 0.0,
        *(rope["args"] if rope is not None else (out,) * 4 + (0,) * 9),
        NORM=norm is not None, NORM_BLOCK=next_pow2(n) if norm is not None else 1, ACT=silu_and_mul,
        ROPE=rope is not None,
        FMT=fmt, GROUP=group, CODES=codes, NB=block_k // group, WPB=group // codes, M_ROWS=m,
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        NUM_STAGES=cfg.num_stages, PACKED=x32 is not None, ASM=not is_interpreted(x),
        TMA=desc is not None, MMA=mma, MMA_XSUM=mma and cfg.mma_xsum, SPLIT_SUM=_split_sum(),
        F16=cfg.f16 and x32 is not None and fmt in (0, 3) and not mma and group % 32 == 0,
        **(rope["fp8"] if rope is not None else NO_FP8), **_pdl(x, words, prefetch=fmt < 6),
        num_warps=cfg.num_warps)
    return (y, res_out) if norm is not None else out




#: Whether ``gemv(..., norm=)`` fuses (the cuda ``linear_rms_norm`` op) and ``gemv(...,
#: silu_and_mul=True)`` (``linear_silu_and_mul``). Timed on a lent H100 (2026-12-07, int4
#: Llama-3-8B shapes at one row, the device step with graphs, in turns on one built model:
#: ``gpu_quant.py --decode-variant``): 3.254 ms apart, 3.232 with the norm fused, 3.193 with
#: silu fused, 3.182 with both; the logits identical.
FUSE_NORM = True
FUSE_SILU = True
#: Whether ``gemv(..., rotary=)`` fuses (the cuda ``linear_rotary_write_kv`` op): the q|k|v
#: GEMV, then ``rotary_write_kv``, one launch a layer fewer. Timed on a lent H100 (2026-12-07,
#: same method): the int4 8B step at one row 2.954 ms apart, 2.880 fused (-2.5%; the rotary
#: kernel's 0.095 ms a step gone, the GEMVs' time unchanged), the logits identical.
FUSE_ROTARY = True
#: The widest row the fused norm takes (one tile of the program, as the norm kernel's).
_NORM_MAX_N = 16384


def _norm_operands(out: torch.Tensor, norm: tuple, num_tiles: int) -> tuple | None:
    """(residual, weight, y, residual out, counters) for ``gemv(..., norm=)``, or None where the
    fused norm does not serve: rows wider than ``_NORM_MAX_N``, a residual not [M, N] with
    contiguous rows in out's dtype, a norm weight not [N], no counters (growing them is not
    allowed inside a CUDA-graph capture)."""
    residual, weight, _ = norm
    m, n = out.shape
    if (n > _NORM_MAX_N or residual.shape != (m, n) or residual.dtype != out.dtype
            or residual.stride(1) != 1 or weight.shape != (n,)):
        return None
    locks = _locks(out, num_tiles + 1)
    if locks is None:
        return None
    residual = residual if residual.stride(0) == n else residual.contiguous()
    return residual, weight.contiguous(), torch.empty_like(out), torch.empty_like(out), locks


def _words_descriptor(words: torch.Tensor, cfg: GemvConfig, block_k: int):
    """A TMA descriptor of the int32 words [N, K / 8], tiles of ``block_n`` rows by one K step,
    where ``cfg.tma`` asks for one and TMA can address the words (16-byte aligned base and row
    stride, a step of at least 16 bytes); else None."""
    if not cfg.tma or TensorDescriptor is None:
        return None
    try:  # (GGUF blocks: [N, blocks, words] -> [N, words])
        words = words.view(words.shape[0], -1)
    except RuntimeError:
        return None
    row_bytes, step_words = words.stride(0) * 4, block_k // 8
    if words.data_ptr() % 16 or row_bytes % 16 or step_words * 4 % 16 or words.stride(1) != 1:
        return None
    return TensorDescriptor(words, list(words.shape), list(words.stride()), [cfg.block_n, step_words])


def packed_supported(x: torch.Tensor) -> bool:
    """Whether x's device runs the packed path's inline PTX (bf16x2 FMA): an NVIDIA GPU of
    compute capability 8.0 or newer, not ROCm; CPU tensors run its interpreter stand-in."""
    if x.device.type != "cuda":
        return True
    return _has_bf16x2_fma(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _has_bf16x2_fma(device_index: int) -> bool:
    """Per GPU, once (``packed_supported`` runs on every one-row GEMV call)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (8, 0)


#: (GPU index, group, tiles) -> whether the ``MMA`` path's compiled kernel gave the right
#: answers there (``mma_supported``).
_MMA_CHECKED: dict[tuple[int, int, GemvConfig], bool] = {}


def mma_supported(x: torch.Tensor, group: int, cfg: GemvConfig) -> bool:
    """Whether the int4 ``MMA`` path serves one row of ``x`` with these tiles: the packed path's
    GPUs (its PTX), and a check run once per GPU and tiles that the compiled kernel matches the
    dequantized weight. Its MMAs rely on the lane layout Triton picks for the kernel's tensors
    (``_gemv_kernel``); a Triton that lays them out otherwise gives wrong sums, which this
    catches, and the GEMV keeps the bf16x2 FMA path. CPU tensors (the interpreter): always."""
    if x.device.type != "cuda":
        return True
    if not packed_supported(x):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    key = (index, group, cfg)
    ok = _MMA_CHECKED.get(key)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():  # (nothing may run now: the FMA path)
            return False
        _MMA_CHECKED[key] = True  # (the check's own GEMV takes the path)
        try:
            ok = _mma_matches(x.device, group, cfg)
        except Exception:  # e.g. a Triton or driver that refuses the PTX: the FMA path
            logger.warning("int4 GEMV: the tensor-core path failed on this GPU; using the bf16x2 path",
                           exc_info=True)
            ok = False
        _MMA_CHECKED[key] = ok
    return ok


def _mma_matches(device: torch.device, group: int, cfg: GemvConfig) -> bool:
    """One int4 GEMV through the ``MMA`` path on random data against float32 on the dequantized
    weight: two row tiles (the second partial) and K of three groups a split."""
    from portaserve.quant.int_formats import Int4Method  # (int_formats does not import this)

    gen = torch.Generator().manual_seed(7)
    n, k = 2 * cfg.block_n - 8, 6 * group
    weight = Int4Method().quantize(torch.randn(n, k, generator=gen) * 0.05 + 0.01, group_size=group,
                                   symmetric=False).to(device)
    x = torch.randn(1, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    want = x.float() @ weight.dequantize(torch.float32).T
    got = gemv(x, weight, config=cfg, split_k=2, out_dtype=torch.float32)
    ok = got is not None and bool(((got - want).abs().max() <= 1e-3 * want.abs().max()).item())
    if not ok:
        logger.warning("int4 GEMV: the tensor-core path (group %d, %d rows, %d warps) gave wrong sums on "
                       "this GPU / Triton; using the bf16x2 path", group, cfg.block_n, cfg.num_warps)
    return ok


def _packed_x(x: torch.Tensor, weight: QuantizedWeight, cfg: GemvConfig) -> torch.Tensor | None:
    """x as 32-bit words (bf16 pairs) where the FMA kernel takes the packed bf16x2 path: a
    format of ``PACKED_FORMATS``, one row of bf16 x (``cfg.packed``); None otherwise."""
    if not cfg.packed or weight.format not in PACKED_FORMATS or x.dtype != torch.bfloat16 or x.shape[0] != 1:
        return None
    if not packed_supported(x):
        return None
    if x.data_ptr() % 16 or x.shape[1] % 8:  # (x is read 16 bytes at a time)
        return None
    try:
        return x.view(torch.int32)
    except RuntimeError:  # odd K or a misaligned row
        return None


def _dot_gemv(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
              x_scale: torch.Tensor | None, out_dtype: torch.dtype | None, cfg: GemvConfig,
              split_k: int | None, planned: dict) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    words, scales, extra = planned.pop("words"), planned.pop("scales"), planned.pop("extra")
    num_tiles = triton.cdiv(n, cfg.block_n)
    split_k, locks = _split(x, num_tiles, planned.pop("num_steps"), cfg, split_k)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    parts = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    if x_scale is None:
        x_scale = scales
    _dot_gemv_kernel.on(x)[(num_tiles, split_k)](
        x, words, scales, extra, x_scale, bias if bias is not None else out, out, parts,
        locks if locks is not None else out,
        m, n, k, split_k, x.stride(0), words.stride(0), scales.stride(0) if scales.dim() else 0,
        extra.stride(0) if extra.dim() else 0, x_scale.stride(0) if x_scale.dim() else 0,
        out.stride(0), M_ROWS=m, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
        NUM_STAGES=cfg.num_stages, SPLIT_SUM=_split_sum(), num_warps=cfg.num_warps, **_pdl(x, words),
        **planned)
    return out


def _split_sum() -> int:
    """The kernels' ``SPLIT_SUM``: how far ``_sum_splits`` unrolls (0: its run-time loop)."""
    return _MAX_SPLIT_K if SPLIT_SUM_UNROLLED else 0


def _pdl(x: torch.Tensor, words: torch.Tensor, prefetch: bool = True) -> dict:
    """The GEMV kernels' ``PDL`` constexprs and launch option for ``x``'s device: with PDL
    (``GEMV_PDL`` and ``launch.pdl``) each program prefetches ``PDL_PREFETCH_LINES`` lines of each of its rows
    (``prefetch``: formats whose rows hold their codes in K order; not the K formats)."""
    constexprs, options = pdl_options(x) if GEMV_PDL else ({"PDL": False}, {})
    lines = PDL_PREFETCH_LINES if constexprs["PDL"] and prefetch and not PDL_LATE else 0
    return {**constexprs, **options, "PREFETCH_LINES": lines, "Q_BYTES": words.element_size(),
            "PDL_LATE": (1 | (2 if PDL_EARLY_WORDS else 0) | (4 if PDL_X_COHERENT else 0)) if PDL_LATE else 0}
