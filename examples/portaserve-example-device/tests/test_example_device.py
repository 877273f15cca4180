"""The example device registers, resolves its kernels, and passes the conformance suite.

Run from this folder after ``pip install .``: ``pytest tests`` and
``pytest --portaserve-device example --pyargs portaserve.testing``.
"""

from __future__ import annotations

import torch

from portaserve.devices import reference
from portaserve.plugins.manager import get_registry


def test_registered_through_its_entry_point():
    registry = get_registry(reload=True)
    entry = registry.devices["example"]
    assert entry.plugin == "example"
    assert entry.availability.is_available


def test_kernel_table_uses_native_plugin_and_reference_ops():
    registry = get_registry()
    device, reason = registry.select_device("example")
    assert reason == "example: requested by --device"
    table = registry.kernel_table(device)
    assert table.sources["rms_norm"] == "native"
    assert table.sources["silu_and_mul"] == "plugin:example"
    assert table.sources["paged_attention"] == "reference"


def test_fused_rms_norm_matches_reference():
    from portaserve_example_device import fused_rms_norm

    x, residual, weight = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5
    y, res = fused_rms_norm(x, weight, 1e-6, residual)
    ref_y, ref_res = reference.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(res, ref_res)
