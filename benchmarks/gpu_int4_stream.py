#!/usr/bin/env python
"""How fast the bytes of an int4 decode GEMV can be read at all, by access pattern: is the
one-row int4 GEMV (``quant/gemv_triton.py``, ~40-50% of the copy bandwidth) held back by the
way it walks the weight, or by what it does with the words?

    PYTHONPATH=. python3 benchmarks/gpu_int4_stream.py            # on a GPU, ~1-2 minutes
    PYTHONPATH=. python3 benchmarks/gpu_int4_stream.py --dry-run  # tiny shapes, interpreter

For each weight of a Llama-3-8B layer as packed int4 (int32 words, [N, K/8]) it times, in one
run and on the same buffers:

- ``flat``: a grid-stride read of the whole buffer as one contiguous array (the read ceiling);
- ``rows BNxBK ppsP sS``: the GEMV's walk: a program owns ``BN`` rows and a K split, each step reads
  ``BK`` columns (``BK / 2`` bytes) of each of its rows, rows ``K / 2`` bytes apart;
- ``tiles BNxBK``: the same program and step, with the weight laid out so that each step's
  ``BN x BK`` tile is contiguous (what a load-time re-layout would give);
- ``+ scales``: the rows walk also reading each row's float32 scale and uint8 zero per 128-column
  group as the GEMV does, from [N, K / 128] as stored and from a transposed copy;
- ``work W ahead A``: the rows walk with W dependent integer multiply-adds a word (the GEMV
  spends ~27 instructions a word), its loads issued A steps ahead by hand: whether the reads
  go on while the warps compute (time ~ max of the two) or wait for them (~ the sum);
- ``weight in L2`` (weights of at most half the L2): the flat read and the GEMV over one copy
  every call, so the bytes come from L2: the most an L2 prefetch of a small weight (o, q|k|v)
  while the kernel before it runs could give;
- ``gemv``: the real one-row GEMV (tuned config) on the same shape, for the side-by-side, the
  same with its split tail's sums in a run-time loop (``SPLIT_SUM_UNROLLED`` off), with K not split, and with each ``--gemv-config BN,BK,WARPS,PPS`` (``--only-gemv``: just
  these; the flat read stays).

The read kernels only add the words up (one integer add a word), so their time is the memory
system's. K is split as the GEMV splits it (until about ``P`` programs an SM); ``S`` is the
step loop's pipelining (1: loads into registers; 3: Triton's asynchronous copies). Each read
kernel is first checked to sum every word exactly once. Each time is a call's share of a CUDA
graph over weight copies that together exceed the L2 several times; median of replays.
Percent is of the device-to-device copy bandwidth (read + write), the roofline
``gpu_llama8b.py`` uses.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_quant  # noqa: E402  (its CUDA-graph timing)

from portaserve.devices.cuda.launch import SUM, triton_kernel  # noqa: E402

SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
#: (BN rows, BK columns) of a step; BK / 8 words a row.
TILES = ((16, 512), (64, 128), (128, 128))
PROGRAMS_PER_SM = (4, 8)
#: Software pipelining of the step loop: 1 = loads into registers as the GEMV does (its own
#: one-step prefetch aside), 3 = Triton's asynchronous copies through shared memory.
STAGES = (1,)
#: Tiles also timed reading the scales and zeros along.
SCALE_TILES = ((64, 128), (16, 512))
#: The work-overlap experiment (``_work_kernel``): tiles, integer ops a word, steps loaded ahead.
WORK_TILES = ((64, 128), (64, 256))
WORK = (0, 12, 24)
AHEAD = (0, 1, 2)
L2_BYTES = 60 * 2**20
DEV = "cuda"


@triton_kernel
def _flat_kernel(q_ptr, out_ptr, total, BLOCK: tl.constexpr):
    """Grid-stride sum of ``total`` int32 words (``total`` a multiple of BLOCK)."""
    acc = tl.full((BLOCK,), 0, tl.int32)
    offs = tl.arange(0, BLOCK)
    for start in range(tl.program_id(0) * BLOCK, total, tl.num_programs(0) * BLOCK):
        acc += tl.load(q_ptr + start + offs)
    tl.store(out_ptr + tl.program_id(0), tl.reduce(acc, 0, SUM))


@triton_kernel
def _rows_kernel(q_ptr, s_ptr, z_ptr, out_ptr, k_words, per_split, stride_s, stride_g,
                 TILED: tl.constexpr, SZ: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
    """Program (tile, split) sums its ``BN`` rows over words ``split * per_split ..`` in steps
    of ``BKW`` words a row; ``TILED``: each step's ``BN x BKW`` block is contiguous (row tiles
    of ``k_words / BKW`` blocks each). ``SZ``: each step also reads the rows' float32 scale and
    uint8 zero of its 128-column group, as the GEMV does, at ``row * stride_s + group *
    stride_g`` (row-major [N, K / 128]: stride_g 1; transposed [K / 128, N]: stride_s 1)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BN)[:, None]
    c = tl.arange(0, BKW)[None, :]
    acc = tl.full((BN, BKW), 0, tl.int32)
    sacc = tl.full((BN, 1), 0.0, tl.float32)
    begin = pid_k * per_split
    for kw in range(begin, tl.minimum(begin + per_split, k_words), BKW):
        if TILED:
            ptrs = q_ptr + (pid_n.to(tl.int64) * BN * k_words + kw * BN) + r * BKW + c
        else:
            ptrs = q_ptr + (pid_n * BN + r).to(tl.int64) * k_words + kw + c
        acc += tl.load(ptrs)
        if SZ:
            sz = (pid_n * BN + r) * stride_s + (kw // 16) * stride_g
            sacc += tl.load(s_ptr + sz) * tl.load(z_ptr + sz).to(tl.float32)
    total = tl.reduce(tl.reduce(acc, 1, SUM), 0, SUM)
    if SZ:  # (the scales' sum only keeps their loads; it is never checked)
        total += (tl.reduce(tl.reduce(sacc, 1, SUM), 0, SUM) == 12345.0).to(tl.int32)
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, total)


@triton_kernel
def _work_kernel(q_ptr, out_ptr, k_words, per_split, BN: tl.constexpr, BKW: tl.constexpr,
                 WORK: tl.constexpr, AHEAD: tl.constexpr):
    """The rows walk with ``WORK`` dependent integer multiply-adds (``w * w + c``) on every word after its load
    (IMAD issues at half the FFMA rate on Hopper, so 12 is about the issue time of the GEMV's ~27 instructions a word), its loads issued ``AHEAD``
    steps before the step that uses them (0: load, then work; 1 and 2: by hand into registers,
    as the GEMV prefetches one step): does the memory stay busy while the warps work?"""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    ptrs = q_ptr + (pid_n * BN + tl.arange(0, BN)[:, None]).to(tl.int64) * k_words + tl.arange(0, BKW)[None, :]
    acc = tl.full((BN, BKW), 0, tl.int32)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, k_words)
    last = end - BKW
    if AHEAD >= 1:
        w_n = tl.load(ptrs + begin)
    if AHEAD >= 2:
        w_nn = tl.load(ptrs + tl.minimum(begin + BKW, last))
    for kw in range(begin, end, BKW):
        if AHEAD == 0:
            w = tl.load(ptrs + kw)
        elif AHEAD == 1:
            w = w_n
            w_n = tl.load(ptrs + tl.minimum(kw + BKW, last))
        else:
            w = w_n
            w_n = w_nn
            w_nn = tl.load(ptrs + tl.minimum(kw + 2 * BKW, last))
        for _ in tl.static_range(WORK):
            w = w * w + 1013904223  # (w * w: nothing for the compiler to fold)
        acc += w
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.reduce(tl.reduce(acc, 1, SUM), 0, SUM))


def time_calls(calls) -> float:
    """Microseconds a call: ``gpu_quant.time_calls`` (the calls back to back in one CUDA graph,
    median of replays; on CPU the host time of one pass, which only checks the script)."""
    gpu_quant.DEV = DEV
    return gpu_quant.time_calls(calls, reps=10) * 1e3


def check_covers(call, words: torch.Tensor, out: torch.Tensor, programs: int) -> None:
    """The read kernel summed every word exactly once: its partial sums add up to the buffer's
    (int32, wrapping)."""
    out.zero_()
    call()
    got = int(out[:programs].to(torch.int64).sum()) % 2**32
    want = int(words.to(torch.int64).sum()) % 2**32
    if got != want:
        raise AssertionError(f"a read kernel missed or repeated words: sum {got} != {want}")


def split_for(num_tiles: int, num_steps: int, target: int) -> int:
    """The GEMV's split of K: doubled until the grid has ``target`` programs (at most 16)."""
    split = 1
    while num_tiles * split < target and split * 2 <= min(num_steps, 16):
        split *= 2
    return split


def rows_call(words: torch.Tensor, out: torch.Tensor, bn: int, bk: int, pps: int, sms: int, tiled: bool,
              stages: int, scales: tuple | None = None):
    """One read kernel's launch (and its program count); ``scales``: (scales, zeros, transposed)
    read along as the GEMV reads them."""
    n, k_words = words.shape
    bkw = bk // 8
    tiles, steps = n // bn, k_words // bkw
    split = split_for(tiles, steps, sms * pps)
    per_split = -(-steps // split) * bkw
    sc, zr, transposed = scales if scales is not None else (words, words, False)
    stride_s, stride_g = (1, n) if transposed else (k_words // 16, 1)
    return partial(_rows_kernel.on(words)[(tiles, split)], words, sc, zr, out, k_words, per_split, stride_s,
                   stride_g, TILED=tiled, SZ=scales is not None, BN=bn, BKW=bkw, num_warps=4,
                   num_stages=stages), tiles * split


def main() -> None:
    global DEV, SHAPES, TILES, PROGRAMS_PER_SM, STAGES, SCALE_TILES, WORK_TILES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of {','.join(SHAPES)} (default: all)")
    p.add_argument("--gemv-config", action="append", default=[], metavar="BN,BK,WARPS,PPS[,FIELD...]",
                   help="also time the GEMV with these one-row tiles (repeatable; FIELD: a boolean "
                        "GemvConfig field set true, e.g. 128,128,4,2,f16)")
    p.add_argument("--only-gemv", action="store_true", help="skip the read kernels")
    args = p.parse_args()
    if args.dry_run:
        DEV, TILES, PROGRAMS_PER_SM, STAGES = "cpu", ((16, 128),), (4,), (1,)
        SCALE_TILES = WORK_TILES = ((16, 128),)
        SHAPES = {"o": (64, 256)}
    from portaserve.quant import gemv_triton, registry

    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
    if DEV == "cuda":
        from gpu_llama8b import copy_bandwidth

        copy_bps = copy_bandwidth()
        print(f"{torch.cuda.get_device_name(0)}, {sms} SMs; torch {torch.__version__}, triton "
              f"{triton.__version__}; copy bandwidth {copy_bps / 1e12:.2f} TB/s (read + write); "
              f"int4 group 128, one row of bf16 x for the GEMV")
    else:
        copy_bps = 1e9
    gen = torch.Generator(device=DEV).manual_seed(0)
    table = []
    for name in (args.shapes or ",".join(SHAPES)).split(","):
        n, k = SHAPES[name]
        copies = max(2, -(-4 * L2_BYTES // (n * k // 2))) if DEV == "cuda" else 2
        first = registry.quantize(torch.randn(n, k, device=DEV, generator=gen) * 0.02, "int4")
        weights = [first] + [registry.quantize(torch.randn(n, k, device=DEV, generator=gen) * 0.02, "int4")
                             for _ in range(copies - 1)]
        words = [w.data["qweight"].view(torch.int32) for w in weights]
        nbytes = words[0].numel() * 4
        out = torch.empty(1 << 16, dtype=torch.int32, device=DEV)
        results = []
        flat_programs = sms * 8
        flat = [partial(_flat_kernel.on(q)[(flat_programs,)], q, out, q.numel(), BLOCK=2048, num_warps=4)
                for q in words]
        check_covers(flat[0], words[0], out, flat_programs)
        results.append(("flat", time_calls(flat)))
        if not args.only_gemv:
            for bn, bk in TILES:
                for pps in PROGRAMS_PER_SM:
                    for tiled, stages in itertools.product((False, True), STAGES):
                        label = f"{'tiles' if tiled else 'rows'} {bn}x{bk} pps{pps} s{stages}"
                        calls = [rows_call(q, out, bn, bk, pps, sms, tiled, stages) for q in words]
                        check_covers(calls[0][0], words[0], out, calls[0][1])
                        results.append((label, time_calls([c for c, _ in calls])))
            for bn, bk in SCALE_TILES:  # the GEMV's scale and zero reads along, as stored / transposed
                for transposed in (False, True):
                    sz = [(w.data["scales"].float().contiguous(), w.data["zeros"].contiguous(), False) for w in weights]
                    if transposed:
                        sz = [(sc.t().contiguous(), zr.t().contiguous(), True) for sc, zr, _ in sz]
                    calls = [rows_call(q, out, bn, bk, 4, sms, False, 1, t) for q, t in zip(words, sz, strict=True)]
                    check_covers(calls[0][0], words[0], out, calls[0][1])
                    label = f"rows {bn}x{bk} pps4 s1 + scales{' transposed' if transposed else ''}"
                    results.append((label, time_calls([c for c, _ in calls])))
            for (bn, bk), pps, work, ahead in itertools.product(WORK_TILES, PROGRAMS_PER_SM, WORK, AHEAD):
                bkw = bk // 8
                tiles, steps = n // bn, (k // 8) // bkw
                split = split_for(tiles, steps, sms * pps)
                per_split = -(-steps // split) * bkw
                calls = [partial(_work_kernel.on(q)[(tiles, split)], q, out, k // 8, per_split, BN=bn, BKW=bkw,
                                 WORK=work, AHEAD=ahead, num_warps=4, num_stages=1) for q in words]
                if work == 0:
                    check_covers(calls[0], words[0], out, tiles * split)
                results.append((f"rows {bn}x{bk} pps{pps} work {work} ahead {ahead}", time_calls(calls)))
        dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
        x = torch.randn(1, k, device=DEV, generator=gen).to(dtype)
        results.append(("gemv (tuned)", time_calls([partial(gemv_triton.gemv, x, w) for w in weights])))
        for spec in args.gemv_config:
            bn_, bk_, warps, pps = (int(v) for v in spec.split(",")[:4])
            flags = spec.split(",")[4:]
            cfg = gemv_triton.GemvConfig(bn_, bk_, num_warps=warps, programs_per_sm=pps,
                                         **gpu_quant.config_fields(flags))
            results.append((f"gemv {bn_}x{bk_} w{warps} pps{pps}" + "".join(f" {f}" for f in flags),
                            time_calls([partial(gemv_triton.gemv, x, w, config=cfg) for w in weights])))
        if nbytes * 2 <= L2_BYTES:  # the same weight every call: its bytes come from L2 after the
            # first (what an L2 prefetch during the kernel before could give a small weight)
            results.append(("flat, weight in L2", time_calls([flat[0]] * copies)))
            results.append(("gemv (tuned), weight in L2",
                            time_calls([partial(gemv_triton.gemv, x, weights[0])] * copies)))
        gemv_triton.SPLIT_SUM_UNROLLED = False  # the split tail's run-time loop, for the A/B
        results.append(("gemv (tuned), split sums in a loop",
                        time_calls([partial(gemv_triton.gemv, x, w) for w in weights])))
        gemv_triton.SPLIT_SUM_UNROLLED = True
        results.append(("gemv (tuned), no split K", time_calls([partial(gemv_triton.gemv, x, w, split_k=1)
                                                                  for w in weights])))
        for label, us in results:
            pct = 100 * nbytes / (us * 1e-6) / copy_bps
            print(f"{name} {n}x{k} ({nbytes / 1e6:.1f} MB codes): {label:24s} {us:8.1f} us  {pct:5.1f}% copy")
            table.append((name, label, us, pct))
        del weights, words
    print("\n| weight | read | us | % copy |\n|---|---|---|---|")
    for name, label, us, pct in table:
        print(f"| {name} | {label} | {us:.1f} | {pct:.0f}% |")


if __name__ == "__main__":
    main()
