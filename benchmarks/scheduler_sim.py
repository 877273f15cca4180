#!/usr/bin/env python
"""The real scheduler on a simulated clock: what an admission or preemption change does to an
offline run, on CPU in seconds, before spending GPU time on it.

Drives ``portaserve.core.scheduler.Scheduler`` step by step over a workload (every sampled token
is a dummy id; a request finishes at its output length) and charges each step a cost from a
model of the H200 bf16 run on the Llama-3-8B shape (section 3 run 6 of docs/benchmarks.md):

    step = max(weight read, tokens x GEMM time a token)    # 3.5 ms; 19.2 us (prompt steps),
                                                           #   24 us (decode-only steps)
         + decode context tokens x 30.8 ns                 # 131 KB of bf16 KV a token at 4.26 TB/s
         + prompt attention + 0.3 ms (+ 5 ms host gap on prompt steps)

Its output is a model, not a measurement: it reproduced the measured run's 2533-2537 steps and
1.243M computed prompt tokens, and its time within 3% (98.8 s against 101 s). It got the
admission reserve wrong, though: it predicted 92.2 s with it, the H200 then gave 107.2 s against
104.3 s without (docs/benchmarks.md, run 7). Its per-step cost is too linear in the rows of a
decode step, so it overrates anything that trades batch size for fewer preemptions.

    python benchmarks/scheduler_sim.py                                  # 1000 x 1000/1000, 852k-token cache
    python benchmarks/scheduler_sim.py --kv-tokens 1864064              # the fp8 cache's size
    python benchmarks/scheduler_sim.py --output-dist exp --max-tokens 0 --input-len 200-2000 --output-len 300
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portaserve.core.request import FinishReason, Request  # noqa: E402
from portaserve.core.sampling import SamplingParams  # noqa: E402
from portaserve.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402

WEIGHT_READ_S = 3.5e-3
GEMM_S_PER_TOKEN = {True: 19.2e-6, False: 24e-6}  # prompt steps / decode-only steps
KV_READ_S_PER_TOKEN = 30.8e-9
PREFILL_ATTN_S = 1.46e-6 / 500  # per prompt token per token of context before it
STEP_S, PROMPT_STEP_HOST_S = 0.3e-3, 5e-3


def _length(spec: str, rng: random.Random) -> int:
    lo, _, hi = spec.partition("-")
    return rng.randint(int(lo), int(hi or lo))


def simulate(args: argparse.Namespace, prior: int | None) -> dict[str, float]:
    config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
        max_model_len=args.max_model_len, block_size=16, num_blocks=args.kv_tokens // 16,
        expected_output_prior=prior)
    sched = Scheduler(config)
    rng = random.Random(args.seed)
    target: dict[str, int] = {}
    for i in range(args.num_prompts):
        prompt = [rng.randrange(1, 128000) for _ in range(_length(args.input_len, rng))]
        n_out = _length(args.output_len, rng)
        if args.output_dist == "exp":
            n_out = int(rng.expovariate(1 / n_out)) + 1
        max_tokens = args.max_tokens or None
        if max_tokens:
            n_out = min(n_out, max_tokens)
        n_out = min(n_out, args.max_model_len - len(prompt))
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                  arrival_seq=i))
        target[f"r{i}"] = n_out
    clock, steps, prompt_tokens = 0.0, 0, 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        steps += 1
        prompts = [s for s in out.scheduled if s.num_new_tokens > 1]
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
        n_prompt = sum(s.num_new_tokens for s in prompts)
        prompt_tokens += n_prompt
        clock += max(WEIGHT_READ_S, out.num_batched_tokens * GEMM_S_PER_TOKEN[n_prompt > 0])
        clock += sum(s.num_computed_before + 1 for s in decodes) * KV_READ_S_PER_TOKEN
        clock += sum(s.num_new_tokens * (s.num_computed_before + s.num_new_tokens / 2) for s in prompts) * PREFILL_ATTN_S
        clock += STEP_S + (PROMPT_STEP_HOST_S if n_prompt else 0.0)
        sampled = {s.request.request_id: 7 for s in out.scheduled if s.needs_logits}
        for s in sched.update_from_output(out, sampled):
            request = s.request
            if request.num_output_tokens >= target[request.request_id]:
                sched.finish_request(request.request_id, FinishReason.STOP)
    output_tokens = sum(target.values())
    return {"seconds": clock, "tok_s": output_tokens / clock, "steps": steps,
            "prompt_tokens": prompt_tokens, "preemptions": sched.num_preemptions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", default="1000", help="N or LO-HI (uniform)")
    p.add_argument("--output-len", default="1000", help="N or LO-HI (uniform); the mean with --output-dist exp")
    p.add_argument("--output-dist", choices=("fixed", "exp"), default="fixed")
    p.add_argument("--max-tokens", type=int, default=1000, help="each request's max_tokens (0: none)")
    p.add_argument("--kv-tokens", type=int, default=852672, help="KV cache size (bf16 on the H200: 852672)")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--priors", default="none,1024", help="expected_output_prior values to compare")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"workload: {args.num_prompts} prompts, input {args.input_len}, output {args.output_len} "
          f"({args.output_dist}), max_tokens {args.max_tokens or 'none'}; KV {args.kv_tokens} tokens, "
          f"max_num_seqs {args.max_num_seqs}, {args.max_batched_tokens} tokens a step; "
          "cost model: H200 bf16 Llama-3-8B (docs/benchmarks.md section 3 run 6)")
    print("| expected_output_prior | simulated s | output tok/s | steps | prompt tokens computed | preemptions | host s |")
    print("|---|---|---|---|---|---|---|")
    for prior_s in args.priors.split(","):
        prior = None if prior_s.strip().lower() == "none" else int(prior_s)
        start = time.perf_counter()
        r = simulate(args, prior)
        print(f"| {prior} | {r['seconds']:.1f} | {r['tok_s']:,.0f} | {r['steps']} | {r['prompt_tokens']:,} | "
              f"{r['preemptions']} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
