"""The ``openvino`` device: per-op kernels and the whole-model paged graph against the reference.

Op kernels are compared with ``portaserve.devices.reference`` on fresh random inputs; the graph
executor runs multi-step schedules (mixed prefill, cached prefix, chunked prefill, decode, non
contiguous block ids) built with ``build_batch`` and is compared, logits row by row, with a
reference forward of the same random-weight Llama over the reference paged-attention op.
"""

from __future__ import annotations

import math

import pytest
import torch

from portaserve.core.batch import build_batch
from portaserve.core.config import ModelConfig
from portaserve.devices import reference as R
from portaserve.plugins.device import KVCacheSpec

ov = pytest.importorskip("openvino")

from portaserve.devices.openvino import CPU_BLOCK_SIZE, OpenVINODevice  # noqa: E402

BS = CPU_BLOCK_SIZE


@pytest.fixture(scope="module")
def device() -> OpenVINODevice:
    return OpenVINODevice(precision="f32", num_threads=2)


@pytest.fixture(scope="module")
def kernels(device: OpenVINODevice) -> dict:
    return device.kernels()


def test_probe_reports_version_and_cpu() -> None:
    avail = OpenVINODevice.probe()
    assert avail.is_available, avail.reason
    assert ov.__version__.split("-")[0] in avail.reason and "CPU" in avail.reason


def test_probe_without_openvino_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # import now fails
    avail = OpenVINODevice.probe()
    assert not avail.is_available and "openvino is not installed" in avail.reason


def test_registered_as_a_builtin_device() -> None:
    from portaserve.plugins.manager import get_registry

    assert get_registry().devices["openvino"].cls is OpenVINODevice


def test_capabilities_state_plugin_facts(device: OpenVINODevice) -> None:
    caps = device.capabilities()
    assert caps.kv_block_sizes == (32,) and caps.kv_layout == "blocks_hnd"
    assert caps.extra["precision"] == "f32"
    assert caps.extra["cpu_default_kv_cache_precision"] == "u8"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(kernels: dict, dtype: torch.dtype, tol: float, with_bias: bool) -> None:
    x = torch.randn(7, 48).to(dtype)
    w = torch.randn(40, 48).to(dtype)
    b = torch.randn(40).to(dtype) if with_bias else None
    got = kernels["linear"](x, w, b)
    want = R.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (7, 40)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_with_and_without_residual(kernels: dict, dtype: torch.dtype, tol: float) -> None:
    x, res, w = torch.randn(5, 64).to(dtype), torch.randn(5, 64).to(dtype), torch.randn(64).to(dtype)
    torch.testing.assert_close(kernels["rms_norm"](x, w, 1e-5).float(),
                               R.rms_norm(x, w, 1e-5).float(), rtol=tol, atol=tol)
    y, summed = kernels["rms_norm"](x, w, 1e-6, res)
    y_ref, summed_ref = R.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(summed.float(), summed_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * 4)


def test_silu_and_mul_and_rotary(kernels: dict) -> None:
    x = torch.randn(9, 2 * 24)
    torch.testing.assert_close(kernels["silu_and_mul"](x), R.silu_and_mul(x), rtol=1e-5, atol=1e-5)
    positions = torch.tensor([0, 5, 3, 17, 2], dtype=torch.int64)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    cfg = ModelConfig("llama", 10, 64, 32, 1, 4, 2, 16, max_position_embeddings=32)
    table = rope_cos_sin(cfg)
    got_q, got_k = kernels["rotary"](positions, q, k, table)
    want_q, want_k = R.rotary(positions, q, k, table)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


def test_op_models_are_cached_per_shape(device: OpenVINODevice, kernels: dict) -> None:
    cache = device._kernels.cache
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    kernels["linear"](x, w)
    before = len(cache)
    kernels["linear"](torch.randn(11, 16), torch.randn(8, 16))  # new token count: same model
    assert len(cache) == before
    kernels["linear"](torch.randn(3, 24), torch.randn(8, 24))  # new K: a new model
    assert len(cache) == before + 1


# ---- the whole-model graph ----------------------------------------------------------------


def _random_llama(seed: int = 0, **over) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    fields = dict(architecture="llama", vocab_size=97, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    fields.update(over)
    cfg = ModelConfig(**fields)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h, scale=1.0),
         "model.norm.weight": 1 + rnd(h)}
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = rnd(cfg.vocab_size, h)
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = 1 + rnd(h)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(h)
        w[p + "self_attn.q_proj.weight"] = rnd(cfg.num_heads * d, h)
        w[p + "self_attn.k_proj.weight"] = rnd(cfg.num_kv_heads * d, h)
        w[p + "self_attn.v_proj.weight"] = rnd(cfg.num_kv_heads * d, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, cfg.num_heads * d)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
        if cfg.attention_bias:
            for n in ("q", "k", "v"):
                w[p + f"self_attn.{n}_proj.bias"] = rnd(w[p + f"self_attn.{n}_proj.weight"].shape[0])
        if cfg.qk_norm:
            w[p + "self_attn.q_norm.weight"] = 1 + rnd(d)
            w[p + "self_attn.k_norm.weight"] = 1 + rnd(d)
    return cfg, w


class _Model:
    """The minimum ``Device.compile`` reads: ``config`` and HF-named ``weights``."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.config = cfg
        self.weights = weights
        self.cos_sin_cache = rope_cos_sin(cfg)


def rope_cos_sin(cfg: ModelConfig) -> torch.Tensor:
    """cat(cos, sin) of each position's angles [P, D] (no scaling)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def _reference_forward(model: _Model, batch, kv_caches) -> torch.Tensor:
    """The model over the reference ops and the reference paged cache (blocks_hnd)."""
    cfg, w = model.config, model.weights
    d = cfg.head_dim
    attn = batch.attention_metadata(torch.device("cpu"))
    x = R.embedding(batch.token_ids, w["model.embed_tokens.weight"])
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        h = R.rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = R.linear(h, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
        k = R.linear(h, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
        v = R.linear(h, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
        q, k, v = q.view(-1, cfg.num_heads, d), k.view(-1, cfg.num_kv_heads, d), v.view(-1, cfg.num_kv_heads, d)
        if cfg.qk_norm:
            q = R.rms_norm(q.reshape(-1, d), w[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps).view_as(q)
            k = R.rms_norm(k.reshape(-1, d), w[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps).view_as(k)
        q, k = R.rotary(batch.positions, q, k, model.cos_sin_cache)
        R.write_kv(k, v, kv_caches[layer], batch.slot_mapping, kv_layout="blocks_hnd")
        o = R.paged_attention(q, kv_caches[layer], attn, 1 / math.sqrt(d), kv_layout="blocks_hnd")
        x = x + R.linear(o.reshape(-1, cfg.num_heads * d), w[p + "self_attn.o_proj.weight"])
        h = R.rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate_up = torch.cat([R.linear(h, w[p + "mlp.gate_proj.weight"]),
                             R.linear(h, w[p + "mlp.up_proj.weight"])], dim=-1)
        x = x + R.linear(R.silu_and_mul(gate_up), w[p + "mlp.down_proj.weight"])
    x = R.rms_norm(x[batch.logits_indices], w["model.norm.weight"], cfg.rms_norm_eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return R.linear(x, head).float()


def _spec(cfg: ModelConfig, num_blocks: int) -> KVCacheSpec:
    return KVCacheSpec(cfg.num_layers, num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, torch.float32)


# Three steps over three requests: a: 40-token prompt, then decode; b: 5-token prompt, then a
# 30-token chunk on top of its cached 5, then decode; c: joins at step 2 with a 70-token prompt
# in two chunks. Block ids are scattered on purpose.
_BLOCKS = {"a": [3, 7], "b": [1, 9], "c": [12, 0, 5]}


def _schedule(rng: torch.Generator, vocab: int) -> list[list[tuple]]:
    def toks(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=rng).tolist()

    return [
        [("a", toks(40), 0, _BLOCKS["a"], True), ("b", toks(5), 0, _BLOCKS["b"], True)],
        [("a", toks(1), 40, _BLOCKS["a"], True), ("b", toks(30), 5, _BLOCKS["b"], True),
         ("c", toks(50), 0, _BLOCKS["c"], False)],
        [("c", toks(20), 50, _BLOCKS["c"], True), ("b", toks(1), 35, _BLOCKS["b"], True),
         ("a", toks(1), 41, _BLOCKS["a"], True)],
    ]


@pytest.mark.parametrize("variant", [
    {},
    {"attention_bias": True, "qk_norm": True, "tie_word_embeddings": True},
])
def test_graph_matches_reference_over_a_schedule(device: OpenVINODevice, variant: dict) -> None:
    cfg, weights = _random_llama(**variant)
    model = _Model(cfg, weights)
    ov_caches = device.allocate_kv_cache(_spec(cfg, 16))
    ref_caches = R.allocate_kv_cache(_spec(cfg, 16), torch.device("cpu"), "blocks_hnd")
    executor = device.compile(model, ov_caches)
    rng = torch.Generator().manual_seed(1)
    for step in _schedule(rng, cfg.vocab_size):
        batch = build_batch(step, BS)
        got = executor.execute(batch)
        want = _reference_forward(model, batch, ref_caches)
        assert got.shape == (len(batch.logits_indices), cfg.vocab_size) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the graph wrote its keys and values into the core's cache, in the reference's layout
    for layer in range(cfg.num_layers):
        torch.testing.assert_close(ov_caches[layer], ref_caches[layer], rtol=1e-5, atol=1e-5)


def _run_schedule(device: OpenVINODevice, model: _Model, ref_model: _Model, seed: int):
    """(graph logits, reference logits) of each step of ``_schedule``."""
    cfg = model.config
    caches = device.allocate_kv_cache(_spec(cfg, 16))
    ref_caches = R.allocate_kv_cache(_spec(cfg, 16), torch.device("cpu"), "blocks_hnd")
    executor = device.compile(model, caches)
    rng = torch.Generator().manual_seed(seed)
    for step in _schedule(rng, cfg.vocab_size):
        batch = build_batch(step, BS)
        yield executor, executor.execute(batch), _reference_forward(ref_model, batch, ref_caches)


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_graph_compressed_weights_match_their_dequantized_reference(weight_format: str) -> None:
    """int8/int4 weights: the graph equals the reference run on the same dequantized codes."""
    from portaserve.devices.openvino.graph import quantize_weight

    device = OpenVINODevice(precision="f32", weight_format=weight_format, num_threads=2)
    cfg, weights = _random_llama(seed=3)
    dequantized = dict(weights)
    for name, w in weights.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            codes, zero, scale = quantize_weight(w.numpy(), weight_format, 32)
            deq = (codes.astype("float32") - zero) * scale
            dequantized[name] = torch.from_numpy(deq.reshape(w.shape))
            assert 0 < (dequantized[name] - w).abs().max() < (w.abs().max() / (10 if weight_format == "int8" else 2))
    for _, got, want in _run_schedule(device, _Model(cfg, weights), _Model(cfg, dequantized), 2):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_graph_plugin_default_precision_stays_close() -> None:
    """precision="auto": the plugin's u8 KV cache; close to the f32 reference, not exact."""
    device = OpenVINODevice(precision="auto", num_threads=2)
    cfg, weights = _random_llama(seed=3)
    model = _Model(cfg, weights)
    steps = list(_run_schedule(device, model, model, 2))
    for _, got, want in steps:
        err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        assert 0 < err < 0.05, f"relative logit error {err:.4f}"
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75
    executor = steps[-1][0]
    assert executor.cache_layout["key_cache"] == ([16, cfg.num_kv_heads, BS + 8, cfg.head_dim], "u8")
    assert executor.cache_layout["value_cache"] == ([16, cfg.num_kv_heads, BS, cfg.head_dim + 8], "u8")


# ---- the engine on the real model: openvino against cpu -------------------------------------
#
# The cpu device is the baseline. Its greedy outputs for every prompt of these tests are made
# in one batched run (the cpu device dequantizes the GGUF weights at every step, so its steps
# are the expensive part); each openvino test then runs its own scenario and compares.

GREEDY_TOKENS = 10


@pytest.fixture(scope="module")
def smollm() -> str:
    from portaserve.core.loaders.fetch import ModelFetchError, resolve_model

    try:
        return str(resolve_model("smollm2-135m"))
    except ModelFetchError as e:
        pytest.skip(f"the test model could not be fetched: {e}")


@pytest.fixture(scope="module")
def ov_llm(smollm: str):
    from portaserve.core.llm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PORTASERVE_OPENVINO_PRECISION", "f32")
        mp.setenv("PORTASERVE_OPENVINO_WEIGHTS", "f32")
        # packed GGUF blocks in the core model: the f32 graph dequantizes them at compile time,
        # the "gguf" graph hands them to OpenVINO as they are
        return LLM(smollm, device="openvino", dtype="float32", num_kv_blocks=64,
                   keep_packed_weights=True)


def _random_ids(n: int, seed: int, lo: int, hi: int, prefix: list[int] | None = None) -> list:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    # ordinary-text ids of SmolLM2's 49152-token vocabulary (the special tokens come first)
    return [(prefix or []) + torch.randint(100, 49152, (k,), generator=g).tolist() for k in lens]


SCENARIOS = {
    "mixed": ["The capital of France is", "def fibonacci(n):", *_random_ids(4, 1, 3, 90)],
    "prefix": _random_ids(3, 3, 5, 20, prefix=_random_ids(1, 2, 100, 100)[0]),
    "preempt": _random_ids(6, 4, 20, 40),
}


def _greedy(llm, prompts, max_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    from portaserve.core.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def cpu_expected(smollm: str) -> dict[str, list[list[int]]]:
    from portaserve.core.llm import LLM

    cpu = LLM(smollm, device="cpu", dtype="float32", num_kv_blocks=128)
    prompts = [p for ps in SCENARIOS.values() for p in ps]
    outs = iter(_greedy(cpu, prompts))
    return {name: [next(outs) for _ in ps] for name, ps in SCENARIOS.items()}


def test_engine_mixed_length_batch_matches_cpu(ov_llm, cpu_expected: dict) -> None:
    assert ov_llm.llm_engine.runner.executor is not None  # the graph runs, not the op table
    got = _greedy(ov_llm, SCENARIOS["mixed"])
    assert got == cpu_expected["mixed"]
    assert all(len(t) == GREEDY_TOKENS for t in got)


def test_engine_prefix_cache_hits_and_matches_cpu(ov_llm, cpu_expected: dict) -> None:
    before = ov_llm.llm_engine.stats().prefix_cache_hits
    got = [_greedy(ov_llm, [p])[0] for p in SCENARIOS["prefix"]]  # later ones hit the cache
    assert ov_llm.llm_engine.stats().prefix_cache_hits - before >= 2 * 96  # 3 blocks of 32 each
    assert got == cpu_expected["prefix"]


def test_engine_preemption_under_tiny_kv_budget_matches_cpu(smollm: str, cpu_expected: dict) -> None:
    from portaserve.core.llm import LLM

    # 5 blocks of 32 tokens: room for about two of these sequences at once
    tiny = LLM(smollm, device="openvino", dtype="float32", num_kv_blocks=5,
               max_num_batched_tokens=64, expected_output_tokens=None)  # no reserve: growth preempts
    got = _greedy(tiny, SCENARIOS["preempt"])
    assert tiny.llm_engine.stats().num_preemptions > 0
    assert got == cpu_expected["preempt"]


def test_plugin_default_precision_top1_agreement_on_real_model(ov_llm) -> None:
    """precision="auto" (u8 KV cache, plugin-chosen inference precision), teacher forced over a
    greedy f32 continuation (f32 equals cpu, tested above): top-1 agrees at >= 90% of 112."""
    from portaserve.core.batch import ScheduledBatch

    cfg = ov_llm.llm_engine.model_config
    prompt = _random_ids(1, 5, 16, 16)[0]
    written = _greedy(ov_llm, [prompt], 112)[0]
    tokens = prompt + written  # [128]
    batch = build_batch([("x", tokens, 0, [3, 0, 2, 1], True)], BS)
    rows = torch.arange(len(prompt) - 1, len(tokens) - 1)  # each row predicts the next token
    batch = ScheduledBatch(**{**{f: getattr(batch, f) for f in batch.__slots__},
                              "logits_indices": rows, "logits_req_ids": ["x"] * len(rows)})
    device = OpenVINODevice(precision="auto")
    spec = KVCacheSpec(cfg.num_layers, 4, BS, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    executor = device.compile(ov_llm.llm_engine.model, device.allocate_kv_cache(spec))
    top1 = executor.execute(batch).argmax(-1)
    agreement = (top1 == torch.tensor(written)).float().mean().item()
    assert agreement >= 0.9, f"top-1 agreement {agreement:.3f} over {len(written)} tokens"


def test_gguf_block_weights_match_dequantized_graph(ov_llm) -> None:
    """weight_format="gguf" (Q4_1 blocks handed to OpenVINO as codes + scales) gives the same
    logits as the dense f32 graph of the dequantized weights."""
    from portaserve.quant.base import QuantizedWeight

    cfg = ov_llm.llm_engine.model_config
    assert isinstance(ov_llm.llm_engine.model.layers[0].down[0][0], QuantizedWeight)
    batch = build_batch([("x", _random_ids(1, 6, 40, 40)[0], 0, [1, 0], True)], BS)
    spec = KVCacheSpec(cfg.num_layers, 2, BS, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    logits = {}
    for fmt in ("f32", "gguf"):
        device = OpenVINODevice(precision="f32", weight_format=fmt)
        executor = device.compile(ov_llm.llm_engine.model, device.allocate_kv_cache(spec))
        logits[fmt] = executor.execute(batch)
    torch.testing.assert_close(logits["gguf"], logits["f32"], rtol=1e-3, atol=1e-3)


def test_default_weights_are_the_gguf_blocks_kept_packed(monkeypatch) -> None:
    monkeypatch.delenv("PORTASERVE_OPENVINO_WEIGHTS", raising=False)
    device = OpenVINODevice(precision="f32")
    assert device.weight_format == "gguf"
    assert device.capabilities().keep_packed_weights is True
    assert OpenVINODevice(precision="f32", weight_format="f32").capabilities().keep_packed_weights is None
