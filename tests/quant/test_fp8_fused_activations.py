"""fp8 W8A8 with the activations quantized by the op before the linear (``rms_norm_fp8``,
``silu_and_mul_fp8``): the model takes that path only where the fp8 kernel accepts a
``QuantizedActivation``, and it computes exactly what quantizing inside the linear does."""

from __future__ import annotations

import dataclasses

import torch

from portaserve.core.batch import build_batch
from portaserve.core.config import ModelConfig
from portaserve.core.models.llama import LlamaForCausalLM
from portaserve.devices import reference
from portaserve.plugins.device import KVCacheSpec
from portaserve.plugins.manager import get_registry
from portaserve.quant.base import QuantizedActivation
from portaserve.quant.fp8 import FP8Method, fp8_linear_emulated, quantize_per_token


def tiny_fp8_llama(kernels, gen: torch.Generator) -> LlamaForCausalLM:
    config = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=64)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * shape[-1] ** -0.5

    fp8 = FP8Method()
    weights = {"model.embed_tokens.weight": w(64, 32), "model.norm.weight": 1 + 0.1 * w(32),
               "lm_head.weight": w(64, 32)}
    for i in range(2):
        p = f"model.layers.{i}"
        weights |= {f"{p}.input_layernorm.weight": 1 + 0.1 * w(32),
                    f"{p}.post_attention_layernorm.weight": 1 + 0.1 * w(32)}
        for name, shape in (("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (16, 32)),
                            ("self_attn.v_proj", (16, 32)), ("self_attn.o_proj", (32, 32)),
                            ("mlp.gate_proj", (48, 32)), ("mlp.up_proj", (48, 32)),
                            ("mlp.down_proj", (32, 48))):
            weights[f"{p}.{name}.weight"] = fp8.quantize(w(*shape))
    return LlamaForCausalLM(config, weights, kernels, dtype=torch.float32, device=torch.device("cpu"))


def test_quantized_activations_change_no_result() -> None:
    seen: list[type] = []

    def accepting(x, weight, bias=None):  # noqa: ANN001, ANN202
        seen.append(type(x))
        return fp8_linear_emulated(x, weight, bias)

    accepting.quant_numerics = "w8a8"
    accepting.accepts_quantized_activation = True
    registry = get_registry()
    cpu, _ = registry.select_device("cpu")
    table = registry.kernel_table(cpu)
    outs = {}
    for name, fn in (("plain", fp8_linear_emulated), ("fused", accepting)):
        kernels = dataclasses.replace(table, quant_ops={**table.quant_ops, "fp8": fn})
        model = tiny_fp8_llama(kernels, torch.Generator().manual_seed(4))
        assert [layer.fp8_inputs for layer in model.layers] == [(name == "fused",) * 3] * 2
        caches = cpu.allocate_kv_cache(KVCacheSpec(2, 8, 16, 2, 8, torch.float32))
        batch = build_batch([("a", [3, 1, 4, 1, 5, 9, 2, 6], 0, [0], True),
                             ("b", [2, 7, 1, 8], 0, [1], True)], 16)
        hidden = model.forward(batch.token_ids, batch.positions, batch.attention_metadata(torch.device("cpu")),
                               caches)
        outs[name] = model.compute_logits(hidden[batch.logits_indices])
    # qkv, gate_up and down of both layers took activations quantized before them; o did not
    assert seen.count(QuantizedActivation) == 6 and seen.count(torch.Tensor) == 2
    assert torch.equal(outs["fused"], outs["plain"])


def test_composed_fused_ops_quantize_the_reference_outputs() -> None:
    """On a device without native ``*_fp8`` kernels (cpu) the table composes them: exactly its
    own rms_norm / silu_and_mul, then the format's per-token quantization."""
    registry = get_registry()
    cpu, _ = registry.select_device("cpu")
    table = registry.kernel_table(cpu)
    assert table.fused_sources["rms_norm_fp8"] == "composed"
    gen = torch.Generator().manual_seed(1)
    x, res, w = torch.randn(3, 40, generator=gen), torch.randn(3, 40, generator=gen), torch.randn(40, generator=gen)
    qa, new_res = table.rms_norm_fp8(x, w, 1e-5, res)
    y, want_res = table.rms_norm(x, w, 1e-5, res)
    want = quantize_per_token(y)
    assert torch.equal(qa.data.float(), want.data.float()) and torch.equal(qa.scale, want.scale)
    assert torch.equal(new_res, want_res)
    assert torch.allclose(y, reference.rms_norm(x, w, 1e-5, res)[0], atol=1e-5)
    gate_up = torch.randn(2, 96, generator=gen)
    qa = table.silu_and_mul_fp8(gate_up)
    want = quantize_per_token(table.silu_and_mul(gate_up))
    assert torch.equal(qa.data.float(), want.data.float()) and qa.dtype == torch.float32
