"""The cuda / rocm / triton-interpret devices: probes, selection, capabilities, kernel table.

No GPU exists on CI machines: the GPU probes are checked by faking what torch reports (a CUDA
build with a GPU, a ROCm/HIP build with a GPU, no GPU, no triton), and the kernels through the
``triton-interpret`` device, which runs the same Triton code on CPU tensors.
"""

from __future__ import annotations

import contextlib
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


def skip_if_interpreter_cannot_index() -> None:
    """Skip where Triton's own interpreter cannot use a loaded value as a loop bound.

    Triton 3.6's interpreter converts such a value with ``int()`` of a one-element array,
    which NumPy 2.x refuses ("only 0-dimensional arrays can be converted to Python scalars";
    later Triton squeezes it first). The lent H200's image pairs the two; CI's Triton does not.
    The kernels themselves are covered there compiled (tests/devices/test_triton_kernels.py)."""
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.errors import InterpreterError

    from portaserve.devices.cuda.launch import triton_kernel

    @triton_kernel
    def loop_to_loaded_bound(n_ptr, out_ptr):
        acc = tl.full([1], 0, dtype=tl.int32)
        for _ in range(0, tl.load(n_ptr)):
            acc += 1
        tl.store(out_ptr + tl.arange(0, 1), acc)

    n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    try:
        loop_to_loaded_bound.on(n)[(1,)](n, out)
    except InterpreterError as e:
        pytest.skip(f"this Triton's interpreter cannot run loops bounded by loaded values ({e})")
    assert int(out) == 3


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
    skip_if_interpreter_cannot_index()
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


# --- decode graphs (the executor's padding and buffers, replayed eagerly on CPU) ---------------


def tiny_llama(kernels, dtype: torch.dtype, gen: torch.Generator, device: str | torch.device = "cpu"):
    from portaserve.core.config import ModelConfig
    from portaserve.core.models.llama import LlamaForCausalLM

    config = ModelConfig(architecture="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=64)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * shape[-1] ** -0.5

    weights = {"model.embed_tokens.weight": w(50, 32), "model.norm.weight": 1 + 0.1 * w(32),
               "lm_head.weight": w(50, 32)}
    for i in range(2):
        p = f"model.layers.{i}"
        weights |= {f"{p}.input_layernorm.weight": 1 + 0.1 * w(32),
                    f"{p}.post_attention_layernorm.weight": 1 + 0.1 * w(32),
                    f"{p}.self_attn.q_proj.weight": w(32, 32), f"{p}.self_attn.k_proj.weight": w(16, 32),
                    f"{p}.self_attn.v_proj.weight": w(16, 32), f"{p}.self_attn.o_proj.weight": w(32, 32),
                    f"{p}.mlp.gate_proj.weight": w(48, 32), f"{p}.mlp.up_proj.weight": w(48, 32),
                    f"{p}.mlp.down_proj.weight": w(32, 48)}
    return LlamaForCausalLM(config, weights, kernels, dtype=dtype, device=torch.device(device))


def test_pdl_is_on_by_default_where_triton_and_the_gpu_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDL (on by default) needs Triton 3.3+ with the gdc calls, a compiled launch and sm_90+:
    anything less launches without it, and ``PORTASERVE_CUDA_PDL=0`` turns it off."""
    import triton

    from portaserve import envs
    from portaserve.devices.cuda import launch

    monkeypatch.delenv("PORTASERVE_CUDA_PDL", raising=False)
    assert envs.cuda_pdl()
    for off in ("0", "off", "False"):
        monkeypatch.setenv("PORTASERVE_CUDA_PDL", off)
        assert not envs.cuda_pdl()
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    assert not launch.triton_has_pdl()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert launch.triton_has_pdl() == all(
        hasattr(triton.language.extra.cuda, n) for n in ("gdc_wait", "gdc_launch_dependents"))
    assert launch.pdl(torch.empty(1)) is False  # a CPU tensor runs in the interpreter
    assert launch.pdl_options(torch.empty(1)) == ({"PDL": False}, {})


def test_graph_ladder() -> None:
    from portaserve.devices.cuda.graphs import batch_size_ladder

    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(6) == [1, 2, 4, 6]
    assert batch_size_ladder(256)[:9] == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_size_ladder(256)[-3:] == [192, 224, 256]


def test_graph_executor_pads_decode_and_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_if_interpreter_cannot_index()
    from portaserve.devices.cuda.graphs import graph_executor_for

    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    gen = torch.Generator().manual_seed(11)
    registry = get_registry()
    device, _ = registry.select_device("triton-interpret")
    model = tiny_llama(registry.kernel_table(device), torch.float32, gen)
    spec = KVCacheSpec(num_layers=2, num_blocks=16, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    graph_caches, eager_caches = device.allocate_kv_cache(spec), device.allocate_kv_cache(spec)
    executor = graph_executor_for(model, graph_caches, torch.device("cpu"), max_batch=4, eager_replay=True)
    assert executor is not None and executor.sizes == [1, 2, 4]

    def eager(batch):
        attn = batch.attention_metadata(torch.device("cpu"))
        hidden = model.forward(batch.token_ids, batch.positions, attn, eager_caches)
        return model.compute_logits(hidden[batch.logits_indices])

    tables = {"a": [3, 9], "b": [12], "c": [0, 5]}  # block 0 is a real block of request c
    prompts = {r: torch.randint(0, 50, (n,), generator=gen).tolist() for r, n in (("a", 18), ("b", 5), ("c", 20))}
    steps = [[(r, prompts[r], 0, tables[r], True) for r in "abc"]]  # a prefill step: op by op
    lens = {r: len(p) for r, p in prompts.items()}
    for step in range(3):  # decode steps: 3 requests replay the size-4 graph with one padded row
        tokens = {r: int(torch.randint(0, 50, (1,), generator=gen)) for r in "abc"}
        steps.append([(r, [tokens[r]], lens[r] + step, tables[r], True) for r in "abc"])
    steps.append([(r, [7], lens[r] + 3, tables[r], True) for r in "ab"])  # 2 requests: size 2
    for items in steps:
        batch = build_batch(items, 16)
        got, want = executor.execute(batch), eager(batch)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert executor.num_eager == 1 and executor.num_replays == 4
    for got_cache, want_cache in zip(graph_caches, eager_caches, strict=True):
        torch.testing.assert_close(got_cache, want_cache, atol=1e-5, rtol=1e-5)  # padding wrote nothing

    kept, replaced = executor.graphs[4], executor.graphs[2]
    executor.capture([2])  # a re-capture of one size (benchmarks, after a kernel setting changed)
    assert executor.graphs[4] is kept and executor.graphs[2] is not replaced
    batch = build_batch([(r, [5], lens[r] + 4, tables[r], True) for r in "bc"], 16)
    torch.testing.assert_close(executor.execute(batch), eager(batch), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"sizes=\[3\]"):
        executor.capture([3])

    monkeypatch.setenv("PORTASERVE_CUDA_GRAPHS", "0")
    assert graph_executor_for(model, graph_caches, torch.device("cpu"), eager_replay=True) is None


def test_graph_executor_warm_up_runs_a_mixed_step_in_free_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """After capture the executor runs one small mixed step op by op (decodes first, then a
    prompt chunk: the prefill and split paths compile at startup); it touches blocks 0..6 only
    and counts as no step."""
    skip_if_interpreter_cannot_index()
    from portaserve.devices.cuda import attention
    from portaserve.devices.cuda.graphs import graph_executor_for

    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    registry = get_registry()
    device, _ = registry.select_device("triton-interpret")
    model = tiny_llama(registry.kernel_table(device), torch.float32, torch.Generator().manual_seed(2))
    spec = KVCacheSpec(num_layers=2, num_blocks=12, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    caches = device.allocate_kv_cache(spec)
    executor = graph_executor_for(model, caches, torch.device("cpu"), max_batch=2, eager_replay=True)
    decoded: list[int] = []
    decode = attention._decode
    monkeypatch.setattr(attention, "_decode", lambda q, *a: decoded.append(q.shape[0]) or decode(q, *a))
    before = [c.clone() for c in caches]
    executor.warm_up_eager()
    assert decoded == [2] * spec.num_layers  # the two leading decode rows, in every layer
    assert executor.num_eager == 0 and executor.num_replays == 0
    for cache, old in zip(caches, before, strict=True):
        assert not torch.equal(cache[:, :7], old[:, :7])
        assert torch.equal(cache[:, 7:], old[:, 7:])


def test_memory_info_hands_the_allocators_cached_blocks_back_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory for the KV cache counts what torch's allocator holds but no tensor uses:
    ``empty_cache`` runs before ``mem_get_info`` reads the driver's numbers (faked here; the GPU
    test below checks it on a real GPU)."""
    cached = {"bytes": 5 << 30}
    calls: list[str] = []

    def empty_cache() -> None:
        calls.append("empty_cache")
        cached["bytes"] = 0

    def mem_get_info(index: int) -> tuple[int, int]:
        calls.append("mem_get_info")
        return (100 << 30) - cached["bytes"], 141 << 30

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    fake_gpu(monkeypatch, hip=None, cuda="13.0", name="NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    info = CudaDevice(0).memory_info()
    assert calls == ["empty_cache", "mem_get_info"]
    assert info.free_bytes == 100 << 30 and info.total_bytes == 141 << 30


# --- on a real GPU (ci/gpu_check.sh): capture/replay and greedy decoding vs cpu ----------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or getattr(torch.version, "hip", None) is not None
    or not CudaDevice.probe().is_available,
    reason="needs an NVIDIA GPU with triton")


def greedy(model, run_step, prompts: list[list[int]], num_new: int, block_size: int = 16) -> list[list[int]]:
    """Greedy decoding of ``prompts`` together: one prefill step, then ``num_new - 1`` decode
    steps; request i owns blocks [i * 8, i * 8 + 8) in reverse order (not contiguous)."""
    tables = {f"r{i}": list(range(i * 8 + 7, i * 8 - 1, -1)) for i in range(len(prompts))}
    out = {r: [] for r in tables}
    items = [(r, p, 0, tables[r], True) for r, p in zip(tables, prompts, strict=True)]
    lens = {r: len(p) for r, p in zip(tables, prompts, strict=True)}
    for _ in range(num_new):
        logits = run_step(build_batch(items, block_size))
        for (r, new, done, _, _), row in zip(items, logits.argmax(-1).tolist(), strict=True):
            out[r].append(row)
            lens[r] = done + len(new)
        items = [(r, [out[r][-1]], lens[r], tables[r], True) for r in tables]
    return [out[r] for r in tables]


def eager_runner(model, caches, device: torch.device):
    def run(batch):
        hidden = model.forward(batch.token_ids.to(device), batch.positions.to(device),
                               batch.attention_metadata(device), caches)
        return model.compute_logits(hidden[batch.logits_indices.to(device)]).float().cpu()

    return run


@needs_gpu
@pytest.mark.gpu
def test_gpu_memory_info_counts_freed_tensors_as_free() -> None:
    device = CudaDevice(0)
    before = device.memory_info().free_bytes
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    assert device.memory_info().free_bytes <= before - (1 << 30) + (64 << 20)
    del big  # (now cached by torch's allocator, not freed to the driver)
    assert device.memory_info().free_bytes >= before - (64 << 20)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_graph_replay_matches_eager(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    from portaserve.devices.cuda.graphs import graph_executor_for

    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    registry = get_registry()
    device, _ = registry.select_device("cuda")
    model = tiny_llama(registry.kernel_table(device), dtype, torch.Generator().manual_seed(3),
                       device.torch_device)
    spec = KVCacheSpec(2, 48, 16, 2, 8, dtype)
    graph_caches, eager_caches = device.allocate_kv_cache(spec), device.allocate_kv_cache(spec)
    executor = graph_executor_for(model, graph_caches, device.torch_device, max_batch=8)
    assert executor is not None and executor.sizes == [1, 2, 4, 8]
    prompts = [[1, 5, 9, 2, 7] * 3, [3, 3, 8], [4, 11, 2, 9, 30, 1, 6]]  # 3 requests: size-4 graph
    eager = eager_runner(model, eager_caches, device.torch_device)
    want = greedy(model, eager, prompts, 20)
    got = greedy(model, lambda b: executor.execute(b).cpu(), prompts, 20)
    assert executor.num_replays == 19 and executor.num_eager == 1
    if dtype == torch.float32:
        assert got == want
    else:  # bf16: kernels of different batch shapes may round differently; most tokens agree
        same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
        assert same >= 0.9 * sum(len(w) for w in want)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_pdl_changes_no_result(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels launched with programmatic dependent launch (each waits inside for the kernel
    before it; the GEMV prefetches its first weight tiles meanwhile) give the very same logits
    as plain launches, op by op and replayed from captured graphs (decode rows through the
    Triton GEMV in bf16)."""
    from portaserve.devices.cuda import gemv, launch
    from portaserve.devices.cuda.graphs import graph_executor_for

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    monkeypatch.setattr(gemv, "faster_than_cublas", lambda x, weight: True)  # always the GEMV
    registry = get_registry()
    device, _ = registry.select_device("cuda")
    model = tiny_llama(registry.kernel_table(device), dtype, torch.Generator().manual_seed(3),
                       device.torch_device)
    spec = KVCacheSpec(2, 48, 16, 2, 8, dtype)
    prompts = [[1, 5, 9, 2, 7] * 3, [3, 3, 8], [4, 11, 2, 9, 30, 1, 6]]

    def run(pdl: bool) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
        monkeypatch.setenv("PORTASERVE_CUDA_PDL", "1" if pdl else "0")
        monkeypatch.setattr(launch, "_PDL", {})
        assert launch.pdl(torch.empty(1, device=device.torch_device)) is pdl
        logits: list[torch.Tensor] = []

        def record(step):  # noqa: ANN001, ANN202
            return lambda b: logits.append(step(b)) or logits[-1]

        eager = greedy(model, record(eager_runner(model, device.allocate_kv_cache(spec), device.torch_device)),
                       prompts, 12)
        executor = graph_executor_for(model, device.allocate_kv_cache(spec), device.torch_device, max_batch=8)
        replayed = greedy(model, record(lambda b: executor.execute(b).cpu()), prompts, 12)
        assert executor.num_replays == 11
        return eager, replayed, torch.stack([t for t in logits if t.shape[0] == 3])

    results = {pdl: run(pdl) for pdl in (False, True)}
    assert results[True][0] == results[False][0] and results[True][1] == results[False][1]
    assert torch.equal(results[True][2], results[False][2])


def check_greedy_matches_cpu(device_name: str, num_new: int, eager_replay: bool,
                             cache_dtype: torch.dtype = torch.float32) -> None:
    """Greedy tokens of a random tiny Llama (float32) on ``device_name`` through its graph
    executor equal those of the cpu device, both over a ``cache_dtype`` KV cache."""
    from portaserve.devices.cuda.graphs import graph_executor_for

    registry = get_registry()
    device, _ = registry.select_device(device_name)
    cpu, _ = registry.select_device("cpu")
    spec = KVCacheSpec(2, 48, 16, 2, 8, cache_dtype)
    cpu_model = tiny_llama(registry.kernel_table(cpu), torch.float32, torch.Generator().manual_seed(5))
    model = tiny_llama(registry.kernel_table(device), torch.float32, torch.Generator().manual_seed(5),
                       device.torch_device)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [40, 2], [7, 7, 7, 1]]
    want = greedy(cpu_model, eager_runner(cpu_model, cpu.allocate_kv_cache(spec), torch.device("cpu")),
                  prompts, num_new)
    executor = graph_executor_for(model, device.allocate_kv_cache(spec), device.torch_device,
                                  max_batch=4, eager_replay=eager_replay)
    assert executor is not None
    got = greedy(model, lambda b: executor.execute(b).cpu(), prompts, num_new)
    assert executor.num_replays == num_new - 1
    assert got == want


def test_triton_interpret_greedy_matches_cpu_device(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_if_interpreter_cannot_index()
    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    check_greedy_matches_cpu("triton-interpret", num_new=5, eager_replay=True)


def test_triton_interpret_greedy_over_fp8_cache_matches_cpu_device(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_if_interpreter_cannot_index()
    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    check_greedy_matches_cpu("triton-interpret", num_new=5, eager_replay=True,
                             cache_dtype=torch.float8_e4m3fn)


@needs_gpu
@pytest.mark.gpu
def test_gpu_greedy_matches_cpu_device_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole model on cuda (Triton kernels, cuBLAS fp32, captured graphs) vs the cpu device.
    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    check_greedy_matches_cpu("cuda", num_new=24, eager_replay=False)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_gpu_greedy_over_fp8_cache_matches_cpu_device(cache_dtype: torch.dtype,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # fp8 K/V written and read by the Triton kernels inside captured graphs, vs the cpu device's
    # torch path over the same fp8 format (skips e4m3 on GPUs before compute capability 8.9).
    if cache_dtype not in CudaDevice(0).capabilities().kv_cache_dtypes:
        pytest.skip(f"this GPU does not read {cache_dtype} in Triton")
    monkeypatch.delenv("PORTASERVE_CUDA_GRAPHS", raising=False)
    check_greedy_matches_cpu("cuda", num_new=24, eager_replay=False, cache_dtype=cache_dtype)


@pytest.mark.parametrize("fmt", ["Q4_1", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_linear_unpacks_then_gemm(fmt: str, dtype: torch.dtype) -> None:
    registry = get_registry()
    device, _ = registry.select_device("triton-interpret")
    table = registry.kernel_table(device)
    assert table.quant_sources[fmt] == "native"
    gen = torch.Generator().manual_seed(2)
    weight = registry.quant_methods[fmt].quantize(torch.randn(48, 256, generator=gen) * 256**-0.5)
    x = torch.randn(5, 256, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    got = table.quant_linear(x, weight, bias)
    want = ref.quant_linear(x, weight, bias)
    assert got.dtype == dtype and got.shape == (5, 48)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("major,minor,has_e4m3", [(9, 0, True), (8, 9, True), (8, 0, False)])
def test_fp8_kv_cache_dtypes_follow_the_gpu(monkeypatch: pytest.MonkeyPatch, major: int, minor: int,
                                            has_e4m3: bool) -> None:
    # Triton converts e4m3 (fp8e4nv) on NVIDIA from compute capability 8.9; e5m2 everywhere.
    fake_gpu(monkeypatch, hip=None, cuda="13.0", name="NVIDIA GPU")
    props = SimpleNamespace(major=major, minor=minor)
    cuda_fp8 = CudaDevice(0).fp8_kv_cache_dtypes(props)
    assert (torch.float8_e4m3fn in cuda_fp8) == has_e4m3 and torch.float8_e5m2 in cuda_fp8
    assert RocmDevice(0).fp8_kv_cache_dtypes(props) == (torch.float8_e4m3fn, torch.float8_e5m2)
    caps = CudaDevice(0).capabilities()  # fake_gpu's H200-like props: cc 9.0
    assert caps.kv_cache_dtypes == (torch.float8_e4m3fn, torch.float8_e5m2)
