"""Plugin loading and the registry of devices, kernels, quant methods and models.

``get_registry()`` loads plugins once per process: the built-ins first
(``portaserve.devices.builtin``, the modules its ``BUILTIN_PLUGINS`` names, and
``portaserve.quant.builtin`` when present), then every entry point of the group ``portaserve``
(unless ``PORTASERVE_DISABLE_PLUGIN_AUTOLOAD`` is set; ``PORTASERVE_PLUGINS`` allow-lists
entry-point names). Each plugin loads in its own try: a plugin that fails to import, declares
another major plugin API version, or raises in a hook is logged and kept in
``Registry.failures``; the others load normally.

The registry then answers what the engine asks: which devices exist and whether they are
available (``devices``), which one to use and why (``select_device``), and the kernel table of
a device (``kernel_table``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from portaserve import envs
from portaserve.errors import DeviceError, PluginError
from portaserve.plugins import hookspecs
from portaserve.plugins.device import FUSED_OPS, OP_NAMES, PLUGIN_API_VERSION, Availability, Device
from portaserve.plugins.kernel_table import KernelFn, KernelTable, build_kernel_table

logger = logging.getLogger(__name__)

#: The entry-point group vendor packages register their plugin module under.
ENTRY_POINT_GROUP = "portaserve"
#: Modules loaded before any entry point; optional ones are skipped when absent.
BUILTIN_MODULES = ("portaserve.devices.builtin",)
OPTIONAL_BUILTIN_MODULES = ("portaserve.quant.builtin",)


@dataclass(frozen=True, slots=True)
class PluginFailure:
    """A plugin (or one thing it registered) that was refused or failed."""

    plugin: str
    message: str
    traceback: str = ""


@dataclass(slots=True)
class DeviceEntry:
    """A registered device class, the plugin that registered it, and its cached probe."""

    name: str
    cls: type[Device]
    plugin: str
    _availability: Availability | None = field(default=None, repr=False)

    @property
    def availability(self) -> Availability:
        """``cls.probe()``, run once. A probe that raises makes the device unavailable."""
        if self._availability is None:
            try:
                result = self.cls.probe()
                if not isinstance(result, Availability):
                    raise PluginError(
                        f"device {self.name!r}: probe() returned {type(result).__name__}, "
                        "expected Availability")
                self._availability = result
            except Exception as e:  # a vendor probe may raise anything; list it, never crash
                self._availability = Availability(
                    False, f"probe raised {type(e).__name__}: {e}", traceback.format_exc())
        return self._availability

    @property
    def priority(self) -> int:
        return int(self.cls.priority)


def api_major(version: str) -> str:
    """The major part of a plugin API version string ("1.0" -> "1")."""
    return str(version).strip().split(".", 1)[0]


def check_api_version(plugin: str, version: object) -> None:
    """Refuse a plugin written for another major version of the plugin API."""
    if version is None:
        logger.warning(
            "plugin %r does not declare PORTASERVE_PLUGIN_API; assuming %s", plugin, PLUGIN_API_VERSION)
        return
    if api_major(str(version)) != api_major(PLUGIN_API_VERSION):
        raise PluginError(
            f"plugin {plugin!r} was written for plugin API {version}, but this portaserve "
            f"provides plugin API {PLUGIN_API_VERSION}; install a version of the plugin built "
            f"for API {api_major(PLUGIN_API_VERSION)}.x")


def discover_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Entry points of the ``portaserve`` group (a seam tests replace)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _failure(plugin: str, error: BaseException) -> PluginFailure:
    message = f"{type(error).__name__}: {error}"
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logger.warning("portaserve plugin %r failed: %s", plugin, message)
    return PluginFailure(plugin, message, tb)


class Registry:
    """Everything the plugins registered. Built by ``get_registry()``; see the module doc."""

    def __init__(self, plugin_manager: pluggy.PluginManager) -> None:
        self.plugin_manager = plugin_manager
        #: Failures while loading plugins (import errors, API version refusals).
        self.load_failures: list[PluginFailure] = []
        self.devices: dict[str, DeviceEntry] = {}
        #: device name -> op name -> (plugin, kernel)
        self.kernel_overrides: dict[str, dict[str, tuple[str, KernelFn]]] = {}
        #: device name -> quant format -> (plugin, kernel)
        self.quant_kernel_overrides: dict[str, dict[str, tuple[str, KernelFn]]] = {}
        self.quant_methods: dict[str, Any] = {}
        self.models: dict[str, type] = {}
        self._collect_failures: list[PluginFailure] = []

    @property
    def failures(self) -> list[PluginFailure]:
        """Every plugin failure: loading, and registrations refused while collecting."""
        return self.load_failures + self._collect_failures

    # -- loading ---------------------------------------------------------------------------

    def load_module(self, module_name: str, plugin_name: str | None = None) -> bool:
        """Import a plugin module by name and register it. Failures are recorded, not raised."""
        name = plugin_name or module_name
        try:
            module = importlib.import_module(module_name)
            self._register_plugin(module, name)
        except Exception as e:  # any import-time error of a plugin is the plugin's failure
            self.load_failures.append(_failure(name, e))
            return False
        return True

    def load_builtins(self) -> None:
        self.load_module(BUILTIN_MODULES[0])
        builtin = self.plugin_manager.get_plugin(BUILTIN_MODULES[0])
        for module_name in getattr(builtin, "BUILTIN_PLUGINS", ()):
            self.load_module(module_name)
        for module_name in OPTIONAL_BUILTIN_MODULES:
            if _module_exists(module_name):
                self.load_module(module_name)

    def load_entry_points(self) -> None:
        """Load the ``portaserve`` entry points, each in its own try."""
        if envs.disable_plugin_autoload():
            logger.info("PORTASERVE_DISABLE_PLUGIN_AUTOLOAD is set: no entry-point plugins loaded")
            return
        allow = envs.plugin_allowlist()
        try:
            entry_points = discover_entry_points()
        except Exception as e:  # broken package metadata must not stop the built-ins
            self.load_failures.append(_failure(f"entry points ({ENTRY_POINT_GROUP})", e))
            return
        for ep in entry_points:
            if allow is not None and ep.name not in allow:
                logger.info("plugin %r skipped: not in PORTASERVE_PLUGINS=%s", ep.name, ",".join(allow))
                continue
            if self.plugin_manager.has_plugin(ep.name):
                continue
            try:
                self._register_plugin(ep.load(), ep.name)
            except Exception as e:  # one broken vendor package cannot stop the others
                self.load_failures.append(_failure(ep.name, e))

    def _register_plugin(self, plugin: object, name: str) -> None:
        check_api_version(name, getattr(plugin, "PORTASERVE_PLUGIN_API", None))
        self.plugin_manager.register(plugin, name=name)
        try:  # a misspelled hook name would otherwise be silently ignored
            self.plugin_manager.check_pending()
        except pluggy.PluginValidationError as e:
            self.plugin_manager.unregister(name=name)
            raise PluginError(f"plugin {name!r}: {e}") from e

    @contextlib.contextmanager
    def temporary_plugin(self, plugin: object, name: str | None = None) -> Iterator[str]:
        """Register ``plugin`` for the duration of a ``with`` block (tests), then remove it.

        The registry is re-collected on entry and on exit. Yields the plugin name. A plugin
        that is already registered (e.g. installed through its entry point) is left as it is.
        """
        if self.plugin_manager.is_registered(plugin):
            yield str(self.plugin_manager.get_name(plugin))
            return
        name = name or f"temporary-{id(plugin):x}"
        self._register_plugin(plugin, name)
        try:
            self.collect()
            yield name
        finally:
            self.plugin_manager.unregister(name=name)
            self.collect()

    # -- collecting what plugins register -------------------------------------------------

    def collect(self) -> None:
        """(Re)run every registration hook over the loaded plugins."""
        old_devices = self.devices
        self.devices, self.kernel_overrides, self.quant_kernel_overrides = {}, {}, {}
        self.quant_methods, self.models, self._collect_failures = {}, {}, []
        self._call_each("portaserve_register_devices", self._device_registrar)
        self._call_each("portaserve_register_kernels", self._kernel_registrar)
        self._call_each("portaserve_register_quant_methods", self._quant_registrar)
        self._call_each("portaserve_register_models", self._model_registrar)
        for name, entry in self.devices.items():  # keep probes already run for the same class
            old = old_devices.get(name)
            if old is not None and old.cls is entry.cls:
                entry._availability = old._availability

    def _call_each(self, hook_name: str, make_register: Callable[[str], Callable[..., None]]) -> None:
        """Call each implementation separately, so a failure is the failing plugin's alone."""
        hook = getattr(self.plugin_manager.hook, hook_name)
        for impl in hook.get_hookimpls():  # in registration order: built-ins first
            kwargs = {"register": make_register(impl.plugin_name)} if impl.argnames else {}
            try:
                impl.function(**kwargs)
            except Exception as e:  # a plugin's hook raising is listed, the rest go on
                self._collect_failures.append(_failure(impl.plugin_name, e))

    def _device_registrar(self, plugin: str) -> Callable[[type], None]:
        def register(device_cls: type) -> None:
            try:
                self._add_device(plugin, device_cls)
            except PluginError as e:
                self._collect_failures.append(_failure(plugin, e))

        return register

    def _add_device(self, plugin: str, device_cls: type) -> None:
        if not (isinstance(device_cls, type) and issubclass(device_cls, Device)):
            raise PluginError(f"register({device_cls!r}): not a subclass of portaserve Device")
        name = device_cls.name
        if not name or name != name.lower() or " " in name or ":" in name:
            raise PluginError(
                f"device class {device_cls.__qualname__} has invalid name {name!r}: "
                "use a non-empty lower-case name without spaces or ':'")
        version = getattr(device_cls, "api_version", PLUGIN_API_VERSION)
        if api_major(version) != api_major(PLUGIN_API_VERSION):
            raise PluginError(
                f"device {name!r} was written for plugin API {version}, but this portaserve "
                f"provides plugin API {PLUGIN_API_VERSION}")
        if name in self.devices:
            raise PluginError(
                f"device {name!r} is already registered by plugin {self.devices[name].plugin!r}; "
                f"refused from plugin {plugin!r} (to change one kernel, use "
                "portaserve_register_kernels)")
        self.devices[name] = DeviceEntry(name, device_cls, plugin)

    def _kernel_registrar(self, plugin: str) -> Callable[..., None]:
        def register(device_name: str, op_name: str, fn: KernelFn, *, quant_format: str | None = None) -> None:
            if op_name not in OP_NAMES and op_name not in FUSED_OPS:
                raise PluginError(f"plugin {plugin!r}: unknown op {op_name!r}; ops are "
                                  f"{list(OP_NAMES)} and the optional fused {list(FUSED_OPS)}")
            if not callable(fn):
                raise PluginError(f"plugin {plugin!r}: kernel for {device_name}/{op_name} is not callable")
            if (op_name == "quant_linear") != (quant_format is not None):
                raise PluginError(
                    f"plugin {plugin!r}: quant_format is required for op 'quant_linear' and only "
                    f"for it (got op {op_name!r}, quant_format={quant_format!r})")
            if quant_format is not None:
                table, key = self.quant_kernel_overrides.setdefault(device_name, {}), quant_format
            else:
                table, key = self.kernel_overrides.setdefault(device_name, {}), op_name
            if key in table:
                logger.warning(
                    "plugin %r: kernel %s/%s already registered by %r; keeping the first",
                    plugin, device_name, key, table[key][0])
                return
            table[key] = (plugin, fn)

        return register

    def _quant_registrar(self, plugin: str) -> Callable[[Any], None]:
        def register(method: Any) -> None:
            name = getattr(method, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin!r}: quant method {method!r} has no name")
            if name in self.quant_methods:
                raise PluginError(f"plugin {plugin!r}: quant format {name!r} is already registered")
            self.quant_methods[name] = method

        return register

    def _model_registrar(self, plugin: str) -> Callable[[str, type], None]:
        def register(architecture: str, model_cls: type) -> None:
            if architecture in self.models:
                raise PluginError(f"plugin {plugin!r}: architecture {architecture!r} is already registered")
            self.models[architecture] = model_cls

        return register

    # -- what the engine asks ----------------------------------------------------------------

    def available_devices(self) -> list[DeviceEntry]:
        """Available devices, highest priority first (ties by name)."""
        entries = [e for e in self.devices.values() if e.availability.is_available]
        return sorted(entries, key=lambda e: (-e.priority, e.name))

    def select_device(self, requested: str | None = None, *, origin: str = "--device") -> tuple[Device, str]:
        """The device to run on, as an instance, and a human reason for the choice.

        ``requested`` is ``"name"`` or ``"name:index"``. Without it: ``PORTASERVE_DEVICE``, then
        the ``portaserve_select_device`` hook, then the highest-priority available device.
        ``origin`` names where ``requested`` came from, for the reason.
        """
        if requested is None and envs.device() is not None:
            requested, origin = envs.device(), "PORTASERVE_DEVICE"
        if requested is not None:
            name, index = parse_device(requested)
            if name in self.devices:
                return self._instantiate(name, index, f"{name}: requested by {origin}")
            chosen = self._hook_choice(name)
            if chosen is None:
                raise DeviceError(f"unknown device {name!r} (from {origin}); {self.describe_devices()}")
            return self._instantiate(chosen, index, f"{chosen}: plugin resolved {origin}={requested!r}")
        chosen = self._hook_choice(None)
        if chosen is not None:
            return self._instantiate(chosen, 0, f"{chosen}: chosen by a portaserve_select_device plugin")
        available = self.available_devices()
        if not available:
            raise DeviceError(f"no device is available; {self.describe_devices()}")
        best = available[0]
        ranking = " > ".join(f"{e.name} {e.priority}" for e in available)
        return self._instantiate(best.name, 0, f"{best.name}: highest priority available ({ranking})")

    def _hook_choice(self, requested: str | None) -> str | None:
        candidates = [(e.name, e.priority) for e in self.available_devices()]
        try:
            chosen = self.plugin_manager.hook.portaserve_select_device(
                candidates=candidates, requested=requested)
        except Exception as e:  # a selection plugin that raises must not stop the engine
            self._collect_failures.append(_failure("portaserve_select_device", e))
            return None
        if chosen is not None and chosen not in dict(candidates):
            logger.warning(
                "portaserve_select_device returned %r, which is not an available device "
                "(candidates %s); ignored", chosen, candidates)
            return None
        return chosen

    def _instantiate(self, name: str, index: int, reason: str) -> tuple[Device, str]:
        entry = self.devices[name]
        availability = entry.availability
        if not availability.is_available:
            raise DeviceError(f"device {name!r} is not available: {availability.reason}; {self.describe_devices()}")
        try:
            device = entry.cls(index)
        except Exception as e:  # a vendor constructor may raise anything
            raise DeviceError(f"device {name!r} (plugin {entry.plugin!r}) failed to start: {e}") from e
        logger.info("device %s", reason)
        return device, reason

    def describe_devices(self) -> str:
        """One line per registered device and why it is (not) available, for error messages."""
        parts = []
        for entry in sorted(self.devices.values(), key=lambda e: e.name):
            a = entry.availability
            state = "available" if a.is_available else f"unavailable: {a.reason}"
            parts.append(f"{entry.name} ({state})")
        return "registered devices: " + ("; ".join(parts) if parts else "none")

    def kernel_table(self, device: Device) -> KernelTable:
        """The ops of ``device``: plugin overrides, then its native kernels, then the reference."""
        from portaserve.devices.reference import REFERENCE_OPS

        return build_kernel_table(
            device.name,
            device.capabilities().kv_layout,
            device.kernels(),
            REFERENCE_OPS,
            overrides=self.kernel_overrides.get(device.name),
            native_quant=device.quant_kernels(),
            quant_overrides=self.quant_kernel_overrides.get(device.name),
        )


def parse_device(spec: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"`` -> ``("cpu", 0)``."""
    name, sep, index = spec.strip().partition(":")
    if not name:
        raise DeviceError(f"invalid device {spec!r}: expected NAME or NAME:INDEX")
    if not sep:
        return name.lower(), 0
    if not index.isdigit():
        raise DeviceError(f"invalid device {spec!r}: the index after ':' must be a non-negative integer")
    return name.lower(), int(index)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a missing parent package
        return False


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("portaserve")
    pm.add_hookspecs(hookspecs)
    return pm


def load_registry() -> Registry:
    """Build a registry from scratch: built-ins, then entry points, then collect."""
    registry = Registry(new_plugin_manager())
    registry.load_builtins()
    registry.load_entry_points()
    registry.collect()
    return registry


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first use (or again with ``reload=True``)."""
    global _registry
    with _lock:
        if _registry is None or reload:
            _registry = load_registry()
        return _registry
