"""``portaserve bench serve | throughput | latency``: the benchmark commands.

``serve`` drives any OpenAI-compatible server (``portaserve/bench/serve.py``); ``throughput``
and ``latency`` run the engine in-process. Flags are those of ``vllm bench``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from portaserve.bench import latency, serve, throughput

    parser = subparsers.add_parser("bench", help="benchmark a server or the engine")
    commands = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    for name, module, help_text in (
        ("serve", serve, "load-test an OpenAI-compatible server (as vllm bench serve)"),
        ("throughput", throughput, "offline throughput through portaserve.LLM"),
        ("latency", latency, "batch-1 prefill and per-token decode time"),
    ):
        sub = commands.add_parser(name, help=help_text, description=module.__doc__.split("\n")[0])
        module.add_cli_args(sub)
        sub.set_defaults(func=module.run)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
