"""An experiment toward issue 7's int4 batch-1 aim: several one-row int4 GEMVs chained in ONE
persistent launch, with a grid-wide barrier between them instead of a kernel boundary.

Not wired into the engine. It exists to answer one question on a GPU before the device contract
grows a "decode layer" op: how much of the gap between the layer's int4 GEMVs launched one by one
(64 us a Llama-3-8B layer on an H200, 2026-12-07) and a flat read of the same bytes (34 us) comes
from the kernel boundaries (each launch's ramp-up, its split-K tail, the next launch waiting for
the last program of the one before), as opposed to the GEMV's own inner loop. The benchmark is
``benchmarks/gpu_int4_chain.py``.

``chain(x, stages)`` computes ``x -> W0 -> W1 -> ...`` for one row of x, where each stage is
``(weight, act)``: ``act`` False stores ``x @ W.T`` rounded to x's dtype, ``act`` True treats W as
gate|up [2 I, K] and stores ``silu(gate) * up`` [I] (as the engine's ``linear_silu_and_mul``).
Up to ``MAX_STAGES`` stages (a Llama layer's o, gate|up, down and the next q|k|v). With
``norms`` the chain is that layer as the engine runs it: after o and after down the residual
stream gains the output and the next stage takes its RMS norm. A stage that adds the residual
stores ``weight * stream`` (it owns those rows); the next stage's programs each read the whole
stream once, and scale their dot products by ``1 / rms`` (a scalar, so it commutes with the
dot), so the norm costs no extra barrier.

How the launch works: ``num_programs`` programs (as many as are resident at once: programs per
SM x SMs, so the barrier cannot deadlock) each take every ``num_programs``-th row tile of a
stage, each tile over the whole of K (no split K: with this many tiles in flight a stage's rows
keep every SM busy, and nothing needs summing across programs). When a program has stored its
tiles, it asks L2 for the first lines of its first tile of the next stage (a hint: the weight
does not depend on this stage's output), then waits at a counter in global memory until every
program has finished the stage. The last program out resets the counter, so a CUDA graph can
replay the launch.

In Triton's interpreter the programs run one after another, so a barrier would wait forever:
there ``chain`` launches once per stage (``BARRIER`` off), which runs the same stage code, the
launch boundary standing in for the barrier. The compiled path is checked against the same
reference on the GPU (``tests/quant/test_chain.py``, ``PORTASERVE_TEST_DEVICE=cuda``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from portaserve.devices.cuda.launch import (
    SUM,
    is_interpreted,
    prefetch_l2,
    triton_helper,
    triton_kernel,
)
from portaserve.errors import ConfigError
from portaserve.quant.base import QuantizedWeight
from portaserve.quant.gemv_triton import _INT4_BF16X2_ASM, _num_sms
from portaserve.quant.int_formats import pack_nibbles, unpack_nibbles

MAX_STAGES = 4

#: Load-acquire of the barrier counter at GPU scope (the spin's read; compiled kernels only).
_LD_ACQUIRE = tl.constexpr("ld.acquire.gpu.global.u32 $0, [$1];")
#: Four words of x from one 16-byte aligned address, through L2 (``.cg``): x is written by
#: other programs of the same launch, so the read-only path the GEMV uses would be wrong here.
_LD_V4_CG = tl.constexpr("ld.global.cg.v4.u32 {$0, $1, $2, $3}, [$4];")


@dataclass(frozen=True, slots=True)
class ChainConfig:
    """Tiles of the chained launch: ``block_n`` rows a tile, ``block_k`` columns a K step
    (a multiple of the group size), ``num_stages`` of Triton's pipelining of the K loop,
    ``programs_per_sm`` programs an SM (the persistent launch takes fewer where fewer fit an
    SM at once), ``prefetch_lines`` 128-byte lines of each row of a program's next tile asked
    of L2 before the barrier (0: none)."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2
    prefetch_lines: int = 4

    def __str__(self) -> str:
        return (f"{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages} "
                f"pps{self.programs_per_sm} pf{self.prefetch_lines}")


@triton_helper
def _int4_rows(in_ptr, q_ptr, s_ptr, z_ptr, rows, row_ok, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, STAGES_K: tl.constexpr):
    """[BLOCK_N] float32: ``x . dequant(W[row])`` for each of ``rows`` over all K. A group's
    products fold as ``s (sum q x - z sum x)``: one FMA a code."""
    NGS: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    j = tl.arange(0, BLOCK_K // 2)
    g = tl.arange(0, NGS)
    q_rows = q_ptr + rows[:, None].to(tl.int64) * (K // 2)
    s_rows = rows[:, None].to(tl.int64) * (K // GROUP)
    acc = tl.full((BLOCK_N, NGS), 0.0, tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES_K):
        codes = tl.load(q_rows + k0 // 2 + j[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
        xe = tl.load(in_ptr + k0 + 2 * j, cache_modifier=".cg").to(tl.float32)
        xo = tl.load(in_ptr + k0 + 2 * j + 1, cache_modifier=".cg").to(tl.float32)
        prod = (codes & 15).to(tl.float32) * xe[None, :] + (codes >> 4).to(tl.float32) * xo[None, :]
        dots = tl.reduce(tl.reshape(prod, (BLOCK_N, NGS, HALF)), 2, SUM)  # [BN, NGS]
        xsum = tl.reduce(tl.reshape(xe + xo, (NGS, HALF)), 1, SUM)  # [NGS]
        s = tl.load(s_ptr + s_rows + k0 // GROUP + g[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + s_rows + k0 // GROUP + g[None, :], mask=row_ok[:, None], other=0).to(tl.float32)
        acc += s * (dots - z * xsum[None, :])
    return tl.reduce(acc, 1, SUM)


@triton_helper
def _int4_rows_bf16x2(in_ptr, q_ptr, s_ptr, z_ptr, rows, row_ok, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, STAGES_K: tl.constexpr, ASM: tl.constexpr):
    """``_int4_rows`` for bf16 x in the quant GEMV's packed arithmetic, over the chain's own
    layout (``_paired_codes``): 32-bit words [BN, groups, words of a group] whose nibbles i and
    i + 4 hold columns 8 j + 2 i and 8 j + 2 i + 1, so that x's 32-bit word 4 j + i (a bf16 pair)
    lines up with them as it is loaded (no byte permutes), and ``z_ptr`` the group's
    ``-(128 + zero)`` in both bf16 halves (no zero-point math a word). Each word's eight products
    by ``gemv_triton._INT4_BF16X2_ASM``; ``ASM`` False (the interpreter): the same products in
    float32 from the same bits."""
    NB: tl.constexpr = BLOCK_K // GROUP
    WPB: tl.constexpr = GROUP // 8
    x32 = in_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    q32 = q_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    blk = tl.arange(0, NB)[None, :, None]
    wrd = tl.arange(0, WPB)[None, None, :]
    w_ptrs = q32 + rows[:, None, None].to(tl.int64) * (K // 8) + blk * WPB + wrd  # [BN, NB, WPB]
    x_ptrs = x32 + (blk * WPB + wrd) * 4  # [1, NB, WPB]: x's columns 8 j .. 8 j + 7 of word j
    sc = rows[:, None].to(tl.int64) * (K // GROUP) + tl.arange(0, NB)[None, :]  # [BN, NB]
    acc = tl.full((BLOCK_N, NB, WPB), 0.0, tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES_K):
        words = tl.load(w_ptrs + k0 // 8, mask=row_ok[:, None, None], other=0)
        d = tl.load(s_ptr + sc + k0 // GROUP, mask=row_ok[:, None], other=0.0)[:, :, None].to(tl.float32)
        neg_zero = tl.load(z_ptr + sc + k0 // GROUP, mask=row_ok[:, None], other=0)[:, :, None]
        if ASM:
            u0, u1, u2, u3 = tl.inline_asm_elementwise(
                _LD_V4_CG, "=r,=r,=r,=r,l", [x_ptrs + k0 // 2], dtype=(tl.int32,) * 4, is_pure=False, pack=1)
            acc += tl.inline_asm_elementwise(
                _INT4_BF16X2_ASM, "=r,r,r,r,r,r,r", [words, neg_zero, u0, u1, u2, u3],
                dtype=tl.float32, is_pure=True, pack=1) * d
        else:
            z = -((neg_zero << 16).to(tl.float32, bitcast=True)) - 128.0
            for i in tl.static_range(8):  # nibble i: column 8 j + 2 (i % 4) + i // 4, x word 4 j + i % 4
                u = tl.load(x_ptrs + k0 // 2 + i % 4)
                xi = ((u << 16) if i < 4 else (u & -65536)).to(tl.float32, bitcast=True)
                acc += (((words >> (4 * i)) & 15).to(tl.float32) - z) * xi * d
    return tl.reduce(tl.reduce(acc, 2, SUM), 1, SUM)


@triton_helper
def _rows_dot(in_ptr, q_ptr, s_ptr, z_ptr, rows, row_ok, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, STAGES_K: tl.constexpr, PACKED: tl.constexpr, ASM: tl.constexpr):
    """``_int4_rows_bf16x2`` where ``PACKED`` (bf16 activations), else ``_int4_rows``."""
    if PACKED:
        return _int4_rows_bf16x2(in_ptr, q_ptr, s_ptr, z_ptr, rows, row_ok, K, GROUP, BLOCK_N, BLOCK_K, STAGES_K,
                                 ASM)
    return _int4_rows(in_ptr, q_ptr, s_ptr, z_ptr, rows, row_ok, K, GROUP, BLOCK_N, BLOCK_K, STAGES_K)


@triton_helper
def _inv_rms(src_ptr, K, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(src[:K]^2) + eps) in float32, src read through L2 (other programs of the
    launch wrote it)."""
    offs = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_K,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(src_ptr + k0 + offs, cache_modifier=".cg").to(tl.float32)
        acc += v * v
    return 1.0 / tl.sqrt(tl.reduce(acc, 0, SUM) / K + eps)


@triton_helper
def _stage(in_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, K, pid, nprog, r_in, r_out, nw, nsrc, eps,
           ACT: tl.constexpr, RES: tl.constexpr, NRM: tl.constexpr, GROUP: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES_K: tl.constexpr, PACKED: tl.constexpr,
           ASM: tl.constexpr):
    """This program's row tiles of one stage (tiles ``pid``, ``pid + nprog``, ...), stored in
    out's dtype; ``ACT``: rows r of the gate half and r of the up half give out[r]. ``PACKED``:
    bf16 activations through ``_int4_rows_bf16x2``.

    ``NRM``: the input is ``nw_prev * r`` of the stage before, so each dot is multiplied by
    ``1 / rms(r)`` (``nsrc``: that r, read whole by every program). ``RES``: the rounded product
    plus ``r_in`` is stored to ``r_out`` (the residual stream) and ``nw * r_out`` to out (the next
    stage's input, its norm's scale still to come)."""
    n_out = N // 2 if ACT else N
    num_tiles = (n_out + BLOCK_N - 1) // BLOCK_N
    inv = 1.0
    if NRM:
        inv = _inv_rms(nsrc, K, eps, BLOCK_K)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rows < n_out
        y = _rows_dot(in_ptr, q_ptr, s_ptr, z_ptr, rows, ok, K, GROUP, BLOCK_N, BLOCK_K, STAGES_K, PACKED, ASM) * inv
        if ACT:  # each half rounded to out's dtype first, as a GEMV storing gate|up would
            up = _rows_dot(in_ptr, q_ptr, s_ptr, z_ptr, rows + n_out, ok, K, GROUP, BLOCK_N, BLOCK_K, STAGES_K,
                           PACKED, ASM) * inv
            gate = y.to(out_ptr.dtype.element_ty).to(tl.float32)
            up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
            y = gate / (1.0 + tl.exp(-gate)) * up
        if RES:
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.load(r_in + rows, mask=ok, other=0.0).to(tl.float32)
            y = y.to(out_ptr.dtype.element_ty)
            tl.store(r_out + rows, y, mask=ok)
            y = y.to(tl.float32) * tl.load(nw + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton_helper
def _prefetch_first_tile(q_ptr, N, K, pid, ACT: tl.constexpr, BLOCK_N: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for the first ``LINES`` 128-byte lines of each row of this program's first tile
    of a stage (both halves' rows with ``ACT``)."""
    if LINES > 0:
        n_out = N // 2 if ACT else N
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rows < n_out
        cols = tl.arange(0, LINES) * 128
        in_row = ok[:, None] & (cols[None, :] < K // 2)
        ptrs = q_ptr + rows[:, None].to(tl.int64) * (K // 2) + cols[None, :]
        prefetch_l2(tl.where(in_row, ptrs, q_ptr))
        if ACT:
            prefetch_l2(tl.where(in_row, ptrs + n_out * (K // 2), q_ptr))


@triton_helper
def _barrier(counter_ptr, target):
    """Wait until ``target`` arrivals have been counted (this program's included): a release
    add, then load-acquires until the count is reached."""
    tl.debug_barrier()  # every thread's stores of the stage are issued before the count moves
    seen = tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu") + 1  # (one thread a program)
    while seen < target:  # (every thread polls, so each one's later loads follow its acquire)
        seen = tl.inline_asm_elementwise(_LD_ACQUIRE, "=r,l", [counter_ptr], dtype=tl.int32,
                                         is_pure=False, pack=1)


@triton_kernel(no_specialize=("first", "last"))
def _chain_kernel(
    x_ptr, counter_ptr,
    q0, s0, z0, o0, N0, K0, ri0, ro0, nw0, q1, s1, z1, o1, N1, K1, ri1, ro1, nw1,
    q2, s2, z2, o2, N2, K2, ri2, ro2, nw2, q3, s3, z3, o3, N3, K3, ri3, ro3, nw3,
    eps, first, last, BARRIER: tl.constexpr,
    ACT0: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr, ACT3: tl.constexpr,
    RES0: tl.constexpr, RES1: tl.constexpr, RES2: tl.constexpr, RES3: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES_K: tl.constexpr,
    PREFETCH: tl.constexpr, PACKED: tl.constexpr, ASM: tl.constexpr,
):
    """Grid ``(num_programs,)``: stages ``first`` .. ``last`` (inclusive, run-time values: one
    compile serves every stage) of the chain; stage i reads stage i-1's output (stage 0 reads
    x). ``RESi``: stage i adds the residual ``rii`` (stores ``roi``) and hands on ``nwi * roi``;
    stage i+1 then scales its dots by ``1 / rms(roi)`` (the norm's scalar, ``eps`` inside).
    ``BARRIER``: one launch runs them all (``first`` 0), the programs meeting at ``counter_ptr``
    between stages (all programs must be resident)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if first <= 0 and last >= 0:
        _stage(x_ptr, q0, s0, z0, o0, N0, K0, pid, nprog, ri0, ro0, nw0, ro0, eps, ACT0, RES0, False,
               GROUP, BLOCK_N, BLOCK_K, STAGES_K, PACKED, ASM)
        if BARRIER and last >= 1:
            _prefetch_first_tile(q1, N1, K1, pid, ACT1, BLOCK_N, PREFETCH)
            _barrier(counter_ptr, nprog)
    if first <= 1 and last >= 1:
        _stage(o0, q1, s1, z1, o1, N1, K1, pid, nprog, ri1, ro1, nw1, ro0, eps, ACT1, RES1, RES0,
               GROUP, BLOCK_N, BLOCK_K, STAGES_K, PACKED, ASM)
        if BARRIER and last >= 2:
            _prefetch_first_tile(q2, N2, K2, pid, ACT2, BLOCK_N, PREFETCH)
            _barrier(counter_ptr, 2 * nprog)
    if first <= 2 and last >= 2:
        _stage(o1, q2, s2, z2, o2, N2, K2, pid, nprog, ri2, ro2, nw2, ro1, eps, ACT2, RES2, RES1,
               GROUP, BLOCK_N, BLOCK_K, STAGES_K, PACKED, ASM)
        if BARRIER and last >= 3:
            _prefetch_first_tile(q3, N3, K3, pid, ACT3, BLOCK_N, PREFETCH)
            _barrier(counter_ptr, 3 * nprog)
    if first <= 3 and last >= 3:
        _stage(o2, q3, s3, z3, o3, N3, K3, pid, nprog, ri3, ro3, nw3, ro2, eps, ACT3, RES3, RES2,
               GROUP, BLOCK_N, BLOCK_K, STAGES_K, PACKED, ASM)
    if BARRIER:  # the last program out puts the counter back to zero for the next launch
        done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if done == (last + 1) * nprog - 1:
            tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


def _paired_codes(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed path's operands of an int4 weight: the codes with the nibbles of each 32-bit
    word reordered so that nibble i holds column 8 j + 2 i and nibble i + 4 column 8 j + 2 i + 1
    (uint8 [N, K / 2]), and ``-(128 + zero)`` as bf16 in both halves of an int32 [N, K / G]."""
    n, k = weight.shape
    codes = unpack_nibbles(weight.data["qweight"]).view(n, k // 8, 8)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7], device=codes.device)
    # pack_nibbles puts columns 2 t and 2 t + 1 in byte t's low and high nibble: nibble i = column i
    paired = pack_nibbles(codes.index_select(2, order).reshape(n, k)).contiguous()
    half = (-(128.0 + weight.data["zeros"].float())).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return paired, (half | (half << 16)).contiguous()


def _resident_programs(compiled: object, num_warps: int, device: torch.device) -> int:
    """How many programs of a compiled kernel one SM holds at once (registers, threads, shared
    memory): a grid barrier waits forever if some program cannot start before others finish."""
    compiled._init_handles()  # (Triton fills n_regs when it loads the kernel)
    props = torch.cuda.get_device_properties(device)
    threads = num_warps * 32
    regs = -(-max(compiled.n_regs, 1) // 8) * 8  # (allocated 8 registers a thread at a time)
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs * threads)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // threads
    shared = compiled.metadata.shared
    by_shared = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // shared if shared else by_threads
    return min(by_regs, by_threads, by_shared)


class Chain:
    """A chain of int4 GEMV stages over one row of ``dtype`` activations, with its output and
    counter buffers allocated once (so a CUDA graph can capture ``run``).

    ``norms={i: weight}``: a decoder layer's residual and RMS norm between stage i and i + 1,
    as the engine's ``linear_rms_norm`` does it: stage i's output plus the residual stream is
    the new stream (``residuals[i]``), and stage i + 1 takes ``rms_norm(stream, weight, eps)``.
    The stream into the first such stage is ``run``'s ``residual``, into a later one the stream
    the one before left. A Llama layer is ``[o, gate|up (silu), down, next q|k|v]`` with norms
    ``{0: post_attention, 2: the next layer's input}``."""

    def __init__(self, stages: list[tuple[QuantizedWeight, bool]], dtype: torch.dtype,
                 config: ChainConfig | None = None, norms: dict[int, torch.Tensor] | None = None,
                 eps: float = 1e-5) -> None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"chain: activations in {dtype}; float32, float16 or bfloat16", field="dtype")
        if not 1 <= len(stages) <= MAX_STAGES:
            raise ConfigError(f"chain: {len(stages)} stages; 1 to {MAX_STAGES} are supported", field="stages")
        self.config = config or ChainConfig()
        cfg = self.config
        group = None
        k_in = None
        for i, (w, act) in enumerate(stages):
            if w.format != "int4":
                raise ConfigError(f"chain: stage {i} is {w.format}; only int4 chains", field="stages")
            n, k = w.shape
            group = group or w.meta["group_size"]
            if w.meta["group_size"] != group:
                raise ConfigError(f"chain: stage {i} has group size {w.meta['group_size']}, stage 0 {group}",
                                  field="group_size")
            if k_in is not None and k != k_in:
                raise ConfigError(f"chain: stage {i} takes K={k} but stage {i - 1} gives {k_in}", field="stages")
            if k % cfg.block_k or cfg.block_k % group:
                raise ConfigError(f"chain: stage {i}'s K={k} is not a multiple of block_k={cfg.block_k}, "
                                  f"or block_k not of the group size {group}", field="block_k")
            if act and n % 2:
                raise ConfigError(f"chain: stage {i} is gate|up with an odd N={n}", field="stages")
            k_in = n // 2 if act else n
        norms = dict(norms or {})
        for i, weight in norms.items():
            if not 0 <= i < len(stages) - 1:
                raise ConfigError(f"chain: a norm after stage {i}; stages 0 to {len(stages) - 2} have one after them",
                                  field="norms")
            n = stages[i][0].shape[0] // (2 if stages[i][1] else 1)
            if tuple(weight.shape) != (n,):
                raise ConfigError(f"chain: the norm after stage {i} has shape {tuple(weight.shape)}; its output is "
                                  f"[{n}]", field="norms")
        if not eps > 0:
            raise ConfigError(f"chain: eps={eps}; it must be positive", field="eps")
        self.stages = stages
        self.group = group
        self.eps = float(eps)
        self.packed = dtype == torch.bfloat16  # one row of bf16 x: the packed bf16x2 path
        self.operands = []  # (codes, scales, zeros) a stage, as its path reads them
        for w, _ in stages:
            if self.packed:
                codes, neg_zero = _paired_codes(w)
                self.operands.append((codes, w.data["scales"], neg_zero))
            else:
                self.operands.append((w.data["qweight"], w.data["scales"], w.data["zeros"]))
        device = stages[0][0].data["qweight"].device
        self.outs = [torch.empty(w.shape[0] // 2 if act else w.shape[0], dtype=dtype, device=device)
                     for w, act in stages]
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.norms = {i: w.to(device=device, dtype=dtype).contiguous() for i, w in norms.items()}
        self.residuals = {i: torch.empty_like(self.outs[i]) for i in self.norms}
        self._grid: tuple[int] | None = None  # the persistent launch's, once compiled

    def launch_args(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[list, dict]:
        """``_chain_kernel``'s positional arguments up to (not including) ``first, last``, and
        its keywords but ``BARRIER``, for one row ``x`` and the ``residual`` stream (also what
        the sm_90 compile checks use)."""
        cfg = self.config
        args = [x, self.counter]
        acts, res = [], []
        stream = residual
        for i in range(MAX_STAGES):  # (stages past the last repeat it, unused)
            j = min(i, len(self.stages) - 1)
            w, act = self.stages[j]
            if i == j and i in self.norms:  # residual in, residual out, norm weight
                if stream is None:
                    raise ConfigError("chain: the chain has norms; run takes the residual stream", field="residual")
                norm = [stream, self.residuals[i], self.norms[i]]
                stream = self.residuals[i]
            else:  # (unused: any tensor of the dtype)
                norm = [self.outs[j]] * 3
            args += [*self.operands[j], self.outs[j], w.shape[0], w.shape[1], *norm]
            acts.append(act)
            res.append(i == j and i in self.norms)
        args.append(self.eps)
        interpreted = is_interpreted(x)
        common = dict(ACT0=acts[0], ACT1=acts[1], ACT2=acts[2], ACT3=acts[3],
                      RES0=res[0], RES1=res[1], RES2=res[2], RES3=res[3], GROUP=self.group,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES_K=cfg.num_stages,
                      PREFETCH=0 if interpreted else cfg.prefetch_lines, PACKED=self.packed,
                      ASM=not interpreted, num_warps=cfg.num_warps)
        return args, common

    def run(self, x: torch.Tensor, one_launch: bool | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [K0] or [1, K0] -> the last stage's output [N_last] (a buffer reused by the next
        run; the streams the norms left are in ``residuals``). ``one_launch``: the persistent
        launch with its barriers (the default when compiled) or a launch a stage (the
        interpreter's only way; on a GPU, the benchmark's A/B). ``residual``: the stream into the
        first norm's stage (a chain with norms needs it)."""
        x = x.reshape(-1)
        if x.shape[0] != self.stages[0][0].shape[1] or x.dtype != self.outs[0].dtype:
            raise ConfigError(f"chain: x has {tuple(x.shape)} {x.dtype}; stage 0 takes "
                              f"{self.stages[0][0].shape[1]} {self.outs[0].dtype}", field="x")
        if self.norms:
            first = min(self.norms)
            if residual is None:
                raise ConfigError("chain: the chain has norms; run takes the residual stream", field="residual")
            residual = residual.reshape(-1)
            want = self.outs[first]
            if residual.shape != want.shape or residual.dtype != want.dtype:
                raise ConfigError(f"chain: residual has {tuple(residual.shape)} {residual.dtype}; stage {first} "
                                  f"gives {tuple(want.shape)} {want.dtype}", field="residual")
            residual = residual.contiguous()
        elif residual is not None:
            raise ConfigError("chain: a residual was given but the chain has no norms", field="residual")
        if self.packed and x.data_ptr() % 16:  # (the packed path reads x 16 bytes at a time)
            x = x.clone()
        cfg = self.config
        args, common = self.launch_args(x, residual)
        interpreted = is_interpreted(x)
        grid = (cfg.programs_per_sm * _num_sms(x),)
        kernel = _chain_kernel.on(x)
        last = len(self.stages) - 1
        if one_launch is None:
            one_launch = not interpreted
        if one_launch and interpreted:
            raise ConfigError("chain: one persistent launch needs a GPU (the interpreter runs programs one "
                              "after another, so its barrier would wait forever)", field="one_launch")
        if one_launch:
            if self._grid is None:  # compile first: no more programs than can all be resident
                compiled = kernel.warmup(*args, 0, last, grid=grid, BARRIER=True, **common)
                fit = _resident_programs(compiled, cfg.num_warps, x.device)
                if fit < 1:
                    raise ConfigError(f"chain: {cfg} does not fit an SM at all", field="config")
                self._grid = (min(cfg.programs_per_sm, fit) * _num_sms(x),)
            kernel[self._grid](*args, 0, last, BARRIER=True, **common)
        else:  # a launch a stage: the launch boundary stands in for the barrier
            for i in range(len(self.stages)):
                kernel[grid](*args, i, i, BARRIER=False, **common)
        return self.outs[-1]


def reference(x: torch.Tensor, stages: list[tuple[QuantizedWeight, bool]],
              norms: dict[int, torch.Tensor] | None = None, residual: torch.Tensor | None = None,
              eps: float = 1e-5) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The chain through the reference dequant in float32 as the engine's ops compute it, each
    stage's output rounded to x's dtype (gate and up each rounded before ``silu(gate) * up``);
    after stage i in ``norms`` the stream (``residual`` at first) gains the output, rounded, and
    the next stage takes ``rms_norm(stream) * weight``, rounded. -> (the last stage's output,
    {i: the stream after stage i})."""
    h = x.reshape(1, -1)
    stream = None if residual is None else residual.reshape(1, -1)
    streams = {}
    for i, (w, act) in enumerate(stages):
        y = (h.float() @ w.dequantize(torch.float32).T).to(x.dtype)
        if act:
            gate, up = y.float().chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up).to(x.dtype)
        if norms and i in norms:
            stream = (y.float() + stream.float()).to(x.dtype)
            streams[i] = stream.reshape(-1)
            r = stream.float()
            y = (r * torch.rsqrt(r.pow(2).mean() + eps) * norms[i].float()).to(x.dtype)
        h = y
    return h.reshape(-1), streams
