"""``bench throughput`` and ``bench latency`` on the real model (SmolLM2, cpu device)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from portaserve.bench import latency, throughput

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    from portaserve import LLM
    from portaserve.core.loaders.fetch import resolve_model

    return LLM(
        str(resolve_model("smollm2-135m")),
        device="cpu",
        max_model_len=256,
        num_kv_blocks=64,
        enable_prefix_caching=False,
    )


def test_throughput_counts_every_token(llm):
    rng = np.random.default_rng()
    n, in_len, out_len = int(rng.integers(2, 4)), int(rng.integers(8, 24)), int(rng.integers(2, 5))
    r = throughput.measure_throughput(
        llm, num_prompts=n, input_len=in_len, output_len=out_len, seed=int(rng.integers(1000))
    )
    assert r["num_requests"] == n
    assert r["total_prompt_tokens"] == n * in_len
    assert r["total_output_tokens"] == n * out_len  # EOS ignored: exactly max_tokens
    assert r["output_tokens_per_second"] == pytest.approx(n * out_len / r["elapsed_time"])


def test_latency_splits_prefill_and_decode(llm):
    rng = np.random.default_rng()
    in_len, out_len = int(rng.integers(16, 48)), int(rng.integers(3, 6))
    r = latency.measure_latency(
        llm,
        input_len=in_len,
        output_len=out_len,
        num_iters=1,
        num_iters_warmup=0,
        seed=int(rng.integers(1000)),
    )
    assert 0 < r["prefill_latency_s"] < r["avg_latency_s"]
    assert r["prefill_tokens_per_second"] == pytest.approx(in_len / r["prefill_latency_s"])
    assert 0 < r["decode_step_latency_s"] < r["avg_latency_s"]
    assert not llm.llm_engine.has_unfinished_requests()


def test_latency_cli_prints_conditions(llm, monkeypatch, capsys):
    monkeypatch.setattr(latency, "make_llm", lambda args: llm)
    args = argparse.Namespace(
        input_len=12,
        output_len=3,
        batch_size=2,
        num_iters=1,
        num_iters_warmup=0,
        seed=0,
        output_json=None,
    )
    assert latency.run(args) == 0
    out = capsys.readouterr().out
    for text in (
        "bench latency: conditions",
        "cpu",
        "float32",
        "Prefill (2 x 12 tokens)",
        "Decode step (batch 2)",
    ):
        assert text in out
