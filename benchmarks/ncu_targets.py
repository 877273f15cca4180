#!/usr/bin/env python
"""One kernel at a time, on real shapes, for Nsight Compute (or any profiler) to look inside.

Each target builds its inputs (random, never zeros), launches the kernel a few times to compile
and warm it, prints its median time (CUDA events), then launches it ``--launches`` more times
between ``cudaProfilerStart`` / ``cudaProfilerStop``, so a profiler started with
``--profile-from-start off`` sees only those:

    ncu --clock-control none --profile-from-start off --set full -k regex:_decode_attn_kernel -c 1 \\
        python3 benchmarks/ncu_targets.py attn-fp8
    ncu --clock-control none --profile-from-start off --set full -k regex:gemv -c 1 \\
        python3 benchmarks/ncu_targets.py gemv-int4

(``--clock-control none``: the device notes ask to leave the clocks alone.) Targets:

- ``attn-fp8`` / ``attn-bf16``: the decode attention of one layer over an fp8 e4m3 / bf16 paged
  cache, ``--batch`` requests of ``--context`` tokens (default 488 x 1036: a decode step of the
  fp8 1000/1000 run's profile, where the fp8 kernel read at 66-71% of the copy bandwidth);
- ``gemv-int4`` / ``gemv-fp8`` / ``gemv-q4_k``: the quant GEMV at one row over gate|up
  (28672 x 4096; int4 streams ~1.4 TB/s there), ``gemv-bf16`` the bf16 one.

    python benchmarks/ncu_targets.py attn-fp8 --device cpu --tiny     # CPU: checks the script

It also prints the result's error against the reference (``devices/reference.py``): for fp8 the
reference is weight-only, so ~1e-2 there is the activation's per-token quantization (W8A8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portaserve.core.batch import build_batch  # noqa: E402

KV_HEADS, HEADS, HEAD_DIM, BLOCK = 8, 32, 128, 16
TARGETS = ("attn-fp8", "attn-bf16", "gemv-int4", "gemv-fp8", "gemv-q4_k", "gemv-bf16")
#: (launch, reference result, bytes a launch must read, what it runs on)
Target = tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], int, str]


def attention_target(args: argparse.Namespace, fp8: bool) -> Target:
    from portaserve.devices.cuda import attention

    dev, gen = torch.device(args.device), torch.Generator().manual_seed(0)
    batch_size, ctx = (2, 40) if args.tiny else (args.batch, args.context)
    blocks_each = -(-ctx // BLOCK)
    pool = torch.randperm(batch_size * blocks_each + 8, generator=gen).tolist()  # scattered blocks
    items = [(f"r{i}", [1], ctx - 1, [pool.pop() for _ in range(blocks_each)], True) for i in range(batch_size)]
    batch = build_batch(items, BLOCK)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    cache = torch.randn(2, batch_size * blocks_each + 8, KV_HEADS, BLOCK, HEAD_DIM, generator=gen).to(dev, dtype)
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
    query = torch.randn(batch_size, HEADS, HEAD_DIM, generator=gen).to(dev, dtype)
    attn = batch.attention_metadata(dev)
    scale = HEAD_DIM**-0.5
    nbytes = 2 * batch_size * ctx * KV_HEADS * HEAD_DIM * cache.element_size()
    from portaserve.devices import reference

    if args.attn_config:  # BLOCK_N,num_warps,num_stages of the decode kernel for this cache
        config = attention.DECODE_CONFIG_FP8 if fp8 else attention.DECODE_CONFIG
        config.update(zip(("BLOCK_N", "num_warps", "num_stages"), map(int, args.attn_config.split(",")), strict=True))

    def want() -> torch.Tensor:
        return reference.paged_attention(query, cache, attn, scale, kv_layout="blocks_hnd")

    shape = f"{batch_size} requests x {ctx} tokens of context, {'fp8 e4m3' if fp8 else 'bf16'} cache"
    return (lambda: attention.paged_attention(query, cache, attn, scale)), want, nbytes, shape


def gemv_target(args: argparse.Namespace, fmt: str) -> Target:
    from portaserve.quant import registry
    from portaserve.quant.gguf_formats import GGUF_FORMATS, GGUFMethod

    dev, gen = torch.device(args.device), torch.Generator().manual_seed(0)
    n, k = (64, 256) if args.tiny else (28672, 4096)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    x = torch.randn(1, k, generator=gen).to(dev, dtype)
    shape = f"one row x {fmt} weight {n} x {k}"
    if fmt == "bf16":
        from portaserve.devices.cuda.gemv import gemv

        w = (torch.randn(n, k, generator=gen) * 0.02).to(dev, dtype)
        return (lambda: gemv(x, w)), (lambda: x.float() @ w.float().t()), w.numel() * w.element_size(), shape
    if fmt in GGUF_FORMATS:
        weight = GGUFMethod(fmt).random(n, k, device=dev, generator=gen)
    else:
        weight = registry.quantize(torch.randn(n, k, generator=gen) * 0.02, fmt).to(dev)
    if fmt == "fp8":
        from portaserve.quant.kernels_triton import fp8_quant_linear as fn
    else:
        from portaserve.quant.kernels_triton import triton_quant_linear as fn
    from portaserve.devices import reference

    return (lambda: fn(x, weight)), (lambda: reference.quant_linear(x.float(), weight, None)), weight.nbytes, shape


def build(args: argparse.Namespace) -> Target:
    kind, _, what = args.target.partition("-")
    if kind == "attn":
        return attention_target(args, what == "fp8")
    return gemv_target(args, {"q4_k": "Q4_K"}.get(what, what))


def median_ms(fn: Callable[[], object], device: str, iters: int = 20) -> float:
    if device == "cpu":
        import time

        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # > the 60 MB L2
    for _ in range(iters):
        flush.zero_()  # a GEMV's 58 MB weight would otherwise be served partly from the L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--batch", type=int, default=488)
    p.add_argument("--context", type=int, default=1036)
    p.add_argument("--launches", type=int, default=3, help="launches inside the profiled range")
    p.add_argument("--device", default="cuda")
    p.add_argument("--attn-config", default=None, help="attention targets: BLOCK_N,num_warps,num_stages")
    p.add_argument("--tiny", action="store_true", help="small shapes (with --device cpu: a dry run)")
    args = p.parse_args()
    fn, want, nbytes, shape = build(args)
    for _ in range(3):  # compile, warm
        out = fn()
    expected = want().float()
    err = ((out.float() - expected).abs().max() / expected.abs().max()).item()  # against the reference
    if args.device != "cpu":
        torch.cuda.synchronize()
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, torch {torch.__version__}"
    else:
        where = f"cpu (interpreter), torch {torch.__version__}"
    ms = median_ms(fn, args.device)
    print(f"{args.target} on {where}: {shape}; {nbytes / 1e6:.1f} MB read a launch; median "
          f"{ms:.4f} ms = {nbytes / ms / 1e9:.0f} GB/s; max error against the reference {err:.1e} "
          "of the largest value")
    if args.device != "cpu":
        torch.cuda.cudart().cudaProfilerStart()
    for _ in range(args.launches):
        fn()
    if args.device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
