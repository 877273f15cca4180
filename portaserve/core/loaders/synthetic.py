"""Synthetic models: real shapes, seeded random weights, for speed work and GPU checks.

``random:<preset>`` as a model argument (e.g. ``random:llama3-8b``) builds the preset's config
and normal(0, 0.02) weights directly on the target device, with a word-level tokenizer whose
tokens are ``t0``, ``t1``, ... Speed does not depend on the weights' values, so benchmarks use
these instead of downloading checkpoints; correctness is checked on real models.

With ``quantization=`` the decoder's linear weights come packed, still made on the device:
int8 / int4 / fp8 by quantizing each random tensor there (``quant.registry.quantize``), GGUF
block formats as random blocks (``GGUFMethod.random``; their quantizer runs on the host).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from portaserve.core.config import ModelConfig
from portaserve.core.tokenizer import Tokenizer
from portaserve.errors import ModelError
from portaserve.quant import registry
from portaserve.quant.base import QuantizedWeight
from portaserve.quant.gguf_formats import GGUF_FORMATS, GGUFMethod

PREFIX = "random:"

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=8192, name="random Llama-3-8B shape",
        eos_token_ids=(0,)),
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        name="random SmolLM2-135M shape", eos_token_ids=(0,)),
    "tiny": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
        name="random tiny Llama", eos_token_ids=(0,)),
}


def is_synthetic(model: str) -> bool:
    return model.startswith(PREFIX)


def synthetic_config(model: str) -> ModelConfig:
    preset = model[len(PREFIX):]
    if preset not in PRESETS:
        raise ModelError(f"unknown synthetic model {model!r}; presets are "
                         f"{', '.join(PREFIX + p for p in PRESETS)}", field="model")
    return PRESETS[preset]


def synthetic_weights(
    config: ModelConfig, *, dtype: torch.dtype, device: torch.device, seed: int = 0,
    quantization: str | None = None,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Hugging Face-named weights, normal(0, 0.02), norms at 1, generated on ``device``; the
    linear layers packed in ``quantization`` when given (see the module docstring)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def linear(name: str, n: int, k: int) -> torch.Tensor | QuantizedWeight:
        if quantization is None or not registry.is_quantized_linear(name):
            return rand(n, k)
        scheme = quantization
        if not registry.can_quantize((n, k), scheme):
            scheme = registry.K_QUANT_FALLBACK.get(scheme, scheme)
        if scheme in GGUF_FORMATS:
            return GGUFMethod(scheme).random(n, k, device=device, generator=gen)
        return registry.quantize_checkpoint_tensor(name, rand(n, k), scheme)

    weights = {"model.embed_tokens.weight": rand(config.vocab_size, h),
               "model.norm.weight": torch.ones(h, dtype=dtype, device=device)}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = rand(config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        weights.update({
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "self_attn.q_proj.weight": linear(p + "self_attn.q_proj.weight", q, h),
            p + "self_attn.k_proj.weight": linear(p + "self_attn.k_proj.weight", kv, h),
            p + "self_attn.v_proj.weight": linear(p + "self_attn.v_proj.weight", kv, h),
            p + "self_attn.o_proj.weight": linear(p + "self_attn.o_proj.weight", h, q),
            p + "mlp.gate_proj.weight": linear(p + "mlp.gate_proj.weight", i, h),
            p + "mlp.up_proj.weight": linear(p + "mlp.up_proj.weight", i, h),
            p + "mlp.down_proj.weight": linear(p + "mlp.down_proj.weight", h, i),
        })
    return weights


def synthetic_tokenizer(config: ModelConfig) -> Tokenizer:
    """Word-level: token i is the word ``t{i}``; text is space-separated words."""
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=config.eos_token_ids,
                     name=config.name)
