"""``portaserve bench throughput``: offline throughput through :class:`portaserve.LLM`.

All ``--num-prompts`` random prompts of ``--input-len`` tokens are handed to ``LLM.generate``
at once, each generating exactly ``--output-len`` tokens (greedy, EOS ignored), as
``vllm bench throughput`` does with its random dataset. One short warmup call is not timed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from portaserve.errors import ConfigError


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared by ``bench throughput`` and ``bench latency``."""
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="model name, GGUF file or folder")
    add("--device", default=None, help="device, e.g. cpu (default: the best available)")
    add("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    add("--kv-cache-dtype", default="auto",
        help="KV cache element type: auto (the compute dtype), fp8 (= fp8_e4m3) or fp8_e5m2")
    add("--max-num-seqs", type=int, default=None)
    add("--max-num-batched-tokens", type=int, default=None)
    add("--max-model-len", type=int, default=None)
    add("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    add("--async-scheduling", default=None, action=argparse.BooleanOptionalAction,
        help="overlap scheduling with the device (default: the device's choice)")
    add("--seed", type=int, default=0)
    add("--output-json", default=None, help="write the results (and conditions) to this file")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)


def make_llm(args: argparse.Namespace) -> Any:
    from portaserve import LLM

    options: dict[str, Any] = {
        "dtype": args.dtype,
        "seed": args.seed,
        "enable_prefix_caching": args.enable_prefix_caching,
    }
    for name in ("device", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                 "async_scheduling", "kv_cache_dtype"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return LLM(args.model, **options)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {value}", field=name)


def measure_throughput(
    llm: Any, *, num_prompts: int, input_len: int, output_len: int, seed: int = 0
) -> dict[str, float]:
    """Generate for all prompts at once; return counts, elapsed seconds and rates."""
    from portaserve import SamplingParams
    from portaserve.bench.conditions import random_token_prompts

    warm = random_token_prompts(llm, 1, min(input_len, 16), seed + 1)
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    prompts = random_token_prompts(llm, num_prompts, input_len, seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(outputs),
        "total_num_tokens": prompt_tokens + output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_second": len(outputs) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
    }


def run(args: argparse.Namespace) -> int:
    """Entry point of ``portaserve bench throughput``."""
    from portaserve.bench.conditions import engine_conditions, machine_conditions, print_conditions

    check_positive(args, "input_len", "output_len", "num_prompts")
    llm = make_llm(args)
    conditions = (
        machine_conditions()
        | engine_conditions(llm)
        | {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_prompts": args.num_prompts,
        }
    )
    print_conditions("bench throughput: conditions", conditions)
    r = measure_throughput(
        llm,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
    )
    print(
        f"Throughput: {r['requests_per_second']:.2f} requests/s, "
        f"{r['tokens_per_second']:.2f} total tokens/s, "
        f"{r['output_tokens_per_second']:.2f} output tokens/s"
    )
    print(f"Total num prompt tokens:  {r['total_prompt_tokens']}")
    print(f"Total num output tokens:  {r['total_output_tokens']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"conditions": conditions} | r, indent=2))
    return 0
