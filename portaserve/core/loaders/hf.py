"""Hugging Face folder loader: ``config.json`` -> ``ModelConfig``, safetensors -> weights.

Reads one ``*.safetensors`` file or a sharded set listed in ``model.safetensors.index.json``.
Weight names are kept as they are (the models use Hugging Face names). Supported
``model_type``: llama, mistral, qwen2 (q/k/v bias), qwen3 (q/k norm). Rope scaling: ``linear``
and ``llama3``. Mistral's sliding window is not implemented, so the usable context is capped
at the window (where results would start to differ) with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from portaserve.core.config import ModelConfig
from portaserve.errors import ModelError
from portaserve.quant.base import QuantizedWeight

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCH_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_model_config(config: dict[str, Any], name: str = "") -> ModelConfig:
    """Map a ``config.json`` dict to ``ModelConfig``; raises ``ModelError`` when unsupported."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        classes = config.get("architectures") or []
        model_type = next((_ARCH_CLASSES[c] for c in classes if c in _ARCH_CLASSES), model_type)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model {name!r} has model_type {config.get('model_type')!r} (architectures "
            f"{config.get('architectures')}); supported model types are "
            f"{list(SUPPORTED_MODEL_TYPES)}", field="model")
    quant = config.get("quantization_config")
    if quant:  # GPTQ / AWQ / fp8 load packed (quant.checkpoint); others are refused there
        from portaserve.quant.checkpoint import checkpoint_method

        checkpoint_method(quant, name)
    sizes: dict[str, int] = {}
    for key in ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
                "num_hidden_layers"):
        try:
            sizes[key] = int(config[key])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"model {name!r}: config.json {key} must be an integer; got "
                             f"{config.get(key)!r}", field="model") from e
    hidden, num_heads = sizes["hidden_size"], sizes["num_attention_heads"]
    vocab, intermediate = sizes["vocab_size"], sizes["intermediate_size"]
    num_layers = sizes["num_hidden_layers"]
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope_theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"model {name!r}: rope scaling {rope_type!r} is not supported "
                         f"(supported: {list(SUPPORTED_ROPE_TYPES)})", field="model")
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
    max_pos = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", model_type == "mistral")
    if uses_window and isinstance(window, int) and window < max_pos:
        logger.warning("%s uses sliding-window attention (%d), which is not implemented: the "
                       "context is capped at %d tokens", name, window, window)
        max_pos = window
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    return ModelConfig(
        architecture=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=name,
    )


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path / 'config.json'}: {e}", field="model") from e


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: those listed by the shard index, else every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"cannot read shard index {index}: {e}", field="model") from e
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{index} lists shards that are missing: {missing}", field="model")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"model folder {str(path)!r} has no *.safetensors files", field="model")
    return files


def load_hf_folder(
    path: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    quantization: str | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantizedWeight]]:
    """Config and weights (Hugging Face names) of a safetensors folder.

    A pre-quantized checkpoint (GPTQ, AWQ, fp8) loads packed (``quant.checkpoint``);
    ``quantization`` quantizes a dense checkpoint's linear weights online (``quant.registry``).
    """
    from safetensors import SafetensorError, safe_open

    raw_config = read_config(path)
    config = hf_model_config(raw_config, name=path.name)
    quant_config = raw_config.get("quantization_config") or None
    files = safetensors_files(path)
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"loading {path.name}", unit="tensor", leave=False)
    try:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    keys = list(f.keys())
                    for key in keys:
                        if key.endswith(_SKIPPED_SUFFIXES):
                            continue
                        weights[key] = _convert_tensor(key, f.get_tensor(key), dtype=dtype,
                                                       device=device, quantization=quantization,
                                                       prequantized=quant_config is not None)
                        if bar is not None:
                            bar.update(1)
            except (SafetensorError, OSError) as e:
                raise ModelError(f"cannot read weights {file}: {e}", field="model") from e
    finally:
        if bar is not None:
            bar.close()
    if quant_config is not None:
        from portaserve.quant.checkpoint import assemble

        weights = assemble(weights, quant_config)
    if "lm_head.weight" not in weights and not config.tie_word_embeddings:
        from dataclasses import replace

        logger.info("%s has no lm_head.weight: using tied embeddings", path.name)
        config = replace(config, tie_word_embeddings=True)
    return config, weights


def _convert_tensor(
    name: str, tensor: torch.Tensor, *, dtype: torch.dtype, device: torch.device,
    quantization: str | None = None, prequantized: bool = False,
) -> torch.Tensor | QuantizedWeight:
    """One checkpoint tensor -> a model weight (the one place a packed format is kept)."""
    from portaserve.quant import checkpoint, registry

    if prequantized and checkpoint.keeps_dtype(name, tensor):
        return tensor.to(device)  # packed codes and scales, assembled after loading
    if quantization is not None and registry.is_quantized_linear(name):
        return registry.quantize_checkpoint_tensor(name, tensor, quantization).to(device)
    return tensor.to(device=device, dtype=dtype)


def save_hf_folder(
    path: Path,
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    tokenizer: Any,
    *,
    max_shard_bytes: int = 2**30,
) -> Path:
    """Write dense weights as a Hugging Face folder this loader (and transformers) can read.

    The inverse of ``load_hf_folder``: ``config.json``, ``model*.safetensors`` (sharded with an
    index when larger than ``max_shard_bytes``), and the tokenizer's ``tokenizer.json`` +
    ``tokenizer_config.json``. Used to turn a GGUF into a folder and to write test models.
    """
    from safetensors.torch import save_file

    if any(not isinstance(w, torch.Tensor) for w in weights.values()):
        raise ModelError("save_hf_folder writes dense weights only", field="weights")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_type = config.architecture
    class_name = {v: k for k, v in _ARCH_CLASSES.items()}[model_type]
    hf_config: dict[str, Any] = {
        "architectures": [class_name],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1
        else (config.eos_token_ids[0] if config.eos_token_ids else None),
        "torch_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch."),
    }
    (path / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, weight in weights.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        nbytes = weight.numel() * weight.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weight.detach().cpu().contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        index = {"metadata": {"total_size": sum(w.numel() * w.element_size()
                                                for s in shards for w in s.values())},
                 "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2),
                                                           encoding="utf-8")
    tokenizer.backend.save(str(path / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.id_to_token(tokenizer.bos_token_id)
        if tokenizer.bos_token_id is not None else None,
        "eos_token": tokenizer.id_to_token(tokenizer.eos_token_ids[0])
        if tokenizer.eos_token_ids else None,
        "chat_template": tokenizer.chat_template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2),
                                                encoding="utf-8")
    return path
