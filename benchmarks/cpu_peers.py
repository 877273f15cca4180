#!/usr/bin/env python
"""CPU peers side by side: portaserve's CPU-capable devices, Hugging Face transformers and
llama.cpp, on the same GGUF and the same number of threads, in one run.

For each engine it measures, in a fresh subprocess (so thread settings and memory do not
leak between engines):

- batch-1 decode tokens/s: the median step time of 128 greedy tokens after a 16-token prompt
  (like ``llama-bench -n 128``);
- prefill tokens/s for a 512-token prompt (like ``llama-bench -p 512``);
- serving: its OpenAI-compatible server driven by ``portaserve bench serve``'s client at
  ``--max-concurrency`` 1, 4 and 16 (random prompts, fixed lengths, EOS ignored): output
  tokens/s and median TTFT. transformers has no server here, so it has no serving numbers.

llama.cpp runs through llama-cpp-python from its own virtual environment
(``ci/build_llamacpp.sh`` builds it); its server ignores ``ignore_eos``, so EOS is banned with
``logit_bias`` instead. The script's top level imports only the standard library: the
llama.cpp worker runs it under that venv's Python, where portaserve is not installed.

    python benchmarks/cpu_peers.py --threads 2 --json cpu_peers.json --markdown cpu_peers.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "CPU_PEERS_RESULT "
DEFAULT_LLAMACPP_PYTHON = "/tmp/llamacpp-venv/bin/python"


# --------------------------------------------------------------------------- workers


def _median_step(times: list[float]) -> float:
    return statistics.median(times) if times else float("nan")


def budgeted_prefill(run_prefill: Any, full_len: int, budget_s: float, iters: int) -> dict:
    """Prefill tokens/s at ``full_len``, or at the longest multiple of 64 tokens that fits
    ``budget_s`` when the engine is too slow for the full length (reported as such).

    ``run_prefill(n)`` times one fresh ``n``-token prompt and returns seconds.
    """
    probe_len = min(64, full_len)
    probe = run_prefill(probe_len)
    estimate = probe * full_len / probe_len
    length = full_len
    if estimate > budget_s:
        length = max(probe_len, int(budget_s / probe * probe_len) // 64 * 64)
    repeats = max(1, min(iters, int(budget_s / max(estimate, 1e-9))))
    times = [run_prefill(length) for _ in range(repeats)]
    return {"prefill_tok_s": length / statistics.median(times), "prefill_len_measured": length}


def decode_deadline(budget_s: float) -> float:
    return time.perf_counter() + budget_s


MIN_DECODE_STEPS = 8
PROFILE_DECODE_TOKENS = 6  # a profile of a few steps shows where a step's time goes


def worker_portaserve(args: argparse.Namespace) -> dict[str, Any]:
    from portaserve.bench.conditions import engine_conditions, random_token_prompts
    from portaserve.bench.latency import one_iteration
    from portaserve.bench.throughput import make_llm

    ns = argparse.Namespace(
        model=args.gguf,
        device=args.device,
        dtype="auto",
        max_num_seqs=None,
        max_num_batched_tokens=None,
        max_model_len=None,
        enable_prefix_caching=False,
        seed=0,
    )
    t0 = time.perf_counter()
    llm = make_llm(ns)
    load_s = time.perf_counter() - t0
    one_iteration(llm, random_token_prompts(llm, 1, 32, 99), 4, "warmup")
    seeds = iter(range(1, 1000))

    def run_prefill(n: int) -> float:
        prompts = random_token_prompts(llm, 1, n, next(seeds))
        return one_iteration(llm, prompts, 1, f"prefill-{n}-{time.perf_counter()}")[0]

    prefill = budgeted_prefill(run_prefill, args.prefill_len, args.budget_s, args.iters)
    step_medians, num_steps = [], 0
    for it in range(args.iters):
        steps = portaserve_decode_steps(llm, args.decode_tokens, decode_deadline(args.budget_s), it)
        num_steps = max(num_steps, len(steps))
        step_medians.append(_median_step(steps))
        if len(steps) < args.decode_tokens - 1:
            break  # out of time budget: one run is all we take
    result = {
        "load_s": load_s,
        **prefill,
        "decode_tok_s": 1.0 / statistics.median(step_medians),
        "decode_steps_measured": num_steps,
        "conditions": engine_conditions(llm),
    }
    if args.profile:
        result["profile"] = profile_decode(llm, min(args.decode_tokens, PROFILE_DECODE_TOKENS))
    return result


def portaserve_decode_steps(llm: Any, max_tokens: int, deadline: float, seed: int) -> list[float]:
    """Step times of one batch-1 greedy decode after a 16-token prompt, stopped at the
    deadline (after at least MIN_DECODE_STEPS steps)."""
    from portaserve import SamplingParams
    from portaserve.bench.conditions import random_token_prompts

    engine = llm.llm_engine
    request_id = f"decode-{seed}-{time.perf_counter()}"
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request(request_id, random_token_prompts(llm, 1, 16, 500 + seed)[0], params)
    steps: list[float] = []
    try:
        while not any(out.outputs[0].token_ids for out in engine.step()):
            pass  # prefill
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
            if t > deadline and len(steps) >= MIN_DECODE_STEPS:
                break
    finally:
        engine.abort_request(request_id)
    return steps


def profile_decode(llm: Any, decode_tokens: int) -> dict[str, str]:
    """Where one batch-1 generation's time goes: cProfile (Python) and torch.profiler (ops)."""
    import cProfile
    import io
    import pstats

    import torch

    from portaserve.bench.conditions import random_token_prompts
    from portaserve.bench.latency import one_iteration

    prompts = random_token_prompts(llm, 1, 16, 5)
    profiler = cProfile.Profile()
    profiler.enable()
    one_iteration(llm, prompts, decode_tokens, "profile-py")
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_iteration(llm, random_token_prompts(llm, 1, 16, 6), decode_tokens, "profile-ops")
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {"python_tottime": text.getvalue(), "torch_ops": ops}


def worker_transformers(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> torch.Tensor:
        return torch.randint(256, vocab, (1, n), generator=gen)  # [1, n]

    with torch.inference_mode():
        model(prompt(32))  # warmup

        def run_prefill(n: int) -> float:
            ids = prompt(n)
            t = time.perf_counter()
            model(ids, use_cache=True)
            return time.perf_counter() - t

        prefill = budgeted_prefill(run_prefill, args.prefill_len, args.budget_s, args.iters)
        step_medians, num_steps = [], 0
        for _ in range(args.iters):
            deadline = decode_deadline(args.budget_s)
            out = model(prompt(16), use_cache=True)
            past, steps = out.past_key_values, []
            for _ in range(args.decode_tokens - 1):
                token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                t = time.perf_counter()
                out = model(token, past_key_values=past, use_cache=True)
                steps.append(time.perf_counter() - t)
                past = out.past_key_values
                if t > deadline and len(steps) >= MIN_DECODE_STEPS:
                    break
            step_medians.append(_median_step(steps))
            num_steps = max(num_steps, len(steps))
            if len(steps) < args.decode_tokens - 1:
                break
    return {
        "load_s": load_s,
        **prefill,
        "decode_tok_s": 1.0 / statistics.median(step_medians),
        "decode_steps_measured": num_steps,
        "conditions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32 (GGUF dequantized at load)",
            "threads": torch.get_num_threads(),
        },
    }


def worker_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    import random

    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=2048,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = llm.n_vocab()

    def prompt(n: int) -> list[int]:
        return [rng.randrange(256, vocab) for _ in range(n)]

    llm.reset()
    llm.eval(prompt(32))  # warmup
    prefill_times, step_medians = [], []
    for _ in range(args.iters):
        llm.reset()
        ids = prompt(args.prefill_len)
        t = time.perf_counter()
        llm.eval(ids)
        prefill_times.append(time.perf_counter() - t)
    for _ in range(args.iters):
        steps, last = [], None
        generator = llm.generate(prompt(16), top_k=1, temp=0.0, reset=True)
        for i, _token in enumerate(generator):
            now = time.perf_counter()
            if last is not None:
                steps.append(now - last)
            last = now
            if i + 1 >= args.decode_tokens:
                break
        step_medians.append(_median_step(steps))
    return {
        "load_s": load_s,
        "prefill_tok_s": args.prefill_len / statistics.median(prefill_times),
        "decode_tok_s": 1.0 / statistics.median(step_medians),
        "conditions": {
            "llama_cpp_python": llama_cpp.__version__,
            "threads": args.threads,
            "weights": "GGUF as is",
        },
    }


def worker_openvino_genai(args: argparse.Namespace) -> dict[str, Any]:
    """openvino-genai's LLMPipeline reading the GGUF directly; times from its perf metrics."""
    import random

    import numpy as np
    import openvino as ov
    import openvino_genai

    t0 = time.perf_counter()
    pipe = openvino_genai.LLMPipeline(args.gguf, "CPU", INFERENCE_NUM_THREADS=args.threads)
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = 49152 if "SmolLM2" in args.gguf else 32000

    def inputs(n: int) -> Any:
        ids = np.array([[rng.randrange(256, vocab) for _ in range(n)]], dtype=np.int64)  # [1, n]
        return openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))

    def config(n: int) -> Any:
        cfg = openvino_genai.GenerationConfig()
        cfg.max_new_tokens = n
        cfg.min_new_tokens = n
        cfg.ignore_eos = True
        return cfg

    pipe.generate(inputs(32), config(4))  # warmup

    def run_prefill(n: int) -> float:
        result = pipe.generate(inputs(n), config(1))
        return result.perf_metrics.get_ttft().mean / 1000.0

    prefill = budgeted_prefill(run_prefill, args.prefill_len, args.budget_s, args.iters)
    tpots = []
    for _ in range(args.iters):
        result = pipe.generate(inputs(16), config(args.decode_tokens))
        tpots.append(result.perf_metrics.get_tpot().mean / 1000.0)
    return {
        "load_s": load_s,
        **prefill,
        "decode_tok_s": 1.0 / statistics.median(tpots),
        "conditions": {
            "openvino_genai": openvino_genai.__version__,
            "threads": args.threads,
            "weights": "GGUF read by openvino-genai",
            "precision": "plugin default",
        },
    }


WORKERS = {
    "portaserve": worker_portaserve,
    "transformers": worker_transformers,
    "llamacpp": worker_llamacpp,
    "openvino-genai": worker_openvino_genai,
}


# --------------------------------------------------------------------------- orchestration


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "PORTASERVE_NUM_THREADS",
    ):
        env[name] = str(threads)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_worker(
    kind: str, python: str, args: argparse.Namespace, device: str | None = None
) -> dict[str, Any]:
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--gguf",
        args.gguf,
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--iters",
        str(args.iters),
        "--decode-tokens",
        str(args.decode_tokens),
        "--prefill-len",
        str(args.prefill_len),
        "--budget-s",
        str(args.budget_s),
    ]
    if device:
        cmd += ["--device", device]
    if args.profile and kind == "portaserve":
        cmd.append("--profile")
    print(f"[cpu_peers] {kind} {device or ''}: offline decode/prefill ...", flush=True)
    try:
        proc = subprocess.run(
            cmd,
            env=thread_env(args.threads),
            capture_output=True,
            text=True,
            timeout=args.worker_timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :]) | {"loadavg_after": os.getloadavg()}
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(1.0)
    raise RuntimeError(f"server not ready after {timeout:.0f} s")


def serve_sweep(
    server_cmd: list[str],
    ready_path: str,
    port: int,
    args: argparse.Namespace,
    tokenizer: Any,
    extra_body: dict[str, Any] | None,
    ignore_eos: bool,
    log: Path,
) -> dict[str, Any]:
    """Start a server, drive it at each concurrency, stop it."""
    import asyncio

    from portaserve.bench.datasets import random_dataset
    from portaserve.bench.serve import ServeTarget, first_model_id, run_benchmark

    base = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            server_cmd, env=thread_env(args.threads), stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(base + ready_path, proc, timeout=args.server_start_timeout)
            target = ServeTarget(
                url=base + "/v1/completions",
                model=first_model_id(base, None),
                chat=False,
                ignore_eos=ignore_eos,
                extra_body=extra_body,
            )
            warm = random_dataset(tokenizer, num_prompts=1, input_len=16, output_len=2, seed=7)
            asyncio.run(run_benchmark(target, warm))
            for conc in args.concurrency:
                n = max(args.min_prompts, args.prompts_per_concurrency * conc)
                reqs = random_dataset(
                    tokenizer,
                    num_prompts=n,
                    input_len=args.serve_input_len,
                    output_len=args.serve_output_len,
                    seed=conc,
                )
                print(f"[cpu_peers]   concurrency {conc}: {n} requests", flush=True)
                out, duration, t0 = asyncio.run(
                    run_benchmark(target, reqs, max_concurrency=conc, time_limit=args.serve_timeout)
                )
                results[str(conc)] = serving_numbers(out, duration, t0, tokenizer)
        except RuntimeError as e:
            results["error"] = f"{e} (log: {log})"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


def serving_numbers(out: list[Any], duration: float, t0: float, tokenizer: Any) -> dict[str, Any]:
    """Output tokens/s and median TTFT of one concurrency level.

    When the time limit cut the run short (``partial``), throughput counts every streamed
    chunk (one token per chunk on both servers here) over the time spent, and TTFT is over the
    requests that got a first token.
    """
    from portaserve.bench.metrics import calculate_metrics

    m = calculate_metrics(
        out, duration, tokenizer=tokenizer, t0=t0, percentiles=[50], metric_names=["ttft", "tpot"]
    )
    partial = any("time limit" in r.error for r in out)
    numbers = {
        "completed": m.completed,
        "failed": m.failed,
        "partial": partial,
        "output_throughput": m.output_throughput,
        "median_ttft_ms": m.stats["median_ttft_ms"],
        "median_tpot_ms": m.stats["median_tpot_ms"],
        "mean_output_len": m.total_output / max(1, m.completed),
        "duration": duration,
    }
    if partial:
        ttfts = [r.ttft * 1000 for r in out if r.chunk_times]
        numbers["output_throughput"] = sum(len(r.chunk_times) for r in out) / duration
        numbers["median_ttft_ms"] = statistics.median(ttfts) if ttfts else float("nan")
    return numbers


def portaserve_devices() -> list[str]:
    """Available devices that run on the host CPU at a usable speed (priority >= 0)."""
    from portaserve.plugins.manager import get_registry

    return [e.name for e in get_registry().available_devices() if e.priority >= 0]


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from portaserve.bench.conditions import cpu_model_name
    from portaserve.bench.datasets import load_tokenizer

    tokenizer = load_tokenizer(args.gguf)
    # llama-cpp-python's server has no ignore_eos: ban every end-of-generation candidate
    stop_ids = set(getattr(tokenizer.impl, "eos_token_ids", ())) | set(tokenizer.special_ids)
    ban_eos = {"logit_bias": {str(i): -100.0 for i in sorted(stop_ids)}}
    peers = args.peers
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "model": args.gguf,
        "prefill_len": args.prefill_len,
        "decode_tokens": args.decode_tokens,
        "serve_input_len": args.serve_input_len,
        "serve_output_len": args.serve_output_len,
        "loadavg_start": os.getloadavg(),
        "engines": {},
    }
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    if "portaserve" in peers:
        for device in args.devices or portaserve_devices():
            name = f"portaserve {device}"
            entry = run_worker("portaserve", sys.executable, args, device=device)
            if not args.skip_serving and "error" not in entry:
                port = free_port()
                cmd = [
                    sys.executable,
                    "-m",
                    "portaserve.serve.cli",
                    "serve",
                    args.gguf,
                    "--device",
                    device,
                    "--port",
                    str(port),
                    "--no-enable-prefix-caching",
                ]
                print(f"[cpu_peers] {name}: serving ...", flush=True)
                entry["serving"] = serve_sweep(
                    cmd,
                    "/health",
                    port,
                    args,
                    tokenizer,
                    None,
                    True,
                    logs / f"server-portaserve-{device}.log",
                )
            report["engines"][name] = entry
    if "transformers" in peers:
        report["engines"]["transformers fp32"] = run_worker("transformers", sys.executable, args)
    if "openvino-genai" in peers:
        report["engines"]["openvino-genai"] = run_worker("openvino-genai", sys.executable, args)
    if "llamacpp" in peers:
        python = args.llamacpp_python
        if not Path(python).exists():
            report["engines"]["llama.cpp"] = {
                "error": f"{python} not found; run ci/build_llamacpp.sh"
            }
        else:
            entry = run_worker("llamacpp", python, args)
            if not args.skip_serving and "error" not in entry:
                port = free_port()
                cmd = [
                    python,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    args.gguf,
                    "--n_threads",
                    str(args.threads),
                    "--n_threads_batch",
                    str(args.threads),
                    "--n_ctx",
                    "4096",
                    # by default a new request cuts off the one being streamed (the server runs
                    # one at a time); queue them instead, as every other server here does
                    "--interrupt_requests",
                    "false",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ]
                print("[cpu_peers] llama.cpp: serving ...", flush=True)
                entry["serving"] = serve_sweep(
                    cmd,
                    "/v1/models",
                    port,
                    args,
                    tokenizer,
                    ban_eos,
                    False,
                    logs / "server-llamacpp.log",
                )
            report["engines"]["llama.cpp"] = entry
    return report


# --------------------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "—"


def markdown(report: dict[str, Any], concurrency: list[int]) -> str:
    """The side-by-side table, plus how far portaserve's best device is from the best peer."""
    head = ["engine", "decode tok/s (batch 1)", "prefill tok/s (512)"]
    head += [f"c={c}: out tok/s / TTFT ms" for c in concurrency]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in report["engines"].items():
        if "error" in e and "decode_tok_s" not in e:
            last = e["error"].strip().splitlines()[-1] if e["error"].strip() else "failed"
            lines.append(f"| {name} | error: {last[:120]} |" + " |" * (len(head) - 2))
            continue
        decode, prefill = _fmt(e.get("decode_tok_s")), _fmt(e.get("prefill_tok_s"))
        steps = e.get("decode_steps_measured")
        if steps and steps < report.get("decode_tokens", 128) - 1:
            decode += f" ({steps} steps: time budget)"
        measured = e.get("prefill_len_measured")
        if measured and measured < report.get("prefill_len", 512):
            prefill += f" (at {measured} tokens: time budget)"
        row = [name, decode, prefill]
        serving = e.get("serving") or {}
        for c in concurrency:
            s = serving.get(str(c)) or {}
            if "output_throughput" in s:
                mark = " (cut at time limit)" if s.get("partial") else ""
                row.append(f"{s['output_throughput']:.1f} / {s['median_ttft_ms']:.0f}{mark}")
            else:
                row.append(s.get("error", serving.get("error", "—"))[:60] if s or serving else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *gap_lines(report, concurrency)]
    return "\n".join(lines)


def gap_lines(report: dict[str, Any], concurrency: list[int]) -> list[str]:
    """Where portaserve's best device trails the best peer, by how much (ratio < 1)."""
    ours = {n: e for n, e in report["engines"].items() if n.startswith("portaserve")}
    peers = {n: e for n, e in report["engines"].items() if not n.startswith("portaserve")}
    metrics = [("decode_tok_s", "batch-1 decode"), ("prefill_tok_s", "prefill 512")]
    out = []
    for key, label in metrics:
        best_ours = max(((e.get(key) or 0.0, n) for n, e in ours.items()), default=(0.0, "-"))
        best_peer = max(((e.get(key) or 0.0, n) for n, e in peers.items()), default=(0.0, "-"))
        if best_ours[0] and best_peer[0]:
            ratio = best_ours[0] / best_peer[0]
            out.append(
                f"- {label}: {best_ours[1]} {best_ours[0]:.1f} tok/s vs {best_peer[1]} "
                f"{best_peer[0]:.1f} tok/s = {ratio:.2f}x "
                + ("(behind by " + f"{(1 - ratio) * 100:.0f}%)" if ratio < 1 else "(ahead)")
            )
    for c in concurrency:

        def rate(e: dict[str, Any], c: int = c) -> float:
            return ((e.get("serving") or {}).get(str(c)) or {}).get("output_throughput") or 0.0

        best_ours = max(((rate(e), n) for n, e in ours.items()), default=(0.0, "-"))
        best_peer = max(((rate(e), n) for n, e in peers.items()), default=(0.0, "-"))
        if best_ours[0] and best_peer[0]:
            ratio = best_ours[0] / best_peer[0]
            out.append(
                f"- serving c={c}: {best_ours[1]} {best_ours[0]:.1f} out tok/s vs "
                f"{best_peer[1]} {best_peer[0]:.1f} = {ratio:.2f}x"
            )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="portaserve model name or GGUF path")
    p.add_argument("--gguf", default=None, help="the GGUF file (default: resolve --model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--peers",
        default="portaserve,transformers,openvino-genai,llamacpp",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
    )
    p.add_argument(
        "--devices",
        default=None,
        type=lambda s: s.split(","),
        help="portaserve devices (default: every available CPU-capable one)",
    )
    p.add_argument("--llamacpp-python", default=DEFAULT_LLAMACPP_PYTHON)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument(
        "--concurrency", default=[1, 4, 16], type=lambda s: [int(x) for x in s.split(",")]
    )
    p.add_argument("--serve-input-len", type=int, default=128)
    p.add_argument("--serve-output-len", type=int, default=64)
    p.add_argument("--prompts-per-concurrency", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--serve-timeout", type=float, default=300.0, help="s per concurrency level")
    p.add_argument("--worker-timeout", type=float, default=900.0, help="s per offline worker")
    p.add_argument(
        "--budget-s",
        type=float,
        default=120.0,
        help="s an engine may spend on one prefill or one decode run; slower "
        "engines are measured on fewer tokens (the report says how many)",
    )
    p.add_argument("--server-start-timeout", type=float, default=300.0)
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile portaserve's batch-1 decode (cProfile and torch.profiler)",
    )
    p.add_argument("--log-dir", default="/tmp/cpu_peers_logs")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--table-from", default=None, help="print the table of a saved --json report")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(markdown(saved, [int(c) for c in saved.get("concurrency", args.concurrency)]))
        return 0
    if args.gguf is None:
        sys.path.insert(0, str(REPO))
        from portaserve.core.loaders.fetch import resolve_model

        args.gguf = str(resolve_model(args.model))
    report = orchestrate(args)
    table = markdown(report, args.concurrency)
    print(
        f"\n{report['date']}, {report['cpu']}, {report['cpu_count']} cores, "
        f"{args.threads} threads, {Path(args.gguf).name}\n"
    )
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
