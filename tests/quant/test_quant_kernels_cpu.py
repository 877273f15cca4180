"""cpu quant_linear kernels against the reference dequant, and the registry through the hooks."""

from __future__ import annotations

import pytest
import torch

import portaserve
from portaserve.devices import reference
from portaserve.errors import ConfigError
from portaserve.plugins.manager import get_registry
from portaserve.quant import kernels_cpu, registry
from portaserve.quant.base import QuantizedWeight

FORMATS = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "int8", "int4", "int4_sym", "fp8",
           "fp8_per_tensor")


def make_weight(scheme: str, n: int, k: int, seed: int) -> QuantizedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k**-0.5
    return registry.quantize(w, scheme, group_size=64)


@pytest.mark.parametrize("scheme", FORMATS)
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_cpu_kernel_matches_reference_fp32(scheme, num_tokens, monkeypatch):
    # a small chunk so the loop runs over several chunks and a ragged last one
    monkeypatch.setattr(kernels_cpu, "CHUNK_ELEMENTS", 256 * 7)
    weight = make_weight(scheme, 45, 512, seed=num_tokens)
    x = torch.randn(num_tokens, 512, generator=torch.Generator().manual_seed(99))
    bias = torch.randn(45, generator=torch.Generator().manual_seed(7))
    kernel = kernels_cpu.CPU_QUANT_KERNELS[weight.format]
    for b in (None, bias):
        out = kernel(x, weight, b)
        expected = reference.quant_linear(x, weight, b)
        assert out.shape == (num_tokens, 45) and out.dtype == torch.float32
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "int8", "int4", "int4_sym"])
def test_cpu_kernel_bfloat16(scheme):
    weight = make_weight(scheme, 64, 256, seed=3)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    out = kernels_cpu.CPU_QUANT_KERNELS[weight.format](x, weight)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.quant_linear(x, weight).float(),
                               atol=3e-2, rtol=3e-2)


def test_expanded_chunk_is_bit_identical_to_reference():
    """Every chunk the kernels expand equals the reference dequant bit for bit."""
    for scheme in FORMATS:
        weight = make_weight(scheme, 20, 256, seed=11)
        chunk_fn = {"int8": kernels_cpu._int8_chunk, "int4": kernels_cpu._int4_chunk,
                    "fp8": kernels_cpu._fp8_chunk}.get(weight.format, kernels_cpu._gguf_chunk)
        dense = weight.dequantize(torch.float32)
        assert torch.equal(chunk_fn(weight, 3, 17), dense[3:17]), scheme


def test_builtin_formats_and_kernels_come_through_the_hooks():
    reg = get_registry()
    assert {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "int8", "int4", "fp8"} <= set(reg.quant_methods)
    device, _ = reg.select_device("cpu")
    table = reg.kernel_table(device)
    assert table.quant_sources["Q4_1"] == "plugin:portaserve.quant.builtin"
    assert not reg.failures


def test_vendor_kernel_for_an_existing_format():
    """A vendor registers a Q8_0 kernel for a device without redefining the format."""
    calls = []

    def fake_q8_0(x, weight, bias=None):
        calls.append(weight.format)
        return reference.quant_linear(x, weight, bias)

    class VendorPlugin:
        PORTASERVE_PLUGIN_API = "1.0"

        @portaserve.hookimpl
        def portaserve_register_kernels(self, register):
            register("acme", "quant_linear", fake_q8_0, quant_format="Q8_0")

    reg = get_registry()
    with reg.temporary_plugin(VendorPlugin(), "acme-q8"):
        assert reg.quant_kernel_overrides["acme"]["Q8_0"] == ("acme-q8", fake_q8_0)
        assert reg.quant_methods["Q8_0"].name == "Q8_0"  # the format is still the built-in one
        from portaserve.plugins.kernel_table import build_kernel_table

        table = build_kernel_table("acme", "blocks_nhd", {}, reference.REFERENCE_OPS,
                                   quant_overrides=reg.quant_kernel_overrides["acme"])
        weight = make_weight("Q8_0", 8, 64, seed=1)
        table.quant_linear(torch.randn(2, 64), weight)
        assert calls == ["Q8_0"]
    assert "acme" not in reg.quant_kernel_overrides


def test_online_quantize_errors():
    with pytest.raises(ConfigError, match="quantization must be one of"):
        registry.quantize(torch.randn(4, 64), "int3")
    assert registry.can_quantize((8, 576), "int4") and not registry.can_quantize((8, 576), "Q4_K")
