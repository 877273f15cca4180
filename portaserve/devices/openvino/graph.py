"""The Llama family as one OpenVINO graph with OpenVINO's paged attention operation.

``build_llama_graph(config, weights, cos_sin_cache, options)`` turns a model held under Hugging
Face weight names into an ``openvino.Model``: opset ops for the embedding, RMSNorm, rotary
(NeoX), the projections and the SwiGLU MLP; weights as constants (dense f32, or re-quantized to
int8 per channel / int4 per group when asked, in the decompression pattern the CPU plugin turns
into compressed-weight matmuls); and one ``PagedAttentionExtension`` per layer that writes the
new keys and values into the paged cache and attends over it.

The graph's inputs are the step, in the shapes OpenVINO's paged attention takes (see
``executor.py`` for how a ``ScheduledBatch`` maps onto them):

``input_ids [T] i64``, ``positions [T] i64``, ``past_lens [R] i32``, ``subsequence_begins
[R+1] i32``, ``block_indices [N] i32``, ``block_indices_begins [R+1] i32``, ``max_context_len
[] i32``, ``score_aggregation_window [R] i32``, ``logits_indices [L] i64`` and per layer
``key_cache.{i}`` / ``value_cache.{i}`` whose shape and element type the plugin chooses at
compile time. The one output is ``logits [L, V] f32``.

Facts of OpenVINO 2026.4 this relies on: the op takes 28 inputs (query, key, value, key_cache,
value_cache, past_lens, subsequence_begins, block_indices, block_indices_begins, scale,
sliding_window, alibi_slopes, max_context_len, score_aggregation_window, rotated_block_indices,
rotation_deltas, rotation_trig_lut, xattention_threshold, xattention_block_size,
xattention_stride, sinks, adaptive_rkv_start_size, adaptive_rkv_evictable_sizes,
adaptive_rkv_diversity_block_set_indices, adaptive_rkv_diversity_block_set_indices_begins,
token_type_ids, qq_bias, qq_bias_begins); the CPU plugin wants num_k_heads / k_head_size /
num_v_heads / v_head_size in the node's rt_info, and ``score_aggregation_window`` per sequence
([R]; a scalar fails at run time for R > 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
import torch
from openvino import opset13 as ops

from portaserve.core.config import ModelConfig
from portaserve.devices.openvino import WEIGHT_FORMATS
from portaserve.devices.openvino.ops import rotary_cos_sin, rotate_half
from portaserve.errors import DeviceError

#: Number of inputs of ``PagedAttentionExtension`` in the OpenVINO versions this graph targets.
PA_NUM_INPUTS = 28


@dataclass(frozen=True, slots=True)
class GraphOptions:
    #: "f32" keeps weights dense; "int8" per output channel; "int4" per group (asymmetric);
    #: "gguf" keeps GGUF Q4_0/Q4_1/Q8_0 blocks as they are (codes + per-block scales), others f32.
    weight_format: str = "f32"
    int4_group_size: int = 32


def _param(shape: list[int] | ov.PartialShape, ov_type: Any, name: str) -> Any:
    node = ops.parameter(shape, ov_type, name=name)
    node.output(0).get_tensor().set_names({name})
    return node


def _const(array: Any, dtype: Any) -> Any:
    return ops.constant(np.asarray(array, dtype=dtype))


def _dense(weight: Any) -> np.ndarray:
    """A weight (tensor or QuantizedWeight) as a float32 numpy array."""
    if isinstance(weight, torch.Tensor):
        return weight.detach().to(torch.float32).contiguous().numpy()
    dequantize = getattr(weight, "dequantize", None)
    if dequantize is None:
        raise DeviceError(f"openvino graph: unsupported weight type {type(weight).__name__}")
    return dequantize(torch.float32).contiguous().numpy()


def _dense_const(weight: Any) -> Any:
    """A dense f32 constant; a contiguous f32 torch weight is shared with the model, not copied."""
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.is_contiguous():
        return ops.constant(weight.detach().numpy(), shared_memory=True)
    return ops.constant(_dense(weight))


def quantize_weight(w: np.ndarray, weight_format: str, group_size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric codes of a [N, K] f32 weight: ``w ~ (codes - zero) * scale``.

    int8: one group per output row (codes [N, 1, K]); int4: groups of ``group_size`` along K
    (codes [N, K / g, g]). Zero and scale are [N, G, 1]; the range always includes 0.
    """
    n, k = w.shape
    if weight_format == "int8":
        groups, bits = w.reshape(n, 1, k), 8
    else:
        if k % group_size:
            raise DeviceError(
                f"openvino graph: int4 group size {group_size} does not divide in_features {k}")
        groups, bits = w.reshape(n, k // group_size, group_size), 4
    levels = (1 << bits) - 1
    lo = np.minimum(groups.min(axis=-1, keepdims=True), 0.0)
    hi = np.maximum(groups.max(axis=-1, keepdims=True), 0.0)
    scale = np.maximum((hi - lo) / levels, np.float32(1e-12)).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, levels).astype(np.uint8)
    codes = np.clip(np.round(groups / scale) + zero, 0, levels).astype(np.uint8)
    return codes, zero, scale


def _compressed(w: np.ndarray, weight_format: str, group_size: int) -> Any:
    """A [N, K] weight as u8/u4 codes decompressed in-graph (the pattern the CPU plugin folds
    into its compressed-weight matmul)."""
    codes, zero, scale = quantize_weight(w, weight_format, group_size)
    code_type = ov.Type.u8 if weight_format == "int8" else ov.Type.u4
    deq = ops.multiply(
        ops.subtract(
            ops.convert(ops.constant(codes, dtype=code_type), ov.Type.f32),
            ops.convert(ops.constant(zero, dtype=code_type), ov.Type.f32)),
        ops.constant(scale))  # [N, G, g]
    return ops.reshape(deq, _const(list(w.shape), np.int64), False)  # [N, K]


def _gguf_block_weight(weight: Any) -> Any | None:
    """A GGUF Q4_0 / Q4_1 / Q8_0 weight as its own codes and per-block scales, decompressed
    in-graph (no re-quantization); None for other formats."""
    fmt = getattr(weight, "format", None)
    if fmt not in ("Q4_0", "Q4_1", "Q8_0"):
        return None
    from portaserve.quant.gguf_formats import unpack_codes

    n, k = weight.shape
    codes = unpack_codes(fmt, weight.data).reshape(n, -1, 32).numpy()  # [N, B, 32]
    d = weight.data["d"].float().unsqueeze(-1).numpy()  # [N, B, 1]
    if fmt == "Q8_0":  # w = d * q, q int8
        values = ops.convert(ops.constant(codes.view(np.int8), dtype=ov.Type.i8), ov.Type.f32)
    elif fmt == "Q4_0":  # w = d * (q - 8)
        values = ops.subtract(ops.convert(ops.constant(codes, dtype=ov.Type.u4), ov.Type.f32),
                              ops.convert(ops.constant(np.full_like(d, 8, dtype=np.uint8),
                                                       dtype=ov.Type.u4), ov.Type.f32))
    else:  # Q4_1: w = d * q + m = d * (q - zero) with zero = -m / d
        m = weight.data["m"].float().unsqueeze(-1).numpy()
        zero = np.divide(-m, d, out=np.zeros_like(m), where=d != 0).astype(np.float32)
        values = ops.subtract(ops.convert(ops.constant(codes, dtype=ov.Type.u4), ov.Type.f32),
                              ops.constant(zero))
    deq = ops.multiply(values, ops.constant(d.astype(np.float32)))  # [N, B, 32]
    return ops.reshape(deq, _const([n, k], np.int64), False)  # [N, K]


class _Builder:
    def __init__(self, config: ModelConfig, weights: Mapping[str, Any], options: GraphOptions):
        self.config = config
        self.weights = weights
        self.options = options

    def weight(self, name: str) -> Any:
        if name not in self.weights:
            raise DeviceError(f"openvino graph: model has no weight {name!r}")
        return self.weights[name]

    def vector(self, name: str) -> Any:
        return ops.constant(_dense(self.weight(name)).reshape(-1))

    def linear(self, x: Any, name: str, bias: str | None = None) -> Any:
        weight = self.weight(name)
        native = _gguf_block_weight(weight) if self.options.weight_format == "gguf" else None
        if native is not None:
            wnode = native
        elif self.options.weight_format in ("f32", "gguf"):
            wnode = _dense_const(weight)  # [N, K]
        else:
            wnode = _compressed(_dense(weight), self.options.weight_format,
                                self.options.int4_group_size)
        y = ops.matmul(x, wnode, False, True)
        if bias is not None and bias in self.weights:
            y = ops.add(y, self.vector(bias))
        return y

    def projections(self, x: Any, prefix: str, names: tuple[str, ...], rows: tuple[int, ...]
                    ) -> list[Any]:
        """The outputs of projections ``names``: one matmul per name, or one on their fused
        weight (``prefix + "+".join(names)``) split by ``rows``."""
        fused = prefix + "+".join(names)
        if fused + ".weight" not in self.weights:
            return [self.linear(x, f"{prefix}{n}.weight", f"{prefix}{n}.bias") for n in names]
        y = self.linear(x, fused + ".weight", fused + ".bias")  # [T, sum rows]
        return list(ops.variadic_split(y, np.int64(-1), _const(list(rows), np.int64)).outputs())

    def rms(self, x: Any, name: str) -> Any:
        mean = ops.reduce_mean(ops.multiply(x, x), _const([-1], np.int64), keep_dims=True)
        inv = ops.divide(np.float32(1.0), ops.sqrt(ops.add(mean, np.float32(self.config.rms_norm_eps))))
        return ops.multiply(ops.multiply(x, inv), self.vector(name))


def _paged_attention(q: Any, k: Any, v: Any, key_cache: Any, value_cache: Any, step: dict[str, Any],
                     num_kv_heads: int, head_dim: int) -> Any:
    empty_i32 = _const(np.zeros(0), np.int32)
    empty_f32 = _const(np.zeros(0), np.float32)
    inputs = [
        q, k, v, key_cache, value_cache,
        step["past_lens"], step["subsequence_begins"], step["block_indices"],
        step["block_indices_begins"],
        _const(1.0 / math.sqrt(head_dim), np.float32),  # scale
        _const(0, np.int32),  # sliding_window: none
        empty_f32,  # alibi_slopes: none
        step["max_context_len"],
        step["score_aggregation_window"],
        empty_i32, empty_i32, empty_f32,  # rotated_block_indices, rotation_deltas, trig lut
        empty_f32, _const(64, np.int32), _const(8, np.int32),  # xattention: off
        empty_f32,  # sinks: none
        _const(0, np.int32), empty_i32, empty_i32, empty_i32,  # adaptive R-KV: off
        empty_i32,  # token_type_ids
        _const(np.zeros(0), np.uint8), empty_i32,  # qq_bias, qq_bias_begins
    ]
    node = ov.op._PagedAttentionExtension([i.output(0) if hasattr(i, "output") else i for i in inputs])
    rt = node.get_rt_info()
    rt["num_k_heads"] = num_kv_heads
    rt["k_head_size"] = head_dim
    rt["num_v_heads"] = num_kv_heads
    rt["v_head_size"] = head_dim
    return node.output(0)


def build_llama_graph(
    config: ModelConfig,
    weights: Mapping[str, Any],
    cos_sin_cache: torch.Tensor,
    options: GraphOptions | None = None,
) -> ov.Model:
    """The whole model as one OpenVINO graph (inputs and output in the module docstring).

    ``cos_sin_cache`` is the model's rotary table [P, D] (``cat(cos, sin)`` of each position).
    """
    options = options or GraphOptions()
    if options.weight_format not in WEIGHT_FORMATS:
        raise DeviceError(
            f"openvino graph: weight_format must be one of {WEIGHT_FORMATS}; got {options.weight_format!r}")
    b = _Builder(config, weights, options)
    hq, hk, d = config.num_heads, config.num_kv_heads, config.head_dim
    input_ids = _param([-1], ov.Type.i64, "input_ids")
    positions = _param([-1], ov.Type.i64, "positions")
    step = {name: _param([-1], ov.Type.i32, name) for name in (
        "past_lens", "subsequence_begins", "block_indices", "block_indices_begins",
        "score_aggregation_window")}
    step["max_context_len"] = _param([], ov.Type.i32, "max_context_len")
    logits_indices = _param([-1], ov.Type.i64, "logits_indices")
    params = [input_ids, positions, *step.values(), logits_indices]

    embed = _dense_const(b.weight("model.embed_tokens.weight"))  # [V, H]
    hidden = ops.gather(embed, input_ids, np.int64(0))  # [T, H]
    table = ops.constant(cos_sin_cache.to(torch.float32).contiguous().numpy())  # [P, D]
    cos, sin = rotary_cos_sin(table, positions)  # [T, 1, D/2] each
    heads_q = _const([0, hq, d], np.int64)
    heads_k = _const([0, hk, d], np.int64)
    flat_q = _const([0, hq * d], np.int64)
    flat_k = _const([0, hk * d], np.int64)

    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        key_cache = _param(ov.PartialShape.dynamic(4), ov.Type.dynamic, f"key_cache.{i}")
        value_cache = _param(ov.PartialShape.dynamic(4), ov.Type.dynamic, f"value_cache.{i}")
        params += [key_cache, value_cache]
        x = b.rms(hidden, p + "input_layernorm.weight")
        q, k, v = b.projections(x, p + "self_attn.", ("q_proj", "k_proj", "v_proj"),
                                (hq * d, hk * d, hk * d))  # [T, Hq*D], [T, Hk*D] x2
        q = ops.reshape(q, heads_q, True)  # [T, Hq, D]
        k = ops.reshape(k, heads_k, True)  # [T, Hk, D]
        if config.qk_norm:
            q = b.rms(q, p + "self_attn.q_norm.weight")
            k = b.rms(k, p + "self_attn.k_norm.weight")
        q = ops.reshape(rotate_half(q, cos, sin), flat_q, True)  # [T, Hq*D]
        k = ops.reshape(rotate_half(k, cos, sin), flat_k, True)  # [T, Hk*D]
        attn = _paged_attention(q, k, v, key_cache, value_cache, step, hk, d)  # [T, Hq*D]
        hidden = ops.add(hidden, b.linear(attn, p + "self_attn.o_proj.weight"))
        x = b.rms(hidden, p + "post_attention_layernorm.weight")
        gate, up = b.projections(x, p + "mlp.", ("gate_proj", "up_proj"),
                                 (config.intermediate_size,) * 2)  # [T, I] each
        gate = ops.swish(gate)
        hidden = ops.add(hidden, b.linear(ops.multiply(gate, up), p + "mlp.down_proj.weight"))

    hidden = ops.gather(hidden, logits_indices, np.int64(0))  # [L, H]
    hidden = b.rms(hidden, "model.norm.weight")
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        logits = b.linear(hidden, "lm_head.weight")
    elif options.weight_format == "f32":
        logits = ops.matmul(hidden, embed, False, True)  # tied: [L, V]
    else:  # tied, with the head compressed like the other matmuls
        logits = b.linear(hidden, "model.embed_tokens.weight")
    logits.output(0).get_tensor().set_names({"logits"})
    return ov.Model([logits], params, f"portaserve-{config.architecture}")
