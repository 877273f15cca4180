#!/usr/bin/env python
"""Which GPU kernels a batch-1 decode step of the Llama-3-8B shape spends its time in.

Builds ``random:llama3-8b`` (bf16, or packed with ``--quantization``) on ``cuda`` with CUDA graphs off (so the profiler sees each
kernel; a kernel's duration is the same inside a graph), prefills one 128-token prompt, then
profiles ``--steps`` decode steps with torch.profiler and prints, per kernel family, the GPU
time per step, its share, and the bytes-over-time bandwidth of the GEMMs; beside it the step's
wall time with graphs on (from the same engine rebuilt) and the weight-bytes roofline.

    PYTHONPATH=. python3 benchmarks/profile_cuda_decode.py --steps 20
    PYTHONPATH=. python3 benchmarks/profile_cuda_decode.py --quantization int4 \
        --one-row-config int4=128,128,4,4,mma      # a format, and GEMV tiles as in gpu_quant.py
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_llama8b import copy_bandwidth  # noqa: E402  (the same roofline as the 8B benchmark)

FAMILIES = (  # (label, regex on the kernel name), first match wins
    ("GEMM / GEMV (cuBLAS, nvjet, cutlass)", r"gemm|gemv|nvjet|cutlass|sm90_xmma|splitK"),
    ("attention (Triton)", r"attn|attention"),
    ("rms_norm (+ residual)", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("write_kv", r"write_kv|kv_write|reshape_and_cache"),
    ("silu_and_mul", r"silu"),
    ("sampling / argmax / softmax", r"argmax|softmax|topk|sort|max|reduce"),
    ("copies, casts, indexing", r"copy|cast|index|gather|fill|elementwise|vectorized"),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quantization", default=None, help="a quant format (int4, fp8, Q4_0, ...)")
    p.add_argument("--one-row-config", action="append", default=[], metavar="FMT=BN,BK,WARPS,PPS[,FIELD]",
                   help="GEMV tiles at one row of x (as gpu_quant.py)")
    args = p.parse_args()
    from gpu_quant import model_bytes, set_one_row_config

    from portaserve import LLM, SamplingParams, envs

    for spec in args.one_row_config:
        set_one_row_config(spec)
    build = dict(device="cuda", dtype="bfloat16", quantization=args.quantization, max_model_len=2048,
                 max_num_seqs=8, enable_prefix_caching=False, memory_utilization=0.3)

    os.environ["PORTASERVE_CUDA_GRAPHS"] = "0"
    llm = LLM("random:llama3-8b", **build)
    engine = llm.llm_engine
    _, weight_bytes = model_bytes(engine.model)  # (what a step reads: all but the embedding table)
    prompt = list(range(1000, 1128))
    engine.add_request("p", prompt, SamplingParams(max_tokens=args.steps + 8, ignore_eos=True,
                                                    temperature=0))
    for _ in range(4):  # prefill and warm-up decode steps
        engine.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    totals: dict[str, float] = defaultdict(float)
    other: dict[str, float] = defaultdict(float)
    members: dict[str, dict[str, float]] = defaultdict(dict)
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
        if dev_us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.key.lower()
        for label, pattern in FAMILIES:
            if re.search(pattern, name):
                totals[label] += dev_us
                members[label][evt.key[:90]] = dev_us
                break
        else:
            other[evt.key[:70]] += dev_us
    kernels_ms = sum(totals.values()) / 1e3 / args.steps + sum(other.values()) / 1e3 / args.steps
    bw = copy_bandwidth()
    print(f"random:llama3-8b {args.quantization or 'bf16'} (GEMV kernels: "
          f"{sorted(set(engine.kernels.quant_sources.values())) or 'bf16'}) on {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"PDL {'on' if envs.cuda_pdl() else 'off'}; "
          f"weights {weight_bytes / 1e9:.2f} GB; copy bandwidth {bw / 1e12:.2f} TB/s -> roofline "
          f"{weight_bytes / bw * 1e3:.2f} ms/step")
    print(f"GPU kernel time per decode step (graphs off, {args.steps} steps): {kernels_ms:.3f} ms")
    print("| kernel family | ms / step | share | largest kernels (ms / step) |")
    print("|---|---|---|---|")
    for label, _ in FAMILIES:
        if totals.get(label):
            ms = totals[label] / 1e3 / args.steps
            top = sorted(members[label].items(), key=lambda kv: -kv[1])[:2]
            names = "; ".join(f"{n} {us / 1e3 / args.steps:.3f}" for n, us in top)
            print(f"| {label} | {ms:.3f} | {ms / kernels_ms:.0%} | {names} |")
    rest = sum(other.values()) / 1e3 / args.steps
    print(f"| other | {rest:.3f} | {rest / kernels_ms:.0%} | |")
    gemm_ms = totals.get(FAMILIES[0][0], 0.0) / 1e3 / args.steps
    if gemm_ms:
        print(f"GEMM bandwidth: {weight_bytes / (gemm_ms / 1e3) / 1e12:.2f} TB/s "
              f"({weight_bytes / (gemm_ms / 1e3) / bw:.0%} of copy)")
    for name, us in sorted(other.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  other: {name}: {us / 1e3 / args.steps:.3f} ms/step")
    del llm, engine, prof
    gc.collect()
    torch.cuda.empty_cache()
    os.environ["PORTASERVE_CUDA_GRAPHS"] = "1"
    llm = LLM("random:llama3-8b", **build)
    params = SamplingParams(max_tokens=129, ignore_eos=True, temperature=0)
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([prompt], params)
    step_ms = (time.perf_counter() - t - prefill) / 128 * 1e3
    print(f"decode step with graphs on (async scheduling as configured): {step_ms:.3f} ms")


if __name__ == "__main__":
    main()
