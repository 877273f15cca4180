"""``bench serve`` against a fake OpenAI server with known delays: the measured TTFT, TPOT,
ITL, latency and throughputs must match what the server was told to do."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from fake_openai import TOKEN, FakeOpenAIServer, FakeServerConfig

from portaserve.bench.datasets import SampleRequest
from portaserve.bench.metrics import calculate_metrics, parse_goodput, result_dict
from portaserve.bench.serve import ServeTarget, arrival_offsets, run_benchmark
from portaserve.errors import ConfigError


def _requests(rng: np.random.Generator, n: int, out_len: int) -> list[SampleRequest]:
    return [
        SampleRequest(f"prompt {rng.integers(1 << 30)}", int(rng.integers(5, 50)), out_len)
        for _ in range(n)
    ]


def _run(base_url: str, requests, *, chat: bool = False, **kwargs):
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    target = ServeTarget(url=base_url + endpoint, model="fake-model", chat=chat, ignore_eos=True)
    return asyncio.run(run_benchmark(target, requests, **kwargs))


def test_metrics_match_the_servers_delays():
    rng = np.random.default_rng()
    ttft, tpot = 0.05 + rng.uniform(0, 0.02), 0.01 + rng.uniform(0, 0.004)
    out_len, n, conc = int(rng.integers(10, 16)), 8, 4
    cfg = FakeServerConfig(ttft=ttft, tpot=tpot)
    requests = _requests(rng, n, out_len)
    with FakeOpenAIServer(cfg) as url:
        results, duration, t0 = _run(url, requests, max_concurrency=conc)
    m = calculate_metrics(
        results,
        duration,
        percentiles=[50, 90, 99],
        metric_names=["ttft", "tpot", "itl", "e2el"],
        t0=t0,
    )
    assert m.completed == n and m.failed == 0
    assert m.total_output == n * out_len
    assert m.total_input == sum(r.prompt_len for r in requests)
    # against what the server really did (its own clock, the same perf_counter): tight
    first_lag, last_lag, tpot_err = [], [], []
    for req, r in zip(requests, results, strict=True):
        first, last = cfg.sent[req.prompt]
        first_lag.append(r.chunk_times[0] - first)
        last_lag.append(r.chunk_times[-1] - last)
        true_tpot = (last - first) / (out_len - 1)
        tpot_err.append(abs((r.latency - r.ttft) / (out_len - 1) - true_tpot))
    assert min(first_lag) >= 0.0 and min(last_lag) >= 0.0
    assert np.median(first_lag) < 0.015, first_lag
    assert np.median(last_lag) < 0.015, last_lag
    assert np.median(tpot_err) < 0.003, tpot_err
    # against what the server was told to do: never below it; above it by what a busy
    # 2-core machine adds (the server's own sleeps run late under load)
    s = m.stats
    assert ttft * 1000 <= s["median_ttft_ms"] < ttft * 1000 * 3 + 30, s
    assert tpot * 1000 <= s["median_tpot_ms"] < tpot * 1000 * 3 + 5, s
    assert tpot * 1000 * 0.8 <= s["median_itl_ms"] < tpot * 1000 * 3 + 5, s
    expected_e2el = ttft + (out_len - 1) * tpot
    assert expected_e2el * 1000 <= s["median_e2el_ms"] < expected_e2el * 1000 * 3 + 30, s
    expected_duration = 2 * expected_e2el  # 8 requests, 4 at a time: two waves
    assert expected_duration <= duration < expected_duration * 3 + 0.1, duration
    assert m.output_throughput == pytest.approx(n * out_len / duration)
    assert m.request_throughput == pytest.approx(n / duration)
    assert m.max_concurrent_requests == conc
    assert s["p99_ttft_ms"] >= s["p90_ttft_ms"] >= s["p50_ttft_ms"] == s["median_ttft_ms"]
    assert len(results[0].itl) == out_len - 1
    assert results[0].generated_text == TOKEN * out_len
    body = cfg.bodies[0]
    assert body["max_tokens"] == out_len and body["stream"] and body["ignore_eos"]


def test_chat_without_usage_counts_text_chunks():
    rng = np.random.default_rng()
    out_len = int(rng.integers(3, 9))
    cfg = FakeServerConfig(ttft=0.02, tpot=0.005, send_usage=False)
    with FakeOpenAIServer(cfg) as url:
        results, duration, t0 = _run(url, _requests(rng, 3, out_len), chat=True)
    m = calculate_metrics(results, duration, t0=t0)
    assert m.completed == 3
    assert m.output_lens == [out_len] * 3  # the role-only chunk is not a token
    assert all(r.usage_output_tokens is None for r in results)
    assert cfg.bodies[0]["messages"][0]["role"] == "user"
    assert m.stats["median_ttft_ms"] >= 20.0


def test_failed_requests_are_counted_not_fatal():
    rng = np.random.default_rng()
    cfg = FakeServerConfig(ttft=0.005, tpot=0.002, fail_every=3)
    with FakeOpenAIServer(cfg) as url:
        results, duration, t0 = _run(url, _requests(rng, 9, 4), max_concurrency=1)
    m = calculate_metrics(results, duration, t0=t0)
    assert (m.completed, m.failed) == (6, 3)
    assert sum("HTTP 500" in r.error for r in results) == 3
    assert m.total_output == 6 * 4


def test_goodput_counts_requests_within_slos():
    rng = np.random.default_rng()
    cfg = FakeServerConfig(ttft=0.03, tpot=0.005)
    with FakeOpenAIServer(cfg) as url:
        results, duration, t0 = _run(url, _requests(rng, 4, 6))
    loose = calculate_metrics(
        results, duration, goodput_slos=parse_goodput(["ttft:2000", "tpot:500"])
    )
    tight = calculate_metrics(results, duration, goodput_slos=parse_goodput(["ttft:10"]))
    assert loose.request_goodput == pytest.approx(loose.request_throughput)
    assert tight.request_goodput == 0.0
    assert calculate_metrics(results, duration).request_goodput is None


def test_request_rate_spreads_arrivals():
    rng = np.random.default_rng()
    n, rate = 2000, float(rng.uniform(5, 50))
    poisson = arrival_offsets(n, rate, 1.0, seed=int(rng.integers(1000)))
    assert poisson[-1] == pytest.approx(n / rate)
    assert np.all(np.diff(poisson) >= 0)
    gaps = np.diff(poisson)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential: CV 1
    bursty = np.diff(arrival_offsets(n, rate, 0.25, seed=1))
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(2.0, abs=0.3)  # gamma k: 1/sqrt(k)
    assert not arrival_offsets(5, float("inf"), 1.0, seed=0).any()
    with pytest.raises(ConfigError, match="burstiness"):
        arrival_offsets(5, 1.0, 0.0, seed=0)


def test_poisson_rate_paces_the_run():
    rng = np.random.default_rng()
    cfg = FakeServerConfig(ttft=0.002, tpot=0.001)
    n, rate, seed = 10, 40.0, int(rng.integers(1000))
    with FakeOpenAIServer(cfg) as url:
        results, duration, t0 = _run(url, _requests(rng, n, 2), request_rate=rate, seed=seed)
    sent = np.array([r.start_time for r in results]) - t0
    planned = arrival_offsets(n, rate, 1.0, seed=seed)
    np.testing.assert_allclose(sent, planned, atol=0.03)
    assert duration >= n / rate  # the last request goes out at n / rate


def test_result_json_has_vllm_keys():
    rng = np.random.default_rng()
    cfg = FakeServerConfig(ttft=0.005, tpot=0.002)
    with FakeOpenAIServer(cfg) as url:
        results, duration, t0 = _run(url, _requests(rng, 3, 5))
    m = calculate_metrics(results, duration, percentiles=[99], metric_names=["ttft", "tpot", "itl"])
    out = json.loads(json.dumps(result_dict(m, results)))
    for key in (
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p99_itl_ms",
        "input_lens",
        "output_lens",
        "ttfts",
        "itls",
        "generated_texts",
        "errors",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
    ):
        assert key in out, key
    assert out["total_output_tokens"] == 15 and out["output_lens"] == [5, 5, 5]
    assert "mean_e2el_ms" not in out  # only the metrics asked for


def test_cli_end_to_end_writes_result_and_plot(tokenizer, tmp_path, capsys):
    from portaserve.serve.cli import main

    rng = np.random.default_rng()
    in_len, out_len = int(rng.integers(10, 40)), int(rng.integers(3, 8))
    cfg = FakeServerConfig(ttft=0.01, tpot=0.002)
    with FakeOpenAIServer(cfg) as url:
        rc = main(
            [
                "bench",
                "serve",
                "--base-url",
                url,
                "--tokenizer",
                "smollm2-135m",
                "--num-prompts",
                "5",
                "--random-input-len",
                str(in_len),
                "--random-output-len",
                str(out_len),
                "--max-concurrency",
                "2",
                "--ignore-eos",
                "--goodput",
                "ttft:5000",
                "--save-result",
                "--save-detailed",
                "--result-dir",
                str(tmp_path),
                "--result-filename",
                "r.json",
                "--plot",
                "--disable-tqdm",
                "--metadata",
                "machine=test",
            ]
        )
    assert rc == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["model_id"] == "fake-model"  # taken from /v1/models
    assert out["tokenizer_id"] == "smollm2-135m"
    assert out["completed"] == 5 and out["total_output_tokens"] == 5 * out_len
    assert out["input_lens"] == [in_len] * 5 and out["total_input_tokens"] == 5 * in_len
    assert out["request_goodput"] == pytest.approx(out["request_throughput"])
    assert out["machine"] == "test" and out["max_concurrency"] == 2
    for key in ("p90_ttft_ms", "p99_tpot_ms", "median_itl_ms", "mean_e2el_ms"):
        assert out[key] > 0
    for body in cfg.bodies:
        assert len(tokenizer.encode(body["prompt"])) == in_len
    assert (tmp_path / "r.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "Output token throughput (tok/s):" in text


def test_time_limit_cancels_and_keeps_partial_chunks():
    rng = np.random.default_rng()
    cfg = FakeServerConfig(ttft=0.02, tpot=0.05)
    limit = float(rng.uniform(0.4, 0.6))
    with FakeOpenAIServer(cfg) as url:
        results, duration, _ = _run(url, _requests(rng, 3, 40), time_limit=limit)
    assert limit <= duration < limit + 0.5
    for r in results:
        assert not r.success and "time limit" in r.error
        expected_chunks = (limit - cfg.ttft) / cfg.tpot + 1
        assert expected_chunks * 0.5 <= len(r.chunk_times) <= expected_chunks + 1
    assert calculate_metrics(results, duration).completed == 0
