"""``bench serve --plot``: one PNG with latency distributions and throughput over time.

Panels: TTFT, TPOT, ITL and E2EL histograms (ms, with median and p99 marked), then output
tokens/s in buckets of about 1/60 of the run with requests in flight on a second axis. matplotlib (the
``bench`` extra) is imported here only, with the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from portaserve.bench.metrics import (
    METRIC_TITLES,
    BenchmarkMetrics,
    RequestResult,
    concurrency_over_time,
    peak_output_rate,
)
from portaserve.errors import ConfigError


def save_plot(
    results: Sequence[RequestResult], metrics: BenchmarkMetrics, t0: float, path: str | Path
) -> Path:
    """Write the PNG to ``path`` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'portaserve[bench]'", field="plot"
        ) from e
    ok = [r for r in results if r.success]
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": metrics.tpots,
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": metrics.e2els,
    }
    fig = plt.figure(figsize=(12, 9), constrained_layout=True)
    grid = fig.add_gridspec(3, 2)
    for i, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        if ms.size:
            ax.hist(ms, bins=min(50, max(5, ms.size // 4)), color="tab:blue", alpha=0.8)
            for q, style in ((50, "--"), (99, ":")):
                ax.axvline(np.percentile(ms, q), color="black", linestyle=style, label=f"p{q}")
            ax.legend()
        ax.set_title(f"{METRIC_TITLES[name]} ({name.upper()})")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    ax = fig.add_subplot(grid[2, :])
    bucket = max(0.1, round(metrics.duration / 60, 1))
    starts, rates = peak_output_rate(results, metrics.output_lens, t0, bucket_s=bucket)
    if starts.size:  # close the last bucket so the step reaches its right edge
        starts, rates = np.append(starts, starts[-1] + bucket), np.append(rates, rates[-1])
    (rate_line,) = ax.step(starts, rates, where="post", color="tab:green", label="output tok/s")
    ax.set_xlabel("s since start")
    ax.set_ylabel(f"output tokens/s ({bucket:g} s buckets)")
    twin = ax.twinx()
    times, in_flight = concurrency_over_time(ok)
    (flight_line,) = twin.step(
        times - t0, in_flight, where="post", color="tab:orange", label="requests in flight"
    )
    twin.set_ylabel("requests in flight")
    ax.set_title("Throughput over time")
    ax.legend(handles=[rate_line, flight_line], loc="upper left")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
