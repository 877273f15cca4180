#!/usr/bin/env python
"""Does a Llama-3-8B layer's int4 GEMVs lose their time at the kernel boundaries? The four
one-row int4 GEMVs of a layer (o, gate|up with silu, down, the next q|k|v) timed, in one run:

- ``gemvs``: the engine's quant GEMV (``gemv_triton.gemv``, tuned tiles, split K, PDL as the
  engine launches it), a launch a weight;
- ``chain CFG, a launch a stage``: ``quant/chain_triton.py``'s kernel, a launch a weight, each
  program taking whole-K row tiles (no split K);
- ``chain CFG, one launch``: the same kernel and tiles, all four stages in one persistent launch
  with a grid barrier between them (and the next stage's first lines asked of L2 before it).

Then the same layer as the engine runs it, with the residual and RMS norm after o and after down
(the engine's ``linear_rms_norm`` GEMVs against the chain with ``norms``). The second against
the third isolates what the kernel boundaries cost with the same inner loop;
the first against the second compares the inner loops. Beside them: a flat read of the same
bytes (``gpu_int4_stream._flat_kernel``, a launch a weight, and once over a buffer of the
layer's code bytes: what one launch a layer could reach) and the roofline (the bytes at the
copy bandwidth measured in the same run). Each variant's output is checked against the
reference dequant (bf16 relative error printed, and the run stops if it is off).

    PYTHONPATH=. python3 benchmarks/gpu_int4_chain.py                 # on a GPU, ~1-2 minutes
    PYTHONPATH=. python3 benchmarks/gpu_int4_chain.py --config 16,2048,4,1,2,4 --config ...
    PYTHONPATH=. python3 benchmarks/gpu_int4_chain.py --dry-run       # tiny shapes, interpreter

Times are per layer: the calls of several layer copies (together over 4x the L2) captured back
to back in one CUDA graph, median of replays (``gpu_quant.time_calls``).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_int4_stream  # noqa: E402  (its flat read)
import gpu_quant  # noqa: E402  (its CUDA-graph timing)

from portaserve.quant import chain_triton, gemv_triton, registry  # noqa: E402

#: (N, K, silu) of a layer's stages in order: o, gate|up (+ silu_and_mul), down, q|k|v.
LAYER = (("o", 4096, 4096, False), ("gate_up", 28672, 4096, True), ("down", 4096, 14336, False),
         ("qkv", 6144, 4096, False))
CONFIGS = (chain_triton.ChainConfig(16, 2048, 4, 1, 2, 4), chain_triton.ChainConfig(16, 1024, 4, 2, 2, 4),
           chain_triton.ChainConfig(32, 1024, 8, 1, 2, 4), chain_triton.ChainConfig(16, 2048, 4, 1, 2, 0))
L2_BYTES = 60 * 2**20


def parse_config(text: str) -> chain_triton.ChainConfig:
    """``BN,BK,WARPS,STAGES,PPS,PREFETCH`` -> a ChainConfig."""
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 6:
        raise SystemExit(f"--config {text}: want BN,BK,WARPS,STAGES,PPS,PREFETCH")
    return chain_triton.ChainConfig(*parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--config", action="append", default=[], metavar="BN,BK,WARPS,STAGES,PPS,PREFETCH",
                   help="chain tiles to time (repeatable; default: a built-in sweep)")
    args = p.parse_args()
    dev = "cpu" if args.dry_run else "cuda"
    layer = LAYER
    configs = [parse_config(c) for c in args.config] or list(CONFIGS)
    if args.dry_run:
        layer = (("o", 256, 256, False), ("gate_up", 768, 256, True), ("down", 256, 384, False),
                 ("qkv", 320, 256, False))
        configs = [chain_triton.ChainConfig(16, 128, 4, 2, 2, 0)]
    gpu_quant.DEV = gpu_int4_stream.DEV = dev
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 4

    def build():
        return [(registry.quantize(torch.randn(n, k, device=dev, generator=gen) * k**-0.5 + 0.002, "int4"), act)
                for _, n, k, act in layer]

    layers = [build()]
    layer_bytes = sum(w.nbytes for w, _ in layers[0])  # codes, scales, zeros
    if dev == "cuda":
        from gpu_llama8b import copy_bandwidth

        copy_bps = copy_bandwidth()
        print(f"{torch.cuda.get_device_name(0)}, {sms} SMs; torch {torch.__version__}, triton {triton.__version__}; "
              f"copy bandwidth {copy_bps / 1e12:.2f} TB/s (read + write)")
        copies = max(2, -(-4 * L2_BYTES // layer_bytes))
    else:
        copy_bps, copies = 1e9, 2
    shapes = ", ".join(f"{name} {n}x{k}{' +silu' if act else ''}" for name, n, k, act in layer)
    print(f"layer: {shapes}; int4 group 128, asymmetric, scales float32; one row of bf16 x; {copies} layer copies "
          f"({copies * layer_bytes / 1e6:.0f} MB) cycled; {layer_bytes / 1e6:.1f} MB a layer")

    layers += [build() for _ in range(copies - 1)]
    x = torch.randn(layer[0][2], device=dev, generator=gen).to(dtype)
    want = chain_triton.reference(x, layers[0])[0]
    # the layer as the engine runs it: the residual and RMS norm after o and after down
    hidden = layer[0][1]
    norms = {0: 1 + 0.1 * torch.randn(hidden, device=dev, generator=gen).to(dtype),
             2: 1 + 0.1 * torch.randn(hidden, device=dev, generator=gen).to(dtype)}
    residual = (4 * torch.randn(hidden, device=dev, generator=gen)).to(dtype)
    want_layer = chain_triton.reference(x, layers[0], norms, residual)[0]

    def check(label: str, got: torch.Tensor, ref: torch.Tensor = want) -> float:
        err = gpu_quant.rel_err(got, ref)
        if not err <= 0.05:  # (four bf16 stages; a wrong kernel is off by ~1)
            raise AssertionError(f"{label}: relative error {err:.2e} against the reference dequant")
        return err

    def gemvs(stages, x_in: torch.Tensor = x) -> torch.Tensor:
        h = x_in.view(1, -1)
        for w, act in stages:
            h = gemv_triton.gemv(h, w, silu_and_mul=act)
            if h is None:
                raise SystemExit(f"the engine's GEMV declined {w.shape} (silu {act})")
        return h.view(-1)

    def engine_layer(stages) -> torch.Tensor:
        """The engine's batch-1 int4 layer without attention: o with the residual and norm in its
        launch (``linear_rms_norm``), gate|up with silu, down with the residual and norm, q|k|v."""
        (o, _), (gate_up, _), (down, _), (qkv, _) = stages
        h, stream = gemv_triton.gemv(x.view(1, -1), o, norm=(residual.view(1, -1), norms[0], 1e-5))
        h = gemv_triton.gemv(h, gate_up, silu_and_mul=True)
        h, stream = gemv_triton.gemv(h, down, norm=(stream, norms[2], 1e-5))
        return gemv_triton.gemv(h, qkv).view(-1)

    rows: list[tuple[str, float, float]] = []
    err = check("gemvs", gemvs(layers[0]))
    rows.append(("gemvs (the engine's GEMV, a launch a weight)", gpu_quant.time_calls(
        [partial(gemvs, s) for s in layers]) * 1e3, err))
    flat_out = torch.empty(1 << 16, dtype=torch.int32, device=dev)
    programs = sms * 8  # (as gpu_int4_stream's flat read)
    flat = []
    for stages in layers:
        for w, _ in stages:
            q = w.data["qweight"].view(torch.int32)
            flat.append(partial(gpu_int4_stream._flat_kernel.on(q)[(programs,)], q, flat_out, q.numel(),
                                BLOCK=2048, num_warps=4))
    rows.append(("flat read of the codes, a launch a weight", gpu_quant.time_calls(flat) * 1e3 * len(layer), 0.0))
    # the ceiling of one launch a layer: the same number of code bytes as one buffer, read flat
    words = sum(w.data["qweight"].numel() for w, _ in layers[0]) // 4
    words -= words % 2048
    whole = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device=dev) for _ in layers]
    rows.append(("flat read of the codes, one launch a layer", gpu_quant.time_calls(
        [partial(gpu_int4_stream._flat_kernel.on(q)[(programs,)], q, flat_out, q.numel(), BLOCK=2048, num_warps=4)
         for q in whole]) * 1e3, 0.0))
    err = check("engine layer", engine_layer(layers[0]), want_layer)
    rows.append(("layer with residuals + norms: the engine's GEMVs (linear_rms_norm)", gpu_quant.time_calls(
        [partial(engine_layer, s) for s in layers]) * 1e3, err))
    for one in ((False, True) if dev == "cuda" else (False,)):
        chains = [chain_triton.Chain(stages, dtype, configs[0], norms=norms) for stages in layers]
        label = f"layer with residuals + norms: chain {configs[0]}, {'one launch' if one else 'a launch a stage'}"
        err = check(label, chains[0].run(x, one_launch=one, residual=residual).clone(), want_layer)
        rows.append((label, gpu_quant.time_calls([partial(c.run, x, one, residual) for c in chains]) * 1e3, err))
    for cfg in configs:
        chains = [chain_triton.Chain(stages, dtype, cfg) for stages in layers]
        for one in ((False, True) if dev == "cuda" else (False,)):
            label = f"chain {cfg}, {'one launch' if one else 'a launch a stage'}"
            err = check(label, chains[0].run(x, one_launch=one).clone())
            rows.append((label, gpu_quant.time_calls([partial(c.run, x, one) for c in chains]) * 1e3, err))
    # weight by weight (each its own launch, cycled over the copies): the inner loops compared
    # where no boundary is shared, the biggest weight (gate|up) with the least launch overhead
    per_weight = []
    for i, (name, n, k, _) in enumerate(layer):
        xs = torch.randn(k, device=dev, generator=gen).to(dtype)
        singles = [chain_triton.Chain([stages[i]], dtype, configs[0]) for stages in layers]
        nbytes = layers[0][i][0].nbytes
        us_gemv = gpu_quant.time_calls([partial(gemvs, [s[i]], xs) for s in layers]) * 1e3
        us_chain = gpu_quant.time_calls([partial(c.run, xs, False) for c in singles]) * 1e3
        per_weight.append((f"{name} {n}x{k}", nbytes, us_gemv, us_chain))
    roofline_us = layer_bytes / copy_bps * 1e6
    print(f"\nper weight (chain tiles {configs[0]}, a launch a weight; % of copy bandwidth):\n")
    print("| weight | MB | engine GEMV us | % | chain stage us | % |")
    print("|---|---|---|---|---|---|")
    for label, nbytes, us_g, us_c in per_weight:
        pct = [100 * nbytes / copy_bps * 1e6 / us for us in (us_g, us_c)]
        print(f"| {label} | {nbytes / 1e6:.1f} | {us_g:.1f} | {pct[0]:.0f}% | {us_c:.1f} | {pct[1]:.0f}% |")
    print(f"\nroofline: {layer_bytes / 1e6:.1f} MB at {copy_bps / 1e12:.2f} TB/s = {roofline_us:.1f} us a layer\n")
    print("| variant | us a layer | % of roofline | rel. err vs reference |")
    print("|---|---|---|---|")
    for label, us, e in rows:
        print(f"| {label} | {us:.1f} | {100 * roofline_us / us:.0f}% | {e:.1e} |")


if __name__ == "__main__":
    main()
