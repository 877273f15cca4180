"""The quant method registry: format name -> method, filled through the plugin hook.

Built-in methods (``builtin_methods()``) register through ``portaserve.quant.builtin``'s
``portaserve_register_quant_methods`` like any vendor's. ``get_method(name)`` asks the plugin
registry, so a method a plugin registers is found by loaders the same way.

``quantize(weight, quantization)`` is online quantization of a dense weight, the one entry
point loaders call for ``quantization="int8" | "int4" | "int4_sym" | "fp8"`` (and any GGUF block
format name, e.g. ``"Q4_K"``, to produce GGUF-packed weights from a dense checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch

from portaserve.errors import ConfigError
from portaserve.quant.base import QuantizedWeight, QuantMethod

#: ``quantization=`` values a loader accepts for online quantization of a 16-bit checkpoint.
ONLINE_SCHEMES = ("int8", "int4", "int4_sym", "fp8", "fp8_per_tensor",
                  "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def builtin_methods() -> list[Any]:
    """portaserve's own formats: the GGUF block formats, int8, int4, fp8."""
    from portaserve.quant.fp8 import FP8Method
    from portaserve.quant.gguf_formats import GGUF_FORMATS, GGUFMethod
    from portaserve.quant.int_formats import Int4Method, Int8Method

    return [*(GGUFMethod(f) for f in GGUF_FORMATS), Int8Method(), Int4Method(), FP8Method()]


def get_method(name: str) -> QuantMethod:
    """The registered method of format ``name`` (from the plugin registry)."""
    from portaserve.plugins import get_registry

    methods = get_registry().quant_methods
    if name not in methods:
        raise ConfigError(f"unknown quant format {name!r}; registered: {sorted(methods)}",
                          field="quantization")
    return methods[name]


def quantize(weight: torch.Tensor, quantization: str, *, group_size: int = 128) -> QuantizedWeight:
    """Quantize a dense [N, K] weight online. See ``ONLINE_SCHEMES``."""
    if quantization not in ONLINE_SCHEMES:
        raise ConfigError(f"quantization must be one of {list(ONLINE_SCHEMES)}; got "
                          f"{quantization!r}", field="quantization")
    if quantization in ("int4", "int4_sym"):
        method = get_method("int4")
        return method.quantize(weight, group_size=group_size,  # type: ignore[attr-defined]
                               symmetric=quantization == "int4_sym")
    if quantization.startswith("fp8"):
        return get_method("fp8").quantize(  # type: ignore[attr-defined]
            weight, per_channel=quantization == "fp8")
    return get_method(quantization).quantize(weight)  # type: ignore[attr-defined]


def can_quantize(weight_shape: tuple[int, ...], quantization: str) -> bool:
    """Whether a weight of this shape can take the scheme (K-quants need K % 256 == 0, ...)."""
    if len(weight_shape) != 2:
        return False
    k = weight_shape[1]
    if quantization in ("Q4_K", "Q5_K", "Q6_K"):
        return k % 256 == 0
    if quantization in ("Q4_0", "Q4_1", "Q8_0", "int4", "int4_sym"):
        return k % 32 == 0
    return True


def select_rows(weight: QuantizedWeight, rows: torch.Tensor | slice) -> QuantizedWeight:
    """Packed rows of a weight (the GGUF loader's Q/K un-permutation, tensor-parallel shards)."""
    fn = getattr(weight.method, "select_rows", None)
    if fn is None:
        raise ConfigError(f"quant format {weight.format!r} cannot select rows", field="format")
    return fn(weight, rows)


#: Checkpoint tensors online quantization applies to: the decoder's linear layers. Embeddings,
#: the (untied) lm_head, norms and biases stay as they are, as in vLLM and llama.cpp's defaults.
LINEAR_WEIGHT_SUFFIXES = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
#: What a tensor whose row length does not fit a K-quant (K % 256) gets instead, as llama.cpp
#: falls back for such tensors (llama.cpp would use Q5_0/Q5_1, which are not implemented here).
K_QUANT_FALLBACK = {"Q4_K": "Q4_1", "Q5_K": "Q8_0", "Q6_K": "Q8_0"}


def is_quantized_linear(name: str) -> bool:
    """Whether online quantization applies to the checkpoint tensor ``name``."""
    return name.endswith(LINEAR_WEIGHT_SUFFIXES)


def quantize_checkpoint_tensor(
    name: str, tensor: torch.Tensor, quantization: str | None
) -> torch.Tensor | QuantizedWeight:
    """The loaders' one call for online quantization: a linear weight of the decoder comes
    back packed in ``quantization`` (or its K-quant fallback); anything else unchanged."""
    if quantization is None or not is_quantized_linear(name) or tensor.dim() != 2:
        return tensor
    scheme = quantization
    if not can_quantize(tuple(tensor.shape), scheme):
        scheme = K_QUANT_FALLBACK.get(scheme, scheme)
        if not can_quantize(tuple(tensor.shape), scheme):
            raise ConfigError(f"{name}: shape {tuple(tensor.shape)} cannot be quantized to "
                              f"{quantization!r}", field="quantization")
    return quantize(tensor, scheme)
