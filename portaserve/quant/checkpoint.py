"""Pre-quantized safetensors checkpoints (GPTQ, AWQ, fp8) -> ``QuantizedWeight`` per linear.

A Hugging Face folder whose ``config.json`` has a ``quantization_config`` stores each quantized
linear as several tensors under the layer's prefix. The safetensors loader keeps those tensors
in their stored dtype (``keeps_dtype``) and hands the dict to ``assemble``, which replaces them
by one ``QuantizedWeight`` under ``<prefix>.weight``:

- ``gptq`` (bits 4, ``desc_act`` false): ``qweight``, ``qzeros``, ``scales``, ``g_idx`` -> int4;
  ``checkpoint_format: gptq_v2`` stores zeros as they are, v1 (the default) stores zero - 1.
- ``awq`` (bits 4, GEMM layout): ``qweight``, ``qzeros``, ``scales`` -> int4.
- ``fp8`` (vLLM / llm-compressor ``quant_method: fp8``, per-tensor or per-channel scales):
  ``weight`` (float8_e4m3fn), ``weight_scale``, optional ``input_scale`` -> fp8.
Block-wise fp8 (``weight_block_size``) and other methods are refused with the reason.
"""

from __future__ import annotations

from typing import Any

import torch

from portaserve.errors import ModelError
from portaserve.quant.base import QuantizedWeight

SUPPORTED_METHODS = ("gptq", "awq", "fp8")
_KEPT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale", ".input_scale")


def checkpoint_method(quant_config: dict[str, Any], name: str = "") -> str:
    """Validate a ``quantization_config``; returns the method name or raises ``ModelError``."""
    method = str(quant_config.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise ModelError(f"model {name!r} is a pre-quantized checkpoint ({method!r}); supported "
                         f"pre-quantized checkpoints are {list(SUPPORTED_METHODS)}",
                         field="quantization_config")
    if method in ("gptq", "awq") and int(quant_config.get("bits", quant_config.get("w_bit", 4))) != 4:
        raise ModelError(f"model {name!r}: {method} with bits={quant_config.get('bits')} is not "
                         "supported (4-bit only)", field="quantization_config")
    if method == "awq" and str(quant_config.get("version", "gemm")).lower() != "gemm":
        raise ModelError(f"model {name!r}: AWQ version {quant_config.get('version')!r} is not "
                         "supported (GEMM layout only)", field="quantization_config")
    if method == "fp8" and quant_config.get("weight_block_size"):
        raise ModelError(f"model {name!r}: block-wise fp8 (weight_block_size="
                         f"{quant_config['weight_block_size']}) is not supported; per-tensor and "
                         "per-channel scales are", field="quantization_config")
    return method


def keeps_dtype(name: str, tensor: torch.Tensor) -> bool:
    """Tensors of a pre-quantized checkpoint that must not be cast to the model dtype."""
    return name.endswith(_KEPT_SUFFIXES) or tensor.element_size() == 1 or not tensor.is_floating_point()


def assemble(weights: dict[str, Any], quant_config: dict[str, Any]) -> dict[str, Any]:
    """Replace each quantized linear's tensors by one ``QuantizedWeight`` (in place; returned)."""
    from portaserve.quant.fp8 import FP8_DTYPE, FP8Method
    from portaserve.quant.int_formats import Int4Method

    method = checkpoint_method(quant_config)
    if method in ("gptq", "awq"):
        int4 = Int4Method()
        for prefix in [k[: -len(".qweight")] for k in weights if k.endswith(".qweight")]:
            qweight = weights.pop(f"{prefix}.qweight")
            qzeros = weights.pop(f"{prefix}.qzeros")
            scales = weights.pop(f"{prefix}.scales")
            g_idx = weights.pop(f"{prefix}.g_idx", None)
            if method == "gptq":
                v2 = str(quant_config.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
                packed: QuantizedWeight = int4.from_gptq(
                    qweight, qzeros, scales, g_idx, symmetric=bool(quant_config.get("sym", False)),
                    zero_offset=0 if v2 else 1)
            else:
                packed = int4.from_awq(qweight, qzeros, scales)
            weights[f"{prefix}.weight"] = packed
        return weights
    fp8 = FP8Method()
    static = str(quant_config.get("activation_scheme", "dynamic")).lower() == "static"
    for prefix in [k[: -len(".weight_scale")] for k in weights if k.endswith(".weight_scale")]:
        weight = weights[f"{prefix}.weight"]
        if weight.dtype != FP8_DTYPE:
            raise ModelError(f"{prefix}.weight has dtype {weight.dtype}, expected float8_e4m3fn",
                             field="model")
        input_scale = weights.pop(f"{prefix}.input_scale", None)
        weights[f"{prefix}.weight"] = fp8.from_tensors(
            weight, weights.pop(f"{prefix}.weight_scale"),
            input_scale=input_scale if static else None)
    return weights
