"""The device contract: what a backend supplies and what the core may assume of it.

A device is a small class. Required members: ``name``, ``probe()``, ``capabilities()``,
``allocate_kv_cache()``. Optional members have defaults documented below. The kernels a device
implements natively are returned by ``kernels()``; every op it leaves out falls back to
``portaserve.devices.reference`` on the device's own tensors, and ``portaserve devices`` shows
which ops are native and which fall back.

Op signatures (the reference in ``portaserve/devices/reference.py`` is the definition):

``embedding(ids [T] int64, weight [V, H]) -> [T, H]``
``linear(x [T, K], weight [N, K], bias [N] | None) -> [T, N]``
``quant_linear(x [T, K], weight: QuantizedWeight, bias [N] | None) -> [T, N]``
    keyed by quant format: ``quant_kernels()`` maps format name -> function.
``rms_norm(x [T, H], weight [H], eps: float, residual [T, H] | None) -> y | (y, residual_out)``
    with a residual: ``residual_out = x + residual`` and ``y = norm(residual_out) * weight``.
``rotary(positions [T], q [T, Hq, D], k [T, Hk, D], cos_sin_cache [P, D]) -> (q, k)``
    rotate-half (NeoX) style; ``cos_sin_cache[p] = cat(cos[p, :D/2], sin[p, :D/2])``.
``silu_and_mul(x [T, 2I]) -> [T, I]``: ``silu(x[:, :I]) * x[:, I:]``.
``write_kv(key [T, Hk, D], value [T, Hk, D], kv_cache, slot_mapping [T]) -> None``
    a negative slot (a padding row) writes nothing.
``paged_attention(query [T, Hq, D], kv_cache, attn: AttentionMetadata, scale: float) -> [T, Hq, D]``
    varlen, causal, GQA, over the cached prefix plus the new tokens (already written).
``all_reduce(x, group) -> x``: sum over the tensor-parallel group (identity for one rank).

Fused ops (``FUSED_OPS``) are optional: a device that implements one saves launches and memory
traffic; one it leaves out is composed from the table's own resolved ops (never from the
reference behind the device's back), so a fused op is always exactly its parts:
``rotary_write_kv(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping) -> q'``
    ``rotary`` of q and k, then ``write_kv`` of the rotated k and v; returns the rotated q.
``rms_norm_fp8(x, weight, eps, residual=None) -> qa | (qa, x + residual)``
    ``rms_norm``, then the output's dynamic per-token fp8 quantization
    (``quant.fp8.quantize_per_token``: a ``QuantizedActivation``), for a W8A8 linear next.
``silu_and_mul_fp8(x) -> qa``
    ``silu_and_mul``, then the same quantization.
The ``*_fp8`` ops' composition quantizes with the format's own torch definition (not a table
op). The model calls them only when the fp8 ``quant_linear`` kernel takes quantized activations.
``linear_rms_norm(x, weight, bias, norm_weight, eps, residual) -> (y, out + residual)``
    ``linear`` (``quant_linear`` for a ``QuantizedWeight``: the table's kernel for its format),
    then ``rms_norm`` of the output with the residual: the projection that closes an attention
    or MLP block and the norm that opens the next. Composed, a quant weight's kernel may run
    both in one launch: a ``quant_linear`` kernel may carry ``fn.with_rms_norm`` (same
    arguments as this op, returning the pair, or None for a call it does not fuse).
``linear_silu_and_mul(x, weight, bias) -> [T, I]``
    ``linear`` / ``quant_linear`` of the gate|up weight [2I, K], then ``silu_and_mul``; a quant
    kernel may carry ``fn.with_silu_and_mul`` (same arguments; None: not fused).
``linear_rotary_write_kv(x, weight, bias, positions, cos_sin_cache, kv_cache, slot_mapping,
num_heads) -> q' [T, Hq, D]``
    ``linear`` / ``quant_linear`` of the q|k|v weight [(Hq + 2 Hk) D, K] (``num_heads`` = Hq,
    D = ``cos_sin_cache``'s width, Hk from the rest), then ``rotary_write_kv`` of its q, k, v;
    a quant kernel may carry ``fn.with_rotary_write_kv`` (same arguments; None: not fused).
Where these compose, a device's ``linear`` kernel may carry the same ``fn.with_*`` hooks for
16-bit weights as a quant kernel does for its format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    from portaserve.core.batch import ScheduledBatch

#: Version of the plugin API. A plugin declaring another major version is refused at load.
PLUGIN_API_VERSION = "1.0"

#: Every op of the kernel table, in the order ``portaserve devices`` lists them.
OP_NAMES: tuple[str, ...] = (
    "embedding",
    "linear",
    "quant_linear",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "write_kv",
    "paged_attention",
    "all_reduce",
)

#: Optional fused ops -> the ops they stand for, in order (see the module docstring).
FUSED_OPS: dict[str, tuple[str, ...]] = {
    "rotary_write_kv": ("rotary", "write_kv"),
    "rms_norm_fp8": ("rms_norm",),
    "silu_and_mul_fp8": ("silu_and_mul",),
    "linear_rms_norm": ("linear", "quant_linear", "rms_norm"),
    "linear_silu_and_mul": ("linear", "quant_linear", "silu_and_mul"),
    "linear_rotary_write_kv": ("linear", "quant_linear", "rotary_write_kv"),
}

#: KV layouts the reference ops understand. A device with another layout must implement
#: ``write_kv`` and ``paged_attention`` natively (checked when its kernel table is built).
#:  - ``blocks_nhd``: one tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
#:  - ``blocks_hnd``: one tensor per layer, ``[2, num_blocks, num_kv_heads, block_size, head_dim]``
REFERENCE_KV_LAYOUTS: tuple[str, ...] = ("blocks_nhd", "blocks_hnd")


@dataclass(frozen=True, slots=True)
class Availability:
    """Result of ``Device.probe()``: whether the device can run here, and why (or why not)."""

    is_available: bool
    reason: str = ""
    #: A traceback when probing raised; shown by ``portaserve devices``.
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """What ``paged_attention`` needs, on the device. R = requests, T = tokens this step."""

    query_start_loc: torch.Tensor  # [R + 1] int32, offsets of each request's new tokens
    seq_lens: torch.Tensor  # [R] int32, cached + new tokens per request
    context_lens: torch.Tensor  # [R] int32, tokens already in the cache before this step
    block_tables: torch.Tensor  # [R, max_blocks] int32, padded with 0 (bounded by seq_lens)
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset of each new token
    max_query_len: int
    max_seq_len: int
    block_size: int
    #: The first ``num_decodes`` requests have exactly one new token each (0: not counted). A
    #: device may run them through its decode kernel and the rest through its prefill kernel.
    num_decodes: int = 0
    # Host copies, so host-side kernels need no device sync.
    query_start_loc_cpu: tuple[int, ...] = ()
    seq_lens_cpu: tuple[int, ...] = ()
    context_lens_cpu: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The shape of the paged KV cache the core asks a device to allocate."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V for one block across all layers."""
        itemsize = self.dtype.itemsize
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Device memory in bytes."""

    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device can do, as data. The core asks these; it never asks for a device's name."""

    #: Compute dtypes the device supports; the first is the default.
    dtypes: tuple[torch.dtype, ...]
    #: (optional) KV cache element types the device stores and reads besides its compute dtypes
    #: (``EngineConfig.kv_cache_dtype``), e.g. ``(torch.float8_e4m3fn,)``: its ``write_kv``
    #: saturates and rounds to them and its ``paged_attention`` upcasts what it reads. Defaults
    #: to none: the engine refuses any other cache dtype on this device.
    kv_cache_dtypes: tuple[torch.dtype, ...] = ()
    #: Preferred KV block sizes; the first is the default.
    kv_block_sizes: tuple[int, ...] = (16,)
    #: The KV layout ``allocate_kv_cache`` produces (see ``REFERENCE_KV_LAYOUTS``).
    kv_layout: str = "blocks_nhd"
    #: Quant formats with a native kernel (others fall back to reference dequant).
    quant_formats: tuple[str, ...] = ()
    #: Whether packed weights (GGUF blocks, int8/int4) stay packed when the user does not say
    #: (``EngineConfig.keep_packed_weights`` is None). None: packed only when computing in 16
    #: bits; True: always (the device's packed kernels beat its dense float32 ones).
    keep_packed_weights: bool | None = None
    #: Whether the device captures decode steps as graphs (CUDA graphs, HPU graphs).
    supports_graph_capture: bool = False
    #: (optional) Whether the engine schedules step N+1 while the device still runs step N
    #: (async scheduling). True only for a device whose work is queued in order (a stream), so
    #: that a step launched early reads the previous step's sampled ids and KV only after that
    #: step wrote them, and whose device-to-host copies are awaited by ``torch.Event``.
    #: Defaults to False: each step completes before the next is scheduled.
    #: ``EngineConfig.async_scheduling`` overrides it either way.
    async_scheduling: bool = False
    #: Defaults for the scheduler when the user sets none.
    default_max_num_seqs: int = 256
    default_max_num_batched_tokens: int = 2048
    #: Fraction of free memory the KV cache may take by default.
    default_memory_utilization: float = 0.9
    #: (optional) Default KV cache size cap in bytes, for devices that share memory with the
    #: rest of the host (cpu): the engine takes min(this, free * utilization) unless the user
    #: sets a size. None: no cap beyond free memory.
    default_kv_cache_bytes: int | None = None
    #: torch.distributed backend for tensor parallelism ("gloo", "nccl", ...).
    dist_backend: str = "gloo"
    #: Extra, device-specific facts shown by ``portaserve devices`` (versions, SKUs).
    extra: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    """(optional) A whole-model executor from ``Device.compile``; graph runtimes supply one.

    (optional) ``accepts_device_input_ids: bool`` [False]: when True, ``execute`` is called as
    ``execute(batch, prev_sampled)`` and must fill the batch's placeholders on the device
    (``batch.to_device(dev).input_ids(prev_sampled)``; see ``ScheduledBatch.prev_token_rows``).
    Otherwise the core fills them in on the host first (waiting for the previous step), so an
    executor that reads ``batch.token_ids`` stays correct under async scheduling.
    """

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step. Returns logits [len(batch.logits_indices), vocab] on host or device,
        float32 or the model's float dtype (the sampler upcasts where it needs to)."""
        ...


KernelFn = Callable[..., Any]


class Device:
    """Base class of a device backend. Subclass it and register the class with
    ``portaserve_register_devices``.

    Required: ``name``, ``probe``, ``capabilities``, ``allocate_kv_cache``.
    Optional (defaults in brackets): ``priority`` [0], ``kernels`` [{}: everything falls back to
    the reference], ``quant_kernels`` [{}], ``memory_info`` [host memory], ``compile`` [None: the
    core runs the model op by op], ``synchronize`` [no-op], ``torch_device`` [cpu].
    """

    #: Registry name, e.g. "cpu", "cuda", "acme-npu". Lower case, no spaces.
    name: ClassVar[str] = ""
    #: Higher wins when the user names no device and several are available.
    priority: ClassVar[int] = 0
    #: The plugin API major version the device was written for.
    api_version: ClassVar[str] = PLUGIN_API_VERSION

    def __init__(self, index: int = 0) -> None:
        self.index = index

    @classmethod
    def probe(cls) -> Availability:
        """Is the runtime and hardware present? Must not raise; say why not in ``reason``."""
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def kernels(self) -> dict[str, KernelFn]:
        """(optional) Native ops by name (``OP_NAMES``, and any of ``FUSED_OPS``). Defaults to
        none."""
        return {}

    def quant_kernels(self) -> dict[str, KernelFn]:
        """(optional) Native ``quant_linear`` per quant format name. Defaults to none."""
        return {}

    @property
    def torch_device(self) -> torch.device:
        """(optional) Where this device's torch tensors live. Defaults to the CPU."""
        import torch

        return torch.device("cpu")

    def allocate_kv_cache(self, spec: KVCacheSpec) -> list[Any]:
        """Allocate the paged KV cache: one object per layer, in ``capabilities().kv_layout``."""
        raise NotImplementedError

    def memory_info(self) -> MemoryInfo:
        """(optional) Free and total memory for the KV cache. Defaults to host memory."""
        return host_memory_info()

    def compile(self, model: Any, kv_caches: list[Any], *, max_batch: int | None = None) -> Executor | None:
        """(optional) Build a whole-model executor. Defaults to None (run op by op).

        ``max_batch``: the most requests one step will hold (the engine's ``max_num_seqs``), for
        executors that prepare per batch size (graph capture); None leaves the device's default.
        The engine passes it only to a ``compile`` that takes the keyword, so a plugin written
        without it keeps working (``compile_executor``)."""
        return None

    def synchronize(self) -> None:
        """(optional) Wait for queued work. Defaults to a no-op."""

    def describe(self) -> str:
        return f"{self.name}:{self.index}"


def host_memory_info() -> MemoryInfo:
    """Free and total host memory from /proc/meminfo (Linux) or os.sysconf."""
    import os

    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        total = int(fields["MemTotal"].split()[0]) * 1024
        free = int(fields["MemAvailable"].split()[0]) * 1024
        return MemoryInfo(free_bytes=free, total_bytes=total)
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return MemoryInfo(
            free_bytes=os.sysconf("SC_AVPHYS_PAGES") * page,
            total_bytes=os.sysconf("SC_PHYS_PAGES") * page,
        )


def compile_executor(device: Device, model: Any, kv_caches: list[Any], max_batch: int) -> Executor | None:
    """``device.compile``, with ``max_batch`` where its ``compile`` takes that keyword (it was
    added to the contract after the first plugins were written)."""
    import inspect

    try:
        params = inspect.signature(device.compile).parameters
    except (TypeError, ValueError):  # (a builtin or C callable: call it as the contract began)
        params = {}
    takes = "max_batch" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes:
        return device.compile(model, kv_caches, max_batch=max_batch)
    return device.compile(model, kv_caches)
