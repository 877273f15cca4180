"""The built-in device plugin: registers portaserve's own devices through the vendor hooks.

``BUILTIN_PLUGINS`` names further in-tree plugin modules (one per device family that needs its
own hooks, e.g. ``portaserve.devices.cuda``); the plugin manager loads each like an entry point,
so a missing vendor SDK in one of them is listed as a failure and breaks nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from portaserve import hookimpl

PORTASERVE_PLUGIN_API = "1.0"

#: In-tree plugin modules loaded after this one (each in its own try).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "portaserve.devices.cuda",
    "portaserve.devices.rocm",
    "portaserve.devices.openvino",
)


@hookimpl
def portaserve_register_devices(register: Callable[[type], None]) -> None:
    from portaserve.devices.cpu import CPUDevice

    register(CPUDevice)
