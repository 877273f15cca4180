"""The conformance suite passes for cpu and the example device, and fails for wrong kernels.

Each test runs the suite in a fresh pytest process, as a vendor would:
``pytest -p portaserve.testing.pytest_plugin --portaserve-device NAME --pyargs portaserve.testing``.
A generated conftest registers the plugin under test (the example device, or a wrong kernel
from ``wrong_kernels.py``) in that process's registry for the session.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from portaserve.devices.cpu import CPUDevice

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EXAMPLE_DIR = REPO / "examples" / "portaserve-example-device"

REGISTER_CONFTEST = '''
import contextlib
import importlib
plugin = importlib.import_module("{module}")
plugin = getattr(plugin, "{attr}") if "{attr}" else plugin
from portaserve.plugins.manager import get_registry

_stack = contextlib.ExitStack()

def pytest_configure(config):
    _stack.enter_context(get_registry().temporary_plugin(plugin, "{name}"))

def pytest_unconfigure(config):
    _stack.close()
'''


def run_suite(pytester: pytest.Pytester, monkeypatch, device: str, *args: str,
              plugin: tuple[str, str, str] | None = None) -> pytest.RunResult:
    """Run the suite on ``device``; ``plugin`` = (module, attribute, name) to register first."""
    path = os.pathsep.join([str(REPO), str(EXAMPLE_DIR), str(HERE), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.delenv("PORTASERVE_DEVICE", raising=False)
    if plugin is not None:
        module, attr, name = plugin
        pytester.makeconftest(REGISTER_CONFTEST.format(module=module, attr=attr, name=name))
    return pytester.runpytest_subprocess(
        "-p", "portaserve.testing.pytest_plugin", "--portaserve-device", device,
        "--pyargs", "portaserve.testing", "-q", "-p", "no:cacheprovider", *args, timeout=300)


def test_suite_passes_for_cpu(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "cpu")
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert outcomes["passed"] >= 60  # every op in several shapes and dtypes actually ran
    assert "failed" not in outcomes


def test_suite_passes_for_example_device(pytester, monkeypatch):
    # The end-to-end generation is left out here: on the example device every op but two is
    # the reference (Python loops, dequantize per call), which takes minutes on the real model.
    result = run_suite(pytester, monkeypatch, "example", "-m", "not portaserve_e2e",
                       plugin=("portaserve_example_device", "", "example"))
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert outcomes["passed"] >= 60


def test_suite_without_a_device_is_a_usage_error(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("PORTASERVE_DEVICE", raising=False)
    result = pytester.runpytest_subprocess(
        "-p", "portaserve.testing.pytest_plugin", "--pyargs", "portaserve.testing", "-q", timeout=120)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*needs a device*--portaserve-device*"])


def test_suite_fails_for_wrong_rotary(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "cpu", "-k", "rotary or (silu and not fp8)",
                       plugin=("wrong_kernels", "WRONG_ROTARY", "wrong-rotary"))
    outcomes = result.parseoutcomes()
    assert result.ret == 1
    num_dtypes = len(CPUDevice().capabilities().dtypes)
    # every rotary shape in every dtype, and the fused rotary_write_kv and
    # linear_rotary_write_kv (3 weights x 2 token counts), which the cpu device does not
    # implement: the table composes them from its own (here: wrong) rotary
    assert outcomes["failed"] == (3 + 3 + 6) * num_dtypes
    assert outcomes["passed"] == (2 + 6) * num_dtypes  # silu_and_mul and linear_silu_and_mul are untouched
    result.stdout.fnmatch_lines(["*rotary q*"])


def test_suite_fails_for_wrong_fused_rotary_write_kv(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "cpu", "-k", "rotary", "-rf",
                       plugin=("wrong_kernels", "UNROTATED_KEYS", "unrotated-keys"))
    outcomes = result.parseoutcomes()
    assert result.ret == 1
    num_dtypes = len(CPUDevice().capabilities().dtypes)
    # the fused op in every shape and dtype, and linear_rotary_write_kv, composed of it
    assert outcomes["failed"] == (3 + 6) * num_dtypes
    assert outcomes["passed"] == 3 * num_dtypes  # the device's own rotary is untouched
    result.stdout.fnmatch_lines(["*rotary_write_kv cache*"])


def test_suite_fails_for_a_per_tensor_fused_fp8_norm(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "cpu", "-k", "rms_norm", "-rf",
                       plugin=("wrong_kernels", "PER_TENSOR_NORM_FP8", "per-tensor-norm-fp8"))
    outcomes = result.parseoutcomes()
    assert result.ret == 1
    num_dtypes = len(CPUDevice().capabilities().dtypes)
    # the batched case (6 tokens, rows of different amax) in every dtype; one token is per
    # tensor and per token alike; rms_norm itself untouched, and linear_rms_norm (-k matches it)
    assert outcomes["failed"] == num_dtypes
    assert outcomes["passed"] == (6 + 1 + 6) * num_dtypes  # rms_norm's 6, the 1-token one, linear_rms_norm's 6
    result.stdout.fnmatch_lines(["*rms_norm_fp8(residual) scales*"])


def test_suite_fails_for_causal_off_by_one(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "cpu", "-k", "paged_attention", "--portaserve-dtype", "float32",
                       "-rf", plugin=("wrong_kernels", "LEAKY_ATTENTION", "leaky"))
    outcomes = result.parseoutcomes()
    assert result.ret == 1
    summary = result.stdout.str().split("short test summary")[-1]
    for scenario in ("prefill", "cached_prefix", "mixed"):
        assert f"test_paged_attention[float32-{scenario}-" in summary
    assert "test_paged_attention[float32-decode-" not in summary  # decode cannot see the future
    # 3 scenarios x 3 head layouts + chunked prefill, and the same 3 scenarios over an fp8
    # cache of each format the cpu device declares
    num_fp8 = len(CPUDevice().capabilities().kv_cache_dtypes)
    assert outcomes["failed"] == 3 * 3 + 1 + 3 * num_fp8


# The wrong fp8 kernels go on the triton-interpret device (see wrong_kernels.py). Checked without
# importing triton here: the suite runs in a subprocess.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@needs_triton
def test_suite_holds_an_undeclared_w8a8_kernel_to_the_reference(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "triton-interpret", "-k", "quant_linear", "--portaserve-dtype", "float32",
                       plugin=("wrong_kernels", "UNDECLARED_W8A8", "undeclared-w8a8"))
    outcomes = result.parseoutcomes()
    assert result.ret == 1
    assert outcomes["failed"] == 2  # 1 and 6 tokens: fp8 activations are ~3% off weight-only
    result.stdout.fnmatch_lines(["*quant_linear[[]fp8[]] (weight_only)*"])


@needs_triton
def test_suite_fails_a_w8a8_kernel_with_the_wrong_activation_scales(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "triton-interpret", "-k", "quant_linear", "--portaserve-dtype", "float32",
                       "-rf", plugin=("wrong_kernels", "PER_TENSOR_W8A8", "per-tensor-w8a8"))
    outcomes = result.parseoutcomes()
    assert result.ret == 1
    summary = result.stdout.str().split("short test summary")[-1]
    assert "test_quant_linear_native_formats[float32-6]" in summary  # one scale for 6 tokens
    assert outcomes["failed"] == 1 and outcomes["passed"] == 1  # one token: the same scale
    result.stdout.fnmatch_lines(["*quant_linear[[]fp8[]] (w8a8)*"])
