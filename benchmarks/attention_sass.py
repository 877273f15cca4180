"""The decode attention kernels' main loop over an fp8 cache as compiled for sm_90, without a GPU.

    PYTHONPATH=<triton 3.6>:. python benchmarks/attention_sass.py          # Triton 3.6: the H200 image's

Compiles, for a Llama-3-8B-shaped decode (32 q / 8 KV heads, head dim 128, blocks of 16 keys,
bf16 queries, an e4m3 cache), ``_decode_attn_kernel`` with its fp8 tiles (``DECODE_CONFIG_FP8``)
and ``_decode_fp8_mma_kernel`` (``DECODE_FP8_MMA``), through the stand-in driver of
``ci/triton_compile_check.py``, and counts the longest loop of each (``gemv_sass.loop_stats``):
instructions a loop step and a warp, per KB of K/V read, registers, shared memory, and the mix.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sass import loop_stats  # noqa: E402
from triton_compile_check import _TargetDriver, compile_launches  # noqa: E402

import portaserve.devices.cuda.attention as attention  # noqa: E402
from portaserve.core.batch import build_batch  # noqa: E402


def compile_decode(mma: bool, num_splits: int = 1):
    """The compiled decode kernel (and its launch keywords) for one step of 4 requests."""
    compiled = compile_launches()
    attention.is_interpreted = lambda tensor: False  # (CPU tensors, compiled for the GPU)
    attention._num_sms = lambda index: 132
    attention.fp8_mma_supported = lambda query: True
    attention.DECODE_FP8_MMA = mma
    cache = torch.randn(2, 64, 8, 16, 128).to(torch.float8_e4m3fn)
    step = build_batch([(f"r{i}", [1], 30, [i, i + 8], True) for i in range(4)], 16)
    attention.paged_attention(torch.randn(4, 32, 128, dtype=torch.bfloat16), cache,
                              step.attention_metadata(torch.device("cpu")), 0.08, num_splits=num_splits)
    return compiled["kernel"], compiled["kwargs"]


def main() -> None:
    driver.set_active(_TargetDriver(GPUTarget("cuda", 90, 32)))
    print(f"triton {triton.__version__}, sm_90; fp8 e4m3 cache, 32 q / 8 KV heads, head dim 128")
    print("| kernel | keys a step | warps | regs | shared KB | instr a step and warp | instr / KB of K/V | mix |")
    print("|---|---|---|---|---|---|---|---|")
    for mma in (False, True):
        kernel, kwargs = compile_decode(mma)
        ops, regs = loop_stats(kernel.asm["cubin"])
        keys = 32 if mma else kwargs["BLOCK_N"]
        warps = kwargs["num_warps"]
        per_step = sum(ops.values())
        per_kb = per_step * warps / (keys * 128 * 2 / 1024)  # K and V, one byte each
        mix = ", ".join(f"{op} {n}" for op, n in ops.most_common(6))
        name = "_decode_fp8_mma_kernel" if mma else "_decode_attn_kernel"
        print(f"| {name} | {keys} | {warps} | {regs} | {kernel.metadata.shared / 1024:.1f} | {per_step} | "
              f"{per_kb:.0f} | {mix} |", flush=True)


if __name__ == "__main__":
    main()
