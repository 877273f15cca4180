"""The fused ops ``linear_rms_norm`` (a block's closing projection, then the norm that opens the
next) and ``linear_silu_and_mul``: their composition, a quant kernel that carries the fused
variant (``with_rms_norm``, ``with_silu_and_mul``), and the model's use of them: cuda's GEMV
running the norm or the silu in its launch (``gemv_triton.FUSE_NORM`` / ``FUSE_SILU``)
changes no result."""

from __future__ import annotations

import pytest
import torch

from portaserve.devices import reference
from portaserve.plugins.device import OP_NAMES
from portaserve.plugins.kernel_table import build_kernel_table
from portaserve.plugins.manager import get_registry
from portaserve.quant.int_formats import Int4Method


def test_composition_is_linear_or_the_formats_quant_kernel_then_rms_norm() -> None:
    calls: list[str] = []

    def int4_kernel(x, weight, bias=None):  # noqa: ANN001, ANN202
        calls.append(weight.format)
        return reference.quant_linear(x, weight, bias)

    ref = {name: getattr(reference, name) for name in OP_NAMES}
    table = build_kernel_table("fake", "blocks_nhd", {}, ref, native_quant={"int4": int4_kernel})
    assert table.fused_sources["linear_rms_norm"] == "composed"
    gen = torch.Generator().manual_seed(3)
    x, res = torch.randn(3, 128, generator=gen), torch.randn(3, 40, generator=gen)
    w, nw, b = torch.randn(40, 128, generator=gen) * 0.1, 1 + 0.1 * torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    y, new_res = table.linear_rms_norm(x, w, b, nw, 1e-5, res)
    want = reference.rms_norm(reference.linear(x, w, b), nw, 1e-5, res)
    assert torch.equal(y, want[0]) and torch.equal(new_res, want[1]) and not calls
    q = Int4Method().quantize(w, group_size=64)
    y, new_res = table.linear_rms_norm(x, q, None, nw, 1e-5, res)
    want = reference.rms_norm(reference.quant_linear(x, q, None), nw, 1e-5, res)
    assert calls == ["int4"], "the composition dispatches by format, as the table's quant_linear"
    assert torch.equal(y, want[0]) and torch.equal(new_res, want[1])


def test_a_quant_kernel_may_carry_the_norm() -> None:
    """A format's kernel with ``with_rms_norm`` runs the composed op's calls for that format
    (its None: that call runs the kernel and then the norm); other formats and dense weights
    do not reach it."""
    seen: list[int] = []

    def int4_kernel(x, weight, bias=None):  # noqa: ANN001, ANN202
        return reference.quant_linear(x, weight, bias)

    def with_norm(x, weight, bias, norm_weight, eps, residual):  # noqa: ANN001, ANN202
        seen.append(x.shape[0])
        return ("fused", x.shape[0]) if x.shape[0] == 1 else None

    int4_kernel.with_rms_norm = with_norm
    ref = {name: getattr(reference, name) for name in OP_NAMES}
    table = build_kernel_table("fake", "blocks_nhd", {}, ref, native_quant={"int4": int4_kernel})
    gen = torch.Generator().manual_seed(5)
    w, nw = torch.randn(8, 128, generator=gen), torch.ones(8)
    q4, q8 = Int4Method().quantize(w, group_size=64), registry_quantize(w, "Q8_0")
    assert table.linear_rms_norm(torch.randn(1, 128), q4, None, nw, 1e-5, torch.randn(1, 8)) == ("fused", 1)
    x, res = torch.randn(2, 128, generator=gen), torch.randn(2, 8, generator=gen)
    y, new_res = table.linear_rms_norm(x, q4, None, nw, 1e-5, res)
    want = reference.rms_norm(reference.quant_linear(x, q4, None), nw, 1e-5, res)
    assert torch.equal(y, want[0]) and torch.equal(new_res, want[1])
    table.linear_rms_norm(x, q8, None, nw, 1e-5, res)
    table.linear_rms_norm(x, w, None, nw, 1e-5, res)
    assert seen == [1, 2]


def test_a_quant_kernel_may_carry_silu_and_mul() -> None:
    seen: list[int] = []

    def int4_kernel(x, weight, bias=None):  # noqa: ANN001, ANN202
        return reference.quant_linear(x, weight, bias)

    def with_silu(x, weight, bias=None):  # noqa: ANN001, ANN202
        seen.append(x.shape[0])
        return "fused" if x.shape[0] == 1 else None

    int4_kernel.with_silu_and_mul = with_silu
    ref = {name: getattr(reference, name) for name in OP_NAMES}
    table = build_kernel_table("fake", "blocks_nhd", {}, ref, native_quant={"int4": int4_kernel})
    assert table.fused_sources["linear_silu_and_mul"] == "composed"
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 128, generator=gen)
    q4 = Int4Method().quantize(w, group_size=64)
    assert table.linear_silu_and_mul(torch.randn(1, 128), q4, None) == "fused"
    x = torch.randn(3, 128, generator=gen)
    assert torch.equal(table.linear_silu_and_mul(x, q4, None),
                       reference.silu_and_mul(reference.quant_linear(x, q4, None)))
    assert torch.equal(table.linear_silu_and_mul(x, w), reference.silu_and_mul(reference.linear(x, w, None)))
    assert seen == [1, 3]


def registry_quantize(w: torch.Tensor, fmt: str):
    from portaserve.quant import registry

    return registry.quantize(w, fmt)


def int4_llama(kernels, gen: torch.Generator):
    """A two-layer Llama whose decoder linears are int4 (group 64), shaped so the quant GEMV
    serves every one of them (K of 128 and 256)."""
    from portaserve.core.config import ModelConfig
    from portaserve.core.models.llama import LlamaForCausalLM

    h, inter = 128, 256
    config = ModelConfig(architecture="llama", vocab_size=50, hidden_size=h, intermediate_size=inter,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * shape[-1] ** -0.5

    int4 = Int4Method()
    weights = {"model.embed_tokens.weight": w(50, h), "model.norm.weight": 1 + 0.1 * w(h), "lm_head.weight": w(50, h)}
    for i in range(2):
        p = f"model.layers.{i}"
        weights |= {f"{p}.input_layernorm.weight": 1 + 0.1 * w(h), f"{p}.post_attention_layernorm.weight": 1 + 0.1 * w(h)}
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (64, h)), ("self_attn.v_proj", (64, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            weights[f"{p}.{name}.weight"] = int4.quantize(w(*shape), group_size=64)
    return LlamaForCausalLM(config, weights, kernels, dtype=torch.float32, device=torch.device("cpu"))


def test_fusing_the_norm_silu_and_rotary_into_the_quant_gemv_changes_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda's int4 kernel on an int4 model (Triton's interpreter): with ``FUSE_NORM`` each decode step's
    o and down GEMVs run the norm after them in the same launch (4 launches for 2 layers, the
    last one with the final norm), with ``FUSE_SILU`` gate|up its silu_and_mul (2), with
    ``FUSE_ROTARY`` q|k|v the rotary and the KV write (2); the 3-token prompt step (int4 takes the tensor-core tiles
    there, which do not fuse) and the flag off run the GEMV and the norm kernel apart; the
    hidden states are bit for bit the same. More rows than the GEMV takes: declined too."""
    pytest.importorskip("triton")
    from triton_device import launch_spy

    from portaserve.core.batch import build_batch
    from portaserve.plugins.device import KVCacheSpec
    from portaserve.quant import gemv_triton
    from portaserve.quant.builtin import _triton_quant_linear

    registry = get_registry()
    device, _ = registry.select_device("triton-interpret")
    base = registry.kernel_table(device)  # (its int4 kernel dequantizes: cuda's is the GEMV's)
    own = {name: base.ops[name] for name in OP_NAMES}
    table = build_kernel_table("triton-interpret", base.kv_layout, own, own,
                               native_quant={"int4": _triton_quant_linear})
    assert table.fused_sources["linear_rms_norm"] == "composed"
    seen = launch_spy(gemv_triton._gemv_kernel, monkeypatch)
    results = {}
    for fuse in (False, True):
        monkeypatch.setattr(gemv_triton, "FUSE_NORM", fuse)
        monkeypatch.setattr(gemv_triton, "FUSE_SILU", fuse)
        monkeypatch.setattr(gemv_triton, "FUSE_ROTARY", fuse)
        model = int4_llama(table, torch.Generator().manual_seed(8))
        caches = device.allocate_kv_cache(KVCacheSpec(2, 8, 16, 2, 32, torch.float32))
        steps = [build_batch([("a", [3, 1, 4], 0, [0], True)], 16),  # a prompt of 3 rows
                 build_batch([("a", [9], 3, [0], True)], 16)]  # a decode step: one row
        outs = []
        for batch in steps:
            del seen[:]
            outs.append(model.forward(batch.token_ids, batch.positions,
                                      batch.attention_metadata(torch.device("cpu")), caches))
            fused = tuple(sum(1 for launch in seen if launch[flag]) for flag in ("NORM", "ACT", "ROPE"))
            assert fused == ((4, 2, 2) if fuse and batch.num_tokens == 1 else (0, 0, 0)), (fuse, batch.num_tokens, fused)
        results[fuse] = outs
    for plain, fused in zip(results[False], results[True], strict=True):
        assert torch.equal(plain, fused), (plain - fused).abs().max()
    # more rows than the GEMV takes (a prompt step's): the kernel declines, the table composes
    from portaserve.quant.kernels_triton import (
        triton_quant_linear_rms_norm,
        triton_quant_linear_silu_and_mul,
    )

    layer = model.layers[0]
    x, res = torch.randn(5, 128), torch.randn(5, 128)
    assert triton_quant_linear_rms_norm(x, layer.o[0][0], None, layer.post_norm, 1e-5, res) is None
    assert triton_quant_linear_silu_and_mul(x, layer.gate_up[0][0]) is None


def test_a_dense_linear_may_carry_a_fused_variant_too() -> None:
    """A device's ``linear`` with ``with_rotary_write_kv`` runs the composed op for 16-bit
    weights (its None: ``linear`` then ``rotary_write_kv``, as composed); quant weights go to
    their format's kernel and never reach the linear's hook (cuda's dense GEMV with rotary in
    its epilogue hangs here)."""
    seen: list[int] = []

    def linear(x, weight, bias=None):  # noqa: ANN001, ANN202
        return reference.linear(x, weight, bias)

    def with_rotary(x, weight, bias, positions, cos_sin_cache, kv_cache, slot_mapping, num_heads):  # noqa: ANN001, ANN202
        seen.append(x.shape[0])
        return "fused" if x.shape[0] == 1 else None

    linear.with_rotary_write_kv = with_rotary
    ref = {name: getattr(reference, name) for name in OP_NAMES}
    table = build_kernel_table("fake", "blocks_nhd", {"linear": linear}, ref)
    assert table.fused_sources["linear_rotary_write_kv"] == "composed"
    gen = torch.Generator().manual_seed(7)
    hq, hk, d = 2, 1, 16
    w = torch.randn((hq + 2 * hk) * d, 64, generator=gen) * 0.1
    cos_sin = torch.randn(32, d, generator=gen)
    cache = torch.zeros(2, 4, 4, hk, d)  # blocks_nhd: [2, blocks, block_size, Hk, D]
    args = (torch.tensor([3, 5]), cos_sin, cache, torch.tensor([1, 6]), hq)
    assert table.linear_rotary_write_kv(torch.randn(1, 64), w, None, args[0][:1], *args[1:3], args[3][:1], hq) == "fused"
    x = torch.randn(2, 64, generator=gen)
    got = table.linear_rotary_write_kv(x, w, None, *args)
    out = reference.linear(x, w, None)
    want_cache = torch.zeros_like(cache)
    want = reference.rotary_write_kv(args[0], out[:, :hq * d].view(2, hq, d), out[:, hq * d:(hq + hk) * d].view(2, hk, d),
                                     out[:, (hq + hk) * d:].view(2, hk, d), cos_sin, want_cache, args[3],
                                     kv_layout="blocks_nhd")
    assert torch.equal(got, want) and torch.equal(cache, want_cache)
    q4 = Int4Method().quantize(w, group_size=32)
    table.linear_rotary_write_kv(x[:1], q4, None, args[0][:1], *args[1:3], args[3][:1], hq)
    assert seen == [1, 2], "the quant weight did not reach the dense linear's hook"
