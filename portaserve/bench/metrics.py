"""Serving metrics from per-request timings, with the definitions and key names of vLLM.

- TTFT: from sending the request to the first streamed chunk that carries text.
- ITL: every gap between text-carrying chunks, pooled over all requests.
- TPOT (per request): ``(latency - ttft) / (output_tokens - 1)`` for outputs longer than one.
- E2EL: request latency.
- Output tokens: the server's ``usage.completion_tokens`` when it streams usage, else the
  tokenizer's count of the generated text, else the number of text chunks.
- Throughputs divide by the benchmark duration; goodput counts requests meeting every SLO.

Times are kept in seconds; result keys end in ``_ms`` where vLLM's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from portaserve.errors import ConfigError

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


@dataclass(slots=True)
class RequestResult:
    """What the client saw of one request. Times are ``time.perf_counter`` seconds."""

    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    generated_text: str = ""
    usage_output_tokens: int | None = None
    ttft: float = 0.0
    latency: float = 0.0
    start_time: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each text chunk


@dataclass(slots=True)
class BenchmarkMetrics:
    """Aggregates of one run; per-metric statistics live in ``stats`` as ``{key_ms: value}``."""

    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    stats: dict[str, float]
    output_lens: list[int]
    tpots: list[float]
    e2els: list[float]


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` -> ``[50.0, 90.0, 99.0]``; each in (0, 100]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise ConfigError(
            f"--metric-percentiles: {text!r} is not a comma list of numbers",
            field="metric_percentiles",
        ) from e
    if not values or any(not 0.0 < p <= 100.0 for p in values):
        raise ConfigError(
            f"--metric-percentiles must be in (0, 100]; got {text!r}", field="metric_percentiles"
        )
    return values


def parse_metric_names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRIC_NAMES]
    if bad or not names:
        raise ConfigError(
            f"--percentile-metrics must name some of {', '.join(METRIC_NAMES)}; got {text!r}",
            field="percentile_metrics",
        )
    return names


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 0.2, "tpot": 0.05}`` (SLOs in seconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ConfigError(
                f"--goodput items are ttft:MS, tpot:MS or e2el:MS; got {item!r}", field="goodput"
            )
        try:
            ms = float(value)
        except ValueError as e:
            raise ConfigError(
                f"--goodput {name} needs milliseconds; got {value!r}", field="goodput"
            ) from e
        if ms <= 0:
            raise ConfigError(f"--goodput {name} must be > 0 ms; got {ms}", field="goodput")
        slos[name] = ms / 1000.0
    return slos


def percentile_key(p: float) -> str:
    """vLLM's spelling: ``99`` -> ``"99"``, ``99.9`` -> ``"99.9"``."""
    return str(int(p)) if int(p) == p else str(p)


def output_token_count(result: RequestResult, tokenizer: Any | None) -> int:
    if result.usage_output_tokens is not None:
        return result.usage_output_tokens
    if tokenizer is not None:
        return len(tokenizer.encode(result.generated_text))
    return len(result.chunk_times)


def peak_output_rate(
    results: Sequence[RequestResult], output_lens: Sequence[int], t0: float, bucket_s: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens per second in ``bucket_s`` buckets since ``t0``: (bucket starts, rates).

    A chunk is credited ``output_tokens / num_chunks`` tokens, so servers that bundle
    tokens into one chunk are counted fairly.
    """
    times, weights = [], []
    for r, n_out in zip(results, output_lens, strict=True):
        if r.success and r.chunk_times:
            share = n_out / len(r.chunk_times)
            times.extend(t - t0 for t in r.chunk_times)
            weights.extend([share] * len(r.chunk_times))
    if not times:
        return np.zeros(0), np.zeros(0)
    num_buckets = int(max(times) // bucket_s) + 1
    counts = np.zeros(num_buckets)
    np.add.at(counts, (np.asarray(times) // bucket_s).astype(np.int64), weights)
    return np.arange(num_buckets) * bucket_s, counts / bucket_s


def concurrency_over_time(results: Sequence[RequestResult]) -> tuple[np.ndarray, np.ndarray]:
    """Step function of requests in flight: (event times, in-flight count after each event)."""
    events = []
    for r in results:
        events.append((r.start_time, 1))
        events.append((r.start_time + r.latency, -1))
    events.sort()
    times = np.array([t for t, _ in events])
    counts = np.cumsum([d for _, d in events]) if events else np.zeros(0)
    return times, counts


def calculate_metrics(
    results: Sequence[RequestResult],
    duration: float,
    *,
    tokenizer: Any | None = None,
    percentiles: Sequence[float] = (99.0,),
    metric_names: Sequence[str] = ("ttft", "tpot", "itl"),
    goodput_slos: dict[str, float] | None = None,
    t0: float | None = None,
) -> BenchmarkMetrics:
    """Aggregate per-request results of a run that lasted ``duration`` seconds."""
    if duration <= 0:
        raise ConfigError(f"benchmark duration must be > 0; got {duration}", field="duration")
    output_lens, ttfts, tpots, itls, e2els = [], [], [], [], []
    total_input = completed = good = 0
    for r in results:
        if not r.success:
            output_lens.append(0)
            continue
        n_out = output_token_count(r, tokenizer)
        output_lens.append(n_out)
        total_input += r.prompt_len
        completed += 1
        tpot = (r.latency - r.ttft) / (n_out - 1) if n_out > 1 else 0.0
        if n_out > 1:
            tpots.append(tpot)
        ttfts.append(r.ttft)
        itls.extend(r.itl)
        e2els.append(r.latency)
        if goodput_slos and _meets(goodput_slos, r.ttft, tpot, r.latency):
            good += 1
    total_output = sum(output_lens)
    series = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    stats: dict[str, float] = {}
    for name in metric_names:
        values = np.asarray(series[name] or [0.0]) * 1000.0
        stats[f"mean_{name}_ms"] = float(values.mean())
        stats[f"median_{name}_ms"] = float(np.median(values))
        stats[f"std_{name}_ms"] = float(values.std())
        for p in percentiles:
            stats[f"p{percentile_key(p)}_{name}_ms"] = float(np.percentile(values, p))
    start = t0 if t0 is not None else min((r.start_time for r in results), default=0.0)
    _, rates = peak_output_rate(results, output_lens, start)
    _, in_flight = concurrency_over_time([r for r in results if r.success])
    return BenchmarkMetrics(
        completed=completed,
        failed=len(results) - completed,
        total_input=total_input,
        total_output=total_output,
        duration=duration,
        request_throughput=completed / duration,
        request_goodput=good / duration if goodput_slos else None,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        max_output_tokens_per_s=float(rates.max()) if rates.size else 0.0,
        max_concurrent_requests=int(in_flight.max()) if in_flight.size else 0,
        stats=stats,
        output_lens=output_lens,
        tpots=tpots,
        e2els=e2els,
    )


def _meets(slos: dict[str, float], ttft: float, tpot: float, e2el: float) -> bool:
    observed = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
    return all(observed[name] <= limit for name, limit in slos.items())


def result_dict(metrics: BenchmarkMetrics, results: Sequence[RequestResult]) -> dict[str, Any]:
    """The run's numbers under ``vllm bench serve``'s JSON key names (times in ms or s as there)."""
    out: dict[str, Any] = {
        "duration": metrics.duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    out.update(metrics.stats)
    out.update(
        {
            "input_lens": [r.prompt_len for r in results],
            "output_lens": metrics.output_lens,
            "ttfts": [r.ttft for r in results],
            "itls": [r.itl for r in results],
            "e2els": [r.latency for r in results],
            "generated_texts": [r.generated_text for r in results],
            "errors": [r.error for r in results],
        }
    )
    return out
