"""The ``portaserve`` command line: one sub-command per module, each exposing ``register``.

Each command module defines ``register(subparsers)`` that adds its parser and sets
``func=run`` on it. Heavy imports (torch, fastapi) happen inside ``run``, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from portaserve import __version__, envs

#: Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "portaserve.serve.cmd_serve",
    "portaserve.serve.cmd_generate",
    "portaserve.serve.cmd_devices",
    "portaserve.serve.cmd_bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portaserve",
        description="LLM inference and serving on any hardware.",
    )
    parser.add_argument("--version", action="version", version=f"portaserve {__version__}")
    parser.add_argument("--log-level", default=envs.log_level(), help="logging level (INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from portaserve.errors import PortaserveError

    try:
        return int(args.func(args) or 0)
    except PortaserveError as e:
        print(f"portaserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
