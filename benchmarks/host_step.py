#!/usr/bin/env python
"""The host's share of an engine step at large decode batches, without running a model.

Builds an ``LLMEngine`` on a tiny synthetic model (``random:tiny`` on ``cpu``: the model is never
run), adds N requests with ~1000-token prompts and a fixed ``max_tokens`` (``ignore_eos``), and
drives the engine's own host parts the way async scheduling does, with fake sampled ids:

    out = scheduler.schedule()            # step N+1 (its batch built by _build_batch)
    engine._complete(step N)              # update_from_output, stop checks, detokenization,
                                          #   RequestOutput building (LLM.generate: final_only)
    out.batch.to_device(cpu, pack=True)   # the runner's host-side packing of the batch

Once every request decodes (prefill done), it times ``--steps`` steps and prints the median of
each part per step. ``PYTHONPATH`` picks the checkout measured (the script adds no path), so
two checkouts compare with the same script:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/host_step.py --num-reqs 128,256,512
    OMP_NUM_THREADS=1 PYTHONPATH=../main python benchmarks/host_step.py   # another checkout
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import random
import statistics
import time
from collections import defaultdict

import torch

from portaserve.core.config import EngineConfig
from portaserve.core.engine import LLMEngine, _LaunchedStep
from portaserve.core.sampling import SamplingParams

#: ``--clock``: this thread's CPU time (the default; other processes on a shared machine barely
#: move it) or wall time.
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}

PARTS = ("schedule", "_build_batch", "update_from_output", "output processing", "to_device",
         "host total")


def _timed(times: dict[str, float], name: str, fn, clock):
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] += clock() - start
    return wrapper


def measure(args: argparse.Namespace, num_reqs: int) -> dict[str, float]:
    """Median seconds per decode step of each part, for ``num_reqs`` running requests."""
    lo, _, hi = args.input_len.partition("-")
    max_len = int(hi or lo) + args.max_tokens
    blocks_per_req = -(-max_len // args.block_size) + 1
    engine = LLMEngine(EngineConfig(
        model="random:tiny", device="cpu", dtype="float32", max_model_len=2048,
        max_num_seqs=num_reqs, max_num_batched_tokens=args.max_batched_tokens,
        block_size=args.block_size, num_kv_blocks=num_reqs * blocks_per_req,
        enable_prefix_caching=True, async_scheduling=True, seed=0))
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, output_kind=args.output_kind)
    for i in range(num_reqs):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(int(lo), int(hi or lo)))]
        engine.add_request(f"r{i}", prompt, params)

    sched = engine.scheduler
    times: dict[str, float] = defaultdict(float)
    clock = CLOCKS[args.clock]
    sched._build_batch = _timed(times, "_build_batch", sched._build_batch, clock)
    sched.update_from_output = _timed(times, "update_from_output", sched.update_from_output, clock)
    cpu = torch.device("cpu")
    per_step: dict[str, list[float]] = defaultdict(list)
    prev: _LaunchedStep | None = None
    measured = warmup = 0
    profiler = cProfile.Profile() if args.profile else None
    while measured < args.steps:
        if profiler is not None and measured == 1:
            profiler.enable()
        times.clear()
        t0 = clock()
        out = sched.schedule()
        t1 = clock()
        if prev is not None:
            engine._complete(prev)
        t2 = clock()
        out.batch.to_device(cpu, pack=True)
        t3 = clock()
        ids = [rng.randrange(1, vocab) for _ in out.batch.logits_req_ids]
        prev = _LaunchedStep(out, None, token_ids=ids)
        decoding = out.num_batched_tokens == num_reqs == len(out.scheduled)
        if not decoding or warmup < args.warmup:
            warmup += decoding
            if out.is_empty:
                raise SystemExit("the requests finished before the measurement: raise --max-tokens")
            continue
        measured += 1
        per_step["schedule"].append(t1 - t0)
        per_step["_build_batch"].append(times["_build_batch"])
        per_step["update_from_output"].append(times["update_from_output"])
        per_step["output processing"].append(t2 - t1 - times["update_from_output"])
        per_step["to_device"].append(t3 - t2)
        per_step["host total"].append(t3 - t0)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return {part: statistics.median(per_step[part]) for part in PARTS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-reqs", default="128,256,512", help="running requests, comma-separated")
    p.add_argument("--input-len", default="900-1100", help="prompt length: N or LO-HI (uniform)")
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--output-kind", choices=("final_only", "cumulative"), default="final_only")
    p.add_argument("--warmup", type=int, default=20, help="decode steps before timing")
    p.add_argument("--steps", type=int, default=200, help="decode steps timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each N this many times and keep each part's lowest median "
                        "(a shared machine's load only ever adds time)")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="cProfile the timed steps and print the top K functions (skews the times)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="time each part by this thread's CPU time or by wall time")
    args = p.parse_args()
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; prompts {args.input_len} tokens, max_tokens "
          f"{args.max_tokens} (ignore_eos), block size {args.block_size}, prefix caching on, "
          f"output_kind {args.output_kind}; median of {args.steps} decode steps after "
          f"{args.warmup}, lowest of {args.repeat} runs, {args.clock} time (ms per step)")
    print("| N | " + " | ".join(PARTS) + " |")
    print("|---" * (len(PARTS) + 1) + "|")
    for n in (int(s) for s in args.num_reqs.split(",")):
        runs = [measure(args, n) for _ in range(args.repeat)]
        r = {part: min(run[part] for run in runs) for part in PARTS}
        print(f"| {n} | " + " | ".join(f"{r[part] * 1e3:.2f}" for part in PARTS) + " |", flush=True)


if __name__ == "__main__":
    main()
