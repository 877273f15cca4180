"""Where an engine step's time goes: schedule / execute / sample / update, per kind of step.

Wraps the engine's parts with timers and cProfiles a window of steady-state decode steps.
Synchronous engine (``--no-async-scheduling``): the device is synchronized around ``execute``
and ``sample`` so GPU time is attributed to them. Async scheduling (the device's default on
cuda): nothing is synchronized, because that would undo the overlap; ``launch`` is the host's
time to queue a step's forward pass and sampling, ``wait`` the time the host sat waiting for the
previous step's sampled ids (the device-bound share), and ``step wall`` the whole ``step()``.

    PYTHONPATH=. python3 benchmarks/profile_engine.py --model random:llama3-8b --device cuda \\
        --num-prompts 512 --input-len 1000 --output-len 300
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time
from collections import defaultdict

from portaserve import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=300)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--async-scheduling", default=None, action=argparse.BooleanOptionalAction)
    args = p.parse_args()

    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_batched_tokens,
              async_scheduling=args.async_scheduling)
    engine = llm.llm_engine
    overlapped = engine.async_scheduling
    device = engine.device
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    kind = {"now": "decode"}

    def timed(name: str, fn, sync: bool = False):
        def wrapper(*a, **kw):
            if sync:
                device.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if sync:
                device.synchronize()
            totals[kind["now"]][name] += time.perf_counter() - t0
            return out
        return wrapper

    sched = engine.scheduler.schedule

    def schedule():
        t0 = time.perf_counter()
        out = sched()
        is_decode = all(s.num_new_tokens == 1 for s in out.scheduled)
        kind["now"] = f"decode(bs~{len(out.scheduled) // 64 * 64})" if is_decode else "with-prefill"
        counts[kind["now"]] += 1
        totals[kind["now"]]["schedule+build"] += time.perf_counter() - t0
        return out

    engine.scheduler.schedule = schedule
    if overlapped:
        columns = ("schedule+build", "launch", "wait", "update", "process_token", "make_output",
                   "step wall")
        from portaserve.core import engine as engine_module

        engine._launch = timed("launch", engine._launch)
        wait = engine_module._LaunchedStep.wait_token_ids
        engine_module._LaunchedStep.wait_token_ids = timed("wait", wait)
    else:
        columns = ("schedule+build", "execute", "sample", "update", "process_token", "make_output",
                   "step wall")
        engine.runner.execute = timed("execute", engine.runner.execute, sync=True)
        engine.sampler.sample_ids = timed("sample", engine.sampler.sample_ids, sync=True)
    engine.scheduler.update_from_output = timed("update", engine.scheduler.update_from_output)
    engine._process_token = timed("process_token", engine._process_token)
    engine._make_output = timed("make_output", engine._make_output)

    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind="final_only")
    for i in range(args.num_prompts):
        engine.add_request(f"p{i}", [rng.randrange(100, vocab) for _ in range(args.input_len)], params)
    start = time.perf_counter()
    steps = 0
    profiler = cProfile.Profile()
    profiled = 0
    tokens = 0
    while engine.has_unfinished_requests():
        on = kind["now"].startswith("decode") and steps > 5 and profiled < args.profile_steps
        if on:
            profiler.enable()
        t0 = time.perf_counter()
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        totals[kind["now"]]["step wall"] += time.perf_counter() - t0
        if on:
            profiler.disable()
            profiled += 1
        steps += 1
    wall = time.perf_counter() - start
    print(f"{engine.device_description}; async scheduling {'on' if overlapped else 'off'}; "
          f"{args.num_prompts} x {args.input_len}/{args.output_len}; "
          f"{steps} steps in {wall:.1f} s; {tokens / wall:.0f} output tok/s")
    print(f"{'step kind':<18}{'steps':>7}" + "".join(f"{n:>16}" for n in columns) + "   (ms/step)")
    for k in sorted(totals):
        row = totals[k]
        print(f"{k:<18}{counts[k]:>7}" + "".join(
            f"{row[n] / max(counts[k], 1) * 1e3:>16.2f}" for n in columns))
    s = io.StringIO()
    pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(22)
    print(s.getvalue()[-6000:])


if __name__ == "__main__":
    main()
