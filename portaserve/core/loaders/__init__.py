"""Model loading: a model argument -> config, weights (Hugging Face names) and tokenizer.

``load_model`` resolves the argument (``fetch.resolve_model``: GGUF file, Hugging Face folder or
alias), then reads it with the GGUF or the safetensors loader. The tokenizer always comes from
the same file or folder as the weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from portaserve.core.config import ModelConfig
from portaserve.core.loaders.fetch import resolve_model
from portaserve.core.tokenizer import Tokenizer
from portaserve.quant.base import QuantizedWeight

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "resolve_model"]


@dataclass(slots=True)
class LoadedModel:
    """What a loader hands the engine."""

    config: ModelConfig
    weights: dict[str, torch.Tensor | QuantizedWeight]  # Hugging Face names
    tokenizer: Tokenizer
    path: Path
    format: str  # "gguf" or "safetensors"


def load_model(
    model: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    quantization: str | None = None,
    keep_packed: bool = True,
) -> LoadedModel:
    """Resolve ``model`` and load it onto ``device``; dense weights are cast to ``dtype``.

    GGUF block formats stay packed unless ``keep_packed`` is false; ``quantization``
    (``portaserve.quant.registry.ONLINE_SCHEMES``: "int8", "int4", "fp8", "Q4_K", ...) quantizes
    the decoder's linear weights at load.
    """
    from portaserve.core.loaders.gguf import load_gguf
    from portaserve.core.loaders.hf import load_hf_folder

    if model.startswith("random:"):  # synthetic weights of a real shape (benchmarks, GPU checks)
        from portaserve.core.loaders import synthetic

        config = synthetic.synthetic_config(model)
        weights = synthetic.synthetic_weights(config, dtype=dtype, device=device,
                                              quantization=quantization)
        return LoadedModel(config=config, weights=weights,
                           tokenizer=synthetic.synthetic_tokenizer(config), path=Path(model),
                           format="synthetic")
    path = resolve_model(model)
    start = time.perf_counter()
    if path.is_file():
        config, weights, meta = load_gguf(path, dtype=dtype, device=device, progress=progress,
                                          keep_packed=keep_packed, quantization=quantization)
        tokenizer = Tokenizer.from_gguf_metadata(meta, name=path.name)
        fmt = "gguf"
    else:
        config, weights = load_hf_folder(path, dtype=dtype, device=device, progress=progress,
                                         quantization=quantization)
        tokenizer = Tokenizer.from_hf_folder(path)
        fmt = "safetensors"
    if not config.eos_token_ids and tokenizer.eos_token_ids:
        from dataclasses import replace

        config = replace(config, eos_token_ids=tokenizer.eos_token_ids)
    logger.info("loaded %s (%s, %s, %d layers) in %.1f s", path.name, fmt, config.architecture,
                config.num_layers, time.perf_counter() - start)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, path=path, format=fmt)
