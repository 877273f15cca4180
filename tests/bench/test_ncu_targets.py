"""benchmarks/ncu_targets.py builds each profiling target on real kernels: on CPU (the Triton
interpreter, tiny shapes) every target runs and matches the reference."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ncu_targets.py"


@pytest.fixture(scope="module")
def ncu():
    spec = importlib.util.spec_from_file_location("ncu_targets", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target,tol", [("attn-fp8", 1e-5), ("attn-bf16", 1e-5), ("gemv-int4", 1e-5),
                                        ("gemv-q4_k", 1e-5), ("gemv-fp8", 5e-2)])
def test_targets_run_and_match_the_reference(ncu, target: str, tol: float) -> None:
    args = argparse.Namespace(target=target, batch=488, context=1036, device="cpu", tiny=True,
                              attn_config=None)
    launch, want, nbytes, shape = ncu.build(args)
    out, expected = launch().float(), want().float()
    assert out.shape == expected.shape and nbytes > 0 and shape
    assert expected.abs().max() > 0  # random inputs, not zeros
    err = ((out - expected).abs().max() / expected.abs().max()).item()
    assert err < tol, (target, err)  # fp8 W8A8 against the weight-only reference: x's quantization
    assert torch.isfinite(out).all()
