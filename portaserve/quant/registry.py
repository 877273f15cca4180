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
