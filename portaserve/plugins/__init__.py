"""The plugin contract (hookspecs, device interface, kernel table) and the plugin registry.

``get_registry()`` is the entry point the engine and CLI use; see ``manager.py``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DeviceEntry", "PluginFailure", "Registry", "get_registry"]


def __getattr__(name: str) -> Any:  # PEP 562: importing the package stays cheap
    if name in __all__:
        from portaserve.plugins import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'portaserve.plugins' has no attribute {name!r}")
