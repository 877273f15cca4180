"""The one exception tree of portaserve.

Every error the package raises on purpose is a ``PortaserveError``. Subclasses say whose fault
it is (the caller's configuration, a request, a device, a plugin), so the server can map them
to HTTP statuses and a vendor can catch what its plugin caused.
"""

from __future__ import annotations


class PortaserveError(Exception):
    """Base class of every error portaserve raises on purpose."""


class ConfigError(PortaserveError, ValueError):
    """A configuration value is invalid. The message names the field and the value."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelError(ConfigError):
    """A model path, file or architecture cannot be loaded."""


class RequestError(PortaserveError, ValueError):
    """A request (prompt, sampling parameter) is invalid. ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class DeviceError(PortaserveError, RuntimeError):
    """A device failed or cannot do what was asked. The message names the device and the op."""


class PluginError(PortaserveError, RuntimeError):
    """A plugin could not be loaded or broke the plugin contract."""


class EngineOverloadedError(PortaserveError, RuntimeError):
    """The engine refuses new work (too many waiting requests)."""
