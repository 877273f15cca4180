"""``portaserve bench serve``: a load generator for any OpenAI-compatible server.

Flags, printed labels and ``--save-result`` keys follow ``vllm bench serve`` so that people's
scripts carry over. Requests stream over httpx (``stream_options.include_usage`` asks for the
server's token counts). Arrivals are all at once (``--request-rate inf``) or a gamma process
(``--burstiness 1`` is Poisson) rescaled so that N requests span N / rate seconds;
``--max-concurrency`` is a client-side semaphore.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from portaserve.bench.datasets import DATASET_NAMES, BenchTokenizer, SampleRequest
from portaserve.bench.metrics import (
    METRIC_TITLES,
    BenchmarkMetrics,
    RequestResult,
    calculate_metrics,
    parse_goodput,
    parse_metric_names,
    parse_percentiles,
    percentile_key,
    result_dict,
)
from portaserve.errors import ConfigError

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The ``bench serve`` flags (names and defaults as in ``vllm bench serve``)."""
    add = parser.add_argument
    add(
        "--base-url",
        default=None,
        help="server URL, e.g. http://127.0.0.1:8000 (wins over --host/--port)",
    )
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    add(
        "--model",
        default=None,
        help="model name sent to the server (default: the first of /v1/models)",
    )
    add(
        "--tokenizer",
        default=None,
        help="tokenizer for prompts and counts (default: the model's own)",
    )
    add("--api-key", default=None, help="bearer token for the server")
    add("--dataset-name", default="random", choices=DATASET_NAMES + ("prefix_repetition",))
    add("--dataset-path", default=None, help="ShareGPT-format JSON file")
    add("--num-prompts", type=int, default=1000)
    add("--random-input-len", type=int, default=1024)
    add("--random-output-len", type=int, default=128)
    add(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths in [L(1-r), L(1+r)]; 0 = fixed",
    )
    add("--prefix-repetition-prefix-len", type=int, default=256)
    add("--prefix-repetition-suffix-len", type=int, default=256)
    add("--prefix-repetition-num-prefixes", type=int, default=10)
    add("--prefix-repetition-output-len", type=int, default=128)
    add("--sharegpt-output-len", type=int, default=None)
    add("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at t=0")
    add("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    add("--max-concurrency", type=int, default=None)
    add("--ignore-eos", action="store_true", help="ask the server to generate exactly max_tokens")
    add("--temperature", type=float, default=0.0)
    add("--extra-body", default=None, help="JSON object merged into every request body")
    add("--num-warmups", type=int, default=0, help="requests sent (unmeasured) before the run")
    add("--seed", type=int, default=0)
    add("--disable-tqdm", action="store_true")
    add("--percentile-metrics", default="ttft,tpot,itl,e2el")
    add("--metric-percentiles", default="90,99")
    add(
        "--goodput",
        nargs="+",
        default=None,
        metavar="SLO",
        help="e.g. ttft:500 tpot:50 e2el:5000 (ms)",
    )
    add("--save-result", action="store_true")
    add("--save-detailed", action="store_true", help="keep per-request arrays in the JSON")
    add("--result-dir", default=None)
    add("--result-filename", default=None)
    add("--label", default=None, help="name of the server/backend in the result")
    add("--metadata", nargs="*", default=None, metavar="KEY=VALUE")
    add("--plot", action="store_true", help="write a PNG of latency distributions and throughput")


@dataclass(slots=True)
class ServeTarget:
    """Where and how to send requests."""

    url: str
    model: str
    chat: bool
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    extra_body: dict[str, Any] | None = None


def _payload(target: ServeTarget, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": req.expected_output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if target.ignore_eos:
        body["ignore_eos"] = True
    body.update(target.extra_body or {})
    return body


def _chunk_text(data: dict[str, Any], chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(
    client: Any, target: ServeTarget, req: SampleRequest, result: RequestResult | None = None
) -> RequestResult:
    """Stream one request; record TTFT, inter-chunk gaps, latency and the server's usage.

    Timings go into ``result`` as they arrive (a new one when None), so a request cancelled
    midway still shows what it received.
    """
    import httpx

    if result is None:
        result = RequestResult(req.prompt_len, req.expected_output_len)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    st = time.perf_counter()
    result.start_time = st
    last = st
    pieces: list[str] = []
    try:
        async with client.stream(
            "POST", target.url, json=_payload(target, req), headers=headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data_text = line[5:].strip()
                if data_text == "[DONE]":
                    continue  # read to the end, so that the connection goes back to the pool
                data = json.loads(data_text)
                now = time.perf_counter()
                if data.get("error"):
                    result.error = json.dumps(data["error"])[:500]
                    return result
                usage = data.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    result.usage_output_tokens = int(usage["completion_tokens"])
                text = _chunk_text(data, target.chat)
                if not text:
                    continue
                if not pieces:
                    result.ttft = now - st
                else:
                    result.itl.append(now - last)
                result.chunk_times.append(now)
                pieces.append(text)
                last = now
        result.latency = time.perf_counter() - st
        result.generated_text = "".join(pieces)
        result.success = bool(pieces) or bool(result.usage_output_tokens)
        if not result.success:
            result.error = "the stream carried no text"
    except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def arrivals(
    requests: Sequence[SampleRequest], request_rate: float, burstiness: float, seed: int
) -> AsyncIterator[SampleRequest]:
    """Yield requests at their scheduled times (see :func:`arrival_offsets`)."""
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    start = time.perf_counter()
    for req, offset in zip(requests, offsets, strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield req


def arrival_offsets(n: int, request_rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s from start) of ``n`` requests: all 0 at ``inf``, else gamma gaps with
    shape ``burstiness`` rescaled so that the last request goes at ``n / request_rate``.
    """
    if request_rate <= 0:
        raise ConfigError(
            f"--request-rate must be > 0 or inf; got {request_rate}", field="request_rate"
        )
    if burstiness <= 0:
        raise ConfigError(f"--burstiness must be > 0; got {burstiness}", field="burstiness")
    if np.isinf(request_rate) or n == 0:
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)  # [n]
    offsets = np.cumsum(gaps)
    return offsets * (n / request_rate) / offsets[-1]


async def run_benchmark(
    target: ServeTarget,
    requests: Sequence[SampleRequest],
    *,
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    num_warmups: int = 0,
    seed: int = 0,
    disable_tqdm: bool = True,
    time_limit: float | None = None,
) -> tuple[list[RequestResult], float, float]:
    """Send every request and return (results in dataset order, duration s, start time).

    With ``time_limit`` (s), requests still running then are cancelled and come back failed,
    with whatever chunks they had received.
    """
    import httpx

    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError(
            f"--max-concurrency must be >= 1; got {max_concurrency}", field="max_concurrency"
        )
    limit = max_concurrency or max(1, len(requests))
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        for i in range(num_warmups):
            warm = await send_request(client, target, requests[i % len(requests)])
            if not warm.success:
                raise ConfigError(
                    f"warmup request to {target.url} failed: {warm.error}", field="base_url"
                )
        semaphore = asyncio.Semaphore(limit)
        pbar = _progress(len(requests), disable_tqdm)
        results = [RequestResult(r.prompt_len, r.expected_output_len) for r in requests]

        async def one(i: int, req: SampleRequest) -> None:
            async with semaphore:
                await send_request(client, target, req, results[i])
            if pbar is not None:
                pbar.update(1)

        async def send_all() -> None:
            tasks, i = [], 0
            async for req in arrivals(requests, request_rate, burstiness, seed):
                tasks.append(asyncio.create_task(one(i, req)))
                i += 1
            await asyncio.gather(*tasks)

        start = time.perf_counter()
        everything = asyncio.create_task(send_all())
        done, _ = await asyncio.wait({everything}, timeout=time_limit)
        if not done:  # cancelling the gather cancels every request still in flight
            everything.cancel()
            await asyncio.gather(everything, return_exceptions=True)
            for r in results:
                if not r.success and not r.error:
                    r.error = f"stopped at the time limit ({time_limit:g} s)"
        else:
            everything.result()  # re-raise what a request task raised
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()
    return results, duration, start


def _progress(total: int, disabled: bool) -> Any:
    if disabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")


# --------------------------------------------------------------------------- reporting


def report_rows(
    m: BenchmarkMetrics,
    *,
    max_concurrency: int | None,
    request_rate: float,
    metric_names: Sequence[str],
    percentiles: Sequence[float],
) -> list[tuple[str, str]]:
    """(label, value) rows with vLLM's labels; a label of ``""`` marks a section title."""
    rows: list[tuple[str, str]] = [
        ("Successful requests:", f"{m.completed}"),
        ("Failed requests:", f"{m.failed}"),
        ("Maximum request concurrency:", f"{max_concurrency}"),
        ("Request rate configured (RPS):", f"{request_rate:.2f}"),
        ("Benchmark duration (s):", f"{m.duration:.2f}"),
        ("Total input tokens:", f"{m.total_input}"),
        ("Total generated tokens:", f"{m.total_output}"),
        ("Request throughput (req/s):", f"{m.request_throughput:.2f}"),
    ]
    if m.request_goodput is not None:
        rows.append(("Request goodput (req/s):", f"{m.request_goodput:.2f}"))
    rows += [
        ("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
        ("Peak output token throughput (tok/s):", f"{m.max_output_tokens_per_s:.2f}"),
        ("Peak concurrent requests:", f"{m.max_concurrent_requests}"),
        ("Total token throughput (tok/s):", f"{m.total_token_throughput:.2f}"),
    ]
    for name in metric_names:
        short = name.upper()
        rows.append(("", METRIC_TITLES[name]))
        rows.append((f"Mean {short} (ms):", f"{m.stats[f'mean_{name}_ms']:.2f}"))
        rows.append((f"Median {short} (ms):", f"{m.stats[f'median_{name}_ms']:.2f}"))
        for p in percentiles:
            key = percentile_key(p)
            rows.append((f"P{key} {short} (ms):", f"{m.stats[f'p{key}_{name}_ms']:.2f}"))
    return rows


def print_report(rows: list[tuple[str, str]]) -> None:
    """A rich table with vLLM's labels ("Serving Benchmark Result")."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Serving Benchmark Result", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in rows:
        if label:
            table.add_row(label, value)
        else:
            table.add_section()
            table.add_row(f"[bold]{value}[/bold]", "")
    Console().print(table)


def _resolve_target(args: argparse.Namespace) -> ServeTarget:
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    model = args.model or first_model_id(base, args.api_key)
    extra = None
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--extra-body is not JSON: {e}", field="extra_body") from e
        if not isinstance(extra, dict):
            raise ConfigError("--extra-body must be a JSON object", field="extra_body")
    return ServeTarget(
        url=base + args.endpoint,
        model=model,
        chat=args.endpoint.endswith("/chat/completions"),
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        api_key=args.api_key,
        extra_body=extra,
    )


def first_model_id(base: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base}/v1/models", headers=headers, timeout=30.0)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"cannot list models at {base}/v1/models ({e}); pass --model", field="model"
        ) from e


def _load_tokenizer(args: argparse.Namespace, model: str) -> BenchTokenizer | None:
    from portaserve.bench.datasets import load_tokenizer

    spec = args.tokenizer or model
    try:
        return load_tokenizer(spec)
    except ConfigError as e:
        if args.tokenizer:
            raise
        logger.warning("no tokenizer for %r (%s); output tokens are counted from usage", spec, e)
        return None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``portaserve bench serve``."""
    from portaserve.bench.datasets import build_dataset

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    percentiles = parse_percentiles(args.metric_percentiles)
    metric_names = parse_metric_names(args.percentile_metrics)
    slos = parse_goodput(args.goodput)
    if args.num_prompts < 1:
        raise ConfigError(
            f"--num-prompts must be >= 1; got {args.num_prompts}", field="num_prompts"
        )
    target = _resolve_target(args)
    tokenizer = _load_tokenizer(args, target.model)
    requests = build_dataset(args, tokenizer)
    print(
        f"Sending {len(requests)} requests to {target.url} (model {target.model}, "
        f"rate {args.request_rate}, max concurrency {args.max_concurrency})"
    )
    results, duration, start = asyncio.run(
        run_benchmark(
            target,
            requests,
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            num_warmups=args.num_warmups,
            seed=args.seed,
            disable_tqdm=args.disable_tqdm,
        )
    )
    metrics = calculate_metrics(
        results,
        duration,
        tokenizer=tokenizer,
        percentiles=percentiles,
        metric_names=metric_names,
        goodput_slos=slos or None,
        t0=start,
    )
    print_report(
        report_rows(
            metrics,
            max_concurrency=args.max_concurrency,
            request_rate=args.request_rate,
            metric_names=metric_names,
            percentiles=percentiles,
        )
    )
    errors = sorted({r.error for r in results if r.error})
    for error in errors[:5]:
        logger.error("request failed: %s", error)
    result = _result_json(args, target, tokenizer, metrics, results)
    if args.save_result or args.plot:
        path = _result_path(args, target)
        if args.save_result:
            path.write_text(json.dumps(result, indent=2))
            print(f"Result written to {path}")
        if args.plot:
            from portaserve.bench.plot import save_plot

            png = save_plot(results, metrics, start, path.with_suffix(".png"))
            print(f"Plot written to {png}")
    return 0 if metrics.completed else 1


def _result_json(
    args: argparse.Namespace,
    target: ServeTarget,
    tokenizer: BenchTokenizer | None,
    metrics: BenchmarkMetrics,
    results: Sequence[RequestResult],
) -> dict[str, Any]:
    from portaserve import __version__

    head: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if target.chat else "openai",
        "endpoint_type": "openai-chat" if target.chat else "openai",
        "label": args.label,
        "model_id": target.model,
        "tokenizer_id": tokenizer.name if tokenizer else None,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if np.isfinite(args.request_rate) else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "dataset_name": args.dataset_name,
        "portaserve_version": __version__,
    }
    for item in args.metadata or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--metadata items are KEY=VALUE; got {item!r}", field="metadata")
        head[key] = value
    body = result_dict(metrics, results)
    if not args.save_detailed:
        for key in (
            "ttfts",
            "itls",
            "e2els",
            "generated_texts",
            "errors",
            "input_lens",
            "output_lens",
        ):
            body.pop(key)
    return head | body


def _result_path(args: argparse.Namespace, target: ServeTarget) -> Path:
    name = args.result_filename
    if not name:
        rate = "inf" if not np.isfinite(args.request_rate) else f"{args.request_rate:g}"
        model = target.model.replace("/", "_")
        conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        name = (
            f"{args.label or 'openai'}-{rate}qps{conc}-{model}-{datetime.now():%Y%m%d-%H%M%S}.json"
        )
    directory = Path(args.result_dir or ".")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name
