"""``portaserve bench latency``: prefill time and per-token decode time at a fixed batch.

The engine is stepped directly (``llm.llm_engine.step()``): prefill time is from queueing the
batch to the step that yields every request's first token (several steps when chunked
prefill splits the prompt); each later step is one decode step for the whole batch. Every
iteration uses fresh random prompts, so the prefix cache cannot shorten the prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from portaserve.bench.throughput import add_engine_args, check_positive, make_llm


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    parser.add_argument("--num-iters", type=int, default=3)


def one_iteration(
    llm: Any, prompts: list[list[int]], output_len: int, tag: str
) -> tuple[float, list[float], float]:
    """Run one batch to completion: (prefill s, decode step times s, end-to-end s)."""
    from portaserve import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    progress = dict.fromkeys(ids, 0)
    try:
        start = time.perf_counter()
        for request_id, prompt in zip(ids, prompts, strict=True):
            engine.add_request(request_id, prompt, params)
        prefill_end: float | None = None
        last = start
        steps: list[float] = []
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                progress[out.request_id] = len(out.outputs[0].token_ids)
            if prefill_end is None:
                if all(n >= 1 for n in progress.values()):
                    prefill_end = now
            elif outputs:
                steps.append(now - last)
            last = now
        total = time.perf_counter() - start
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
    return (prefill_end or total) - start, steps, total


def measure_latency(
    llm: Any,
    *,
    input_len: int,
    output_len: int,
    batch_size: int = 1,
    num_iters: int = 3,
    num_iters_warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Median prefill time and decode step time over ``num_iters`` fresh batches."""
    from portaserve.bench.conditions import random_token_prompts

    prefills, decode_medians, totals = [], [], []
    for it in range(num_iters_warmup + num_iters):
        prompts = random_token_prompts(llm, batch_size, input_len, seed + 1000 * it)
        prefill, steps, total = one_iteration(llm, prompts, output_len, f"latency-{it}")
        if it < num_iters_warmup:
            continue
        prefills.append(prefill)
        totals.append(total)
        if steps:
            decode_medians.append(statistics.median(steps))
    prefill_s = statistics.median(prefills)
    decode_s = statistics.median(decode_medians) if decode_medians else float("nan")
    return {
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_latency_s": prefill_s,
        "prefill_tokens_per_second": batch_size * input_len / prefill_s,
        "decode_step_latency_s": decode_s,
        "decode_tokens_per_second": batch_size / decode_s,
        "avg_latency_s": statistics.fmean(totals),
        "latencies_s": totals,
        "prefill_latencies_s": prefills,
    }


def run(args: argparse.Namespace) -> int:
    """Entry point of ``portaserve bench latency``."""
    from portaserve.bench.conditions import engine_conditions, machine_conditions, print_conditions

    check_positive(args, "input_len", "output_len", "batch_size", "num_iters")
    llm = make_llm(args)
    conditions = (
        machine_conditions()
        | engine_conditions(llm)
        | {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "batch_size": args.batch_size,
        }
    )
    print_conditions("bench latency: conditions", conditions)
    r = measure_latency(
        llm,
        input_len=args.input_len,
        output_len=args.output_len,
        batch_size=args.batch_size,
        num_iters=args.num_iters,
        num_iters_warmup=args.num_iters_warmup,
        seed=args.seed,
    )
    print(f"Avg latency: {r['avg_latency_s']:.4f} seconds")
    print(
        f"Prefill ({args.batch_size} x {args.input_len} tokens): "
        f"{r['prefill_latency_s'] * 1000:.2f} ms, {r['prefill_tokens_per_second']:.2f} tokens/s"
    )
    print(
        f"Decode step (batch {args.batch_size}): {r['decode_step_latency_s'] * 1000:.2f} ms, "
        f"{r['decode_tokens_per_second']:.2f} tokens/s"
    )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"conditions": conditions} | r, indent=2))
    return 0
