"""Configuration dataclasses: the model's shape and the engine's options.

``ModelConfig`` is what a loader reads from a GGUF header or a Hugging Face ``config.json``.
``EngineConfig`` is what the user sets (``LLM(...)`` keyword arguments, ``portaserve serve``
flags); ``None`` means "let the device decide". Both validate at construction and never change
afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from portaserve.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family model."""

    architecture: str  # "llama", "mistral", "qwen2", "qwen3", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    #: Hugging Face style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections have a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config {name} must be a positive integer; got {value!r}",
                                  field=name)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})", field="num_kv_heads")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine options. ``None`` fields take the device's defaults when the engine starts."""

    model: str = "smollm2-135m"
    device: str | None = None
    dtype: str = "auto"  # "auto" (device default), "float32", "float16", "bfloat16"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    num_kv_blocks: int | None = None
    memory_utilization: float | None = None
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # "fcfs", "priority", "cache-aware"
    #: Admission keeps KV blocks free for the output running requests are expected to still
    #: write; this is the expected output length (tokens) until finished requests show the real
    #: one (core/scheduler.py). None (default): admit on present needs (vLLM's; growth then
    #: preempts), which measured faster on the H200.
    expected_output_tokens: int | None = None
    quantization: str | None = None
    #: Element type of the KV cache: "auto" (the compute dtype) or an fp8 format ("fp8" is
    #: "fp8_e4m3"; names and dtypes in ``portaserve.quant.fp8.KV_CACHE_DTYPES``). The device
    #: must declare the format in ``Capabilities.kv_cache_dtypes``.
    kv_cache_dtype: str = "auto"
    #: Keep GGUF block formats packed in memory. None: the device decides
    #: (``Capabilities.keep_packed_weights``; the cpu device with its native kernels keeps them
    #: packed), else packed when computing in 16 bits and expanded at load in float32.
    keep_packed_weights: bool | None = None
    #: Schedule step N+1 while the device runs step N (see core/engine.py). None: the
    #: device's ``Capabilities.async_scheduling``; True/False forces it on any device.
    async_scheduling: bool | None = None
    seed: int = 0
    max_waiting_requests: int | None = None
    tensor_parallel_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_or_none(self, "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                          "block_size", "num_kv_blocks", "max_waiting_requests")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(
                f"dtype must be one of auto, float32, float16, bfloat16; got {self.dtype!r}",
                field="dtype")
        if self.kv_cache_dtype != "auto":
            from portaserve.quant.fp8 import KV_CACHE_DTYPES  # imports torch: only when asked

            if self.kv_cache_dtype not in KV_CACHE_DTYPES:
                raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                                  f"got {self.kv_cache_dtype!r}", field="kv_cache_dtype")
        if self.memory_utilization is not None and not 0.0 < self.memory_utilization <= 1.0:
            raise ConfigError(
                f"memory_utilization must be in (0, 1]; got {self.memory_utilization!r}",
                field="memory_utilization")
        if self.scheduling_policy not in ("fcfs", "priority", "cache-aware"):
            raise ConfigError(
                "scheduling_policy must be one of fcfs, priority, cache-aware; got "
                f"{self.scheduling_policy!r}", field="scheduling_policy")
        eo = self.expected_output_tokens
        if eo is not None and (not isinstance(eo, int) or isinstance(eo, bool) or eo < 0):
            raise ConfigError(f"expected_output_tokens must be a non-negative integer or None; got {eo!r}",
                              field="expected_output_tokens")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(
                f"tensor_parallel_size must be an integer >= 1; got {self.tensor_parallel_size!r}",
                field="tensor_parallel_size")


def _positive_or_none(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer; got {value!r}", field=name)
