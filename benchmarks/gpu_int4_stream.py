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
- ``gemv``: the real one-row GEMV (tuned config) on the same shape, for the side-by-side.

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
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portaserve.devices.cuda.launch import SUM, triton_kernel  # noqa: E402

SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
#: (BN rows, BK columns) of a step; BK / 8 words a row.
TILES = ((16, 512), (32, 256), (64, 128), (64, 256), (128, 128), (32, 512), (128, 256))
PROGRAMS_PER_SM = (4, 8)
#: Software pipelining of the step loop: 1 = loads into registers as the GEMV does (its own
#: one-step prefetch aside), 3 = Triton's asynchronous copies through shared memory.
STAGES = (1, 3)
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
def _rows_kernel(q_ptr, out_ptr, k_words, per_split, TILED: tl.constexpr, BN: tl.constexpr,
                 BKW: tl.constexpr):
    """Program (tile, split) sums its ``BN`` rows over words ``split * per_split ..`` in steps
    of ``BKW`` words a row; ``TILED``: each step's ``BN x BKW`` block is contiguous (row tiles
    of ``k_words / BKW`` blocks each)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BN)[:, None]
    c = tl.arange(0, BKW)[None, :]
    acc = tl.full((BN, BKW), 0, tl.int32)
    begin = pid_k * per_split
    for kw in range(begin, tl.minimum(begin + per_split, k_words), BKW):
        if TILED:
            ptrs = q_ptr + (pid_n.to(tl.int64) * BN * k_words + kw * BN) + r * BKW + c
        else:
            ptrs = q_ptr + (pid_n * BN + r).to(tl.int64) * k_words + kw + c
        acc += tl.load(ptrs)
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.reduce(tl.reduce(acc, 1, SUM), 0, SUM))


def time_calls(calls, reps: int = 10) -> float:
    """Microseconds a call: the calls back to back in one CUDA graph, median of replays (on CPU:
    host time of one pass, meaningless beyond checking the script)."""
    for fn in calls:
        fn()
    if DEV != "cuda":
        t0 = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


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
              stages: int):
    n, k_words = words.shape
    bkw = bk // 8
    tiles, steps = n // bn, k_words // bkw
    split = split_for(tiles, steps, sms * pps)
    per_split = -(-steps // split) * bkw
    return partial(_rows_kernel.on(words)[(tiles, split)], words, out, k_words, per_split, TILED=tiled, BN=bn,
                   BKW=bkw, num_warps=4, num_stages=stages), tiles * split


def main() -> None:
    global DEV, SHAPES, TILES, PROGRAMS_PER_SM, STAGES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of {','.join(SHAPES)} (default: all)")
    args = p.parse_args()
    if args.dry_run:
        DEV, TILES, PROGRAMS_PER_SM, STAGES = "cpu", ((16, 128),), (4,), (1,)
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
        for bn, bk in TILES:
            for pps in PROGRAMS_PER_SM:
                for tiled, stages in itertools.product((False, True), STAGES):
                    label = f"{'tiles' if tiled else 'rows'} {bn}x{bk} pps{pps} s{stages}"
                    calls = [rows_call(q, out, bn, bk, pps, sms, tiled, stages) for q in words]
                    check_covers(calls[0][0], words[0], out, calls[0][1])
                    results.append((label, time_calls([c for c, _ in calls])))
        dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
        x = torch.randn(1, k, device=DEV, generator=gen).to(dtype)
        results.append(("gemv (tuned)", time_calls([partial(gemv_triton.gemv, x, w) for w in weights])))
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
