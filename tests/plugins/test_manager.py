"""Plugin loading and the registry: entry points, failures, API versions, device selection."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
import torch

import portaserve
from portaserve.devices import reference
from portaserve.devices.cpu import CPUDevice
from portaserve.errors import DeviceError, PluginError
from portaserve.plugins import manager
from portaserve.plugins.device import Availability, Capabilities, Device


def make_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def fake_device(name: str, priority: int = 0, available: bool = True, **extra) -> type[Device]:
    def probe(cls) -> Availability:
        return Availability(available, "ok" if available else f"{name} hardware not found")

    attrs = {
        "name": name,
        "priority": priority,
        "probe": classmethod(probe),
        "capabilities": lambda self: Capabilities(dtypes=(torch.float32,)),
        "allocate_kv_cache": lambda self, spec: reference.allocate_kv_cache(spec, torch.device("cpu"), "blocks_nhd"),
    }
    attrs.update(extra)
    return type(f"Fake{name.title()}Device", (Device,), attrs)


def device_plugin(*device_classes: type[Device], api: str = "1.0") -> types.SimpleNamespace:
    @portaserve.hookimpl
    def portaserve_register_devices(register):
        for cls in device_classes:
            register(cls)

    return types.SimpleNamespace(PORTASERVE_PLUGIN_API=api, portaserve_register_devices=portaserve_register_devices)


@pytest.fixture
def entry_points(monkeypatch):
    """Replace entry-point discovery with modules put in sys.modules for the test."""
    eps: list[importlib.metadata.EntryPoint] = []
    modules: list[str] = []

    def add(ep_name: str, module: types.ModuleType | None = None, value: str | None = None) -> None:
        if module is not None:
            monkeypatch.setitem(sys.modules, module.__name__, module)
            modules.append(module.__name__)
        eps.append(importlib.metadata.EntryPoint(ep_name, value or module.__name__, manager.ENTRY_POINT_GROUP))

    monkeypatch.setattr(manager, "discover_entry_points", lambda: list(eps))
    monkeypatch.delenv("PORTASERVE_PLUGINS", raising=False)
    monkeypatch.delenv("PORTASERVE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PORTASERVE_DEVICE", raising=False)
    return add


def test_builtins_register_cpu_through_the_hooks(entry_points):
    registry = manager.load_registry()
    entry = registry.devices["cpu"]
    assert entry.cls is CPUDevice and entry.plugin == "portaserve.devices.builtin"
    assert entry.availability.is_available and "torch" in entry.availability.reason
    assert all(e.plugin.startswith("portaserve.devices.") for e in registry.devices.values())


def test_entry_point_plugin_is_loaded(entry_points):
    entry_points("acme", make_module("acme_plugin", **vars(device_plugin(fake_device("acme-npu", 1000)))))
    registry = manager.load_registry()
    assert registry.devices["acme-npu"].plugin == "acme"
    device, reason = registry.select_device()
    assert device.name == "acme-npu"
    assert reason.startswith("acme-npu: highest priority available (acme-npu 1000 > ")
    assert "cpu 10" in reason


def test_broken_entry_point_is_listed_and_others_still_load(entry_points):
    entry_points("broken", value="portaserve_no_such_vendor_module_xyz")
    entry_points("raises", make_module("raises_plugin"), value="raises_plugin:missing_attribute")
    entry_points("acme", make_module("acme_plugin", **vars(device_plugin(fake_device("acme-npu", -50)))))
    registry = manager.load_registry()
    failures = {f.plugin: f for f in registry.failures}
    assert {"broken", "raises"} <= set(failures) and "acme" not in failures
    assert "ModuleNotFoundError" in failures["broken"].message
    assert "portaserve_no_such_vendor_module_xyz" in failures["broken"].message
    assert "Traceback" in failures["broken"].traceback
    assert {"cpu", "acme-npu"} <= set(registry.devices)
    device, _ = registry.select_device()
    assert device.name != "acme-npu"  # its priority is the lowest


def test_wrong_api_major_version_is_refused_with_both_versions(entry_points):
    entry_points("future", make_module("future_plugin", **vars(device_plugin(fake_device("future-npu"), api="2.3"))))
    registry = manager.load_registry()
    assert "future-npu" not in registry.devices
    (failure,) = [f for f in registry.failures if f.plugin == "future"]
    assert "2.3" in failure.message and "1.0" in failure.message
    assert registry.select_device()[0].name != "future-npu"


def test_device_class_with_wrong_api_version_is_refused(entry_points):
    old = fake_device("old-npu", api_version="0.9")
    entry_points("old", make_module("old_plugin", **vars(device_plugin(old))))
    registry = manager.load_registry()
    assert "old-npu" not in registry.devices
    assert any(f.plugin == "old" and "0.9" in f.message and "1.0" in f.message for f in registry.failures)


def test_allowlist_and_autoload_switch(entry_points, monkeypatch):
    entry_points("a", make_module("a_plugin", **vars(device_plugin(fake_device("dev-a")))))
    entry_points("b", make_module("b_plugin", **vars(device_plugin(fake_device("dev-b")))))
    monkeypatch.setenv("PORTASERVE_PLUGINS", "b")
    names = set(manager.load_registry().devices)
    assert "dev-b" in names and "dev-a" not in names and "cpu" in names
    monkeypatch.delenv("PORTASERVE_PLUGINS")
    monkeypatch.setenv("PORTASERVE_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = set(manager.load_registry().devices)
    assert "cpu" in names and not names & {"dev-a", "dev-b"}


def test_probe_that_raises_makes_device_unavailable_with_traceback(entry_points):
    def probe(cls):
        raise RuntimeError("driver exploded")

    entry_points("bad", make_module("bad_plugin", **vars(device_plugin(fake_device("bad-npu", 99, probe=classmethod(probe))))))
    registry = manager.load_registry()
    availability = registry.devices["bad-npu"].availability
    assert not availability.is_available
    assert "driver exploded" in availability.reason and "RuntimeError" in availability.error
    assert registry.select_device()[0].name != "bad-npu"
    with pytest.raises(DeviceError) as info:
        registry.select_device("bad-npu")
    assert "driver exploded" in str(info.value)


def test_hook_raising_is_a_failure_of_that_plugin_only(entry_points):
    @portaserve.hookimpl
    def portaserve_register_devices(register):
        raise ValueError("cannot enumerate cards")

    entry_points("flaky", make_module("flaky_plugin", PORTASERVE_PLUGIN_API="1.0",
                                      portaserve_register_devices=portaserve_register_devices))
    registry = manager.load_registry()
    assert [f.message for f in registry.failures if f.plugin == "flaky"] == ["ValueError: cannot enumerate cards"]
    assert "cpu" in registry.devices


def test_misspelled_hook_is_refused(entry_points):
    @portaserve.hookimpl
    def portaserve_register_device(register):  # missing the final "s"
        raise AssertionError("never called")

    entry_points("typo", make_module("typo_plugin", PORTASERVE_PLUGIN_API="1.0",
                                     portaserve_register_device=portaserve_register_device))
    registry = manager.load_registry()
    (failure,) = [f for f in registry.failures if f.plugin == "typo"]
    assert "portaserve_register_device" in failure.message
    assert not registry.plugin_manager.has_plugin("typo")


def test_duplicate_device_name_is_refused(entry_points):
    entry_points("impostor", make_module("impostor_plugin", **vars(device_plugin(fake_device("cpu", 1000)))))
    registry = manager.load_registry()
    assert registry.devices["cpu"].cls is CPUDevice
    assert any(f.plugin == "impostor" and "already registered" in f.message for f in registry.failures)


def test_select_device_requested_index_and_env(monkeypatch, entry_points):
    registry = manager.load_registry()
    device, reason = registry.select_device("cpu:0")
    assert (device.name, device.index, reason) == ("cpu", 0, "cpu: requested by --device")
    monkeypatch.setenv("PORTASERVE_DEVICE", "cpu:3")
    device, reason = registry.select_device()
    assert (device.index, reason) == (3, "cpu: requested by PORTASERVE_DEVICE")
    with pytest.raises(DeviceError, match="index after ':'"):
        registry.select_device("cpu:x")


def test_unknown_or_unavailable_device_error_lists_devices(entry_points):
    entry_points("acme", make_module("acme_plugin", **vars(device_plugin(fake_device("acme-npu", 50, available=False)))))
    registry = manager.load_registry()
    with pytest.raises(DeviceError) as info:
        registry.select_device("tpu")
    message = str(info.value)
    assert "'tpu'" in message and "cpu (available)" in message
    assert "acme-npu (unavailable: acme-npu hardware not found)" in message
    with pytest.raises(DeviceError, match="acme-npu hardware not found"):
        registry.select_device("acme-npu")
    assert registry.select_device()[0].name != "acme-npu"


def test_select_device_hook_chooses_and_resolves_aliases(entry_points):
    class Chooser:
        PORTASERVE_PLUGIN_API = "1.0"
        seen: list = []

        @portaserve.hookimpl
        def portaserve_select_device(self, candidates, requested):
            self.seen.append((list(candidates), requested))
            return "acme-npu" if requested in (None, "npu") else None

    entry_points("acme", make_module("acme_plugin", **vars(device_plugin(fake_device("acme-npu", 1)))))
    registry = manager.load_registry()
    chooser = Chooser()
    with registry.temporary_plugin(chooser, "chooser"):
        device, reason = registry.select_device()
        assert device.name == "acme-npu" and "portaserve_select_device" in reason
        assert registry.select_device("npu:2")[0].index == 2
        assert registry.select_device("cpu")[0].name == "cpu"
    candidates, requested = chooser.seen[0]
    assert requested is None and ("cpu", 10) in candidates and ("acme-npu", 1) in candidates
    assert [p for _, p in candidates] == sorted((p for _, p in candidates), reverse=True)
    assert chooser.seen[1][1] == "npu"
    assert registry.select_device()[0].name != "acme-npu" or len(registry.available_devices()) == 1


def test_kernel_override_and_temporary_plugin(entry_points):
    registry = manager.load_registry()

    def my_silu(x):
        return reference.silu_and_mul(x)

    def my_q4(x, weight, bias=None):
        return reference.quant_linear(x, weight, bias)

    class Kernels:
        PORTASERVE_PLUGIN_API = "1.0"

        @portaserve.hookimpl
        def portaserve_register_kernels(self, register):
            register("cpu", "silu_and_mul", my_silu)
            register("cpu", "quant_linear", my_q4, quant_format="q4_test")

    device, _ = registry.select_device("cpu")
    with registry.temporary_plugin(Kernels(), "fast-silu"):
        table = registry.kernel_table(device)
        assert table.sources["silu_and_mul"] == "plugin:fast-silu" and table.silu_and_mul is my_silu
        assert table.quant_sources["q4_test"] == "plugin:fast-silu"
        x = torch.randn(3, 8)
        torch.testing.assert_close(table.silu_and_mul(x), reference.silu_and_mul(x))
    table = registry.kernel_table(device)
    assert table.sources["silu_and_mul"] == "native" and "q4_test" not in table.quant_ops
    assert not registry.plugin_manager.has_plugin("fast-silu")


def test_bad_kernel_registration_is_a_failure(entry_points):
    class Bad:
        PORTASERVE_PLUGIN_API = "1.0"

        @portaserve.hookimpl
        def portaserve_register_kernels(self, register):
            register("cpu", "quant_linear", lambda x, w, b=None: x)  # no quant_format

    registry = manager.load_registry()
    with registry.temporary_plugin(Bad(), "bad-kernels"):
        assert any(f.plugin == "bad-kernels" and "quant_format" in f.message for f in registry.failures)
        assert "quant_linear" not in registry.kernel_overrides.get("cpu", {})


def test_quant_methods_and_models_are_collected(entry_points):
    class Model:
        pass

    class Plugin:
        PORTASERVE_PLUGIN_API = "1.0"
        method = types.SimpleNamespace(name="toy4")

        @portaserve.hookimpl
        def portaserve_register_quant_methods(self, register):
            register(self.method)

        @portaserve.hookimpl
        def portaserve_register_models(self, register):
            register("ToyForCausalLM", Model)

    registry = manager.load_registry()
    plugin = Plugin()
    with registry.temporary_plugin(plugin, "toy"):
        assert registry.quant_methods["toy4"] is plugin.method
        assert registry.models["ToyForCausalLM"] is Model
    assert "toy4" not in registry.quant_methods and "ToyForCausalLM" not in registry.models


def test_temporary_plugin_refuses_wrong_api():
    registry = manager.load_registry()
    with pytest.raises(PluginError, match="9.0"), registry.temporary_plugin(types.SimpleNamespace(PORTASERVE_PLUGIN_API="9.0")):
        pass


def test_get_registry_is_cached():
    assert manager.get_registry() is manager.get_registry()


def test_example_vendor_plugin_through_an_entry_point(entry_points, example_device_module):
    entry_points("example", example_device_module)
    registry = manager.load_registry()
    assert registry.devices["example"].plugin == "example"
    device, reason = registry.select_device()
    assert device.name != "example"  # priority 1, below cpu
    table = registry.kernel_table(registry.select_device("example")[0])
    assert table.sources["rms_norm"] == "native"
    assert table.sources["silu_and_mul"] == "plugin:example"
    assert table.fallback_ops == ["embedding", "linear", "quant_linear", "rotary", "write_kv",
                                  "paged_attention", "all_reduce"]


def test_temporary_plugin_leaves_an_already_registered_plugin(entry_points, example_device_module):
    entry_points("example", example_device_module)
    registry = manager.load_registry()
    with registry.temporary_plugin(example_device_module, "again") as name:
        assert name == "example"
    assert registry.plugin_manager.has_plugin("example") and "example" in registry.devices


def test_engine_hands_max_num_seqs_to_a_compile_that_takes_it() -> None:
    """``Device.compile`` gained the ``max_batch`` keyword (the engine's ``max_num_seqs``: graph
    capture sizes its ladder with it); a plugin whose ``compile`` predates it is called without."""
    from portaserve import LLM
    from portaserve.plugins.device import compile_executor

    seen: list[tuple[str, object]] = []

    class NewStyle(CPUDevice):
        name, priority = "cpu-compile-kw", -50

        def compile(self, model, kv_caches, *, max_batch=None):
            seen.append(("new", max_batch))

    class OldStyle(CPUDevice):
        name, priority = "cpu-compile-old", -50

        def compile(self, model, kv_caches):  # the contract as it began
            seen.append(("old", None))

    class Plugin:
        PORTASERVE_PLUGIN_API = "1.0"

        @portaserve.hookimpl
        def portaserve_register_devices(self, register) -> None:
            register(NewStyle)
            register(OldStyle)

    with manager.get_registry().temporary_plugin(Plugin(), "compile-kw-test"):
        LLM("random:tiny", device="cpu-compile-kw", max_num_seqs=24)
        LLM("random:tiny", device="cpu-compile-old", max_num_seqs=24)
    assert seen == [("new", 24), ("old", None)]

    class AnyKw(CPUDevice):
        def compile(self, model, kv_caches, **options):
            return options

    assert compile_executor(AnyKw(), None, [], 7) == {"max_batch": 7}
