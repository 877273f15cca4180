"""Compile every Triton kernel variant of the cuda/rocm devices (and the quant GEMVs) for a GPU
target, without a GPU.

    PYTHONPATH=. python ci/triton_compile_check.py cuda:90      # Hopper (sm_90), cubin via ptxas
    PYTHONPATH=. python ci/triton_compile_check.py hip:gfx942   # MI300

The kernel tests (tests/devices/test_triton_kernels.py) and a set of Llama-3-8B-shaped bf16 calls
are run with every launch replaced by ``JITFunction.warmup`` (compile only) against a stand-in
Triton driver that reports the target, and with the GPU tile sizes (on sm_90+ the Llama calls
and the quant GEMVs once more with programmatic dependent launch, ``launch.pdl``). The outputs are not computed,
so the tests' value assertions fail by design; this script reports only compile errors. It leans
on Triton internals (the driver object, ``warmup``); written against Triton 3.6-3.9.
"""

from __future__ import annotations

import sys
import traceback

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources

import portaserve.devices.cuda.activation as activation
import portaserve.devices.cuda.attention as attention
import portaserve.devices.cuda.gemv as gemv
import portaserve.devices.cuda.launch as launch
import portaserve.devices.cuda.norm as norm
import portaserve.quant.kernels_triton as kernels_triton

#: Shared memory a block may use: sm_90 227 KiB (opt-in), gfx942 64 KiB of LDS.
SHARED_LIMIT = {"cuda": 232448, "hip": 65536}


class _TargetDriver:
    """Just enough of a Triton driver for JITFunction.warmup to compile for ``target``."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def compile_launches() -> dict:
    """Make every ``TritonKernel`` launch compile for the active driver's target instead of
    running; the dict returned then holds the last launch's compiled kernel (``"kernel"``)
    and its keywords (``"kwargs"``). For scripts that read a kernel's code
    (``benchmarks/gemv_sass.py``, ``attention_sass.py``)."""
    import portaserve.devices.cuda.launch as launch

    compiled: dict = {}

    def on(self: launch.TritonKernel, tensor: torch.Tensor):
        fn = triton.jit(self.fn)

        class Launcher:
            def __getitem__(_, grid):
                def go(*args, **kwargs):
                    compiled["kernel"], compiled["kwargs"] = fn.warmup(*args, grid=grid, **kwargs), kwargs
                return go
        return Launcher()

    launch.TritonKernel.on = on
    return compiled


def main(argv: list[str]) -> int:
    spec = argv[0] if argv else "cuda:90"
    backend, arch = spec.split(":")
    target = GPUTarget(backend, int(arch) if backend == "cuda" else arch, 32 if backend == "cuda" else 64)
    driver.set_active(_TargetDriver(target))
    compiled: dict = {}
    counts: dict[str, int] = {}
    largest: dict[str, int] = {}
    errors: list[str] = []
    oversized: list[str] = []

    def on(self: launch.TritonKernel, tensor: torch.Tensor):
        fn = compiled.setdefault(self.fn, triton.jit(self.fn))

        class Launcher:
            def __getitem__(_, grid):
                def go(*args, **kwargs):
                    try:
                        kernel = fn.warmup(*args, grid=grid, **kwargs)
                    except Exception:  # report every failing variant, keep compiling the rest
                        errors.append(f"{self.__name__} {kwargs}:\n{traceback.format_exc()}")
                        return
                    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
                    if shared > SHARED_LIMIT[backend]:
                        # as a GPU's launch would: the kernels' own fitting (fewer stages,
                        # smaller tiles) retries; a variant nothing fits stays an error
                        oversized.append(f"{self.__name__} {kwargs}: needs {shared} bytes of shared "
                                         f"memory, the {spec} limit is {SHARED_LIMIT[backend]}")
                        raise OutOfResources(shared, SHARED_LIMIT[backend], "shared memory")
                    if oversized and oversized[-1].startswith(self.__name__ + " "):
                        oversized.pop()  # the retry that followed fitted
                    ptx = kernel.asm.get("ptx", "") if backend == "cuda" else ""
                    wanted = (["griddepcontrol.wait", "griddepcontrol.launch_dependents"] if kwargs.get("PDL") else [])
                    prefetch = kwargs.get("PREFETCH") or kwargs.get("PREFETCH_LINES")
                    wanted += ["prefetch.global.L2"] if kwargs.get("PDL") and prefetch else []
                    missing = [w for w in wanted if w not in ptx]
                    if missing:
                        errors.append(f"{self.__name__} {kwargs}: PTX lacks {missing}")
                    counts[self.__name__] = counts.get(self.__name__, 0) + 1
                    largest[self.__name__] = max(largest.get(self.__name__, 0), shared)
                return go

        return Launcher()

    launch.TritonKernel.on = on
    attention.is_interpreted = lambda tensor: False  # GPU tile sizes
    gemv.is_interpreted = lambda tensor: False
    for module in (norm, activation, kernels_triton):  # fp8 codes stored as fp8, as on a GPU
        module.fp8_codes_dtype = lambda tensor: torch.float8_e4m3fn
    gemv.faster_than_cublas = lambda x, weight: True
    from portaserve.quant import gemv_triton  # the packed GEMV's inline PTX: NVIDIA targets only
    gemv_triton.packed_supported = lambda x: backend == "cuda"
    attention._num_sms = lambda index: 132
    attention.fp8_mma_supported = lambda query: backend == "cuda"  # (its PTX: NVIDIA only)
    pytest.main(["-q", "--tb=no", "-rN", "-p", "no:cacheprovider", "-W", "ignore",
                 "tests/devices/test_triton_kernels.py", "-k", "not leak"])
    try:
        _llama_bf16_calls()
        if backend == "cuda" and int(arch) >= 90:  # and launched with PDL (griddepcontrol)
            launch.pdl = lambda tensor: True
            _llama_bf16_calls()
            gemv_triton.GEMV_PDL = True
            late = gemv_triton.PDL_LATE
            for gemv_triton.PDL_LATE in (False, True):  # the trigger first, then late
                _quant_calls()
            gemv_triton.GEMV_PDL, gemv_triton.PDL_LATE = False, late
            launch.pdl = lambda tensor: False
        _quant_calls()
    except OutOfResources:
        pass  # the variant is in ``oversized``
    errors.extend(oversized)
    print("(the test failures above are expected: kernels were compiled, not run)")
    print(f"target {target}: compiled variants {counts}")
    print(f"largest shared memory (bytes) per kernel: {largest}")
    for error in errors:
        print("COMPILE ERROR", error)
    return 1 if errors else 0


def _llama_bf16_calls() -> None:
    """The variants a Llama-3-8B bf16 run launches: decode at every split count, prefill."""
    from portaserve.core.batch import build_batch
    from portaserve.devices.cuda import activation, gemv, kv, norm, rotary

    dt = torch.bfloat16
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)):
        gemv.gemv(torch.randn(1, k, dtype=dt), torch.randn(n, k, dtype=dt))
    x = torch.randn(8, 4096, dtype=dt)
    norm.rms_norm(x, x[0], 1e-5, x)
    norm.rms_norm(x, x[0], 1e-5)
    activation.silu_and_mul(torch.randn(8, 2 * 14336, dtype=dt))
    qkv = torch.randn(8, 48 * 128, dtype=dt)
    rotary.rotary(torch.arange(8), qkv[:, :4096].view(8, 32, 128), qkv[:, 4096:5120].view(8, 8, 128),
                  torch.randn(64, 128, dtype=dt))
    cache = torch.randn(2, 64, 8, 16, 128, dtype=dt)
    rotary.rotary_write_kv(torch.arange(8), qkv[:, :4096].view(8, 32, 128),
                           qkv[:, 4096:5120].view(8, 8, 128), qkv[:, 5120:].view(8, 8, 128),
                           torch.randn(64, 128, dtype=dt), cache, torch.arange(8))
    decode = build_batch([(f"r{i}", [1], 30, [i, i + 8], True) for i in range(4)], 16)
    prefill = build_batch([("a", [1] * 40, 0, [1, 2, 3], True), ("b", [1], 20, [4, 5], True)], 16)
    for dt in (torch.bfloat16, torch.float32):  # fp32: IEEE dots, the largest tiles in bytes
        cache = torch.randn(2, 64, 8, 16, 128, dtype=dt)
        kv.write_kv(torch.randn(8, 8, 128, dtype=dt), torch.randn(8, 8, 128, dtype=dt), cache, torch.arange(8))
        attn = decode.attention_metadata(torch.device("cpu"))
        for splits in (1, 2, 4, 8, 16, 32):
            attention.paged_attention(torch.randn(4, 32, 128, dtype=dt), cache, attn, 0.08, num_splits=splits)
        attention.paged_attention(torch.randn(41, 32, 128, dtype=dt), cache,
                                  prefill.attention_metadata(torch.device("cpu")), 0.08)
    if sys.argv[1:2] != ["cuda:80"]:  # fp8 (e4m3) outputs: the fused norm / silu for W8A8
        norm.rms_norm_fp8(x, x[0], 1e-5, x)
        norm.rms_norm_fp8(x, x[0], 1e-5)
        activation.silu_and_mul_fp8(torch.randn(8, 2 * 14336, dtype=dt))
    if sys.argv[1:2] != ["cuda:80"]:  # an fp8 (e4m3) cache under bf16 queries: the fp16 dots
        cache8 = torch.randn(2, 64, 8, 16, 128).to(torch.float8_e4m3fn)
        kv.write_kv(torch.randn(8, 8, 128, dtype=dt), torch.randn(8, 8, 128, dtype=dt), cache8, torch.arange(8))
        for splits in (1, 32):
            attention.paged_attention(torch.randn(4, 32, 128, dtype=dt), cache8,
                                      decode.attention_metadata(torch.device("cpu")), 0.08, num_splits=splits)
            attention.DECODE_FP8_MMA = True  # and the hand-built MMA decode (16-bit queries)
            attention.paged_attention(torch.randn(4, 32, 128, dtype=torch.bfloat16), cache8,
                                      decode.attention_metadata(torch.device("cpu")), 0.08, num_splits=splits)
            attention.DECODE_FP8_MMA = False
        attention.paged_attention(torch.randn(41, 32, 128, dtype=dt), cache8,
                                  prefill.attention_metadata(torch.device("cpu")), 0.08)


def _quant_calls() -> None:
    """The quant GEMV of every format at M = 1..4 (split K and not) in each activation dtype,
    int4's tensor-core variants at one row, and the fp8 activation quantizer in each scheme, at
    Llama-3-8B widths."""
    from portaserve.quant import gemv_triton, kernels_triton, registry
    from portaserve.quant.fp8 import FP8Method

    gemv_triton._num_sms = lambda x: 132
    gemv_triton.is_interpreted = lambda tensor: False  # fp8 tiles: the GPU's fp16 dots
    for fmt in ("Q4_0", "Q4_1", "Q8_0", "int4", "int8", "fp8", "Q4_K", "Q5_K", "Q6_K"):
        weight = registry.quantize(torch.randn(64, 4096) * 0.02, fmt)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for m in range(1, gemv_triton.MAX_M + 1):
                x = torch.randn(m, 4096, dtype=dt)
                # the tuned kernel, and the other one where the format has both
                configs = [None, gemv_triton.FMA_FALLBACK]
                if fmt in gemv_triton.DOT_FORMATS:
                    configs.append(gemv_triton.GemvConfig(128, 128, num_stages=4, dot=True))
                for split_k, config in ((1, None), (4, None), *((1, c) for c in configs[1:])):
                    if fmt == "fp8":
                        gemv_triton.gemv(x.to(torch.float8_e4m3fn), weight, x_scale=torch.ones(m),
                                         out_dtype=dt, split_k=split_k, config=config)
                    else:
                        gemv_triton.gemv(x, weight, split_k=split_k, config=config)
    # int4 at one row on the tensor cores (GemvConfig.mma; needs the packed path: NVIDIA only)
    from portaserve.quant.int_formats import Int4Method

    for group in (32, 64, 128):
        weight = Int4Method().quantize(torch.randn(256, 4096) * 0.02, group_size=group)
        x = torch.randn(1, 4096, dtype=torch.bfloat16)
        for config in (gemv_triton.GemvConfig(128, 128, mma=True), gemv_triton.GemvConfig(64, 128, mma=True),
                       gemv_triton.GemvConfig(128, 128, mma=True, mma_xsum=True),
                       gemv_triton.GemvConfig(128, 128, num_stages=2, mma=True)):
            for split_k in (1, 4):
                gemv_triton.gemv(x, weight, split_k=split_k, config=config)
    # the norm after the GEMV in its launch (``norm=``, the fused ``linear_rms_norm``): the
    # packed and MMA one-row paths and the float32 FMA one, split K and not
    fuse = gemv_triton.FUSE_NORM, gemv_triton.FUSE_SILU
    gemv_triton.FUSE_NORM = True
    weight = Int4Method().quantize(torch.randn(4096, 4096) * 0.02, group_size=128)
    for dt, config in ((torch.bfloat16, None), (torch.bfloat16, gemv_triton.GemvConfig(128, 128, mma=True)),
                       (torch.float32, None)):
        x = torch.randn(1, 4096, dtype=dt)
        for split_k in (1, 4):
            gemv_triton.gemv(x, weight, split_k=split_k, config=config,
                             norm=(torch.randn(1, 4096, dtype=dt), torch.ones(4096, dtype=dt), 1e-5))
    # silu_and_mul after a gate|up GEMV in its launch (``linear_silu_and_mul``)
    gemv_triton.FUSE_SILU = True
    weight = Int4Method().quantize(torch.randn(2 * 14336, 4096) * 0.02, group_size=128)
    for dt, config in ((torch.bfloat16, None), (torch.bfloat16, gemv_triton.GemvConfig(128, 128, mma=True)),
                       (torch.float32, None)):
        for split_k in (1, 2):
            gemv_triton.gemv(torch.randn(1, 4096, dtype=dt), weight, split_k=split_k, config=config,
                             silu_and_mul=True)
    gemv_triton.FUSE_NORM, gemv_triton.FUSE_SILU = fuse
    for scheme in ("dynamic_per_token", "dynamic_per_tensor"):
        weight = FP8Method().quantize(torch.randn(64, 4096), activation=scheme)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            kernels_triton.quantize_fp8_activation(torch.randn(3, 4096, dtype=dt), weight)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
