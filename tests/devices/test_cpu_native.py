"""The cpu device's native kernels (``portaserve.devices.cpu_native``) against the reference.

Every kernel runs on fresh random inputs and is compared with ``devices/reference.py``; the
decode executor is compared with the op-by-op model on a small random Llama, float32 and every
packed format, logits and KV cache both.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from portaserve.core.batch import build_batch
from portaserve.core.config import ModelConfig
from portaserve.core.loaders.synthetic import synthetic_weights
from portaserve.core.models.llama import LlamaForCausalLM
from portaserve.devices import cpu_native, reference
from portaserve.devices.cpu import CPUDevice
from portaserve.devices.cpu_native.executor import NativeDecodeExecutor, build_executor
from portaserve.plugins.device import AttentionMetadata, KVCacheSpec
from portaserve.plugins.manager import get_registry
from portaserve.quant import registry as quant_registry
from portaserve.quant.base import QuantizedWeight
from portaserve.quant.fp8 import FP8_DTYPE, FP8Method

pytestmark = pytest.mark.skipif(
    cpu_native.library() is None,
    reason=f"native cpu kernels unavailable: {cpu_native.unavailable_reason()}")

FORMATS = tuple(cpu_native.FORMATS)
GGUF = tuple(f for f in FORMATS if f.startswith("Q"))


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5) -> None:
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= rel * scale + 1e-6, f"max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 8, 13, 32])
def test_linear_matches_reference_dequant(fmt: str, tokens: int) -> None:
    gen = torch.Generator().manual_seed(hash((fmt, tokens)) % 2**31)
    n, k = 96, 512
    weight = quant_registry.quantize(torch.randn(n, k, generator=gen) * 0.1, fmt)
    x = torch.randn(tokens, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ref = reference.quant_linear(x, weight, bias)
    out = cpu_native.linear(x, weight, bias)
    assert out.shape == (tokens, n)
    _close(out, ref)
    # a strided input (a column slice of a wider activation) gives the same result
    wide = torch.randn(tokens, k + 64, generator=gen)
    _close(cpu_native.linear(wide[:, 32:32 + k], weight),
           reference.quant_linear(wide[:, 32:32 + k].contiguous(), weight, None))


def _fp8_weight(n: int, k: int, per_channel: bool, gen: torch.Generator) -> QuantizedWeight:
    """Uniformly random e4m3 codes, so every finite value from the subnormals to +-448 occurs
    (the NaN codes 0x7f / 0xff become +-448), and a per-row or a per-tensor scale."""
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
    codes[(codes & 0x7F) == 0x7F] -= 1
    scale = (torch.rand(n, generator=gen) + 0.05) * 1e-2 if per_channel else torch.tensor(3e-3)
    return FP8Method().from_tensors(codes.view(FP8_DTYPE), scale)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 8, 13, 32])
def test_fp8_linear_over_every_code_matches_reference_dequant(per_channel: bool, tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens * 2 + per_channel)
    n, k = 80, 512
    weight = _fp8_weight(n, k, per_channel, gen)
    dense = weight.dequantize(torch.float32)
    assert dense.abs().max() == 448 * weight.data["weight_scale"].max()
    assert ((dense != 0) & (weight.data["weight"].view(torch.uint8) & 0x78 == 0)).any()  # subnormals
    wide = torch.randn(tokens, k + 64, generator=gen)
    x = wide[:, 32:32 + k]  # strided: a column slice of a wider activation
    bias = torch.randn(n, generator=gen)
    out = cpu_native.linear(x, weight, bias)
    assert out.shape == (tokens, n)
    _close(out, reference.quant_linear(x.contiguous(), weight, bias))


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_dequant_of_every_code_is_torchs_bit_for_bit(per_channel: bool) -> None:
    """All 256 codes, NaN (0x7f, 0xff) and -0.0 included, in every row."""
    codes = torch.arange(256, dtype=torch.uint8).roll(7).repeat(6, 2)  # [6, 512]
    scale = torch.tensor([1.0, 3e-3, 17.0, 2.0**-20, 0.7, 5e3]) if per_channel else torch.tensor(0.37)
    weight = FP8Method().from_tensors(codes.view(FP8_DTYPE), scale)
    out = torch.empty(4, 512)
    cpu_native.dequant_rows(weight, 1, 5, out)
    ref = weight.dequantize(torch.float32)[1:5]
    nan = ref.isnan()
    assert int(nan.sum()) == 4 * 4 and torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # signs of zero too
    # a NaN weight makes its row NaN, as in the reference
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(4))
    assert bool(cpu_native.linear(x, weight).isnan().all())


def test_fp8_fused_rows_match_each_part() -> None:
    """q|k|v as one weight from ``concat_rows``: parts with different per-tensor scales and a
    per-channel part give, row for row, what each part gives alone."""
    gen = torch.Generator().manual_seed(21)
    method = FP8Method()
    parts = [method.quantize(torch.randn(n, 256, generator=gen) * s, per_channel=pc)
             for n, s, pc in ((128, 0.5, False), (64, 0.02, False), (64, 3.0, True))]
    fused = method.concat_rows(parts)
    assert fused is not None and fused.shape == (256, 256)
    assert fused.data["weight_scale"].shape == (256,)
    x = torch.randn(5, 256, generator=gen)
    expected = torch.cat([reference.quant_linear(x, p) for p in parts], dim=1)
    _close(cpu_native.linear(x, fused), expected)
    out = torch.empty(256, 256)
    cpu_native.dequant_rows(fused, 0, 256, out)
    assert torch.equal(out, torch.cat([p.dequantize(torch.float32) for p in parts]))


def _paged_inputs(seq_lens: list[int], hq: int, hk: int, d: int, block_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    blocks_per = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per) + 5
    cache = torch.randn(2, num_blocks, block_size, hk, d, generator=gen)
    order = torch.randperm(num_blocks, generator=gen)  # non-contiguous block tables
    width = max(blocks_per)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per):
        tables[r, :nb] = order[used:used + nb].to(torch.int32)
        used += nb
    query = torch.randn(len(seq_lens), hq, d, generator=gen)
    return query, cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (8, 1)])
def test_paged_decode_attention_matches_reference(hq: int, hk: int) -> None:
    seq_lens = [1, 15, 16, 17, 70]  # one token, partial and whole blocks
    query, cache, tables, lens = _paged_inputs(seq_lens, hq, hk, 32, 16, seed=hq * 10 + hk)
    attn = AttentionMetadata(
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32), seq_lens=lens,
        context_lens=lens - 1, block_tables=tables,
        slot_mapping=torch.zeros(len(seq_lens), dtype=torch.int64), max_query_len=1,
        max_seq_len=max(seq_lens), block_size=16)
    ref = reference.paged_attention(query, cache, attn, 0.125)
    _close(cpu_native.paged_decode_attention(query, cache, tables, lens, 0.125), ref)


def test_rms_norm_rotary_and_write_kv_match_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    x, res, w = torch.randn(5, 96, generator=gen), torch.randn(5, 96, generator=gen), torch.randn(96, generator=gen)
    ref_y, ref_res = reference.rms_norm(x, w, 1e-5, res)
    y, new_res = cpu_native.rms_norm(x, w, 1e-5, res)
    _close(y, ref_y)
    assert torch.equal(new_res, ref_res)
    _close(cpu_native.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))

    qkv = torch.randn(5, (6 + 2 + 2) * 16, generator=gen)  # q, k as strided views of one row
    q, k = qkv[:, :96].view(5, 6, 16), qkv[:, 96:128].view(5, 2, 16)
    positions = torch.tensor([0, 3, 9, 100, 2047])
    cos_sin = torch.randn(2048, 16, generator=gen)
    for out, ref in zip(cpu_native.rotary(positions, q, k, cos_sin),
                        reference.rotary(positions, q, k, cos_sin), strict=True):
        _close(out, ref)

    v = qkv[:, 128:].view(5, 2, 16)
    cache, ref_cache = torch.zeros(2, 4, 4, 2, 16), torch.zeros(2, 4, 4, 2, 16)
    slots = torch.tensor([13, 0, 5, 6, 2])
    cpu_native.write_kv(k, v, cache, slots)
    reference.write_kv(k, v, ref_cache, slots)
    assert torch.equal(cache, ref_cache)


# -- the decode executor ------------------------------------------------------------------------

SMALL = ModelConfig(architecture="llama", vocab_size=300, hidden_size=128, intermediate_size=192,
                    num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                    max_position_embeddings=512, tie_word_embeddings=True, name="small")


#: K formats need rows of whole 256-weight super-blocks
SMALL_K = ModelConfig(architecture="llama", vocab_size=300, hidden_size=256,
                      intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
                      name="small-k")


def _model(fmt: str | None, cache_blocks: int = 40, scales_dtype: torch.dtype | None = None):
    """A small random Llama in ``fmt``; ``scales_dtype`` recasts int8/int4 scales (GPTQ
    checkpoints keep them in float16)."""
    cfg = SMALL_K if fmt in ("Q4_K", "Q5_K", "Q6_K") else SMALL
    weights: dict = synthetic_weights(cfg, dtype=torch.float32, device=torch.device("cpu"), seed=5)
    gen = torch.Generator().manual_seed(11)
    for name in list(weights):  # norms away from 1 so that they matter
        if "norm" in name:
            weights[name] = 1.0 + 0.3 * torch.randn(weights[name].shape, generator=gen)
    if fmt is not None:
        weights = {n: quant_registry.quantize(w, fmt) if w.dim() == 2 else w
                   for n, w in weights.items()}
    if scales_dtype is not None:
        for w in weights.values():
            if isinstance(w, QuantizedWeight):
                w.data["scales"] = w.data["scales"].to(scales_dtype)
    device = CPUDevice()
    kernels = get_registry().kernel_table(device)
    model = LlamaForCausalLM(cfg, weights, kernels, dtype=torch.float32, device=torch.device("cpu"))
    spec = KVCacheSpec(cfg.num_layers, cache_blocks, 16, cfg.num_kv_heads, cfg.head_dim,
                       torch.float32)
    return model, device.allocate_kv_cache(spec)


def _step(items: list[tuple], block_tables: dict[str, list[int]]):
    """build_batch for (req_id, new token ids, num computed before)."""
    return build_batch([(rid, ids, done, block_tables[rid], True) for rid, ids, done in items],
                       block_size=16)


@pytest.mark.parametrize("fmt", [None, *FORMATS, "fp8_per_tensor"])
def test_decode_executor_matches_op_by_op(fmt: str | None) -> None:
    _check_executor_against_op_by_op(*_model(fmt))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_executor_with_float16_scales(fmt: str) -> None:
    """The step's float32 copies of the scales outlive the op-by-op prefill that runs first
    (and makes copies of its own)."""
    _check_executor_against_op_by_op(*_model(fmt, scales_dtype=torch.float16))


def _check_executor_against_op_by_op(model, caches) -> None:
    executor, why = build_executor(model, caches)
    assert isinstance(executor, NativeDecodeExecutor), why
    gen = torch.Generator().manual_seed(1)
    lens = {"a": 5, "b": 23, "c": 40}
    tables = {"a": [7, 3], "b": [0, 12, 9], "c": [30, 2, 21, 4]}
    prompts = {r: torch.randint(1, 300, (n,), generator=gen).tolist() for r, n in lens.items()}
    prefill = _step([(r, prompts[r], 0) for r in lens], tables)
    executor.execute(prefill)  # op by op (not decode): fills the caches
    assert executor.native_steps == 0
    ref_caches = [c.clone() for c in caches]
    decode = _step([(r, [int(torch.randint(1, 300, (1,), generator=gen))], lens[r]) for r in lens],
                   tables)
    native = executor.execute(decode)
    assert executor.native_steps == 1
    native_caches = [c.clone() for c in caches]
    for c, ref in zip(caches, ref_caches, strict=True):  # rerun op by op from the same state
        c.copy_(ref)
    attn = decode.attention_metadata(torch.device("cpu"))
    hidden = model.forward(decode.token_ids, decode.positions, attn, caches)
    expected = model.compute_logits(hidden[decode.logits_indices])
    assert native.shape == expected.shape == (3, model.config.vocab_size)
    _close(native, expected, rel=1e-4)
    assert torch.equal(native.argmax(-1), expected.argmax(-1))
    for got, ref in zip(native_caches, caches, strict=True):
        _close(got, ref, rel=1e-5)


def test_executor_declines_what_it_cannot_run() -> None:
    model, caches = _model("Q4_1")
    model.layers[1].q_norm = torch.ones(SMALL.head_dim)
    executor, why = build_executor(model, caches)
    assert executor is None and "q/k norm" in why
    model, caches = _model("Q4_1")
    (fused, _), = model.layers[0].gate_up  # run gate and up as two weights
    half = fused.shape[0] // 2
    model.layers[0].gate_up = [(fused.method.select_rows(fused, rows), None)
                               for rows in (slice(0, half), slice(half, None))]
    executor, why = build_executor(model, caches)
    assert executor is None and why == "layer 0 gate_up is not one fused weight"


def test_without_a_compiler_the_cpu_device_keeps_its_torch_paths(tmp_path) -> None:
    code = (
        "import torch\n"
        "from portaserve.devices import cpu_native\n"
        "from portaserve.devices.cpu import CPUDevice, paged_attention\n"
        "assert cpu_native.library() is None\n"
        "print(cpu_native.unavailable_reason())\n"
        "caps = CPUDevice().capabilities()\n"
        "assert caps.keep_packed_weights is None and caps.quant_formats == ()\n"
        "print(caps.extra['native_kernels'])\n")
    env = {"PATH": "/usr/bin:/bin", "CC": "definitely-not-a-compiler",
           "PORTASERVE_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no C compiler 'definitely-not-a-compiler'" in proc.stdout
    assert proc.stdout.count("no C compiler") == 2  # the reason reaches `portaserve devices`


def test_a_weights_first_rows_get_their_own_struct() -> None:
    """``select_rows`` copies the meta, and the first rows start at the same address."""
    gen = torch.Generator().manual_seed(8)
    weight = quant_registry.quantize(torch.randn(64, 256, generator=gen), "int8")
    x = torch.randn(2, 256, generator=gen)
    cpu_native.linear(x, weight)  # builds and caches the whole weight's struct
    top = weight.method.select_rows(weight, slice(0, 16))
    _close(cpu_native.linear(x, top), reference.quant_linear(x, top, None))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_rows_equal_the_reference_exactly(fmt: str) -> None:
    gen = torch.Generator().manual_seed(9)
    weight = quant_registry.quantize(torch.randn(70, 512, generator=gen), fmt)
    out = torch.empty(40, 512)
    cpu_native.dequant_rows(weight, 20, 60, out)
    assert torch.equal(out, weight.dequantize(torch.float32)[20:60])


def test_mixed_steps_split_into_native_decode_and_op_by_op_prefill() -> None:
    model, caches = _model("Q4_1", cache_blocks=60)
    executor, why = build_executor(model, caches)
    assert executor is not None, why
    gen = torch.Generator().manual_seed(2)
    tables = {"a": [7, 3], "b": [0, 12, 9], "c": [30, 2, 21, 4], "d": [40, 41]}
    lens = {"a": 5, "b": 23, "c": 40}
    prompts = {r: torch.randint(1, 300, (n,), generator=gen).tolist() for r, n in lens.items()}
    executor.execute(_step([(r, prompts[r], 0) for r in lens], tables))
    new = torch.randint(1, 300, (20,), generator=gen).tolist()
    # a, c decode; d's prompt arrives in two chunks (the first samples nothing); b decodes
    items = [("a", [5], lens["a"]), ("d", new[:12], 0), ("b", [9], lens["b"]), ("c", [17], 40)]
    batch = build_batch([(r, ids, done, tables[r], r != "d") for r, ids, done in items],
                        block_size=16)
    start = [c.clone() for c in caches]
    native = executor.execute(batch)
    assert executor.native_steps == 1
    native_caches = [c.clone() for c in caches]
    for c, s in zip(caches, start, strict=True):
        c.copy_(s)
    attn = batch.attention_metadata(torch.device("cpu"))
    hidden = model.forward(batch.token_ids, batch.positions, attn, caches)
    expected = model.compute_logits(hidden[batch.logits_indices])
    assert batch.logits_req_ids == ["a", "b", "c"]
    _close(native, expected, rel=1e-4)
    for got, ref in zip(native_caches, caches, strict=True):
        _close(got, ref, rel=1e-5)


def test_the_step_profile_times_every_phase() -> None:
    from portaserve.devices.cpu_native.executor import PHASES

    assert cpu_native.library().ps_decode_num_phases() == len(PHASES)
    model, caches = _model("Q8_0")
    executor, why = build_executor(model, caches)
    assert executor is not None, why
    tables = {"a": [1, 2]}
    executor.execute(_step([("a", [3, 4, 5], 0)], tables))
    executor.profile = torch.zeros(len(PHASES), dtype=torch.float64)
    for i in range(3):
        executor.execute(_step([("a", [6 + i], 3 + i)], tables))
    assert executor.native_steps == 3
    assert bool((executor.profile > 0).all()), executor.profile
