"""The ``cuda`` device (NVIDIA GPUs through torch + Triton) and ``triton-interpret``.

``cuda``: GEMMs through torch (cuBLAS) in bf16/fp16/fp32 (packed quant formats are unpacked
to the compute dtype right before the GEMM); Triton kernels for attention,
``write_kv``, fused residual + RMSNorm, rotary and silu-and-mul (modules beside this one);
the KV cache in layout ``blocks_hnd`` (``kv.py``), in the compute dtype or in fp8 (e5m2, and
e4m3 from compute capability 8.9; ``Capabilities.kv_cache_dtypes``); decode steps replayed
from CUDA graphs (``graphs.py``, off with ``PORTASERVE_CUDA_GRAPHS=0``); async scheduling on (the engine
schedules step N+1 while the GPU runs step N; ``--no-async-scheduling`` turns it off). The ``rocm`` device
(``portaserve/devices/rocm.py``) shares all of this through ``TritonGPUDevice``.

``triton-interpret``: the same Triton kernels run by Triton's interpreter on CPU tensors, so the
conformance suite and CI check the GPU kernels' code on a machine without a GPU. Slow, float32
and float16 only (the interpreter's bfloat16 is inexact); never chosen unless asked for.

This module is an in-tree plugin (listed in ``portaserve.devices.builtin.BUILTIN_PLUGINS``). It
imports neither triton nor CUDA at load: a missing triton or GPU shows as the probe's reason.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F

from portaserve import hookimpl
from portaserve.devices import reference
from portaserve.plugins.device import (
    Availability,
    Capabilities,
    Device,
    Executor,
    KernelFn,
    KVCacheSpec,
    MemoryInfo,
)

PORTASERVE_PLUGIN_API = "1.0"

logger = logging.getLogger(__name__)

#: The KV layout of every Triton device (see kv.py).
KV_LAYOUT = "blocks_hnd"


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)  # [T, H]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[T, N]: a decode batch of a few rows through the Triton GEMV (``gemv.py``) for weight
    shapes where it measured faster than cuBLAS on this GPU, the rest through cuBLAS /
    hipBLASLt."""
    from portaserve.devices.cuda import gemv

    if gemv.supports(x, weight) and gemv.faster_than_cublas(x, weight):
        out = gemv.gemv(x, weight)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def _linear_rotary_write_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            positions: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor | None:
    """``linear``'s hook for the fused op ``linear_rotary_write_kv``: where ``linear`` would run
    the Triton GEMV, the GEMV with rotary and the KV write in its epilogue (``gemv.FUSE_ROTARY``)
    -> q' [T, Hq, D]; None (the table composes ``linear`` and ``rotary_write_kv``) elsewhere."""
    from portaserve.devices.cuda import gemv

    x2 = x.reshape(-1, weight.shape[-1])
    if not (gemv.FUSE_ROTARY and gemv.supports(x2, weight) and gemv.faster_than_cublas(x2, weight)):
        return None
    q = gemv.gemv(x2, weight, bias=bias, rotary=(positions, cos_sin_cache, kv_cache, slot_mapping, num_heads,
                                                 KV_LAYOUT))
    return None if q is None else q.view(q.shape[0], num_heads, -1)


linear.with_rotary_write_kv = _linear_rotary_write_kv  # type: ignore[attr-defined]


def dequant_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``quant_linear`` for any packed format: unpack to x's dtype on the device, then one GEMM.

    A stopgap that keeps packed weights in memory and the GEMM on the tensor cores; a fused
    dequant-GEMM kernel registered for (format, cuda) by a quant plugin takes precedence."""
    return F.linear(x, weight.dequantize(x.dtype), bias)  # [T, N]


def quant_formats() -> tuple[str, ...]:
    """Names of portaserve's built-in quant formats (each served by ``dequant_linear``)."""
    from portaserve.quant.registry import builtin_methods

    return tuple(method.name for method in builtin_methods())


def triton_kernels() -> dict[str, KernelFn]:
    """The native ops of the Triton devices (imports triton). ``quant_linear`` and
    ``all_reduce`` come from the reference (dequantize + F.linear; torch.distributed)."""
    from portaserve.devices.cuda.activation import silu_and_mul, silu_and_mul_fp8
    from portaserve.devices.cuda.attention import paged_attention
    from portaserve.devices.cuda.kv import write_kv
    from portaserve.devices.cuda.norm import rms_norm, rms_norm_fp8
    from portaserve.devices.cuda.rotary import rotary, rotary_write_kv

    return {
        "embedding": embedding,
        "linear": linear,
        "rms_norm": rms_norm,
        "rotary": rotary,
        "silu_and_mul": silu_and_mul,
        "write_kv": write_kv,
        "paged_attention": paged_attention,
        "rotary_write_kv": rotary_write_kv,
        "rms_norm_fp8": rms_norm_fp8,
        "silu_and_mul_fp8": silu_and_mul_fp8,
    }


def triton_version() -> str | None:
    """Triton's version, or None when it is not installed (checked without importing it)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:  # importable from a source tree without metadata
        return "unknown"


def allocate_blocks_hnd(spec: KVCacheSpec, device: torch.device) -> list[torch.Tensor]:
    """One ``[2, num_blocks, Hk, block_size, D]`` tensor per layer, zeroed (so padded reads of a
    captured graph never see NaN garbage)."""
    return reference.allocate_kv_cache(spec, device, KV_LAYOUT)


class TritonGPUDevice(Device):
    """Shared body of the Triton GPU devices (``cuda``, ``rocm``): torch's ``cuda`` device
    namespace, which HIP builds of torch also use. Subclasses set ``name`` and ``probe``."""

    #: Whether decode steps are captured as graphs on this device family.
    graph_capture: bool = False
    #: Whether the engine overlaps its host work with the device's (``Capabilities``): work is
    #: queued on one stream and sampled ids come back through a pinned copy and an event.
    async_scheduling: bool = False

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        torch.cuda.set_device(index)  # Triton launches on the current device

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def capabilities(self) -> Capabilities:
        props = torch.cuda.get_device_properties(self.index)
        dtypes = (torch.bfloat16, torch.float16, torch.float32) if torch.cuda.is_bf16_supported() \
            else (torch.float16, torch.float32)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=self.fp8_kv_cache_dtypes(props),
            kv_block_sizes=(16, 32, 64),
            kv_layout=KV_LAYOUT,
            supports_graph_capture=self.graph_capture,
            async_scheduling=self.async_scheduling,
            default_max_num_seqs=256,
            default_max_num_batched_tokens=8192,
            default_memory_utilization=0.9,
            dist_backend="nccl",
            extra={
                "gpu": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "torch": torch.__version__,
                "triton": triton_version(),
            },
        )

    def fp8_kv_cache_dtypes(self, props: Any) -> tuple[torch.dtype, ...]:
        """fp8 KV cache formats the Triton kernels read on this GPU (kv.py writes both; AMD's
        Triton backend converts OCP fp8 natively on CDNA4 and in software before)."""
        return (torch.float8_e4m3fn, torch.float8_e5m2)

    def kernels(self) -> dict[str, KernelFn]:
        return triton_kernels()

    def quant_kernels(self) -> dict[str, KernelFn]:
        return dict.fromkeys(quant_formats(), dequant_linear)

    def allocate_kv_cache(self, spec: KVCacheSpec) -> list[torch.Tensor]:
        return allocate_blocks_hnd(spec, self.torch_device)

    def memory_info(self) -> MemoryInfo:
        """Free and total memory of the GPU, the torch allocator's cached but unused blocks
        handed back first (loading a model leaves some: what it freed, e.g. the 16-bit weights
        an online quantization replaced), so that they count as free for the KV cache."""
        with torch.cuda.device(self.index):
            torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.index)
        return MemoryInfo(free_bytes=int(free), total_bytes=int(total))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def compile(self, model: Any, kv_caches: list[Any], *, max_batch: int | None = None) -> Executor | None:
        if not self.graph_capture:
            return None
        from portaserve.devices.cuda.graphs import DEFAULT_MAX_BATCH, graph_executor_for

        try:
            return graph_executor_for(model, kv_caches, self.torch_device,
                                      max_batch=max_batch or DEFAULT_MAX_BATCH)
        except RuntimeError:  # capture is an optimisation: say why and run op by op
            logger.warning("%s: CUDA graph capture failed; running every step op by op "
                           "(PORTASERVE_CUDA_GRAPHS=0 skips the attempt)", self.describe(),
                           exc_info=True)
            return None


def probe_gpu(runtime: str) -> Availability:
    """Shared probe: torch sees a GPU of this build's ``runtime`` ("cuda" or "hip") and triton
    is installed. Never raises."""
    hip = getattr(torch.version, "hip", None)
    if runtime == "cuda" and hip:
        return Availability(False, f"torch {torch.__version__} is a ROCm/HIP build (use device rocm)")
    if runtime == "hip" and not hip:
        return Availability(False, f"torch {torch.__version__} is not a ROCm/HIP build")
    if runtime == "cuda" and torch.version.cuda is None:
        return Availability(False, f"torch {torch.__version__} is built without CUDA")
    try:
        if not torch.cuda.is_available():
            return Availability(False, f"torch {torch.__version__} ({runtime}) sees no GPU")
        count = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
    except (RuntimeError, AssertionError) as e:  # driver/runtime mismatch, broken install
        return Availability(False, f"GPU runtime error: {e}")
    triton = triton_version()
    if triton is None:
        return Availability(False, f"{count} GPU(s) ({props.name}) but triton is not installed "
                                   f"(pip install 'portaserve[{'cuda' if runtime == 'cuda' else 'rocm'}]')")
    version = torch.version.cuda if runtime == "cuda" else hip
    return Availability(
        True,
        f"{count} x {props.name} (cc {props.major}.{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__} {runtime} {version}, "
        f"triton {triton}")


class CudaDevice(TritonGPUDevice):
    """NVIDIA GPUs: torch (cuBLAS) GEMMs, Triton kernels, CUDA graphs for decode."""

    name = "cuda"
    priority = 100
    graph_capture = True
    async_scheduling = True

    @classmethod
    def probe(cls) -> Availability:
        return probe_gpu("cuda")

    def fp8_kv_cache_dtypes(self, props: Any) -> tuple[torch.dtype, ...]:
        """e4m3 (Triton's fp8e4nv) from compute capability 8.9 (Ada, Hopper) on; e5m2 on all."""
        if (props.major, props.minor) >= (8, 9):
            return (torch.float8_e4m3fn, torch.float8_e5m2)
        return (torch.float8_e5m2,)


class TritonInterpretDevice(Device):
    """The Triton kernels of the GPU devices, run by Triton's interpreter on the host CPU."""

    name = "triton-interpret"
    priority = -100

    @classmethod
    def probe(cls) -> Availability:
        version = triton_version()
        if version is None:
            return Availability(False, "triton is not installed (pip install triton)")
        return Availability(True, f"triton {version} interpreter on the host CPU (slow; for tests)")

    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=(torch.float32, torch.float16),
            kv_cache_dtypes=(torch.float8_e4m3fn, torch.float8_e5m2),
            kv_block_sizes=(16,),
            kv_layout=KV_LAYOUT,
            default_max_num_seqs=16,
            default_max_num_batched_tokens=512,
            default_kv_cache_bytes=1 << 30,
            extra={"triton": triton_version(), "interpreter": True},
        )

    def kernels(self) -> dict[str, KernelFn]:
        return triton_kernels()

    def quant_kernels(self) -> dict[str, KernelFn]:
        return dict.fromkeys(quant_formats(), dequant_linear)

    def allocate_kv_cache(self, spec: KVCacheSpec) -> list[torch.Tensor]:
        return allocate_blocks_hnd(spec, torch.device("cpu"))


@hookimpl
def portaserve_register_devices(register: Any) -> None:
    register(CudaDevice)
    register(TritonInterpretDevice)
