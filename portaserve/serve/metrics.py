"""Prometheus metrics of one server (``/metrics``), in a registry of its own.

A registry per app (not prometheus-client's global one) lets several servers live in one
process, as the tests do. Per-request timings are measured by the async engine from the
moment the request reached the server; engine gauges (running, waiting, KV usage, prefix
cache) are read from the last stats snapshot the engine thread took, at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from collections.abc import Callable

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

#: ``status`` label values of ``portaserve_requests_total``.
REQUEST_STATUSES = ("stop", "length", "abort", "error", "rejected")


class ServerMetrics:
    """The server's metrics. ``stats_fn`` returns the engine's latest ``EngineStats`` or None."""

    def __init__(self, model_name: str, stats_fn: Callable[[], object | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats_fn = stats_fn
        labels = ["model_name"]
        r = self.registry
        self.requests = Counter(
            "portaserve_requests",
            "Requests by how they ended: stop, length (finished), abort "
            "(client went away or shutdown), error (engine failure), rejected (4xx/503 before "
            "running).",
            labels + ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "portaserve_prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "portaserve_generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.ttft = Histogram(
            "portaserve_time_to_first_token_seconds",
            "Arrival to first generated token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "portaserve_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "portaserve_e2e_request_latency_seconds",
            "Arrival to the last token (or abort).",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "portaserve_num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.waiting = Gauge(
            "portaserve_num_requests_waiting",
            "Requests waiting to be scheduled.",
            labels,
            registry=r,
        )
        self.kv_usage = Gauge(
            "portaserve_kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0..1).",
            labels,
            registry=r,
        )
        self.prefix_queries = Gauge(
            "portaserve_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (cumulative).",
            labels,
            registry=r,
        )
        self.prefix_hits = Gauge(
            "portaserve_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (cumulative).",
            labels,
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "portaserve_prefix_cache_hit_rate",
            "prefix_cache_hits / prefix_cache_queries since start.",
            labels,
            registry=r,
        )
        self.preemptions = Gauge(
            "portaserve_num_preemptions",
            "Requests preempted since start (cumulative).",
            labels,
            registry=r,
        )
        self._model = model_name
        # Show every series from the start, at zero.
        for status in REQUEST_STATUSES:
            self.requests.labels(model_name, status)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e):
            metric.labels(model_name)

    def count_request(self, status: str) -> None:
        self.requests.labels(self._model, status).inc()

    def observe_finished(
        self,
        *,
        num_prompt_tokens: int,
        num_output_tokens: int,
        ttft: float | None,
        e2e: float,
        decode_time: float | None,
    ) -> None:
        """Record one finished (or aborted) request. Times are seconds."""
        self.prompt_tokens.labels(self._model).inc(num_prompt_tokens)
        self.generation_tokens.labels(self._model).inc(num_output_tokens)
        if ttft is not None:
            self.ttft.labels(self._model).observe(ttft)
        if decode_time is not None and num_output_tokens > 1:
            self.tpot.labels(self._model).observe(decode_time / (num_output_tokens - 1))
        self.e2e.labels(self._model).observe(e2e)

    def render(self) -> bytes:
        stats = self._stats_fn()
        if stats is not None:
            m = self._model
            self.running.labels(m).set(stats.num_running)
            self.waiting.labels(m).set(stats.num_waiting)
            self.kv_usage.labels(m).set(stats.kv_usage)
            self.prefix_queries.labels(m).set(stats.prefix_cache_queries)
            self.prefix_hits.labels(m).set(stats.prefix_cache_hits)
            queries = stats.prefix_cache_queries
            self.prefix_hit_rate.labels(m).set(
                stats.prefix_cache_hits / queries if queries else 0.0
            )
            self.preemptions.labels(m).set(stats.num_preemptions)
        return generate_latest(self.registry)
