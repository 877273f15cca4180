"""The chained int4 GEMVs of ``quant.chain_triton`` (an experiment toward a persistent decode
layer) against the reference dequant, on fresh random weights and inputs: a Llama-like chain
(o, gate|up with silu, down, the next q|k|v) in small shapes, each stage count 1-4, row counts
that do not fill the last tile, group sizes 32 and 128, and the input checks. In the interpreter
(no GPU) a launch a stage stands in for the barrier, and bf16 (the packed bf16x2 path) runs its
float32 stand-in for the assembly, exact but for the interpreter's bf16 stores; with ``PORTASERVE_TEST_DEVICE=cuda`` one
persistent launch runs the chain with its grid barrier, replayed three times (the counter goes
back to zero) and in a CUDA graph.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from triton_device import DEVICE, RTOL, rel_err, skip_module_without_device

pytest.importorskip("triton")
skip_module_without_device()

from portaserve.errors import ConfigError  # noqa: E402
from portaserve.quant import chain_triton, registry  # noqa: E402
from portaserve.quant.int_formats import Int4Method  # noqa: E402

SMALL = chain_triton.ChainConfig(block_n=16, block_k=128, num_stages=2, programs_per_sm=2, prefetch_lines=2)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def int4(n: int, k: int, gen: torch.Generator, group: int = 128):
    w = torch.randn(n, k, generator=gen) * k**-0.5 + 0.01  # (an offset: the zeros matter)
    return Int4Method().quantize(w, group_size=group).to(DEVICE)


def layer(gen: torch.Generator, hidden: int = 256, inter: int = 384, qkv: int = 200, group: int = 128):
    """o [hidden, hidden], gate|up [2 inter, hidden] + silu, down [hidden, inter], q|k|v
    [qkv, hidden] (200 rows: the last 16-row tile is partial)."""
    return [(int4(hidden, hidden, gen, group), False), (int4(2 * inter, hidden, gen, group), True),
            (int4(hidden, inter, gen, group), False), (int4(qkv, hidden, gen, group), False)]


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chain_equals_the_reference(num_stages: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    stages = layer(gen)[:num_stages]
    x = torch.randn(256, generator=gen).to(dtype).to(DEVICE)
    chain = chain_triton.Chain(stages, dtype, SMALL)
    want = chain_triton.reference(x, stages)[0]
    for _ in range(3 if DEVICE.type == "cuda" else 1):  # (the counter is reset by each launch)
        got = chain.run(x)
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_err(got, want) <= RTOL[dtype] * num_stages
    if DEVICE.type == "cuda":  # the barrier computes what the launch boundary does, bit for bit
        staged = chain.run(x, one_launch=False).clone()
        assert torch.equal(chain.run(x, one_launch=True), staged)
    # each stage's buffer holds that stage's output
    for i in range(num_stages):
        assert rel_err(chain.outs[i], chain_triton.reference(x, stages[: i + 1])[0]) <= RTOL[dtype] * (i + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chain_as_a_layer_with_residuals_and_norms(dtype: torch.dtype, gen: torch.Generator) -> None:
    """o, then the residual and the post-attention norm, gate|up (silu), down, the residual and
    the next layer's norm, q|k|v: the engine's ``linear_rms_norm`` between the GEMVs."""
    stages = layer(gen)
    norms = {0: 1 + 0.1 * torch.randn(256, generator=gen), 2: 1 + 0.1 * torch.randn(256, generator=gen)}
    x = torch.randn(256, generator=gen).to(dtype).to(DEVICE)
    residual = (4 * torch.randn(256, generator=gen)).to(dtype).to(DEVICE)  # (the stream dominates)
    chain = chain_triton.Chain(stages, dtype, SMALL, norms=norms, eps=1e-5)
    want, streams = chain_triton.reference(x, stages, {i: w.to(DEVICE) for i, w in norms.items()}, residual)
    got = chain.run(x, residual=residual)
    # (the chain scales by 1/rms after the dot, the reference before rounding the normed input)
    assert rel_err(got, want) <= RTOL[dtype] * len(stages)
    for i in norms:
        assert rel_err(chain.residuals[i], streams[i]) <= RTOL[dtype] * (i + 1)
    no_norms = chain_triton.reference(x, stages)[0]  # (the norms and residuals changed the answer)
    assert rel_err(no_norms, want) > 0.1
    if DEVICE.type == "cuda":
        staged = chain.run(x, one_launch=False, residual=residual).clone()
        assert torch.equal(chain.run(x, one_launch=True, residual=residual), staged)


def test_chain_group_32_and_a_fresh_input_changes_the_answer(gen: torch.Generator) -> None:
    stages = layer(gen, group=32)[:2]
    chain = chain_triton.Chain(stages, torch.float32, SMALL)
    x1 = torch.randn(256, generator=gen).to(DEVICE)
    x2 = torch.randn(256, generator=gen).to(DEVICE)
    got1 = chain.run(x1).clone()
    got2 = chain.run(x2).clone()
    assert rel_err(got1, chain_triton.reference(x1, stages)[0]) <= 1e-5
    assert rel_err(got2, chain_triton.reference(x2, stages)[0]) <= 1e-5
    assert not torch.equal(got1, got2)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_chain_replays_in_a_cuda_graph(gen: torch.Generator) -> None:
    stages = layer(gen)
    chain = chain_triton.Chain(stages, torch.float16, SMALL)
    x = torch.randn(256, generator=gen).half().to(DEVICE)
    chain.run(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain.run(x)
    for _ in range(2):
        x.copy_(torch.randn(256, generator=gen).half().to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(chain.outs[-1], chain_triton.reference(x, stages)[0]) <= 16 * RTOL[torch.float16]
    assert int(chain.counter.item()) == 0


def test_chain_refuses_what_it_cannot_run(gen: torch.Generator) -> None:
    o, gate_up, down, qkv = layer(gen)
    with pytest.raises(ConfigError, match="stage 1 takes K=384 but stage 0 gives 256"):
        chain_triton.Chain([o, down], torch.float32, SMALL)
    int8 = registry.quantize(torch.randn(256, 256, generator=gen), "int8").to(DEVICE)
    with pytest.raises(ConfigError, match="stage 0 is int8; only int4 chains"):
        chain_triton.Chain([(int8, False)], torch.float32, SMALL)
    with pytest.raises(ConfigError, match="activations in torch.float64"):
        chain_triton.Chain([o], torch.float64, SMALL)
    with pytest.raises(ConfigError, match="5 stages"):
        chain_triton.Chain([o, o, o, o, o], torch.float32, SMALL)
    with pytest.raises(ConfigError, match="block_k"):
        chain_triton.Chain([o], torch.float32, chain_triton.ChainConfig(block_k=96))
    with pytest.raises(ConfigError, match="group size 32"):
        chain_triton.Chain([o, (int4(256, 256, gen, group=32), False)], torch.float32, SMALL)
    chain = chain_triton.Chain([o], torch.float32, SMALL)
    with pytest.raises(ConfigError, match="x has"):
        chain.run(torch.randn(128).to(DEVICE))
    with pytest.raises(ConfigError, match="no norms"):
        chain.run(torch.randn(256).to(DEVICE), residual=torch.randn(256).to(DEVICE))
    with pytest.raises(ConfigError, match="a norm after stage 1; stages 0 to 0"):
        chain_triton.Chain([o, gate_up], torch.float32, SMALL, norms={1: torch.ones(384)})
    with pytest.raises(ConfigError, match=r"the norm after stage 0 has shape \(128,\); its output is \[256\]"):
        chain_triton.Chain([o, gate_up], torch.float32, SMALL, norms={0: torch.ones(128)})
    with pytest.raises(ConfigError, match="eps=0.0"):
        chain_triton.Chain([o, gate_up], torch.float32, SMALL, norms={0: torch.ones(256)}, eps=0.0)
    normed = chain_triton.Chain([o, gate_up], torch.float32, SMALL, norms={0: torch.ones(256)})
    with pytest.raises(ConfigError, match="run takes the residual stream"):
        normed.run(torch.randn(256).to(DEVICE))
    with pytest.raises(ConfigError, match=r"residual has \(128,\)"):
        normed.run(torch.randn(256).to(DEVICE), residual=torch.randn(128).to(DEVICE))


def test_chain_one_launch_needs_a_gpu(gen: torch.Generator) -> None:
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU the persistent launch runs (test_chain_equals_the_reference)")
    chain = chain_triton.Chain(layer(gen)[:1], torch.float32, SMALL)
    with pytest.raises(ConfigError, match="one persistent launch needs a GPU"):
        chain.run(torch.randn(256), one_launch=True)


def test_chain_takes_an_unaligned_bf16_row(gen: torch.Generator) -> None:
    """The packed path reads x 16 bytes at a time: a row starting mid-word is copied first."""
    stages = layer(gen)[:1]
    wide = torch.randn(257, generator=gen).to(torch.bfloat16).to(DEVICE)
    x = wide[1:]
    assert x.data_ptr() % 16
    got = chain_triton.Chain(stages, torch.bfloat16, SMALL).run(x)
    assert rel_err(got, chain_triton.reference(x, stages)[0]) <= RTOL[torch.bfloat16]
