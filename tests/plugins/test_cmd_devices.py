"""``portaserve devices``: the table and ``--json``, with broken and refused plugins present."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types

import pytest

from portaserve.plugins import manager
from portaserve.serve import cli


@pytest.fixture
def registry(monkeypatch, example_device_module):
    """A registry with the example vendor, a package that raises on import, and an API-2 plugin."""
    future = types.ModuleType("vendor_future_api")
    future.PORTASERVE_PLUGIN_API = "2.0"
    monkeypatch.setitem(sys.modules, "vendor_future_api", future)
    eps = [
        importlib.metadata.EntryPoint("example", "portaserve_example_device", "portaserve"),
        importlib.metadata.EntryPoint("broken", "vendor_raises_on_import_not_importable", "portaserve"),
        importlib.metadata.EntryPoint("future", "vendor_future_api", "portaserve"),
    ]
    monkeypatch.setattr(manager, "discover_entry_points", lambda: eps)
    for var in ("PORTASERVE_PLUGINS", "PORTASERVE_DISABLE_PLUGIN_AUTOLOAD", "PORTASERVE_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    built = manager.load_registry()
    monkeypatch.setattr(manager, "get_registry", lambda reload=False: built)
    return built


def test_devices_json_lists_devices_and_failures(registry, capsys):
    assert cli.main(["devices", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in report["devices"]}
    cpu = by_name["cpu"]
    assert cpu["available"] and cpu["plugin"] == "portaserve.devices.builtin" and cpu["priority"] == 10
    assert {"linear", "rms_norm", "rotary", "silu_and_mul", "write_kv", "paged_attention"} <= set(cpu["native_ops"])
    example = by_name["example"]
    assert example["available"] and example["plugin"] == "example"
    assert example["native_ops"] == ["rms_norm", "silu_and_mul (plugin:example)"]
    assert "paged_attention" in example["fallback_ops"] and example["kv_layout"] == "blocks_hnd"
    failures = {f["plugin"]: f for f in report["failures"]}
    assert "ModuleNotFoundError" in failures["broken"]["message"]
    assert "2.0" in failures["future"]["message"] and "1.0" in failures["future"]["message"]
    assert report["selected"].startswith(report["devices"][0]["name"] if report["devices"][0]["available"] else "")


def test_devices_table_shows_failures(registry, capsys):
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "portaserve devices" in out and "example" in out
    assert "plugins that failed to load" in out
    assert "broken" in out and "future" in out
