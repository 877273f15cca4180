"""`portaserve serve [MODEL]`: the OpenAI- and Anthropic-compatible HTTP server.

Engine flags mirror ``EngineConfig`` (leave one out and the device picks its default). With
no MODEL the embedded default (SmolLM2-135M-Instruct) is served. The API key comes from
``--api-key`` or ``PORTASERVE_API_KEY``.
"""

from __future__ import annotations

import argparse
import logging

from portaserve import envs
from portaserve.core.config import EngineConfig
from portaserve.serve.engine_args import add_engine_args, engine_config_from_args

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
    add_engine_args(p)  # MODEL and the engine flags every command shares
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    server.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: PORTASERVE_API_KEY)",
    )
    server.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) clients use; the first is reported (default: the model's own name)",
    )
    server.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="waiting-queue cap; requests beyond it get 503 (default: no cap)",
    )
    server.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish on SIGINT/SIGTERM "
        "before they are aborted (default 30)",
    )
    p.set_defaults(func=run)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    # No --device leaves the choice (PORTASERVE_DEVICE, else the best) to the registry, which
    # logs why it chose.
    return engine_config_from_args(args, max_waiting_requests=args.max_waiting_requests)


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
