"""The hookspecs are the documented contract: names, arguments, firstresult, docstrings."""

from __future__ import annotations

import inspect

from portaserve.plugins import hookspecs
from portaserve.plugins.manager import new_plugin_manager

EXPECTED = {
    "portaserve_register_devices": ["register"],
    "portaserve_register_kernels": ["register"],
    "portaserve_register_quant_methods": ["register"],
    "portaserve_register_models": ["register"],
    "portaserve_select_device": ["candidates", "requested"],
}


def test_hook_names_and_arguments():
    specs = {name: fn for name, fn in vars(hookspecs).items() if name.startswith("portaserve_")}
    assert {name: list(inspect.signature(fn).parameters) for name, fn in specs.items()} == EXPECTED


def test_only_select_device_is_firstresult():
    pm = new_plugin_manager()
    firstresult = {name for name in EXPECTED if getattr(pm.hook, name).spec.opts["firstresult"]}
    assert firstresult == {"portaserve_select_device"}
    assert "Stops at first non-None result." in hookspecs.portaserve_select_device.__doc__


def test_every_hook_is_documented():
    for name, params in EXPECTED.items():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc, name  # when and how often
        for param in params:
            assert f":param {param}:" in doc, (name, param)
        assert ":returns:" in doc and ".. versionadded:: 0.1" in doc, name
