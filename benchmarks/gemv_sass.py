"""The quant GEMV's main loop as compiled for sm_90, without a GPU: instructions per weight.

    PYTHONPATH=. python benchmarks/gemv_sass.py int4:1 int4:1:16:512 Q8_0:4 fp8:1:32:256

Each argument is ``format:M[:block_n:block_k[:num_warps[:programs_per_sm[:num_stages[:dot[:scale_tile]]]]]]``
(no tiles: ``gemv_triton.CONFIGS``; dot 1: the tensor-core kernel; scale_tile 1: its scaled tiles),
then any boolean ``GemvConfig`` fields by name (``int4:1:64:128:4:mma=1``). The kernel is
compiled for an H100/H200 target through a
stand-in driver (``ci/triton_compile_check.py``), disassembled with the ``nvdisasm`` Triton
ships, and its longest loop counted: instructions per weight element per thread, registers,
and the instruction mix. A decode GEMV is bound by whichever is lower: the memory (about 16
bytes per SM per clock on an H200) or the issue rate (4 warp instructions per SM per clock,
i.e. 128 / (instructions per weight) weights per SM per clock); the last column is that issue
bound in TB/s at 132 SMs and 1.98 GHz for the format's bytes per weight.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
from triton_compile_check import _TargetDriver, compile_launches  # noqa: E402

from portaserve.quant import gemv_triton, registry  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
BYTES_PER_WEIGHT = {"int4": 0.5, "Q4_0": 0.5625, "Q4_1": 0.625, "Q8_0": 1.0625, "int8": 1.0, "fp8": 1.0,
                    "Q4_K": 0.5625, "Q5_K": 0.6875, "Q6_K": 0.8203}


def compile_one(fmt: str, m: int, cfg: gemv_triton.GemvConfig | None) -> tuple[bytes, dict]:
    compiled = compile_launches()
    weight = registry.quantize(torch.randn(64, 4096) * 0.02, fmt)
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    scale = None
    if fmt == "fp8":
        x, scale = x.to(torch.float8_e4m3fn), torch.ones(m)
    gemv_triton.gemv(x, weight, x_scale=scale, out_dtype=torch.bfloat16, config=cfg, split_k=1)
    return compiled["kernel"].asm["cubin"], compiled["kwargs"]


def loop_stats(cubin: bytes) -> tuple[collections.Counter, int]:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "gemv_sass.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([str(BIN / "nvdisasm"), "-c", str(path)], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", str(path)],
                           capture_output=True, text=True, check=True).stdout
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"^\s*(\.L_x_\d+):", line))}
    loop = (0, 0)
    for i, line in enumerate(sass):  # the longest backward branch is the K loop
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > loop[1] - loop[0]:
            loop = (labels[m.group(1)], i)
    ops: collections.Counter = collections.Counter()
    for line in sass[loop[0]:loop[1] + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return ops, int(re.search(r"REG:(\d+)", usage).group(1))


def main(argv: list[str]) -> None:
    driver.set_active(_TargetDriver(GPUTarget("cuda", 90, 32)))
    gemv_triton._num_sms = lambda x: 132
    gemv_triton.is_interpreted = lambda tensor: False  # (CPU tensors, compiled for the GPU)
    print("| format | M | tiles (BN x BK, warps) | regs | instr / weight | issue bound TB/s | mix |")
    print("|---|---|---|---|---|---|---|")
    for spec in argv or ["int4:1", "Q4_0:1", "Q8_0:1", "int8:1", "fp8:1", "int4:4", "fp8:4"]:
        fmt, m, *tiles = spec.split(":")
        named = dict(t.split("=") for t in tiles if "=" in t)  # e.g. mma=1, tma=1, packed=0
        values = [int(v) for v in tiles if "=" not in v]
        values[5:] = [bool(v) for v in values[5:]]  # dot, scale_tile
        cfg = gemv_triton.GemvConfig(*values) if values else gemv_triton.config_for(fmt, int(m))
        cfg = dataclasses.replace(cfg, **{k: bool(int(v)) for k, v in named.items()})
        cubin, _ = compile_one(fmt, int(m), cfg)
        ops, regs = loop_stats(cubin)
        per_thread = cfg.block_n * cfg.block_k / (cfg.num_warps * 32)
        per_weight = sum(ops.values()) / per_thread
        bound = 128 / per_weight * BYTES_PER_WEIGHT[fmt] * 132 * 1.98e9 / 1e12
        mix = ", ".join(f"{op} {n / per_thread:.2f}" for op, n in ops.most_common(6))
        print(f"| {fmt} | {m} | {cfg.block_n} x {cfg.block_k}, {cfg.num_warps} | {regs} | "
              f"{per_weight:.2f} | {bound:.1f} | {mix} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
