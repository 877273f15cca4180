"""Prefix caching on vs off, in one run: a shared-prefix workload and a no-sharing workload.

Offline through ``portaserve.LLM`` on the real SmolLM2-135M (cpu by default). For each workload
and each setting it reports mean time to first token (arrival -> first token, all requests
submitted at once) and output tokens/s; the no-sharing workload shows what having the cache on
costs when nothing is shared.

    PYTHONPATH=. python benchmarks/prefix_cache_cpu.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=400)
    p.add_argument("--suffix-len", type=int, default=24)
    p.add_argument("--output-len", type=int, default=16)
    args = p.parse_args()
    os.environ["PORTASERVE_NUM_THREADS"] = str(args.threads)

    import torch

    from portaserve import LLM, SamplingParams, __version__

    rng = random.Random(0)
    shared = [rng.randrange(100, 49000) for _ in range(args.prefix_len)]
    workloads = {
        "shared prefix": [shared + [rng.randrange(100, 49000) for _ in range(args.suffix_len)]
                          for _ in range(args.num_prompts)],
        "no sharing": [[rng.randrange(100, 49000) for _ in range(args.prefix_len + args.suffix_len)]
                       for _ in range(args.num_prompts)],
    }
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    print(f"portaserve {__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()} {os.cpu_count()} cpus, {args.threads} threads; model {args.model} "
          f"on {args.device}; {args.num_prompts} prompts of {args.prefix_len}+{args.suffix_len} "
          f"tokens, {args.output_len} out, greedy; all submitted at once")
    rows = []
    outputs: dict[tuple[str, bool], list[list[int]]] = {}
    for caching in (True, False):
        llm = LLM(args.model, device=args.device, enable_prefix_caching=caching, num_kv_blocks=1024)
        llm.generate([[200] * 8], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        for name, prompts in workloads.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - start
            ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            outputs[(name, caching)] = [o.outputs[0].token_ids for o in outs]
            cached = sum(o.num_cached_tokens for o in outs)
            rows.append((name, "on" if caching else "off", statistics.mean(ttft) * 1e3,
                         tokens / wall, wall, cached))
        del llm
    print()
    print("| workload | prefix caching | mean TTFT ms | output tok/s | wall s | cached prompt tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]} |")
    same = all(outputs[(n, True)] == outputs[(n, False)] for n in workloads)
    print(f"\noutputs identical with caching on and off: {same}")


if __name__ == "__main__":
    main()
