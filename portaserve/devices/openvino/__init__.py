"""The ``openvino`` device: OpenVINO's CPU plugin, op by op or as one paged-attention graph.

A graph runtime behind the same contract as the torch devices. It supplies:

- ``probe``: the OpenVINO version and the OpenVINO devices present (``CPU`` here); when the
  ``openvino`` package is missing the probe says so (nothing imports it before then);
- per-op kernels (``ops.py``): ``linear``, ``rms_norm``, ``silu_and_mul`` and ``rotary`` as small
  compiled OpenVINO models, cached per shape and dtype, fed torch tensors through shared memory;
- ``allocate_kv_cache``: ``blocks_hnd`` tensors ``[2, num_blocks, Hk, 32, D]``, which are exactly
  the plugin's f32 paged-cache layout (its block size is fixed at 32);
- ``compile(model, kv_caches)``: the whole Llama-family model as one OpenVINO graph with
  ``PagedAttentionExtension`` (``graph.py``), run from the core's ``ScheduledBatch`` and block
  tables (``executor.py``).

Precision (``PORTASERVE_OPENVINO_PRECISION`` or ``OpenVINODevice(precision=...)``):

- ``f32`` (default): ``INFERENCE_PRECISION_HINT=f32``, ``KV_CACHE_PRECISION=f32`` and dynamic
  activation quantization off; greedy decoding matches the ``cpu`` device token for token.
- ``auto``: the plugin's own defaults: u8 KV cache (keys per channel, values per token), bf16
  inference on CPUs with AVX-512 BF16 or AMX (f32 on others, like this AVX2 host), dynamic
  quantization of activations for compressed weights. Faster, not bit-exact.

Weights (``PORTASERVE_OPENVINO_WEIGHTS`` or ``weight_format=``): ``f32`` (default), ``int8``
(per output channel) or ``int4`` (groups of 32), re-quantized at compile time.
"""

from __future__ import annotations

import functools
import logging
import traceback
from typing import TYPE_CHECKING, Any

import torch

from portaserve import envs
from portaserve.devices import reference
from portaserve.errors import ConfigError, DeviceError
from portaserve.plugins.device import (
    Availability,
    Capabilities,
    Device,
    Executor,
    KernelFn,
    KVCacheSpec,
)

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

#: The CPU plugin pages its KV cache in blocks of 32 tokens (a static dimension it sets itself).
CPU_BLOCK_SIZE = 32
PRECISIONS = ("f32", "auto")
WEIGHT_FORMATS = ("f32", "int8", "int4")


@functools.cache
def _core() -> ov.Core:
    import openvino as ov

    return ov.Core()


def _target_config(precision: str, num_threads: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = num_threads
    if precision == "f32":
        config.update({"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                       "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
    return config


class OpenVINODevice(Device):
    """OpenVINO on the host CPU (see the module docstring)."""

    name = "openvino"
    priority = 5  # below cpu: chosen when asked for by name

    def __init__(
        self,
        index: int = 0,
        *,
        precision: str | None = None,
        weight_format: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(index)
        self.precision = precision or envs.openvino_precision()
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"openvino precision must be one of {PRECISIONS}; got {self.precision!r}",
                field="precision")
        self.weight_format = weight_format or envs.openvino_weights()
        if self.weight_format not in WEIGHT_FORMATS:
            raise ConfigError(
                f"openvino weight_format must be one of {WEIGHT_FORMATS}; got {self.weight_format!r}",
                field="weight_format")
        self.num_threads = num_threads or envs.num_threads()
        self.target = "CPU"
        self.config = _target_config(self.precision, self.num_threads)
        self._kernels: Any = None

    @classmethod
    def probe(cls) -> Availability:
        try:
            import openvino as ov
        except ImportError as e:
            return Availability(False, f"openvino is not installed ({e}); pip install 'portaserve[openvino]'")
        try:
            devices = _core().available_devices
        except RuntimeError:
            return Availability(False, "openvino could not list its devices",
                                error=traceback.format_exc())
        if "CPU" not in devices:
            return Availability(False, f"openvino {ov.__version__}: no CPU plugin (devices {devices})")
        return Availability(True, f"openvino {ov.__version__}, devices {', '.join(devices)}")

    def capabilities(self) -> Capabilities:
        import openvino as ov

        core = _core()
        return Capabilities(
            dtypes=(torch.float32, torch.bfloat16),
            kv_block_sizes=(CPU_BLOCK_SIZE,),
            kv_layout="blocks_hnd",
            default_max_num_seqs=64,
            default_max_num_batched_tokens=1024,
            default_kv_cache_bytes=4 << 30,
            extra={
                "openvino": ov.__version__,
                "devices": list(core.available_devices),
                "precision": self.precision,
                "weights": self.weight_format,
                "cpu_default_inference_precision": core.get_property(
                    self.target, "INFERENCE_PRECISION_HINT").get_type_name(),
                "cpu_default_kv_cache_precision": core.get_property(
                    self.target, "KV_CACHE_PRECISION").get_type_name(),
            },
        )

    def kernels(self) -> dict[str, KernelFn]:
        if self._kernels is None:
            from portaserve.devices.openvino.ops import OpCache, OpenVINOKernels

            self._kernels = OpenVINOKernels(OpCache(_core(), self.target, self.config))
        return self._kernels.table()

    def allocate_kv_cache(self, spec: KVCacheSpec) -> list[torch.Tensor]:
        if spec.block_size != CPU_BLOCK_SIZE:
            raise DeviceError(
                f"openvino: KV block size {spec.block_size} is not supported; the OpenVINO CPU "
                f"plugin pages its cache in blocks of {CPU_BLOCK_SIZE}")
        return reference.allocate_kv_cache(spec, torch.device("cpu"), "blocks_hnd")

    def compile(self, model: Any, kv_caches: list[Any]) -> Executor | None:
        from portaserve.devices.openvino.executor import OpenVINOExecutor
        from portaserve.devices.openvino.graph import GraphOptions, build_llama_graph

        config = model.config
        graph = build_llama_graph(config, model_weights(model), model_cos_sin(model),
                                  GraphOptions(weight_format=self.weight_format))
        try:
            compiled = _core().compile_model(graph, self.target, self.config)
        except RuntimeError as e:
            raise DeviceError(f"openvino: compiling {config.architecture} failed: {e}") from e
        block_size = kv_caches[0].shape[3] if kv_caches else CPU_BLOCK_SIZE
        return OpenVINOExecutor(compiled, kv_caches, block_size, config.vocab_size)


def model_weights(model: Any) -> dict[str, Any]:
    """The model's weights under Hugging Face names (tensors or QuantizedWeight)."""
    for attr in ("weights", "params"):
        found = getattr(model, attr, None)
        if isinstance(found, dict):
            return found
    if hasattr(model, "state_dict"):
        return dict(model.state_dict())
    raise DeviceError(f"openvino: cannot read the weights of {type(model).__name__}")


def model_cos_sin(model: Any) -> torch.Tensor:
    """The model's rotary table [P, D]; computed from its config when the model has none."""
    table = getattr(model, "cos_sin_cache", None)
    if isinstance(table, torch.Tensor):
        return table
    return rope_cos_sin(model.config)


def rope_cos_sin(config: Any, max_positions: int | None = None) -> torch.Tensor:
    """``cat(cos, sin)`` per position [P, D] for plain, linear and llama3 rope scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv_freq
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind != "default":
        raise DeviceError(f"openvino: rope scaling {kind!r} is not supported")
    positions = torch.arange(max_positions or config.max_position_embeddings, dtype=torch.float64)
    angles = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()
