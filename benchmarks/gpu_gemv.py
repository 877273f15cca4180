#!/usr/bin/env python
"""Decode GEMVs of the Llama-3-8B shape on a GPU: cuBLAS (``F.linear``) against the cuda
device's Triton GEMV (``devices/cuda/gemv.py``).

    PYTHONPATH=. python3 benchmarks/gpu_gemv.py [--rows 1 4 8 16] [--sweep]

For each weight of a layer (q|k|v 6144x4096, o 4096x4096, gate|up 28672x4096, down 4096x14336)
and the lm_head (128256x4096), bf16, x of 1..16 rows: time per product and weight bytes over
that time, beside the device-to-device copy bandwidth; the Triton kernel with the tile config
``gemv.tile_config`` picks, and with ``--sweep`` the best of every config tried (top three
printed per shape).

Timing: the products replayed from one CUDA graph over several weight copies (more bytes than
the L2 cache holds), so launch gaps are a graph's, as in a decode step; median of 5 replays.
Every Triton result is checked against cuBLAS on the same random inputs (relative error).
"""

# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_llama8b import copy_bandwidth  # noqa: E402

from portaserve.devices.cuda import gemv  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
DTYPE = torch.bfloat16
COPIES_BYTES = 512 * 2**20  # weights cycled per replay, well over the 50 MB L2


def graph_time(fn, reps: int) -> float:
    """Seconds per call of ``fn(i)`` for i in range(reps), replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(reps):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def weights(n: int, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    count = max(2, COPIES_BYTES // (2 * n * k))
    return [(torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(DTYPE)
            for _ in range(count)]


def configs(n: int, k: int, sweep: bool) -> list[dict[str, int]]:
    out = [gemv.tile_config(n, k)]
    if not sweep:
        return out
    for bn, bk, stages, split in itertools.product((16, 32, 64), (128, 256, 512), (3, 5), (1, 2, 4)):
        cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": stages, "SPLIT_K": split}
        if bn * bk <= 64 * 256 and cfg != out[0]:
            out.append(cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--sweep", action="store_true", help="try every tile config, keep the best")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16")
    rows_out = []
    for name, (n, k) in SHAPES.items():
        ws = weights(n, k, gen)
        for m in args.rows:
            x = (torch.randn(m, k, device="cuda", generator=gen)).to(DTYPE)
            nbytes = 2 * n * k
            t_cublas = graph_time(lambda i: F.linear(x, ws[i % len(ws)]), 2 * len(ws))
            timed = []
            for cfg in configs(n, k, args.sweep):
                try:
                    t = graph_time(lambda i: gemv.gemv(x, ws[i % len(ws)], config=cfg), 2 * len(ws))
                except Exception as e:  # a config that does not compile (shared memory)
                    print(f"  {name} m={m} {cfg}: {type(e).__name__}")
                    continue
                timed.append((t, cfg))
            t_default = timed[0][0]
            timed.sort(key=lambda tc: tc[0])
            t_best, cfg = timed[0]
            err = rel_err(gemv.gemv(x, ws[0]), F.linear(x, ws[0]))
            rows_out.append((f"{name} {n}x{k}", m, t_cublas, t_default, t_best, nbytes, err, cfg))
            top = "; ".join(f"{t * 1e6:.1f} us {c}" for t, c in timed[:3])
            print(f"  {name} m={m}: cuBLAS {t_cublas * 1e6:.1f} us, triton default "
                  f"{t_default * 1e6:.1f} us, best: {top}; err {err:.1e}", flush=True)


    print("\n| weight | rows | cuBLAS us | % copy | Triton us | % copy | best swept us | its config | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, m, tc, tt, tb, nbytes, err, cfg in rows_out:
        print(f"| {label} | {m} | {tc * 1e6:.1f} | {100 * nbytes / tc / bw:.0f}% "
              f"| {tt * 1e6:.1f} | {100 * nbytes / tt / bw:.0f}% | {tb * 1e6:.1f} "
              f"| {cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']} "
              f"k{cfg.get('SPLIT_K', 1)} | {err:.1e} |")
    total_c = sum(r[2] for r in rows_out if r[1] == 1 and "lm_head" not in r[0])
    total_t = sum(r[3] for r in rows_out if r[1] == 1 and "lm_head" not in r[0])
    print(f"\none layer's four GEMVs at batch 1: cuBLAS {total_c * 1e6:.1f} us, Triton "
          f"{total_t * 1e6:.1f} us; x32 layers: {32 * (total_c - total_t) * 1e3:.3f} ms a step saved")

if __name__ == "__main__":
    main()
