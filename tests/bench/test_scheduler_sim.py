"""benchmarks/scheduler_sim.py drives the real scheduler: a small oversubscribed wave preempts
without the admission reserve and not with it, and every output token is accounted for."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "scheduler_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("scheduler_sim", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reserve_removes_the_preemptions_of_a_wave(sim):
    # 40 requests of 64 + 64 tokens, 20 at a time, over 1600 tokens of KV: 20 x 128 = 2560 at the end
    args = argparse.Namespace(num_prompts=40, input_len="64", output_len="64", output_dist="fixed",
                              max_tokens=64, kv_tokens=1600, max_num_seqs=20, max_batched_tokens=512,
                              max_model_len=256, seed=3)
    without = sim.simulate(args, None)
    with_reserve = sim.simulate(args, 1024)
    assert without["preemptions"] > 0 and without["prompt_tokens"] > 40 * 64
    assert with_reserve["preemptions"] == 0 and with_reserve["prompt_tokens"] == 40 * 64
    assert without["tok_s"] == pytest.approx(40 * 64 / without["seconds"])
