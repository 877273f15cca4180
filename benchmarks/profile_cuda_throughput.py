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
import cProfile
import io
import pstats
import random
import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_cuda_decode import FAMILIES  # noqa: E402

from portaserve import LLM, SamplingParams  # noqa: E402
from portaserve.core.engine import _LaunchedStep  # noqa: E402
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


def idle_gaps(prof: object, steps: int) -> str:
    """Where the GPU sat idle between kernels in the profiled window: the idle time per step by
    gap length, and the longest gaps with the kernels around them."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if len(spans) < 2:
        return ""
    gaps, end, last = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, last, name))
        if stop > end:
            end, last = stop, name
    buckets = {"< 5 us": 0.0, "5-50 us": 0.0, "50-500 us": 0.0, ">= 500 us": 0.0}
    for us, _, _ in gaps:
        key = "< 5 us" if us < 5 else "5-50 us" if us < 50 else "50-500 us" if us < 500 else ">= 500 us"
        buckets[key] += us
    lines = ["GPU idle per step by gap length: " + ", ".join(
        f"{k} {v / 1e3 / steps:.2f} ms" for k, v in buckets.items())]
    for us, before, after in sorted(gaps, reverse=True)[:6]:
        lines.append(f"  idle {us / 1e3:.2f} ms after {before[:60]} before {after[:60]}")
    return "\n".join(lines)


def print_profile(title: str, prof: object, steps: int, wall_ms: float) -> None:
    rows = kernel_families(prof, steps)
    total = sum(ms for _, ms, _ in rows)
    print(f"\n{title}: GPU kernels {total:.2f} ms/step, wall {wall_ms:.2f} ms/step")
    if torch.cuda.is_available():
        print(idle_gaps(prof, steps))
    print("| kernel family | ms / step | share | largest kernels (ms / step) |")
    print("|---|---|---|---|")
    for label, ms, top in rows:
        print(f"| {label} | {ms:.2f} | {ms / total:.0%} | {top} |")


def compiled_variants() -> str:
    """Per Triton kernel of the cuda device and the quant kernels: how many specializations
    were compiled (each one is a compile, ~1 s, the first time its argument pattern shows up)."""
    import gc as _gc

    from portaserve.devices.cuda.launch import TritonKernel

    counts = []
    for obj in _gc.get_objects():
        if isinstance(obj, TritonKernel) and obj._compiled is not None:
            caches = getattr(obj._compiled, "device_caches", {})
            n = sum(len(c[0]) for c in caches.values()) if caches else len(getattr(obj._compiled, "cache", {}))
            counts.append(f"{obj.__name__} {n}")
    return ", ".join(sorted(counts))


def host_profile(engine: object, steps: int) -> str:
    """cProfile of ``steps`` engine steps: the host functions that take the most time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(16)
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(16)
    return f"\nhost profile of {steps} steps (cProfile, by own time, then cumulative):\n" + buf.getvalue()


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
    p.add_argument("--sync-debug", action="store_true",
                   help="report host calls that wait for the GPU in steps 3-8 (torch sync debug mode)")
    p.add_argument("--host-profile", action="store_true",
                   help="cProfile a few full decode steps, early prompt steps, and two prompt steps launched "
                        "right after a decode step")
    p.add_argument("--preset", default="llama3-8b", help="a random: preset (tiny: a CPU dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=400, help="stop the run after this long")
    p.add_argument("--memory-utilization", type=float, default=None,
                   help="share of GPU memory for weights + KV cache (TensorRT-LLM's runs: 0.95)")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile

    llm = LLM(f"random:{args.preset}", device=args.device,
              dtype="bfloat16" if args.device == "cuda" else "auto", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_batched_tokens, kv_cache_dtype=args.kv_cache_dtype,
              quantization=args.quantization, memory_utilization=args.memory_utilization)
    engine = llm.llm_engine
    print(f"{engine.device_description}; torch {torch.__version__}; KV {engine.kv_capacity_tokens} tokens "
          f"({args.kv_cache_dtype}); weights {args.quantization or 'bf16'}; async "
          f"{engine.async_scheduling}; max_num_seqs {args.max_num_seqs}, batched tokens "
          f"{args.max_batched_tokens}; {args.num_prompts} x {args.input_len} in / {args.output_len} out",
          flush=True)
    llm.generate([list(range(100, 228))], SamplingParams(max_tokens=8, ignore_eos=True))  # warm up

    #: per step: (prompt tokens, decode rows, requests, tokens in cache after it)
    steps: list[tuple[int, int, int, int]] = []
    phases: dict[str, float] = defaultdict(float)  # host seconds of the current step, by phase
    host: list[dict[str, float]] = []  # per step
    schedule, launch, complete = engine.scheduler.schedule, engine._launch, engine._complete
    wait_token_ids = _LaunchedStep.wait_token_ids

    def timed(name, fn):  # noqa: ANN001, ANN202
        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] += time.perf_counter() - t0
        return call

    def recording_schedule():  # noqa: ANN202
        out = timed("schedule", schedule)()
        decode = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        context = sum(s.num_computed_before + s.num_new_tokens for s in out.scheduled)
        steps.append((out.num_batched_tokens - decode, decode, len(out.scheduled), context))
        return out

    engine.scheduler.schedule = recording_schedule
    engine._launch = timed("launch", launch)
    engine._complete = timed("complete", complete)
    _LaunchedStep.wait_token_ids = timed("wait", wait_token_ids)  # inside complete
    rng = random.Random(0)
    vocab = PRESETS[args.preset].vocab_size
    cfg = PRESETS[args.preset]
    kv_itemsize = 1 if args.kv_cache_dtype.startswith("fp8") else 2
    kv_token_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind="final_only")
    for i in range(args.num_prompts):
        engine.add_request(f"t{i}", [rng.randrange(100, vocab) for _ in range(args.input_len)], params)
    sync()
    walls: list[float] = []
    profiled: dict[str, tuple[object, float, list[tuple[int, int, int, int]]]] = {}
    tokens = 0
    syncs: dict[str, int] = defaultdict(int)
    transition_profiles: list[tuple[tuple[int, int, int, int], object]] = []
    start = last = time.perf_counter()
    while engine.has_unfinished_requests() and last - start < args.budget_s:
        kind = None
        if steps and len(walls) == 8 and "mixed" not in profiled:
            kind = "mixed"  # early steps: full prompt chunks beside the first decodes
        elif (steps and steps[-1][0] == 0 and steps[-1][1] >= 0.9 * args.max_num_seqs
              and "decode" not in profiled and len(walls) > args.decode_profile_after
              and engine.stats().num_waiting == 0):
            kind = "decode"  # deep into the run, every prompt admitted: full decode batches
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
            host += [{}] * args.profile_steps
            last = now
            continue
        phases.clear()
        # After the first wave of prompts, prompt chunks come one step at a time between decode
        # steps (as running requests finish): the launch of such a step may leave the GPU idle
        # (its eager forward launches op by op after a ~25 ms decode step).
        seen_decode = any(st[0] == 0 for st in steps)
        transition = seen_decode and engine.stats().num_waiting > 0
        watch = args.sync_debug and torch.cuda.is_available() and (3 <= len(walls) < 9 or transition)
        catch = args.host_profile and transition and len(transition_profiles) < 2
        step_prof = None
        if catch:
            step_prof = cProfile.Profile()
            step_prof.enable()
        if watch:  # which host calls wait for the GPU in these (mixed) steps, and from where
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for out in engine.step():
                if out.finished:
                    tokens += sum(len(c.token_ids) for c in out.outputs)
        if step_prof is not None:
            step_prof.disable()
            if steps[-1][0] > 0 and steps[-2][0] == 0:  # this call launched a prompt step after a decode step
                transition_profiles.append((steps[-1], step_prof))
        if watch:
            torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                syncs[f"{w.filename}:{w.lineno} {str(w.message)[:60]}"] += 1
        now = time.perf_counter()
        walls.append(now - last)
        host.append(dict(phases))
        last = now
        if args.host_profile and "host mixed" not in profiled and len(walls) == 16:
            profiled["host mixed"] = host_profile(engine, 3)
        if args.host_profile and "host decode" not in profiled and "decode" in profiled:
            profiled["host decode"] = host_profile(engine, args.profile_steps * 2)
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
    print("\nhost time by phase, ms / step ('wait': the part of 'complete' spent waiting for the "
          "previous step's ids; host busy = the rest):")
    print("| steps | count | wall | schedule | launch | complete | wait | host busy |")
    print("|---|---|---|---|---|---|---|---|")
    after = [None] + [st[0] > 0 for st in steps[:-1]]  # whether the step before carried prompt tokens
    for name, pick in (("with prompt tokens", lambda s, a: s[0] > 0),
                       ("  after a step with prompt tokens", lambda s, a: s[0] > 0 and a),
                       ("  after a decode-only step", lambda s, a: s[0] > 0 and a is False),
                       ("full decode", lambda s, a: s[0] == 0 and s[1] >= 0.9 * args.max_num_seqs)):
        chosen = [(h, w) for s, a, h, w in zip(steps, after, host, walls, strict=False) if pick(s, a) and h]
        if not chosen:
            continue
        mean = {k: sum(h.get(k, 0.0) for h, _ in chosen) / len(chosen) * 1e3
                for k in ("schedule", "launch", "complete", "wait")}
        busy = mean["schedule"] + mean["launch"] + mean["complete"] - mean["wait"]
        wall = sum(w for _, w in chosen) / len(chosen) * 1e3
        print(f"| {name} | {len(chosen)} | {wall:.2f} | {mean['schedule']:.2f} | {mean['launch']:.2f} | "
              f"{mean['complete']:.2f} | {mean['wait']:.2f} | {busy:.2f} |")
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        print("allocator: " + ", ".join(f"{k} {stats.get(k, 0)}" for k in (
            "num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free", "num_ooms")))
    print("Triton variants compiled in this process: " + compiled_variants())
    for where, count in sorted(syncs.items(), key=lambda kv: -kv[1])[:8]:
        print(f"synchronizing call x{count}: {where}")
    for (pt, dr, _, _), step_prof in transition_profiles:
        buf = io.StringIO()
        pstats.Stats(step_prof, stream=buf).sort_stats("cumulative").print_stats(24)
        print(f"\nhost profile of the engine step that launched a prompt step after a decode step "
              f"({pt} prompt tok + {dr} decode; cProfile, cumulative):\n" + buf.getvalue())
    for key in ("host mixed", "host decode"):
        if key in profiled:
            print(f"\n{key} steps:" + profiled.pop(key))
    for kind, (prof, wall, window) in profiled.items():
        desc = ", ".join(f"{pt} prompt tok + {dr} decode" for pt, dr, _, _ in window[:2])
        print_profile(f"{kind} steps ({desc}, ...)", prof, args.profile_steps, wall)
        kv_bytes = sum(w[3] for w in window) / len(window) * kv_token_bytes
        attn_ms = next((ms for label, ms, _ in kernel_families(prof, args.profile_steps)
                        if label.startswith("attention")), 0.0)
        if attn_ms and torch.cuda.is_available():
            print(f"attention: {kv_bytes / 1e9:.1f} GB of KV in cache per step (mean context "
                  f"{sum(w[3] for w in window) / max(sum(w[2] for w in window), 1):.0f}) over "
                  f"{attn_ms:.2f} ms = {kv_bytes / attn_ms / 1e9:.2f} TB/s")


if __name__ == "__main__":
    main()
