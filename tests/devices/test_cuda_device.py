"""The cuda / rocm / triton-interpret devices: probes, selection, capabilities, kernel table.

No GPU exists on CI machines: the GPU probes are checked by faking what torch reports (a CUDA
build with a GPU, a ROCm/HIP build with a GPU, no GPU, no triton), and the kernels through the
``triton-interpret`` device, which runs the same Triton code on CPU tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import portaserve.devices.cuda as cuda_mod
from portaserve.core.batch import build_batch
from portaserve.devices import reference as ref
from portaserve.devices.cuda import CudaDevice, TritonInterpretDevice
from portaserve.devices.rocm import RocmDevice
from portaserve.plugins.device import KVCacheSpec
from portaserve.plugins.manager import get_registry


def fake_gpu(monkeypatch: pytest.MonkeyPatch, *, hip: str | None, cuda: str | None, name: str) -> None:
    """Make torch look like a build with one visible GPU called ``name``."""
    props = SimpleNamespace(name=name, major=9, minor=0, total_memory=141 << 30, multi_processor_count=132)
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(cuda_mod, "triton_version", lambda: "3.6.0")


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """A registry loaded under the current fakes, and a clean one again afterwards."""
    monkeypatch.delenv("PORTASERVE_DEVICE", raising=False)
    yield lambda: get_registry(reload=True)
    monkeypatch.undo()
    get_registry(reload=True)


def test_cuda_build_with_gpu_selects_cuda(monkeypatch: pytest.MonkeyPatch, fresh_registry) -> None:
    fake_gpu(monkeypatch, hip=None, cuda="13.0", name="NVIDIA H200")
    probe = CudaDevice.probe()
    assert probe.is_available
    assert "NVIDIA H200" in probe.reason and "cc 9.0" in probe.reason and "triton 3.6.0" in probe.reason
    rocm = RocmDevice.probe()
    assert not rocm.is_available and "not a ROCm/HIP build" in rocm.reason
    device, reason = fresh_registry().select_device(None)
    assert device.name == "cuda" and "highest priority" in reason
    assert device.torch_device == torch.device("cuda", 0)
    caps = device.capabilities()
    assert caps.dtypes[0] == torch.bfloat16 and torch.float32 in caps.dtypes
    assert caps.kv_layout == "blocks_hnd" and caps.dist_backend == "nccl"
    assert caps.extra["gpu"] == "NVIDIA H200" and caps.extra["compute_capability"] == "9.0"


def test_hip_build_selects_rocm_not_cuda(monkeypatch: pytest.MonkeyPatch, fresh_registry) -> None:
    fake_gpu(monkeypatch, hip="6.3.42131", cuda=None, name="AMD Instinct MI300X")
    cuda_probe = CudaDevice.probe()
    assert not cuda_probe.is_available and "ROCm/HIP build" in cuda_probe.reason
    rocm_probe = RocmDevice.probe()
    assert rocm_probe.is_available and "MI300X" in rocm_probe.reason and "hip 6.3" in rocm_probe.reason
    registry = fresh_registry()
    device, _ = registry.select_device(None)
    assert device.name == "rocm"
    assert not device.capabilities().supports_graph_capture
    assert device.compile(model=None, kv_caches=[]) is None
    with pytest.raises(Exception, match="not available"):
        registry.select_device("cuda")


def test_no_gpu_or_no_triton_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, hip=None, cuda="12.8", name="NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    probe = CudaDevice.probe()
    assert not probe.is_available and "sees no GPU" in probe.reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_mod, "triton_version", lambda: None)
    probe = CudaDevice.probe()
    assert not probe.is_available and "triton is not installed" in probe.reason
    assert "NVIDIA H100" in probe.reason

    def broken(index: int = 0) -> None:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(cuda_mod, "triton_version", lambda: "3.6.0")
    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    probe = CudaDevice.probe()
    assert not probe.is_available and "driver version is insufficient" in probe.reason


def test_cpu_torch_build_is_not_selected() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert not CudaDevice.probe().is_available
    assert not RocmDevice.probe().is_available
    registry = get_registry()
    assert {"cuda", "rocm", "triton-interpret"} <= set(registry.devices)
    assert not [f for f in registry.failures if "cuda" in f.plugin or "rocm" in f.plugin]
    # triton-interpret is registered but never wins without being asked for.
    assert TritonInterpretDevice.priority < 0


def test_triton_interpret_kernel_table_runs_the_triton_kernels() -> None:
    pytest.importorskip("triton")
    registry = get_registry()
    device, _ = registry.select_device("triton-interpret")
    table = registry.kernel_table(device)
    assert table.kv_layout == "blocks_hnd"
    native = {"embedding", "linear", "rms_norm", "rotary", "silu_and_mul", "write_kv", "paged_attention"}
    assert set(table.native_ops) == native
    assert table.paged_attention.__module__ == "portaserve.devices.cuda.attention"

    # One layer's KV write + attention through the table, against the reference.
    gen = torch.Generator().manual_seed(7)
    spec = KVCacheSpec(num_layers=2, num_blocks=12, block_size=16, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    caches = device.allocate_kv_cache(spec)
    assert len(caches) == 2 and caches[0].shape == (2, 12, 2, 16, 16)
    batch = build_batch([("a", [1] * 20, 0, [7, 2], True), ("b", [2], 30, [5, 9], True)], 16)
    attn = batch.attention_metadata(torch.device("cpu"))
    q = torch.randn(21, 6, 16, generator=gen).half()
    k = torch.randn(21, 2, 16, generator=gen).half()
    v = torch.randn(21, 2, 16, generator=gen).half()
    expected_cache = caches[0].clone()
    ref.write_kv(k, v, expected_cache, attn.slot_mapping, kv_layout="blocks_hnd")
    caches[0][:, 5] = expected_cache[:, 5] = torch.randn(2, 2, 16, 16, generator=gen).half()  # b's prefix
    table.write_kv(k, v, caches[0], attn.slot_mapping)
    assert torch.equal(caches[0], expected_cache)
    out = table.paged_attention(q, caches[0], attn, 0.25)
    want = ref.paged_attention(q, expected_cache, attn, 0.25, kv_layout="blocks_hnd")
    torch.testing.assert_close(out.float(), want.float(), atol=3e-3, rtol=3e-3)
