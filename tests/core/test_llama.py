"""The Llama-family model against Hugging Face transformers.

The real SmolLM2 GGUF: greedy tokens equal transformers' ``generate`` on the same file in
float32; the same model from a Hugging Face folder gives the same tokens; chunked prefill gives
the same logits as one-shot prefill. Tiny random Qwen2 / Qwen3 / Llama-3-scaled models cover
q/k/v bias, q/k norm, untied heads and rope scaling against transformers' own classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from portaserve.core.loaders import load_model
from portaserve.core.models import MODEL_REGISTRY, builtin_models, get_model_class
from portaserve.core.models.llama import rotary_inv_freq
from portaserve.errors import ModelError

MAX_NEW = 40
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chat_prompt_ids(smollm_loaded: Any, chat_messages: list[Any]) -> list[list[int]]:
    tok = smollm_loaded.tokenizer
    return [tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
            for m in chat_messages]


@pytest.fixture(scope="module")
def portaserve_greedy(smollm_model: Any, smollm_loaded: Any, chat_prompt_ids: list[list[int]],
                      greedy: Any) -> list[list[int]]:
    return greedy(smollm_model, chat_prompt_ids, MAX_NEW, smollm_loaded.config.eos_token_ids)


def test_greedy_matches_transformers_on_the_gguf(
    portaserve_greedy: list[list[int]], chat_prompt_ids: list[list[int]], hf_model: Any,
    greedy_hf: Any, smollm_loaded: Any,
) -> None:
    for prompt, ours in zip(chat_prompt_ids, portaserve_greedy, strict=True):
        theirs = greedy_hf(hf_model, prompt, MAX_NEW)
        assert len(ours) >= 32, smollm_loaded.tokenizer.decode(ours)
        assert ours == theirs, (smollm_loaded.tokenizer.decode(ours),
                                smollm_loaded.tokenizer.decode(theirs))


def test_hf_folder_made_from_the_gguf_gives_the_same_tokens(
    hf_folder: Path, portaserve_greedy: list[list[int]], chat_prompt_ids: list[list[int]],
    reference_kernels: Any, greedy: Any, chat_messages: list[Any],
) -> None:
    assert (hf_folder / "model.safetensors.index.json").is_file()  # sharded
    loaded = load_model(str(hf_folder), dtype=torch.float32, device=CPU, progress=False)
    assert loaded.format == "safetensors"
    assert loaded.config.tie_word_embeddings
    model = get_model_class(loaded.config.architecture)(
        loaded.config, loaded.weights, reference_kernels, dtype=torch.float32, device=CPU)
    assert loaded.tokenizer.apply_chat_template(chat_messages[0]).startswith("<|im_start|>")
    ids = [loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(m),
                                   add_special_tokens=False) for m in chat_messages]
    assert ids == chat_prompt_ids
    out = greedy(model, ids, MAX_NEW, loaded.config.eos_token_ids)
    assert out == portaserve_greedy


def test_chunked_prefill_and_decode_match_one_shot_prefill(
    smollm_model: Any, chat_prompt_ids: list[list[int]], greedy: Any,
) -> None:
    from portaserve.core.batch import build_batch
    from portaserve.devices.reference import allocate_kv_cache
    from portaserve.plugins.device import KVCacheSpec

    model = smollm_model
    prompt = chat_prompt_ids[1]
    cfg = model.config
    spec = KVCacheSpec(cfg.num_layers, 12, 8, cfg.num_kv_heads, cfg.head_dim, torch.float32)

    def run(chunks: list[int]) -> torch.Tensor:
        """Logits of every prompt position, the prompt fed in chunks of the given sizes."""
        kv = allocate_kv_cache(spec, CPU, "blocks_nhd")
        blocks = [7, 3, 9, 1, 11, 5, 2, 10]  # scattered on purpose
        done, rows = 0, []
        for size in chunks:
            batch = build_batch([("r", prompt[done : done + size], done, blocks, True)], 8)
            hidden = model.forward(batch.token_ids, batch.positions,
                                   batch.attention_metadata(CPU), kv)
            rows.append(model.compute_logits(hidden))
            done += size
        return torch.cat(rows)

    n = len(prompt)
    one_shot = run([n])
    chunked = run([5, 11, 1, n - 5 - 11 - 1 - 3, 1, 1, 1])  # prefill chunks, then decode steps
    assert one_shot.shape == (n, cfg.vocab_size)
    torch.testing.assert_close(chunked, one_shot, rtol=1e-4, atol=1e-4)
    assert one_shot.std() > 1.0  # real logits, not a constant


def test_batched_requests_of_mixed_phases_match_running_alone(
    smollm_model: Any, chat_prompt_ids: list[list[int]], portaserve_greedy: list[list[int]],
    greedy: Any,
) -> None:
    # chunked prefill interleaves prefill chunks of some requests with decodes of others
    out = greedy(smollm_model, chat_prompt_ids, 12, (), prefill_chunk=13)
    assert out == [tokens[:12] for tokens in portaserve_greedy]


def test_packed_gguf_weights_give_the_same_tokens(
    smollm_packed: Any, chat_prompt_ids: list[list[int]], portaserve_greedy: list[list[int]],
    reference_kernels: Any, greedy: Any,
) -> None:
    """The engine's default load keeps Q4_1/Q8_0 packed; the model runs them through
    ``quant_linear`` and the packed embedding lookup, with the dense model's tokens."""
    from portaserve.quant.base import QuantizedWeight

    weights = smollm_packed.weights
    assert isinstance(weights["model.layers.0.self_attn.q_proj.weight"], QuantizedWeight)
    assert isinstance(weights["model.embed_tokens.weight"], QuantizedWeight)
    model = get_model_class("llama")(smollm_packed.config, weights, reference_kernels,
                                     dtype=torch.float32, device=CPU)
    fused = model.layers[0]
    assert len(fused.qkv) == 1 and len(fused.gate_up) == 1  # packed rows fused at load
    assert isinstance(fused.qkv[0][0], QuantizedWeight) and fused.qkv[0][0].shape == (960, 576)
    out = greedy(model, chat_prompt_ids[:1], 8, ())
    assert out == [portaserve_greedy[0][:8]]


def test_registry_names_every_supported_architecture() -> None:
    assert set(MODEL_REGISTRY) == {"llama", "mistral", "qwen2", "qwen3"}
    assert builtin_models() == MODEL_REGISTRY and builtin_models() is not MODEL_REGISTRY
    with pytest.raises(ModelError, match=r"'gpt_neox'.*llama.*qwen2"):
        get_model_class("gpt_neox")


# -- tiny random models of each architecture against transformers -----------------------


def _tiny_hf_model(kind: str, tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=24, use_sliding_window=False)
        cls = transformers.Qwen3ForCausalLM
    else:  # llama with Llama 3.1 rope scaling and tied embeddings
        config = transformers.LlamaConfig(
            **{**common, "tie_word_embeddings": True},
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        cls = transformers.LlamaForCausalLM
    torch.manual_seed({"qwen2": 1, "qwen3": 2}.get(kind, 3))
    model = cls(config).eval()
    with torch.no_grad():  # biases start at zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3-scaled"])
def test_tiny_models_match_transformers_logits(kind: str, tmp_path: Path,
                                               reference_kernels: Any, smollm_loaded: Any) -> None:
    import transformers

    path = _tiny_hf_model(kind, tmp_path)
    smollm_loaded.tokenizer.backend.save(str(path / "tokenizer.json"))
    loaded = load_model(str(path), dtype=torch.float32, device=CPU, progress=False)
    cfg = loaded.config
    assert cfg.architecture == ("llama" if kind.startswith("llama") else kind)
    assert cfg.attention_bias == (kind == "qwen2") and cfg.qk_norm == (kind == "qwen3")
    model = get_model_class(cfg.architecture)(cfg, loaded.weights, reference_kernels,
                                              dtype=torch.float32, device=CPU)
    ids = torch.randint(0, cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(1))
    from portaserve.core.batch import build_batch
    from portaserve.devices.reference import allocate_kv_cache
    from portaserve.plugins.device import KVCacheSpec

    kv = allocate_kv_cache(KVCacheSpec(cfg.num_layers, 20, 16, cfg.num_kv_heads, cfg.head_dim,
                                       torch.float32), CPU, "blocks_nhd")
    batch = build_batch([("r", ids.tolist(), 0, list(range(1, 11)), True)], 16)
    ours = model.compute_logits(model.forward(batch.token_ids, batch.positions,
                                              batch.attention_metadata(CPU), kv))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0]
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from portaserve.core.config import ModelConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ours = rotary_inv_freq(ModelConfig("llama", 128, 4096, 64, 1, 32, 8, 128, rope_theta=500000.0,
                                       rope_scaling=scaling, max_position_embeddings=131072))
    hf_config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                         rope_theta=500000.0, rope_scaling=scaling,
                                         max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert (ours < rotary_inv_freq(ModelConfig("llama", 128, 4096, 64, 1, 32, 8, 128,
                                               rope_theta=500000.0))).any()


def test_model_refuses_weights_it_would_ignore(smollm_loaded: Any,
                                               reference_kernels: Any) -> None:
    weights = dict(smollm_loaded.weights)
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.randn(4, 4)
    cls = get_model_class("llama")
    with pytest.raises(ModelError, match="extra_proj"):
        cls(smollm_loaded.config, weights, reference_kernels, dtype=torch.float32, device=CPU)
    del weights["model.layers.0.mlp.extra_proj.weight"]
    del weights["model.norm.weight"]
    with pytest.raises(ModelError, match="model.norm.weight"):
        cls(smollm_loaded.config, weights, reference_kernels, dtype=torch.float32, device=CPU)


def test_logits_stay_in_the_lm_head_dtype_unless_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compute_logits(upcast=False)`` (the runner, the decode graphs) keeps the lm_head's dtype
    for the sampler's argmax; ``upcast=True`` and the A/B switch ``UPCAST_LOGITS`` give float32
    of the same values."""
    from types import SimpleNamespace

    from portaserve.core.models import llama

    hidden = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    head = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    fake = SimpleNamespace(lm_head=head, _linear=lambda x, proj: (x @ proj[0][0].T).to(torch.bfloat16))
    as_is = llama.LlamaForCausalLM.compute_logits(fake, hidden, upcast=False)
    assert as_is.dtype == torch.bfloat16
    assert torch.equal(llama.LlamaForCausalLM.compute_logits(fake, hidden), as_is.float())
    monkeypatch.setattr(llama, "UPCAST_LOGITS", True)
    assert torch.equal(llama.LlamaForCausalLM.compute_logits(fake, hidden, upcast=False), as_is.float())
