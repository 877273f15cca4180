"""The fp8 KV cache option end to end on the cpu device (``kv_cache_dtype="fp8"``).

What is checked: the option is validated and refused on a device that does not declare it; the
cache is allocated in fp8 with twice the blocks of a 16-bit cache in the same byte budget; the
engine's greedy tokens on SmolLM2 equal those of the op-by-op reference path over the same fp8
cache, and no block leaks; fp8-cache logits stay within a stated distance of the float32
cache's.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import Any

import pytest
import torch

from portaserve import LLM, SamplingParams, hookimpl
from portaserve.core.batch import build_batch
from portaserve.core.config import EngineConfig
from portaserve.devices import cpu_native, reference
from portaserve.devices.cpu import CPUDevice
from portaserve.errors import ConfigError
from portaserve.plugins.device import KVCacheSpec
from portaserve.plugins.manager import get_registry

FP8 = torch.float8_e4m3fn
#: KV budget of the test devices below: a fixed byte count, so sizing is exact arithmetic.
BUDGET_BYTES = 1 << 20
TINY = "random:tiny"  # 2 layers, 2 KV heads of 16 dims: 4096 bytes per 16-token fp16 block


class FixedBudgetCPU(CPUDevice):
    """The cpu device with a 1 MiB KV cache budget."""

    name = "cpu-1mib-kv"
    priority = -50

    def capabilities(self) -> Any:
        return replace(super().capabilities(), default_kv_cache_bytes=BUDGET_BYTES)


class NoFp8CPU(CPUDevice):
    """The cpu device declaring no KV cache dtype besides its compute dtypes."""

    name = "cpu-no-fp8"
    priority = -50

    def capabilities(self) -> Any:
        return replace(super().capabilities(), kv_cache_dtypes=())


class _TestDevices:
    PORTASERVE_PLUGIN_API = "1.0"

    @hookimpl
    def portaserve_register_devices(self, register: Any) -> None:
        register(FixedBudgetCPU)
        register(NoFp8CPU)


@pytest.fixture
def test_devices() -> Any:
    with get_registry().temporary_plugin(_TestDevices(), "fp8-kv-test-devices"):
        yield


# -- the option and its errors ------------------------------------------------------------


def test_bad_kv_cache_dtype_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, fp8") as e:
        EngineConfig(kv_cache_dtype="int3")
    assert e.value.field == "kv_cache_dtype"
    with pytest.raises(ConfigError, match="'fp4'") as e:  # refused before any model loads
        LLM("no-such-model", kv_cache_dtype="fp4")
    assert e.value.field == "kv_cache_dtype"


def test_device_without_fp8_cache_refuses_it(test_devices: Any) -> None:
    with pytest.raises(ConfigError, match=r"'fp8' \(float8_e4m3fn\) is not supported by device "
                                          r"cpu-no-fp8:0") as e:
        LLM(TINY, device="cpu-no-fp8", kv_cache_dtype="fp8")
    assert e.value.field == "kv_cache_dtype"
    assert LLM(TINY, device="cpu-no-fp8").llm_engine.kv_cache_dtype == torch.float32  # auto


def test_cli_flags_reach_the_engine_config() -> None:
    from portaserve.bench.throughput import add_engine_args as add_bench_args
    from portaserve.serve.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["m", "--kv-cache-dtype", "fp8_e5m2"]))
    assert config.kv_cache_dtype == "fp8_e5m2"
    assert engine_config_from_args(parser.parse_args(["m"])).kv_cache_dtype == "auto"
    bench = argparse.ArgumentParser()
    add_bench_args(bench)
    assert bench.parse_args(["--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"


# -- sizing ---------------------------------------------------------------------------------


def test_fp8_cache_holds_twice_the_blocks_of_a_float16_cache(test_devices: Any) -> None:
    half = LLM(TINY, device="cpu-1mib-kv", dtype="float16").llm_engine
    fp8 = LLM(TINY, device="cpu-1mib-kv", dtype="float16", kv_cache_dtype="fp8").llm_engine
    assert half.kv_spec.dtype == torch.float16 and fp8.kv_spec.dtype == FP8
    assert all(c.dtype == FP8 for c in fp8.kv_caches)
    # Byte accounting: a block is K and V of 16 tokens in every layer, 2 x 2 x 16 x 2 x 16
    # elements, 2 bytes each in float16 and 1 in fp8; blocks = budget // bytes per block.
    mc = half.model_config
    elements = 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim
    assert half.kv_spec.bytes_per_block == 2 * elements == 2 * fp8.kv_spec.bytes_per_block
    assert half.kv_spec.num_blocks == BUDGET_BYTES // (2 * elements) == 256
    assert fp8.kv_spec.num_blocks == 2 * half.kv_spec.num_blocks
    assert sum(c.nbytes for c in fp8.kv_caches) == sum(c.nbytes for c in half.kv_caches) == BUDGET_BYTES
    assert fp8.kv_capacity_tokens == 2 * half.kv_capacity_tokens


def test_fp8_cache_in_float16_compute_runs_and_frees_every_block(test_devices: Any) -> None:
    llm = LLM(TINY, device="cpu-1mib-kv", dtype="float16", kv_cache_dtype="fp8",
              max_num_batched_tokens=64)
    rng = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 512, (int(n),), generator=rng).tolist() for n in (5, 40, 17, 90)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [9] * 4
    stats = llm.llm_engine.stats()
    assert stats.kv_usage == 0.0 and stats.num_running == stats.num_waiting == 0


# -- SmolLM2: the engine against the reference path, and the fp8 error -----------------------

MAX_NEW = 24


@pytest.fixture(scope="module")
def chat_prompt_ids(smollm_loaded: Any, chat_messages: list[Any]) -> list[list[int]]:
    tok = smollm_loaded.tokenizer
    return [tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
            for m in chat_messages]


@pytest.mark.slow
def test_engine_with_fp8_cache_matches_the_reference_path(
    smollm_path: Any, smollm_model: Any, smollm_loaded: Any, chat_prompt_ids: list[list[int]],
    greedy: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="portaserve"):
        llm = LLM(str(smollm_path), device="cpu", kv_cache_dtype="fp8", max_model_len=1024)
    engine = llm.llm_engine
    assert engine.kv_cache_dtype == FP8 and all(c.dtype == FP8 for c in engine.kv_caches)
    assert "float8_e4m3fn" in caplog.text  # the engine logs the cache dtype
    # the native decode step reads float32 caches only: it declines, and says why
    assert engine.runner.executor is None
    if cpu_native.library() is not None:
        assert "native decode step off (the KV cache is torch.float8_e4m3fn" in caplog.text

    eos = smollm_loaded.config.eos_token_ids
    outs = llm.generate(chat_prompt_ids, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    ours = [o.outputs[0].token_ids for o in outs]
    expected = greedy(smollm_model, chat_prompt_ids, MAX_NEW, eos, kv_cache_dtype=FP8)
    assert all(len(t) >= 16 for t in expected)
    assert ours == expected
    stats = engine.stats()
    assert stats.kv_usage == 0.0 and stats.num_running == stats.num_waiting == 0
    assert engine.scheduler.block_pool.num_free_blocks == engine.kv_spec.num_blocks


def _teacher_forced_logits(model: Any, tokens: list[int], num_prompt: int,
                           cache_dtype: torch.dtype) -> torch.Tensor:
    """Logits [steps + 1, vocab]: the prompt's prefill, then one decode step per later token of
    ``tokens`` (the same inputs whatever the cache holds)."""
    cfg = model.config
    spec = KVCacheSpec(cfg.num_layers, -(-len(tokens) // 16), 16, cfg.num_kv_heads, cfg.head_dim,
                       cache_dtype)
    caches = reference.allocate_kv_cache(spec, model.device, "blocks_nhd")
    table = list(range(spec.num_blocks))
    rows, done, chunk = [], 0, tokens[:num_prompt]
    while done < len(tokens):
        batch = build_batch([("r", chunk, done, table, True)], 16)
        hidden = model.forward(batch.token_ids, batch.positions, batch.attention_metadata(model.device),
                               caches)
        rows.append(model.compute_logits(hidden[batch.logits_indices])[0])
        done += len(chunk)
        chunk = tokens[done : done + 1]
    return torch.stack(rows)


@pytest.mark.slow
def test_fp8_cache_logits_stay_close_to_the_float32_cache(
    smollm_model: Any, chat_prompt_ids: list[list[int]], greedy: Any,
) -> None:
    """The price of fp8 K/V (e4m3: 3 mantissa bits, each value within 2^-4 of itself) on the
    logits of a prefill and 8 decode steps, teacher-forced with the float32 cache's tokens.

    Measured on the three chat prompts (SmolLM2's K/V stay below 25, so nothing saturates and
    all the error is rounding): relative (L2) error of a step's logits at most 0.09, mean 0.03
    to 0.05; the float32 run's top token moved by at most 0.25 nats of log-probability; the top
    token agreed on all 9 steps (e5m2, 2 mantissa bits: up to 0.36, 0.49 nats, 7 of 9). The
    bounds below leave 1.6x or more on e4m3; a near-tie may flip one top token.
    """
    prompt = chat_prompt_ids[0]
    continuation = greedy(smollm_model, [prompt], 8, ())[0]
    tokens = prompt + continuation
    wide = _teacher_forced_logits(smollm_model, tokens, len(prompt), torch.float32)
    narrow = _teacher_forced_logits(smollm_model, tokens, len(prompt), FP8)
    assert wide.shape == narrow.shape == (9, smollm_model.config.vocab_size)
    rel = ((narrow - wide).norm(dim=-1) / wide.norm(dim=-1)).max().item()
    top = wide.argmax(-1)
    logp_gap = (wide.log_softmax(-1) - narrow.log_softmax(-1)).gather(-1, top[:, None]).abs().max().item()
    agree = int((narrow.argmax(-1) == top).sum())
    assert 0.0 < rel < 0.15, rel  # fp8 changes the logits, boundedly
    assert logp_gap < 0.4, logp_gap
    assert agree >= 8, agree
