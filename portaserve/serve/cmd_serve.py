"""`portaserve serve [MODEL]`: the OpenAI- and Anthropic-compatible HTTP server.

Engine flags mirror ``EngineConfig`` (leave one out and the device picks its default). With
no MODEL the embedded default (SmolLM2-135M-Instruct) is served. The API key comes from
``--api-key`` or ``PORTASERVE_API_KEY``.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from portaserve import envs

if TYPE_CHECKING:
    from portaserve.core.config import EngineConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI and Anthropic HTTP APIs",
        description="Serve MODEL (a name, GGUF file or Hugging Face folder; default "
        f"{DEFAULT_MODEL}) over /v1/chat/completions, /v1/completions, "
        "/v1/messages, /v1/models, /health, /version and /metrics.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"model to serve (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--device",
        default=None,
        help="device, e.g. cpu or cuda:0 (default: PORTASERVE_DEVICE, else the best available)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: PORTASERVE_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) clients use; the first is reported (default: the model's own name)",
    )
    engine = p.add_argument_group("engine")
    engine.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    engine.add_argument("--quantization", default=None, help="weight quantization method")
    engine.add_argument(
        "--max-model-len", type=int, default=None, help="context length (prompt + output tokens)"
    )
    engine.add_argument("--max-num-seqs", type=int, default=None, help="most requests in one batch")
    engine.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="token budget of one step"
    )
    engine.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV cache size in blocks (overrides memory utilization)",
    )
    engine.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    engine.add_argument(
        "--gpu-memory-utilization",
        "--memory-utilization",
        type=float,
        default=None,
        dest="memory_utilization",
        help="fraction of device memory the engine may use (0, 1]",
    )
    engine.add_argument(
        "--no-enable-prefix-caching",
        action="store_false",
        dest="enable_prefix_caching",
        help="turn prefix caching off",
    )
    engine.add_argument(
        "--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "cache-aware"]
    )
    engine.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="waiting-queue cap; requests beyond it get 503",
    )
    engine.add_argument("--seed", type=int, default=0, help="engine random seed")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish on SIGINT/SIGTERM "
        "before they are aborted (default 30)",
    )
    p.set_defaults(func=run)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    from portaserve.core.config import EngineConfig

    return EngineConfig(
        model=args.model,
        device=args.device or envs.device(),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        memory_utilization=args.memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        quantization=args.quantization,
        seed=args.seed,
        max_waiting_requests=args.max_waiting_requests,
    )


def api_key(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``PORTASERVE_API_KEY``, else None (no authentication)."""
    return args.api_key or envs.api_key()


def run(args: argparse.Namespace) -> int:
    config = engine_config(args)  # bad flags fail here, before the model loads
    key = api_key(args)

    from portaserve.core.engine import LLMEngine
    from portaserve.serve.api_server import run_server

    engine = LLMEngine.from_config(config)
    logger.info("device: %s", engine.device_description)
    logger.info(
        "model %s: max_model_len %d, KV cache capacity %d tokens",
        engine.model_name,
        engine.max_model_len,
        engine.kv_capacity_tokens,
    )
    if key is None:
        logger.info(
            "no API key set: every route is open (use --api-key or PORTASERVE_API_KEY to "
            "require one)"
        )
    run_server(
        engine,
        host=args.host,
        port=args.port,
        api_key=key,
        served_model_names=args.served_model_name,
        shutdown_timeout=args.shutdown_timeout,
    )
    return 0
