"""Model definitions, by architecture name (``ModelConfig.architecture``).

``MODEL_REGISTRY`` holds the built-in models; plugins add more through the
``portaserve_register_models`` hook (the plugin registry consults them first), and
``builtin_models()`` is what the built-in plugin registers.
"""

from __future__ import annotations

from portaserve.core.models.llama import LlamaForCausalLM
from portaserve.errors import ModelError

MODEL_REGISTRY: dict[str, type] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def builtin_models() -> dict[str, type]:
    """Architecture -> model class of every model portaserve ships."""
    return dict(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type:
    """The built-in model class for ``architecture``; ``ModelError`` names the supported ones."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelError(
            f"no model is registered for architecture {architecture!r}; supported: "
            f"{sorted(MODEL_REGISTRY)} (plugins add more through portaserve_register_models)",
            field="model") from None


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "builtin_models", "get_model_class"]
