#!/usr/bin/env python
"""Quantized SmolLM2 on cpu: decode tokens/s and resident weight memory per format, in one run.

Formats: the dense float32 and bfloat16 models (the SmolLM2 Q4_1 GGUF dequantized), the file as
it is (Q4_1 linears + Q8_0 embedding / tied lm_head), and the file's float32 weights
re-quantized to Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, int8, int4 and fp8 (what ``quantization=`` does
at load; rows of 576 take a K-quant's llama.cpp-style fallback). Quantized models run float32
activations through the ``cpu`` quant kernels (``portaserve.quant.kernels_cpu``), which send
decode-sized batches of every format here, fp8 (weight-only) included, to the native kernels
(``portaserve.devices.cpu_native``). The model runs op by op (not the native decode step).

For each: weight bytes the model holds; greedy decode tokens/s at batch 1 and batch 8 (after
a 16-token prompt, prefill not timed; wall clock, plus process CPU seconds per step, which
is steadier on a shared machine). With ``--kernels``, also each kernel against dense
``F.linear`` (float32) at batch 1 and 8 on SmolLM2's shapes. Prints the conditions first.

    python benchmarks/quant_cpu.py --threads 2 --steps 16 --kernels
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "quant"))  # the model driver shared with the tests

import quant_driver as qd  # noqa: E402

from portaserve.core.loaders import load_model  # noqa: E402
from portaserve.core.models.llama import LlamaForCausalLM  # noqa: E402
from portaserve.plugins.manager import get_registry  # noqa: E402
from portaserve.quant import kernels_cpu, registry  # noqa: E402
from portaserve.quant.base import QuantizedWeight  # noqa: E402

SCHEMES = ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "int8", "int4", "fp8")
SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576))  # (N, K) of SmolLM2's linears
CPU = torch.device("cpu")


def conditions() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"conditions: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; torch {torch.__version__}; "
            f"{cpu}; {os.cpu_count()} logical cpus; torch threads {torch.get_num_threads()}; "
            f"ATen capability {torch.backends.cpu.get_cpu_capability()}; load average {load}")


def variants(packed_weights: dict, dense: dict, only: set[str] | None):
    """(label, weights, dtype) per format, built one at a time."""
    if only is None or "float32" in only:
        yield "float32 (dense)", dense, torch.float32
    if only is None or "bfloat16" in only:
        yield "bfloat16 (dense)", dense, torch.bfloat16
    if only is None or "Q4_1" in only:
        yield "Q4_1 (file) + Q8_0 emb", packed_weights, torch.float32
    if only is None or "Q4_1-bf16" in only:  # bf16 activations: ATen's int4 packed matmuls
        yield "Q4_1 (file), bf16 act", packed_weights, torch.bfloat16
    for scheme in SCHEMES:
        if only is not None and scheme not in only:
            continue
        weights = dict(packed_weights)
        for name, w in dense.items():
            if registry.is_quantized_linear(name):
                weights[name] = registry.quantize_checkpoint_tensor(name, w, scheme)
        yield f"{scheme} + Q8_0 emb", weights, torch.float32


def bench_model(model, device, prompt: list[int], batch: int, steps: int) -> tuple[float, float]:
    cpu0 = time.process_time()
    tps = qd.decode_tokens_per_s(model, device, batch, prompt, steps)
    cpu_per_step = (time.process_time() - cpu0) / (steps + 1)  # the prefill counts as one step
    return tps, cpu_per_step


def bench_kernels(reps: int) -> None:
    print("\nkernels vs dense F.linear (float32, best of "
          f"{reps}; ms):\n{'format':8} {'N x K':>11} {'T':>2} {'dense':>8} {'kernel':>8} {'x':>6}")
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=gen) * k**-0.5
        for scheme in ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "int8", "int4", "fp8"):
            if not registry.can_quantize((n, k), scheme):
                continue
            q = registry.quantize(w, scheme, group_size=64)
            dense = q.dequantize()
            fn = kernels_cpu.CPU_QUANT_KERNELS[q.format]
            for t in (1, 8):
                x = torch.randn(t, k, generator=gen)
                d = _best(lambda: F.linear(x, dense), reps)  # noqa: B023
                kk = _best(lambda: fn(x, q), reps)  # noqa: B023
                print(f"{scheme:8} {n:>5}x{k:<5} {t:>2} {d * 1e3:8.3f} {kk * 1e3:8.3f} {kk / d:6.1f}",
                      flush=True)


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--formats", nargs="*", help="only these (float32 bfloat16 Q4_1 Q4_1-bf16 " + " ".join(SCHEMES) + ")")
    parser.add_argument("--kernels", action="store_true", help="also time each kernel vs F.linear")
    parser.add_argument("--kernel-reps", type=int, default=10)
    args = parser.parse_args()
    reg = get_registry()
    device, _ = reg.select_device("cpu")
    torch.set_num_threads(args.threads)  # after the device, which sets its own default count
    print(conditions())
    table = reg.kernel_table(device)
    loaded = load_model("smollm2-135m", dtype=torch.float32, device=CPU, progress=False)
    dense = {k: (w.dequantize(torch.float32) if isinstance(w, QuantizedWeight) else w)
             for k, w in loaded.weights.items()}
    prompt = loaded.tokenizer.encode("The little harbour town was famous for its")[:16]
    print(f"model: {loaded.path.name} ({loaded.path.stat().st_size / 1e6:.1f} MB file); prompt "
          f"{len(prompt)} tokens; {args.steps} greedy decode steps per batch size\n")
    header = f"{'format':26} {'weights MB':>10}"
    for b in args.batch:
        header += f" {'tok/s b=' + str(b):>11} {'cpu s/step':>10}"
    print(header, flush=True)
    only = set(args.formats) if args.formats else None
    for label, weights, dtype in variants(loaded.weights, dense, only):
        model = LlamaForCausalLM(loaded.config, weights, table, dtype=dtype, device=CPU)
        row = f"{label:26} {qd.weight_bytes(model) / 1e6:10.1f}"
        for b in args.batch:
            tps, cpu_step = bench_model(model, device, prompt, b, args.steps)
            row += f" {tps:11.2f} {cpu_step:10.3f}"
        print(row, flush=True)
        del model
    if args.kernels:
        bench_kernels(args.kernel_reps)
    print("\n" + conditions())


if __name__ == "__main__":
    main()
