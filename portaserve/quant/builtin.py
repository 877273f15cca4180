"""The built-in quant plugin: portaserve's formats and their cpu kernels, through the vendor hooks.

Loaded by the plugin manager after the device built-ins. Registers every built-in format
(``registry.builtin_methods()``) and, per format, the ``cpu`` ``quant_linear`` kernel from
``kernels_cpu``. Triton kernels for ``cuda`` register here too when Triton imports.
"""

from __future__ import annotations

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
