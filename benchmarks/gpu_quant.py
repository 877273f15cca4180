"""H200: the Llama-3-8B-shaped random model in each quant format beside bf16, and the kernels.

    PYTHONPATH=. python3 benchmarks/gpu_quant.py                       # model table, ~4 min
    PYTHONPATH=. python3 benchmarks/gpu_quant.py --kernels             # kernel table, ~2-3 min
    PYTHONPATH=. python3 benchmarks/gpu_quant.py --kernels --sweep --formats bf16,int4,Q4_K,Q8_0,fp8
    PYTHONPATH=. python3 benchmarks/gpu_quant.py --kernels --lm-head --formats bf16,int4 --kernel-ms 1
    PYTHONPATH=. python3 benchmarks/gpu_quant.py --formats int4 --parts decode --decode-variant default \\
        --decode-variant pdl=2 --decode-variant "pdl=2 int4=128,128,4,4,mma"   # A/B on one model
    PYTHONPATH=. python3 benchmarks/gpu_quant.py --formats fp8 --parts throughput \\
        --num-prompts 1000 --input-len 1000 --output-len 1000 --budget-s 500   # fp8 at 1000/1000
    python benchmarks/gpu_quant.py --dry-run --kernels --sweep         # CPU: checks the script

Model mode, per format of ``--formats`` (bf16 fp8 int8 int4 Q4_0 Q8_0 Q4_K Q6_K): ``random:llama3-8b``
built with ``quantization=<format>``, packed on the GPU (int8 / int4 / fp8 quantized from random
bf16 tensors there, GGUF formats as random blocks: ``core.loaders.synthetic``); embeddings and
lm_head stay bf16, as with online quantization. Then:

- weight memory: bytes of every weight the model holds, and the bytes a decode step reads
  (all but the embedding table);
- batch-1 decode ms/token (128-token prompt, ``--decode-tokens`` greedy tokens, CUDA graphs)
  and the device-only step (100 steps queued back to back); % of roofline = (bytes read per
  step / copy bandwidth) / ms per token;
- offline throughput: ``--num-prompts`` prompts of ``--input-len`` random tokens and
  ``--output-len`` new ones, ignore EOS (output tokens/s).

Kernel mode (``--kernels``): the cuda ``quant_linear`` of each format on the 8B shapes (o 4096x4096,
qkv 6144x4096, gate_up 28672x4096, down 4096x14336; ``--lm-head`` adds the 128256x4096 lm_head)
at M = 1, 2, 4, 16 (and 64, 256: the tiled
GEMM and dequantize + cuBLAS): weight GB/s beside the bf16 cuBLAS GEMV, and the relative error
against the reference. Each time is one call's share of a CUDA graph of back-to-back calls over
rotating weight copies (more bytes than the 60 MB L2), median of replays. ``--sweep`` times
candidate GEMV tiles per format (sum over the four shapes = one layer's GEMVs) for tuning
``gemv_triton.CONFIGS``. Triton variants are compiled first by ``--compile-workers`` processes
into Triton's disk cache.

Conditions (GPU, versions, shapes) print first; a table prints last; JSON goes to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "quant"))

from gpu_llama8b import copy_bandwidth, gpu_step_ms, log, random_ids, run_all  # noqa: E402

FORMATS = ("bf16", "fp8", "int8", "int4", "Q4_0", "Q8_0", "Q4_K", "Q6_K")
SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
KERNEL_MS = (1, 2, 4, 16, 64, 256)
SWEEP_MS = (1, 4)
L2_BYTES = 60 * 2**20
PRESET = "llama3-8b"
DEV = "cuda"

# -- weights and timing ----------------------------------------------------------------------


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator):
    """A random [n, k] weight in ``fmt`` on DEV ("bf16": a dense tensor)."""
    from portaserve.quant import registry
    from portaserve.quant.gguf_formats import GGUF_FORMATS, GGUFMethod

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    if fmt in GGUF_FORMATS:
        return GGUFMethod(fmt).random(n, k, device=torch.device(DEV), generator=gen)
    w = torch.randn(n, k, device=DEV, generator=gen) * 0.02
    return w.to(dtype) if fmt == "bf16" else registry.quantize(w, fmt)


def nbytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes


def copies_for(weight_bytes: int) -> int:
    """Weight copies to rotate over so one pass reads several times the L2."""
    return 1 if DEV != "cuda" else max(2, math.ceil(4 * L2_BYTES / weight_bytes))


def time_calls(calls: list[Callable[[], object]], reps: int = 15) -> float:
    """ms per call: the calls captured back to back in one CUDA graph, median of replays (on
    CPU: host time of one pass)."""
    for fn in calls:  # compile, allocate
        fn()
    if DEV != "cuda":
        t0 = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - t0) * 1e3 / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# -- precompiling Triton variants in parallel ------------------------------------------------


def _compile_task(task: tuple) -> str:
    """Run one GEMV / quant_linear variant once (in a worker process) so Triton caches it."""
    kind, fmt, m, n, k, cfg = task
    try:
        gen = torch.Generator(device=DEV).manual_seed(0)
        w = make_weight(fmt, n, k, gen)
        x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
        run_variant(kind, fmt, x, w, cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # reported, then compiled again (serially) when timed
        return f"{task}: {type(e).__name__}: {e}"


def precompile(tasks: list[tuple], workers: int) -> None:
    if DEV != "cuda" or workers <= 1 or not tasks:
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.perf_counter()
    unique = list(dict.fromkeys(tasks))
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        errors = [e for e in pool.map(_compile_task, unique) if e]
    log(f"precompiled {len(unique)} variants in {time.perf_counter() - t0:.0f} s with {workers} "
        f"processes{'; failures: ' + '; '.join(errors[:5]) if errors else ''}")


def run_variant(kind: str, fmt: str, x: torch.Tensor, w, cfg=None) -> torch.Tensor:
    """One call of the kernel ``kind`` measures: "kernel" (the cuda quant_linear of ``fmt``),
    "gemv" (gemv_triton with ``cfg``), "tiled" (the tiled GEMM), "dequant" (dequantize +
    cuBLAS), "scaled_mm" (fp8 quantize + _scaled_mm), "bf16" (cuBLAS)."""
    from portaserve.quant import gemv_triton, kernels_triton
    from portaserve.quant.fp8 import scaled_mm

    if kind == "bf16" or fmt == "bf16":
        return F.linear(x, w)
    if kind == "dequant":
        return F.linear(x, w.dequantize(x.dtype))
    if fmt == "fp8":
        if kind == "kernel":
            return kernels_triton.fp8_quant_linear(x, w)
        xq, xs = kernels_triton.quantize_fp8_activation(x, w)
        if kind == "scaled_mm":
            return scaled_mm(xq, xs, w, x.dtype)
        return gemv_triton.gemv(xq, w, x_scale=xs, out_dtype=x.dtype, config=cfg)  # gemv
    if kind == "gemv":
        return gemv_triton.gemv(x, w, config=cfg)
    if kind == "tiled":
        saved, gemv_triton.MAX_M = gemv_triton.MAX_M, 0
        try:
            return kernels_triton.triton_quant_linear(x, w)
        finally:
            gemv_triton.MAX_M = saved
    return kernels_triton.triton_quant_linear(x, w)


# -- kernel mode -----------------------------------------------------------------------------


def kernel_kinds(fmt: str, m: int) -> list[str]:
    if fmt == "bf16":
        return ["bf16"]
    kinds = ["kernel"]
    if fmt == "fp8":
        kinds += ["scaled_mm"] if m <= 16 else []
    elif m <= 4 and not fmt.endswith("_K"):  # (K formats have no tiled kernel)
        kinds += ["tiled"]
    if m >= 16:
        kinds += ["dequant"]
    return kinds


def bench_kernels(formats: list[str], ms: tuple[int, ...], copy_bps: float) -> list[dict]:
    from portaserve.devices import reference
    from portaserve.quant.fp8 import fp8_linear_emulated

    rows = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    for shape_name, (n, k) in SHAPES.items():
        for fmt in formats:
            first = make_weight(fmt, n, k, gen)
            ws = [first] + [make_weight(fmt, n, k, gen) for _ in range(copies_for(nbytes(first)) - 1)]
            for m in ms:
                xs = [torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16 if DEV == "cuda"
                                                                      else torch.float32)
                      for _ in ws]
                if fmt == "bf16":
                    ref = None
                elif fmt == "fp8":
                    ref = fp8_linear_emulated(xs[0].float(), first)
                else:
                    ref = reference.quant_linear(xs[0].float(), first, None)
                for kind in kernel_kinds(fmt, m):
                    try:
                        ms_call = time_calls([partial(run_variant, kind, fmt, x, w)
                                              for x, w in zip(xs, ws, strict=True)])
                        err = rel_err(run_variant(kind, fmt, xs[0], first), ref) if ref is not None else 0.0
                    except Exception as e:  # a variant that fails is reported, the rest go on
                        log(f"{fmt} {kind} {shape_name} M={m}: {type(e).__name__}: {e}")
                        continue
                    gbps = nbytes(first) / ms_call / 1e6
                    log(f"{shape_name} {fmt} {kind} M={m}: {ms_call * 1e3:.1f} us, {gbps:.0f} GB/s, "
                        f"err {err:.1e}")
                    rows.append({"shape": shape_name, "n": n, "k": k, "format": fmt, "kind": kind,
                                 "m": m, "us": ms_call * 1e3, "weight_gbps": gbps,
                                 "pct_copy_bw": gbps * 1e9 / copy_bps * 100, "rel_err": err,
                                 "weight_mb": nbytes(first) / 1e6})
            del ws, first
            torch.cuda.empty_cache() if DEV == "cuda" else None
    return rows


def print_kernel_table(rows: list[dict]) -> None:
    bf16 = {(r["shape"], r["m"]): r["us"] for r in rows if r["format"] == "bf16"}
    print("\n| shape | format | kernel | M | us | weight GB/s | % copy BW | bf16 cuBLAS us | vs bf16 | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = bf16.get((r["shape"], r["m"]))
        print(f"| {r['shape']} {r['n']}x{r['k']} | {r['format']} | {r['kind']} | {r['m']} | {r['us']:.1f} | "
              f"{r['weight_gbps']:.0f} | {r['pct_copy_bw']:.0f}% | {base or float('nan'):.1f} | "
              f"{(base / r['us']) if base else float('nan'):.2f}x | {r['rel_err']:.1e} |")


# -- GEMV sweep ------------------------------------------------------------------------------


def sweep_configs(fmt: str) -> list:
    """GEMV tiles to time per format: the FMA kernel's former choices, then the tensor-core
    kernel's candidates (``dot``) for the formats it serves. The first two also run at M = 4."""
    from portaserve.quant.gemv_triton import DOT_FORMATS
    from portaserve.quant.gemv_triton import GemvConfig as C

    four_bit = fmt in ("int4", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
    fma = [C(32, 512), C(16, 512)] if four_bit else [C(32, 256), C(16, 256)]
    if fmt in ("int4", "Q4_0"):  # one row: packed bf16x2 arithmetic (the default) against float32
        fma = [C(64, 128), C(16, 512, packed=False), C(32, 512, packed=False), C(32, 128),
               C(64, 256), C(128, 128, num_warps=8), C(64, 128, num_warps=2), C(32, 512)]
        # the words through TMA, staged num_stages deep in shared memory (2026-11-30: no faster)
        fma += [C(64, 128, num_stages=s, tma=True) for s in (3, 5, 8)]
        fma += [C(32, 128, num_stages=4, tma=True), C(64, 256, num_stages=3, tma=True),
                C(128, 128, num_warps=8, num_stages=4, tma=True)]
    if fmt == "int4":  # more one-row packed tiles (those above are not timed twice), and
        # programs per SM as an axis (fewer K splits; 64 x 256 at 2 won on an H100, 2026-12-07)
        fma += [C(64, 512), C(32, 256), C(128, 128), C(64, 128, programs_per_sm=8),
                C(128, 256, num_warps=8)]
        fma += [C(bn, bk, programs_per_sm=p) for bn, bk, p in ((64, 256, 2), (64, 128, 2), (64, 256, 3),
                                                              (32, 256, 2), (128, 256, 2))]
        # the products on the tensor cores (a K step is one group: block_k is not used); the
        # zero points after the MMAs (mma_xsum); the words two steps ahead (num_stages 2)
        fma += [C(bn, 128, num_warps=w, programs_per_sm=p, num_stages=d, mma=True, mma_xsum=x)
                for bn, w, p, d, x in ((64, 4, 4, 1, False), (128, 4, 4, 1, False), (128, 4, 8, 1, False),
                                       (256, 8, 4, 1, False), (128, 8, 4, 1, False), (64, 2, 8, 1, False),
                                       (128, 4, 4, 1, True), (128, 4, 8, 1, True), (128, 4, 4, 2, False),
                                       (64, 4, 8, 2, False), (128, 4, 4, 2, True))]
    if fmt == "Q4_K":  # one row: packed bf16x2 (the default) against float32
        return [C(32, 512), C(32, 512, packed=False), C(64, 256), C(32, 256), C(16, 512)]
    if fmt not in DOT_FORMATS:
        return fma + [C(16, 512, programs_per_sm=8), C(16, 512, num_stages=3), C(8, 1024)]
    dot = [C(128, 128, programs_per_sm=3, num_stages=4, dot=True),
           C(128, 128, programs_per_sm=2, num_stages=4, dot=True),
           C(128, 128, programs_per_sm=1, num_stages=6, dot=True),
           C(128, 128, num_warps=8, programs_per_sm=2, num_stages=4, dot=True),
           C(128, 256, programs_per_sm=2, num_stages=3, dot=True),
           C(64, 128, programs_per_sm=4, num_stages=4, dot=True),
           C(64, 256, programs_per_sm=3, num_stages=4, dot=True),
           C(64, 128, programs_per_sm=2, num_stages=6, dot=True)]
    if fmt not in ("int8", "fp8"):  # group scales applied to the tile before one chained dot
        dot += [C(128, 128, programs_per_sm=3, num_stages=4, dot=True, scale_tile=True),
                C(128, 128, programs_per_sm=2, num_stages=4, dot=True, scale_tile=True)]
    return [dot[0], fma[0]] + dot[1:] + fma[1:]


SWEEP_FILTER = ""


def set_one_row_config(spec: str) -> None:
    """``--one-row-config FMT=BN,BK,WARPS,PPS[,FIELD...]``: FMT's GEMV tiles at one row of x;
    ``FMT=tiled``: no GEMV at one row, the caller's tiled dequant GEMM (float32 accumulation: the
    yardstick for the GEMVs' own rounding, e.g. the packed path's bf16x2 products)."""
    from portaserve.quant import gemv_triton

    fmt, _, values = spec.partition("=")
    if values == "tiled" and fmt in gemv_triton.CONFIGS:
        gemv_triton.CONFIGS[fmt] = ((1, None),) + tuple(e for e in gemv_triton.CONFIGS[fmt] if e[0] > 1)
        log(f"{fmt} at one row: the tiled dequant GEMM")
        return
    parts = values.split(",")
    if fmt not in gemv_triton.CONFIGS or len(parts) < 4:
        raise SystemExit(f"--one-row-config {spec!r}: want FMT=BN,BK,WARPS,PPS[,FIELD] with FMT one of "
                         f"{sorted(gemv_triton.CONFIGS)}")
    bn, bk, warps, pps = (int(v) for v in parts[:4])
    cfg = gemv_triton.GemvConfig(bn, bk, num_warps=warps, programs_per_sm=pps, **config_fields(parts[4:]))
    gemv_triton.CONFIGS[fmt] = ((1, cfg),) + tuple(e for e in gemv_triton.CONFIGS[fmt] if e[0] > 1)
    log(f"{fmt} at one row: {cfg}")


def config_fields(items: list[str]) -> dict:
    """The ``[,FIELD...]`` of a tiles spec as ``GemvConfig`` fields: ``name`` (a boolean set
    true) or ``name=integer``."""
    return {f.partition("=")[0]: int(f.partition("=")[2]) if "=" in f else True for f in items}


def set_gemv_pdl(lines: int) -> None:
    """``--gemv-pdl-lines``: the quant GEMVs under PDL with the trigger at their start and an L2
    prefetch of this many lines a row (``PDL_LATE`` off), or (-1) no PDL for them."""
    from portaserve.quant import gemv_triton

    gemv_triton.GEMV_PDL = lines >= 0
    if lines >= 0:
        gemv_triton.PDL_PREFETCH_LINES = lines
        gemv_triton.PDL_LATE = False


def set_gemv_pdl_late(early_words: bool = True, coherent_x: bool = False) -> None:
    """``pdl_late`` and its bisect forms: the quant GEMVs under PDL, the trigger after their
    loop (``gemv_triton.PDL_LATE``), their first step's words loaded before the wait or not
    (``PDL_EARLY_WORDS``), x through ``ld.global.nc`` or coherent loads (``PDL_X_COHERENT``)."""
    from portaserve.quant import gemv_triton

    gemv_triton.GEMV_PDL = gemv_triton.PDL_LATE = True
    gemv_triton.PDL_EARLY_WORDS, gemv_triton.PDL_X_COHERENT = early_words, coherent_x


def swept(fmt: str, m: int) -> list:
    """The configs the sweep times for ``fmt`` at ``m`` rows: beyond one row the first two; with
    ``--sweep-filter`` only those whose repr holds it, beside the first two (the baselines)."""
    configs = sweep_configs(fmt)[: (None if m == 1 else 2)]
    return [c for i, c in enumerate(configs) if i < 2 or SWEEP_FILTER in repr(c)]


def bench_sweep(formats: list[str], copy_bps: float) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(1)
    for fmt in formats:
        if fmt == "bf16":
            continue
        sets = {}
        for shape_name, (n, k) in SHAPES.items():
            if shape_name == "lm_head":  # (the sweep times one layer's four GEMVs)
                continue
            first = make_weight(fmt, n, k, gen)
            ws = [first] + [make_weight(fmt, n, k, gen) for _ in range(copies_for(nbytes(first)) - 1)]
            sets[shape_name] = ws
        layer_bytes = sum(nbytes(ws[0]) for ws in sets.values())
        for m in SWEEP_MS:
            for cfg in swept(fmt, m):
                per_shape = {}
                for shape_name, ws in sets.items():
                    k = ws[0].shape[1]
                    xs = [torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16 if DEV == "cuda"
                                                                          else torch.float32)
                          for _ in ws]
                    try:
                        per_shape[shape_name] = time_calls(
                            [partial(run_variant, "gemv", fmt, x, w, cfg) for x, w in zip(xs, ws, strict=True)]) * 1e3
                    except Exception as e:
                        log(f"sweep {fmt} {cfg} M={m} {shape_name}: {type(e).__name__}: {e}")
                        per_shape[shape_name] = float("nan")
                total = sum(per_shape.values())
                log(f"sweep {fmt} M={m} {cfg}: {per_shape} -> layer {total:.1f} us")
                rows.append({"format": fmt, "m": m, "config": repr(cfg), "us": per_shape,
                             "layer_us": total, "gbps": layer_bytes / total / 1e3,
                             "pct_copy_bw": layer_bytes / total / 1e3 * 1e9 / copy_bps * 100})
        del sets
        torch.cuda.empty_cache() if DEV == "cuda" else None
    return rows


def print_sweep(rows: list[dict]) -> None:
    print("\nGEMV sweep: us per shape, and one layer's four GEMVs (o + qkv + gate_up + down)")
    print("| format | M | config | o | qkv | gate_up | down | layer us | GB/s | % copy BW |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["format"], r["m"], r["layer_us"])):
        u = r["us"]
        print(f"| {r['format']} | {r['m']} | {r['config']} | {u['o']:.1f} | {u['qkv']:.1f} | "
              f"{u['gate_up']:.1f} | {u['down']:.1f} | {r['layer_us']:.1f} | {r['gbps']:.0f} | "
              f"{r['pct_copy_bw']:.0f}% |")


def compile_tasks(formats: list[str], ms: tuple[int, ...], sweep: bool) -> list[tuple]:
    tasks = []
    for fmt in formats:
        if fmt == "bf16":
            continue
        for shape_name, (n, k) in SHAPES.items():
            for m in ms:
                for kind in kernel_kinds(fmt, m):
                    if kind in ("kernel", "tiled", "scaled_mm"):
                        tasks.append(("tiled" if kind == "tiled" else "kernel", fmt, m, n, k, None))
            if sweep and shape_name != "lm_head":
                for m in SWEEP_MS:
                    for cfg in swept(fmt, m):
                        tasks.append(("gemv", fmt, m, n, k, cfg))
    return tasks


# -- model mode ------------------------------------------------------------------------------


def model_bytes(model) -> tuple[int, int]:
    """(bytes of every weight the model holds, bytes a decode step reads: all but embeddings)."""
    import quant_driver

    total = quant_driver.weight_bytes(model)
    emb = model.embed_tokens
    return total, total - nbytes(emb) if emb is not model.lm_head else total


def bench_model(fmt: str, args: argparse.Namespace, copy_bps: float, deadline: float) -> dict:
    from portaserve import LLM, SamplingParams
    from portaserve.core.loaders.synthetic import PRESETS

    vocab = PRESETS[PRESET].vocab_size
    t0 = time.perf_counter()
    llm = LLM(f"random:{PRESET}", device=DEV, dtype="bfloat16" if DEV == "cuda" else "float32",
              quantization=None if fmt == "bf16" else fmt, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_batched_tokens, max_model_len=args.max_model_len)
    engine = llm.llm_engine
    total, per_step = model_bytes(engine.model)
    res = {"format": fmt, "weights_gb": total / 1e9, "step_read_gb": per_step / 1e9,
           "build_s": time.perf_counter() - t0, "quant_kernels": dict(engine.kernels.quant_sources)}
    log(f"{fmt}: built in {res['build_s']:.0f} s, weights {total / 1e9:.2f} GB, KV "
        f"{engine.kv_capacity_tokens} tokens, async {engine.async_scheduling}")
    rng = random.Random(0)
    greedy = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate(random_ids(rng, 128, vocab), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.add_request("lat", random_ids(rng, 128, vocab), greedy)
    engine.step()
    sync()
    t1 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    res["decode_ms"] = (time.perf_counter() - t1) / (args.decode_tokens - 1) * 1e3
    res["gpu_step_ms"] = gpu_step_ms(engine, 128 + args.decode_tokens // 2) if DEV == "cuda" else float("nan")
    if args.decode_variant:
        res["variants"] = time_variants(engine, args.decode_variant, 128 + args.decode_tokens // 2)
    res["roofline_ms"] = per_step / copy_bps * 1e3
    res["pct_roofline"] = res["roofline_ms"] / res["decode_ms"] * 100
    res["throughput"], res["throughput_done"] = float("nan"), 0
    if "throughput" in args.parts and args.num_prompts > 0:
        prompts = [random_ids(rng, args.input_len, vocab) for _ in range(args.num_prompts)]
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                                output_kind="final_only")
        tokens, secs, done = run_all(llm, prompts, params, deadline)
        res["throughput"], res["throughput_done"], res["throughput_s"] = tokens / secs, done, secs
    log(f"{fmt}: {res}")
    del llm, engine
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return res


def apply_variant(spec: str) -> None:
    """One ``--decode-variant``: space-separated settings, each ``pdl=N`` (``--gemv-pdl-lines``),
    ``pdl_late``, ``pdl_late_wait_first``, ``pdl_late_coherent``, ``pdl_late_wait_first_coherent``
    (``set_gemv_pdl_late``),
    ``fuse_norm`` (``gemv_triton.FUSE_NORM``: o and down run the norm after them in their
    launch), ``fuse_silu`` (``FUSE_SILU``: gate|up runs silu_and_mul in its launch),
    ``unfused`` (both off, and ``FUSE_ROTARY``), ``fuse_rotary`` / ``unfused_rotary``
    (``gemv_triton.FUSE_ROTARY`` and the dense ``gemv.FUSE_ROTARY`` on / off: q|k|v runs
    ``rotary_write_kv`` in its launch), ``max_splits=N``
    (``attention._MAX_SPLITS``: the decode graph's split count is fixed at capture for the
    longest context, 16 at batch 1 over 4096 tokens, most of them empty at short contexts; 1:
    one program a KV head, no merge), ``min_chunk=N`` (``attention.DECODE_MIN_CHUNK``: keys a
    split covers at least; 0 spreads a short context over all the graph's splits, as before
    stop 23), ``force_gemv`` (16-bit weights: the dense Triton GEMV wherever it serves, even
    where cuBLAS timed faster, e.g. q|k|v on an H100, so ``unfused_rotary`` has a fused path to
    compare with), ``decode_bn=N`` (``attention.DECODE_CONFIG``'s key tile), ``serial_tails`` (``gemv_triton.SPLIT_SUM_UNROLLED`` and
    ``attention.MERGE_UNROLLED`` off: the split GEMVs' and the decode attention's last program
    read the partials one split at a time) or ``FMT=BN,BK,WARPS,PPS[,FIELD]`` / ``FMT=tiled``
    (``--one-row-config``); ``default`` changes nothing."""
    from portaserve.devices.cuda import attention
    from portaserve.devices.cuda import gemv as dense_gemv
    from portaserve.quant import gemv_triton

    for item in spec.split():
        if item.startswith("pdl="):
            set_gemv_pdl(int(item[4:]))
        elif item == "pdl_late":
            set_gemv_pdl_late()
        elif item == "pdl_late_wait_first":  # (the trigger late, nothing loaded before the wait)
            set_gemv_pdl_late(early_words=False)
        elif item == "pdl_late_coherent":  # (early words, x through coherent loads)
            set_gemv_pdl_late(coherent_x=True)
        elif item == "pdl_late_wait_first_coherent":  # (both)
            set_gemv_pdl_late(early_words=False, coherent_x=True)
        elif item == "fuse_norm":
            gemv_triton.FUSE_NORM = True
        elif item == "fuse_silu":
            gemv_triton.FUSE_SILU = True
        elif item == "unfused":
            gemv_triton.FUSE_NORM = gemv_triton.FUSE_SILU = gemv_triton.FUSE_ROTARY = False
            dense_gemv.FUSE_ROTARY = False
        elif item == "unfused_rotary":
            gemv_triton.FUSE_ROTARY = dense_gemv.FUSE_ROTARY = False
        elif item == "fuse_rotary":
            gemv_triton.FUSE_ROTARY = dense_gemv.FUSE_ROTARY = True
        elif item.startswith("max_splits="):
            attention._MAX_SPLITS = int(item.split("=")[1])
        elif item == "force_gemv":  # the dense Triton GEMV wherever it serves, cuBLAS or not faster
            dense_gemv.faster_than_cublas = lambda x, weight: True
        elif item.startswith("min_chunk="):
            attention.DECODE_MIN_CHUNK = int(item.split("=")[1])
        elif item.startswith("decode_bn="):
            attention.DECODE_CONFIG["BLOCK_N"] = int(item.split("=")[1])
        elif item == "serial_tails":
            gemv_triton.SPLIT_SUM_UNROLLED = attention.MERGE_UNROLLED = False
        elif item != "default":
            set_one_row_config(item)


def time_variants(engine, specs: list[str], context: int, rounds: int = 3) -> dict[str, dict]:
    """The batch-1 device step (``gpu_step_ms``) under each ``--decode-variant`` on the model
    already built: the variants take turns for ``rounds`` rounds (a lent GPU drifts by several
    percent over a minute) and each reports its median, after the size-1 decode graph is
    re-captured with its settings. ``logits_rel_err``: its logits against the first variant's."""
    from portaserve.core.batch import build_batch
    from portaserve.devices.cuda import attention
    from portaserve.devices.cuda import gemv as dense_gemv
    from portaserve.quant import gemv_triton

    saved = (dict(gemv_triton.CONFIGS), gemv_triton.GEMV_PDL, gemv_triton.PDL_PREFETCH_LINES,
             gemv_triton.FUSE_NORM, gemv_triton.FUSE_SILU, gemv_triton.SPLIT_SUM_UNROLLED,
             attention.MERGE_UNROLLED, gemv_triton.FUSE_ROTARY, attention._MAX_SPLITS,
             attention.DECODE_MIN_CHUNK, dense_gemv.FUSE_ROTARY, dense_gemv.faster_than_cublas,
             gemv_triton.PDL_LATE, gemv_triton.PDL_EARLY_WORDS, gemv_triton.PDL_X_COHERENT,
             dict(attention.DECODE_CONFIG))
    recapture = getattr(getattr(engine.runner, "executor", None), "capture", None)  # cuda graphs
    bs = engine.kv_spec.block_size
    batch = build_batch([("variant", [100], context, list(range(1, context // bs + 2)), True)], bs)

    def use(spec: str | None) -> None:
        gemv_triton.CONFIGS.clear()
        gemv_triton.CONFIGS.update(saved[0])
        (gemv_triton.GEMV_PDL, gemv_triton.PDL_PREFETCH_LINES, gemv_triton.FUSE_NORM,
         gemv_triton.FUSE_SILU, gemv_triton.SPLIT_SUM_UNROLLED, attention.MERGE_UNROLLED,
         gemv_triton.FUSE_ROTARY, attention._MAX_SPLITS, attention.DECODE_MIN_CHUNK,
         dense_gemv.FUSE_ROTARY, dense_gemv.faster_than_cublas, gemv_triton.PDL_LATE,
         gemv_triton.PDL_EARLY_WORDS, gemv_triton.PDL_X_COHERENT) = saved[1:-1]
        attention.DECODE_CONFIG.clear()
        attention.DECODE_CONFIG.update(saved[-1])
        if spec is not None:
            apply_variant(spec)
        if recapture is not None:
            recapture([1])

    times: dict[str, list[float]] = {s: [] for s in specs}
    errors: dict[str, float] = {}
    first = None
    try:
        for _ in range(rounds):
            for spec in specs:
                use(spec)
                if spec not in errors:
                    logits = engine.runner.execute(batch).float()
                    first = logits if first is None else first
                    errors[spec] = rel_err(logits, first)
                times[spec].append(gpu_step_ms(engine, context))
    finally:
        use(None)
    out = {s: {"gpu_step_ms": statistics.median(t), "all_ms": t, "logits_rel_err": errors.get(s)}
           for s, t in times.items() if t}
    print(f"\n| decode variant (batch 1, context {context}) | GPU-only step ms (median of {rounds}) "
          f"| rounds | logits rel. err vs first |")
    print("|---|---|---|---|")
    for s, r in out.items():
        print(f"| {s} | {r['gpu_step_ms']:.3f} | {' / '.join(f'{v:.3f}' for v in r['all_ms'])} | "
              f"{r['logits_rel_err']:.1e} |")
    return out


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def print_model_table(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n| format | weights GB | read per step GB | decode ms/token (b=1) | GPU-only step ms | "
          f"roofline ms | % of roofline | offline tok/s ({args.num_prompts} x {args.input_len}/"
          f"{args.output_len}) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        tput = f"{r['throughput']:.0f} ({r['throughput_done']} done)" if r["throughput_done"] else "-"
        print(f"| {r['format']} | {r['weights_gb']:.2f} | {r['step_read_gb']:.2f} | {r['decode_ms']:.2f} | "
              f"{r['gpu_step_ms']:.2f} | {r['roofline_ms']:.2f} | {r['pct_roofline']:.0f}% | {tput} |")


# -- main ------------------------------------------------------------------------------------


def conditions() -> str:
    import triton

    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    else:
        gpu = "none (dry run: CPU, Triton interpreter)"
    from portaserve.core.loaders.synthetic import PRESETS

    c = PRESETS[PRESET]
    return (f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; GPU {gpu}; torch {torch.__version__}, "
            f"triton {triton.__version__}, python {platform.python_version()}; model {PRESET}: "
            f"hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads / {c.num_kv_heads} "
            f"KV heads, MLP {c.intermediate_size}, vocab {c.vocab_size}; GEMV shapes (N x K) "
            f"{', '.join(f'{k} {n}x{kk}' for k, (n, kk) in SHAPES.items())}; PDL {pdl_state()}")


def pdl_state() -> str:
    from portaserve import envs
    from portaserve.quant import gemv_triton

    if not envs.cuda_pdl():
        return "off"
    if not gemv_triton.GEMV_PDL:
        return "on, but not for the quant GEMVs"
    if gemv_triton.PDL_LATE:
        return "on where sm_90+ (quant GEMVs: trigger after the loop, first words before the wait)"
    return f"on where sm_90+ (quant GEMVs prefetch {gemv_triton.PDL_PREFETCH_LINES} lines a row)"


def main() -> None:
    global SHAPES, DEV, KERNEL_MS, PRESET, SWEEP_MS, SWEEP_FILTER
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--kernels", action="store_true", help="the kernel table instead of the model")
    p.add_argument("--sweep", action="store_true", help="with --kernels: the GEMV tile sweep")
    p.add_argument("--kernel-ms", default=",".join(map(str, KERNEL_MS)))
    p.add_argument("--sweep-ms", default="1,4", help="with --sweep: rows of x (beyond 1: two configs)")
    p.add_argument("--sweep-filter", default="", help="with --sweep: only configs whose repr holds this "
                   "(and the first two, as baselines), e.g. 'mma=True'")
    p.add_argument("--lm-head", action="store_true", help="with --kernels: also the 128256x4096 lm_head")
    p.add_argument("--parts", default="decode,throughput", help="model mode: decode[,throughput]")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--compile-workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--budget-s", type=float, default=230, help="model mode: stop throughput runs after this")
    p.add_argument("--one-row-config", action="append", default=[], metavar="FMT=BN,BK,WARPS,PPS[,FIELD]",
                   help="replace FMT's one-row GEMV tiles (gemv_triton.CONFIGS), e.g. "
                        "'int4=128,128,4,4,mma,num_stages=2' (FIELD: a boolean GemvConfig field set "
                        "true, or name=integer)")
    p.add_argument("--gemv-pdl-lines", type=int, default=None,
                   help="the quant GEMVs launch with PDL (gemv_triton.GEMV_PDL), each program "
                        "prefetching this many lines of its rows into L2; -1: without PDL")
    p.add_argument("--decode-variant", action="append", default=[], metavar="SETTINGS",
                   help="model mode, repeatable: after the batch-1 decode, time the device step again "
                        "under each of these (space-separated 'pdl=N', 'pdl_late' and 'FMT=BN,BK,WARPS,PPS[,FIELD]' "
                        "items, 'fuse_norm', 'fuse_silu', 'fuse_rotary', 'unfused', 'unfused_rotary', 'max_splits=N', 'min_chunk=N', 'force_gemv', 'decode_bn=N', or 'default'), taking turns, the decode graph re-captured for each")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_quant.json"))
    args = p.parse_args()
    deadline = time.perf_counter() + args.budget_s
    formats = args.formats.split(",")
    if args.dry_run:
        DEV, PRESET = "cpu", "tiny"
        SHAPES = {"o": (48, 256), "qkv": (80, 256), "gate_up": (96, 256), "down": (48, 512)}
        args.kernel_ms, args.max_model_len = "1,4", 512
        torch.cuda.synchronize = lambda *a, **k: None  # run_all (shared with gpu_llama8b) syncs
    for spec in args.one_row_config:
        set_one_row_config(spec)
    if args.gemv_pdl_lines is not None:
        set_gemv_pdl(args.gemv_pdl_lines)
    ms = tuple(int(v) for v in args.kernel_ms.split(","))
    SWEEP_MS = tuple(int(v) for v in args.sweep_ms.split(","))
    SWEEP_FILTER = args.sweep_filter
    if args.lm_head:
        SHAPES = {**SHAPES, "lm_head": (128256, 4096) if not args.dry_run else (96, 256)}
    log("conditions: " + conditions())
    copy_bps = copy_bandwidth() if DEV == "cuda" else 50e9
    log(f"copy bandwidth {copy_bps / 1e12:.2f} TB/s (bytes read + written per second)")
    out: dict = {"conditions": conditions(), "copy_bw": copy_bps, "args": vars(args)}
    if args.kernels:
        precompile(compile_tasks(formats, ms, args.sweep), args.compile_workers)
        if args.sweep:
            out["sweep"] = bench_sweep(formats, copy_bps)
            print_sweep(out["sweep"])
            save(out, args.json)
        out["kernels"] = bench_kernels(formats, ms, copy_bps)
        if args.sweep:
            print_sweep(out["sweep"])
        print_kernel_table(out["kernels"])
    else:
        out["models"] = []
        for fmt in formats:
            try:
                out["models"].append(bench_model(fmt, args, copy_bps, deadline))
            except Exception as e:  # one format failing leaves the others' numbers
                log(f"{fmt}: FAILED {type(e).__name__}: {e}")
        print_model_table(out["models"], args)
    print(f"\nconditions: {out['conditions']}; copy bandwidth {copy_bps / 1e12:.2f} TB/s")
    save(out, args.json)


def save(out: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
