"""Run ``run_server`` over the fake engine, as ``portaserve serve`` would over the real one.

Usage: ``python tests/serve/run_fake_server.py --port P [--api-key K] [--step-delay S]
[--max-num-seqs N] [--max-waiting-requests N] [--shutdown-timeout S]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository, when not installed

from serve_fake_engine import FakeEngine  # noqa: E402

from portaserve.serve.api_server import run_server  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--step-delay", type=float, default=0.005)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-waiting-requests", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--shutdown-timeout", type=float, default=5.0)
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = FakeEngine(
        step_delay=args.step_delay,
        max_num_seqs=args.max_num_seqs,
        max_waiting_requests=args.max_waiting_requests,
        max_model_len=args.max_model_len,
    )
    run_server(
        engine,
        host="127.0.0.1",
        port=args.port,
        api_key=args.api_key,
        shutdown_timeout=args.shutdown_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
