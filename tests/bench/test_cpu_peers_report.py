"""The CPU-peers report: the table shows every engine and says by how much portaserve trails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_peers.py"


@pytest.fixture(scope="module")
def cpu_peers():
    spec = importlib.util.spec_from_file_location("cpu_peers", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_and_gaps(cpu_peers):
    rng = np.random.default_rng()
    ours, peer = float(rng.uniform(10, 50)), float(rng.uniform(60, 120))
    serve_ours, serve_peer = float(rng.uniform(100, 200)), float(rng.uniform(20, 90))
    report = {
        "engines": {
            "portaserve cpu": {
                "decode_tok_s": ours,
                "prefill_tok_s": 300.0,
                "serving": {"1": {"output_throughput": serve_ours, "median_ttft_ms": 80.0}},
            },
            "llama.cpp": {
                "decode_tok_s": peer,
                "prefill_tok_s": 250.0,
                "serving": {"1": {"output_throughput": serve_peer, "median_ttft_ms": 120.0}},
            },
            "transformers fp32": {"error": "timed out after 5 s"},
        }
    }
    text = cpu_peers.markdown(report, [1, 4])
    assert "| portaserve cpu | " + f"{ours:.1f}" in text
    assert f"{serve_ours:.1f} / 80" in text
    assert "error: timed out" in text
    ratio = ours / peer
    assert f"= {ratio:.2f}x (behind by {(1 - ratio) * 100:.0f}%)" in text
    assert (
        "prefill 512: portaserve cpu 300.0 tok/s vs llama.cpp 250.0 tok/s = 1.20x (ahead)" in text
    )
    assert f"serving c=1: portaserve cpu {serve_ours:.1f}" in text


def test_worker_script_imports_only_the_standard_library_at_top():
    # the llama.cpp worker runs this file under a venv without portaserve or numpy
    top = [line for line in _PATH.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert top and all(
        line.split()[1].split(".")[0]
        in {
            "__future__",
            "argparse",
            "json",
            "os",
            "socket",
            "statistics",
            "subprocess",
            "sys",
            "time",
            "pathlib",
            "typing",
        }
        for line in top
    )


def test_budgeted_prefill_shortens_only_when_too_slow(cpu_peers):
    rng = np.random.default_rng()
    per_token = float(rng.uniform(0.001, 0.01))
    lengths = []

    def run_prefill(n):
        lengths.append(n)
        return n * per_token

    full = cpu_peers.budgeted_prefill(run_prefill, 512, budget_s=100.0, iters=2)
    assert full["prefill_len_measured"] == 512 and lengths == [64, 512, 512]
    assert full["prefill_tok_s"] == pytest.approx(1 / per_token)
    lengths.clear()
    budget = 64 * per_token * 3.5  # room for 224 tokens: measured at 192
    short = cpu_peers.budgeted_prefill(run_prefill, 512, budget_s=budget, iters=3)
    assert short["prefill_len_measured"] == 192 and lengths == [64, 192]
