"""Command-line flags for engine options, shared by ``serve``, ``generate``, ``chat`` and ``bench``.

The flags mirror ``EngineConfig`` fields (and vLLM's flag names where one exists).
"""

from __future__ import annotations

import argparse

from portaserve.core.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, *, model_positional: bool = True) -> None:
    if model_positional:
        parser.add_argument(
            "model",
            nargs="?",
            default="smollm2-135m",
            help="GGUF file, Hugging Face folder or alias (default smollm2-135m)",
        )
    else:
        parser.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m)")
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--device", default=None, help="device name, e.g. cpu, cuda:0 (default: best available)"
    )
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument(
        "--gpu-memory-utilization",
        "--memory-utilization",
        dest="memory_utilization",
        type=float,
        default=None,
        help="fraction of free device memory for the KV cache",
    )
    g.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=True,
    )
    g.add_argument(
        "--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "cache-aware"]
    )
    g.add_argument("--expected-output-tokens", type=int_or_none, default=None, metavar="N|none",
                   help="admission keeps KV room for each running request's expected output: N "
                        "tokens until finished requests show their real length; none (default) "
                        "admits on present needs only (growth then preempts, as in vLLM)")
    g.add_argument("--quantization", "-q", default=None, help="weight format, e.g. int8, int4, fp8")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="KV cache element type: auto (the compute dtype), fp8 (= fp8_e4m3) or "
                        "fp8_e5m2; half the bytes of bf16 per token, where the device supports it")
    g.add_argument("--keep-packed-weights", dest="keep_packed_weights", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="keep GGUF block weights packed (default: the device decides; yes on "
                        "cpu and openvino, and in 16-bit everywhere)")
    g.add_argument("--async-scheduling", dest="async_scheduling", default=None,
                   action=argparse.BooleanOptionalAction,
                   help="schedule the next step while the device runs this one (default: when "
                        "the device says it can, e.g. cuda)")
    g.add_argument("--seed", type=int, default=0)


def int_or_none(text: str) -> int | None:
    """argparse type: an integer, or None for 'none' (e.g. ``--expected-output-tokens``)."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none'; got {text!r}") from None


def engine_config_from_args(args: argparse.Namespace, **extra: object) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        memory_utilization=args.memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        expected_output_tokens=getattr(args, "expected_output_tokens", None),
        quantization=args.quantization,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        keep_packed_weights=getattr(args, "keep_packed_weights", None),
        async_scheduling=getattr(args, "async_scheduling", None),
        seed=args.seed,
        **extra,  # type: ignore[arg-type]
    )
