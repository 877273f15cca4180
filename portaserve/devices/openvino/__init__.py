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

Weights (``PORTASERVE_OPENVINO_WEIGHTS`` or ``weight_format=``): ``gguf`` (default): GGUF Q4_0 /
Q4_1 / Q8_0 blocks passed to OpenVINO as they are (other weights dense f32; the device has the
core keep GGUF weights packed), ``f32``, or ``int8`` (per output channel) / ``int4`` (groups of
32) re-quantized at compile time.
"""

from __future__ import annotations

import functools
import logging
import traceback
from typing import TYPE_CHECKING, Any

import torch

from portaserve import envs, hookimpl
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

PORTASERVE_PLUGIN_API = "1.0"

logger = logging.getLogger(__name__)

#: The CPU plugin pages its KV cache in blocks of 32 tokens (a static dimension it sets itself).
CPU_BLOCK_SIZE = 32
PRECISIONS = ("f32", "auto")
WEIGHT_FORMATS = ("f32", "int8", "int4", "gguf")


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
            # "gguf" hands GGUF blocks to OpenVINO as they are: they must arrive packed
            keep_packed_weights=True if self.weight_format == "gguf" else None,
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
        graph = build_llama_graph(config, model_weights(model), model.cos_sin_cache,
                                  GraphOptions(weight_format=self.weight_format))
        try:
            compiled = _core().compile_model(graph, self.target, self.config)
        except RuntimeError as e:
            raise DeviceError(f"openvino: compiling {config.architecture} failed: {e}") from e
        block_size = kv_caches[0].shape[3] if kv_caches else CPU_BLOCK_SIZE
        return OpenVINOExecutor(compiled, kv_caches, block_size, config.vocab_size)


def model_weights(model: Any) -> dict[str, Any]:
    """The model's weights under Hugging Face names (dense tensors or ``QuantizedWeight``).

    Reads a plain ``weights`` dict when the model has one; otherwise the core
    ``LlamaForCausalLM``'s attributes. Its fused q/k/v and gate/up projections stay fused,
    named ``...self_attn.q_proj+k_proj+v_proj.weight`` and ``...mlp.gate_proj+up_proj.weight``.
    """
    found = getattr(model, "weights", None)
    if isinstance(found, dict):
        return found
    if not hasattr(model, "layers") or not hasattr(model, "embed_tokens"):
        raise DeviceError(f"openvino: cannot read the weights of {type(model).__name__}")
    cfg = model.config
    d = cfg.head_dim
    w: dict[str, Any] = {"model.embed_tokens.weight": model.embed_tokens,
                         "model.norm.weight": model.norm}
    if model.lm_head is not model.embed_tokens:
        w["lm_head.weight"] = model.lm_head
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = layer.input_norm
        w[p + "post_attention_layernorm.weight"] = layer.post_norm
        _name_projection(w, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), layer.qkv,
                (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d))
        _name_projection(w, p + "self_attn.", ("o_proj",), layer.o, (cfg.hidden_size,))
        _name_projection(w, p + "mlp.", ("gate_proj", "up_proj"), layer.gate_up,
                (cfg.intermediate_size, cfg.intermediate_size))
        _name_projection(w, p + "mlp.", ("down_proj",), layer.down, (cfg.hidden_size,))
        if layer.q_norm is not None:
            w[p + "self_attn.q_norm.weight"] = layer.q_norm
            w[p + "self_attn.k_norm.weight"] = layer.k_norm
    return w


def _name_projection(out: dict[str, Any], prefix: str, names: tuple[str, ...], proj: list[Any],
            rows: tuple[int, ...]) -> None:
    """Name the parts of one projection: one per name, or one fused weight [sum N, K] kept
    fused under ``<prefix><first>+<second>...`` (the graph splits its output)."""
    if len(proj) == len(names):
        parts = list(zip(names, proj, strict=True))
    elif len(proj) == 1:
        parts = [("+".join(names), proj[0])]
    else:
        raise DeviceError(f"openvino: cannot read projection {prefix}{names} of {len(proj)} parts")
    for name, (weight, bias) in parts:
        if tuple(weight.shape)[0] != (sum(rows) if "+" in name else rows[names.index(name)]):
            raise DeviceError(f"openvino: projection {prefix}{name} has shape {tuple(weight.shape)}")
        out[f"{prefix}{name}.weight"] = weight
        if bias is not None:
            out[f"{prefix}{name}.bias"] = bias


@hookimpl
def portaserve_register_devices(register: Any) -> None:
    register(OpenVINODevice)
