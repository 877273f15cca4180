#!/usr/bin/env python
"""Where the time of the offline-throughput run goes, on the Llama-3-8B shape on ``cuda``.

Runs the 1000-in / 1000-out throughput workload of ``gpu_llama8b.py`` (random bf16 weights,
ignore EOS) and records every engine step: how many prompt tokens and decode rows it carried
and its wall time (with async scheduling a step's wall time is the device time of one step in
steady state). It prints the run's time split into steps that carry prompt tokens (chunked
prefill, mixed with decodes) and decode-only steps by batch size, then the GPU kernel families
of a few steps of each kind from torch.profiler (kernels inside CUDA graphs included).

    PYTHONPATH=. python3 benchmarks/profile_cuda_throughput.py --kv-cache-dtype fp8
    PYTHONPATH=. python3 benchmarks/profile_cuda_throughput.py --kv-cache-dtype fp8 --quantization fp8
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_cuda_decode import FAMILIES  # noqa: E402

from portaserve import LLM, SamplingParams  # noqa: E402
from portaserve.core.loaders.synthetic import PRESETS  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_families(prof: object, steps: int) -> list[tuple[str, float, str]]:
    """(family, GPU ms per step, its two largest kernels) from a finished profiler."""
    totals: dict[str, float] = defaultdict(float)
    members: dict[str, dict[str, float]] = defaultdict(dict)
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
        if not torch.cuda.is_available():  # a CPU dry run: CPU operators stand in for kernels
            dev_us = evt.self_cpu_time_total if evt.key.startswith("aten::") else 0.0
        elif evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if dev_us <= 0:
            continue
        name = evt.key.lower()
        label = next((lab for lab, pat in FAMILIES if re.search(pat, name)), "other")
        totals[label] += dev_us
        members[label][evt.key[:80]] = members[label].get(evt.key[:80], 0.0) + dev_us
    rows = []
    for label, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        top = sorted(members[label].items(), key=lambda kv: -kv[1])[:2]
        rows.append((label, us / 1e3 / steps, "; ".join(f"{n} {u / 1e3 / steps:.2f}" for n, u in top)))
    return rows


def print_profile(title: str, prof: object, steps: int, wall_ms: float) -> None:
    rows = kernel_families(prof, steps)
    total = sum(ms for _, ms, _ in rows)
    print(f"\n{title}: GPU kernels {total:.2f} ms/step, wall {wall_ms:.2f} ms/step")
    print("| kernel family | ms / step | share | largest kernels (ms / step) |")
    print("|---|---|---|---|")
    for label, ms, top in rows:
        print(f"| {label} | {ms:.2f} | {ms / total:.0%} | {top} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--decode-profile-after", type=int, default=1500, help="steps before the decode profile")
    p.add_argument("--profile-steps", type=int, default=6)
    p.add_argument("--preset", default="llama3-8b", help="a random: preset (tiny: a CPU dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=400, help="stop the run after this long")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile

    llm = LLM(f"random:{args.preset}", device=args.device,
              dtype="bfloat16" if args.device == "cuda" else "auto", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_batched_tokens, kv_cache_dtype=args.kv_cache_dtype,
              quantization=args.quantization)
    engine = llm.llm_engine
    print(f"{engine.device_description}; torch {torch.__version__}; KV {engine.kv_capacity_tokens} tokens "
          f"({args.kv_cache_dtype}); weights {args.quantization or 'bf16'}; async "
          f"{engine.async_scheduling}; max_num_seqs {args.max_num_seqs}, batched tokens "
          f"{args.max_batched_tokens}; {args.num_prompts} x {args.input_len} in / {args.output_len} out",
          flush=True)
    llm.generate([list(range(100, 228))], SamplingParams(max_tokens=8, ignore_eos=True))  # warm up

    steps: list[tuple[int, int, int]] = []  # (prompt tokens, decode rows, requests) per step
    schedule = engine.scheduler.schedule

    def recording_schedule():  # noqa: ANN202
        out = schedule()
        decode = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        steps.append((out.num_batched_tokens - decode, decode, len(out.scheduled)))
        return out

    engine.scheduler.schedule = recording_schedule
    rng = random.Random(0)
    vocab = PRESETS[args.preset].vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind="final_only")
    for i in range(args.num_prompts):
        engine.add_request(f"t{i}", [rng.randrange(100, vocab) for _ in range(args.input_len)], params)
    sync()
    walls: list[float] = []
    profiled: dict[str, tuple[object, float, list[tuple[int, int, int]]]] = {}
    tokens = 0
    start = last = time.perf_counter()
    while engine.has_unfinished_requests() and last - start < args.budget_s:
        kind = None
        if steps and len(walls) == 8 and "mixed" not in profiled:
            kind = "mixed"  # early steps: full prompt chunks beside the first decodes
        elif (steps and steps[-1][0] == 0 and steps[-1][1] >= 0.9 * args.max_num_seqs
              and "decode" not in profiled and len(walls) > args.decode_profile_after):
            kind = "decode"  # deep into the run: a full decode batch at long contexts
        if kind:
            with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(args.profile_steps):
                    for out in engine.step():
                        tokens += sum(len(c.token_ids) for c in out.outputs) if out.finished else 0
                sync()
                wall = (time.perf_counter() - t0) / args.profile_steps * 1e3
            profiled[kind] = (prof, wall, steps[-args.profile_steps:])
            now = time.perf_counter()
            walls += [(now - last) / args.profile_steps] * args.profile_steps
            last = now
            continue
        for out in engine.step():
            if out.finished:
                tokens += sum(len(c.token_ids) for c in out.outputs)
        now = time.perf_counter()
        walls.append(now - last)
        last = now
    elapsed = last - start
    steps = steps[: len(walls)]
    print(f"\n{tokens} output tokens in {elapsed:.1f} s = {tokens / elapsed:,.0f} tok/s over "
          f"{len(walls)} steps (profiled steps included)")
    mixed = [(s, w) for s, w in zip(steps, walls, strict=True) if s[0] > 0]
    decode = [(s, w) for s, w in zip(steps, walls, strict=True) if s[0] == 0]
    print("| steps | count | seconds | share | prompt tokens | decode rows | ms / step |")
    print("|---|---|---|---|---|---|---|")
    for name, group in (("with prompt tokens", mixed), ("decode only", decode)):
        secs = sum(w for _, w in group)
        print(f"| {name} | {len(group)} | {secs:.1f} | {secs / elapsed:.0%} | "
              f"{sum(s[0] for s, _ in group):,} | {sum(s[1] for s, _ in group):,} | "
              f"{secs / max(len(group), 1) * 1e3:.2f} |")
    print("\ndecode-only steps by batch size:")
    print("| rows | count | seconds | ms / step | rows / ms |")
    print("|---|---|---|---|---|")
    buckets: dict[int, list[float]] = defaultdict(list)
    for s, w in decode:
        buckets[min(s[1] // 64 * 64, args.max_num_seqs)].append(w)
    for lo in sorted(buckets):
        ws = buckets[lo]
        ms = sum(ws) / len(ws) * 1e3
        print(f"| {lo}-{lo + 63} | {len(ws)} | {sum(ws):.1f} | {ms:.2f} | {(lo + 32) / ms:.1f} |")
    for kind, (prof, wall, window) in profiled.items():
        desc = ", ".join(f"{pt} prompt tok + {dr} decode" for pt, dr, _ in window[:2])
        print_profile(f"{kind} steps ({desc}, ...)", prof, args.profile_steps, wall)


if __name__ == "__main__":
    main()
