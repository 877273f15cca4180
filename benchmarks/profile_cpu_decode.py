#!/usr/bin/env python
"""Where a decode step's time goes on the ``cpu`` device (the native decode step).

Runs greedy decode of SmolLM2 (the GGUF as it ships, packed Q4_1 / Q8_0) at each batch size
and prints, per step: the engine step's wall time, the executor's share, and inside the native
step the time of each phase (timed by one thread between the barriers that end the phases, so
a phase includes waiting for the slowest thread). Also prints the bytes of weights a step reads
and the copy bandwidth measured in the same run, for the memory roofline.

    python benchmarks/profile_cpu_decode.py --threads 2 --batch 1,8 --tokens 64
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portaserve import LLM, SamplingParams  # noqa: E402
from portaserve.devices.cpu_native.executor import PHASES  # noqa: E402
from portaserve.quant.base import QuantizedWeight  # noqa: E402


def copy_bandwidth() -> float:
    """GB/s of a 256 MB float32 copy (bytes read + written), best of 5."""
    a = torch.randn(64 << 20)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    def size(w) -> int:
        if isinstance(w, QuantizedWeight):
            return w.nbytes
        return w.numel() * w.element_size()

    total = size(model.lm_head) + model.norm.numel() * 4
    for layer in model.layers:
        total += layer.input_norm.numel() * 4 + layer.post_norm.numel() * 4
        for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
            total += sum(size(w) for w, _ in proj)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    os.environ["PORTASERVE_NUM_THREADS"] = str(args.threads)

    llm = LLM(args.model, device="cpu")
    engine = llm.llm_engine
    executor = engine.runner.executor
    if executor is None:
        sys.exit("the cpu device built no native decode step here (see the log for why)")
    bw = copy_bandwidth()
    wbytes = weight_bytes(engine.model)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.model}: weights read per step {wbytes / 1e6:.1f} MB; copy bandwidth "
          f"{bw:.1f} GB/s -> roofline {wbytes / bw / 1e6:.2f} ms/step; torch {torch.__version__};"
          f" {platform.processor() or platform.machine()}, {args.threads} threads; load {load}")

    tok = llm.get_tokenizer()
    prompts = [tok.encode(f"Write a story about lighthouse keeper number {i}.")[:16]
               for i in range(max(args.batch))]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up

    execute = executor.execute
    timing = {"n": 0, "exec": 0.0}

    def timed(batch):
        t = time.perf_counter()
        out = execute(batch)
        if batch.num_tokens == batch.num_reqs:  # decode steps only
            timing["n"] += 1
            timing["exec"] += time.perf_counter() - t
        return out

    executor.execute = timed
    step = engine.step
    steps = {"wall": 0.0}

    def timed_step():
        t = time.perf_counter()
        out = step()
        steps["wall"] += time.perf_counter() - t
        return out

    rows = []
    for bs in args.batch:
        # prefill first (not timed), then the decode steps
        params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        for i in range(bs):
            engine.add_request(f"b{bs}-{i}", prompts[i], params)
        while any(engine.scheduler.get_request(f"b{bs}-{i}").num_computed_tokens
                  < len(prompts[i]) for i in range(bs)):
            step()
        executor.profile = torch.zeros(len(PHASES), dtype=torch.float64)
        timing.update(n=0, exec=0.0)
        steps["wall"] = 0.0
        engine.step = timed_step
        while engine.has_unfinished_requests():
            engine.step()
        engine.step = step
        n = max(timing["n"], 1)
        phases = (executor.profile / n * 1e3).tolist()
        rows.append((bs, n, steps["wall"] / n * 1e3, timing["exec"] / n * 1e3, phases))

    head = ["batch", "steps", "engine step ms", "executor ms", *PHASES, "tok/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for bs, n, wall, exe, phases in rows:
        cells = [str(bs), str(n), f"{wall:.2f}", f"{exe:.2f}", *(f"{x:.2f}" for x in phases),
                 f"{bs * 1e3 / wall:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
