"""Where the Triton kernel tests run, and how close they must come to the reference (shared by
tests/devices/test_triton_kernels.py and tests/quant/test_quant_gemv.py).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (the same kernel code; see
``portaserve/devices/cuda/launch.py``), in float32 and float16 (the interpreter's bfloat16 is
not exact). With ``PORTASERVE_TEST_DEVICE=cuda`` set (ci/gpu_check.sh) the same tests run
compiled on the GPU and add bfloat16.
"""

from __future__ import annotations

import os

import pytest
import torch

#: Which torch device the kernels run on: "cpu" (interpreter, the CI default) or "cuda".
DEVICE = torch.device(os.environ.get("PORTASERVE_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type != "cpu" else [])
#: Relative (Frobenius) error allowed against the float32 reference, per dtype.
RTOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def skip_module_without_device() -> None:
    """Skip the calling test module when ``PORTASERVE_TEST_DEVICE`` names a GPU that is absent."""
    if DEVICE.type != "cpu" and not torch.cuda.is_available():
        pytest.skip(f"PORTASERVE_TEST_DEVICE={DEVICE} but no GPU is visible", allow_module_level=True)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.double().cpu(), expected.double().cpu()
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    return ((out - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def launch_spy(kernel, monkeypatch: pytest.MonkeyPatch) -> list[dict]:  # noqa: ANN001
    """The keyword arguments (constexprs, launch options) of every launch of ``kernel`` (a
    ``launch.TritonKernel``) from now on; the launches still run."""
    seen: list[dict] = []
    on = kernel.on

    def spy(tensor):  # noqa: ANN001, ANN202
        launcher = on(tensor)

        class Grid:
            def __getitem__(self, grid):  # noqa: ANN001, ANN204
                def go(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                    seen.append(kwargs)
                    return launcher[grid](*args, **kwargs)
                return go
        return Grid()
    monkeypatch.setattr(kernel, "on", spy)
    return seen
