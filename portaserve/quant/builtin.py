"""The built-in quant plugin: portaserve's formats and their cpu kernels, through the vendor hooks.

Loaded by the plugin manager after the device built-ins. Registers every built-in format
(``registry.builtin_methods()``) and, per format, the ``cpu`` ``quant_linear`` kernel from
``kernels_cpu``; when triton is installed, the Triton kernels of ``kernels_triton`` for ``cuda``
(dequant-GEMMs for Q4_0, Q4_1, Q8_0, int4, int8, a decode GEMV for Q4_K, Q5_K, Q6_K too, and
fp8 W8A8; triton is imported at the first call). On ``cpu`` fp8 stays weight-only (the reference's numerics).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from portaserve import hookimpl

PORTASERVE_PLUGIN_API = "1.0"


@hookimpl
def portaserve_register_quant_methods(register: Callable[[Any], None]) -> None:
    from portaserve.quant.registry import builtin_methods

    for method in builtin_methods():
        register(method)


@hookimpl
def portaserve_register_kernels(register: Callable[..., None]) -> None:
    from portaserve.quant.kernels_cpu import CPU_QUANT_KERNELS

    for fmt, fn in CPU_QUANT_KERNELS.items():
        register("cpu", "quant_linear", fn, quant_format=fmt)
    if importlib.util.find_spec("triton") is not None:  # imported at the first call, not here
        for fmt in TRITON_FORMATS:
            register("cuda", "quant_linear", _triton_quant_linear, quant_format=fmt)
        register("cuda", "quant_linear", _fp8_quant_linear, quant_format="fp8")


#: formats ``kernels_triton`` serves (kept here so registering does not import triton)
TRITON_FORMATS = ("Q4_0", "Q4_1", "Q8_0", "int4", "int8", "Q4_K", "Q5_K", "Q6_K")


def _triton_quant_linear(x: Any, weight: Any, bias: Any = None) -> Any:
    from portaserve.quant.kernels_triton import triton_quant_linear

    return triton_quant_linear(x, weight, bias)


def _triton_quant_linear_rms_norm(x: Any, weight: Any, bias: Any, norm_weight: Any, eps: float,
                                  residual: Any) -> Any:
    from portaserve.quant.kernels_triton import triton_quant_linear_rms_norm

    return triton_quant_linear_rms_norm(x, weight, bias, norm_weight, eps, residual)


def _triton_quant_linear_silu_and_mul(x: Any, weight: Any, bias: Any = None) -> Any:
    from portaserve.quant.kernels_triton import triton_quant_linear_silu_and_mul

    return triton_quant_linear_silu_and_mul(x, weight, bias)


def _triton_quant_linear_rotary_write_kv(x: Any, weight: Any, bias: Any, positions: Any, cos_sin_cache: Any,
                                         kv_cache: Any, slot_mapping: Any, num_heads: int) -> Any:
    from portaserve.quant.kernels_triton import triton_quant_linear_rotary_write_kv

    return triton_quant_linear_rotary_write_kv(x, weight, bias, positions, cos_sin_cache, kv_cache,
                                               slot_mapping, num_heads)


_triton_quant_linear.with_rms_norm = _triton_quant_linear_rms_norm  # type: ignore[attr-defined]  # (linear_rms_norm)
_triton_quant_linear.with_silu_and_mul = _triton_quant_linear_silu_and_mul  # type: ignore[attr-defined]
_triton_quant_linear.with_rotary_write_kv = _triton_quant_linear_rotary_write_kv  # type: ignore[attr-defined]


def _fp8_quant_linear(x: Any, weight: Any, bias: Any = None) -> Any:
    from portaserve.quant.kernels_triton import fp8_quant_linear

    return fp8_quant_linear(x, weight, bias)


_fp8_quant_linear.quant_numerics = "w8a8"  # type: ignore[attr-defined]  # see quant.base
_fp8_quant_linear.accepts_quantized_activation = True  # type: ignore[attr-defined]  # (rms_norm_fp8, ...)
