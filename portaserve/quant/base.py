"""Quantized weights as the model and the kernels see them.

A ``QuantizedWeight`` keeps a linear layer's weight packed (the format decides how) and knows
its logical shape ``[out_features, in_features]``. Its quant method provides the reference
dequantization; fast kernels are registered per (format, device) and read ``data`` directly.

Numerics: a ``quant_linear`` kernel computes, by default, what the reference does (x in its
dtype times the dequantized weight: "weight only"). A kernel that computes something else on
purpose (fp8 W8A8 quantizes the activations too) says so with a ``quant_numerics`` attribute
naming one of its format's ``QuantMethod.numerics``; that entry holds a plain-torch statement
of those numerics, the oracle the conformance suite checks the kernel against, and the error
allowed against the weight-only reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

#: What the reference ``quant_linear`` computes: x in its dtype @ dequantize(w).T
WEIGHT_ONLY = "weight_only"


@dataclass(frozen=True, slots=True)
class Numerics:
    """A way other than weight-only in which a kernel may compute a format's linear.

    ``emulate(x, weight, bias)`` states it in plain torch (the oracle such a kernel is checked
    against, tightly); ``max_rel_error`` bounds ``|emulate - reference| / |reference|``
    (Frobenius) on random inputs: the accuracy the scheme itself gives up.
    ``accumulation_rel_error`` is how far (same measure) a kernel may lie from ``emulate``
    because the hardware sums its products with fewer bits than float32 (Hopper's fp8 tensor
    cores); a kernel within it passes even where the dtype's elementwise tolerance is tighter."""

    emulate: Callable[..., torch.Tensor]
    max_rel_error: float
    accumulation_rel_error: float = 0.0


@dataclass(frozen=True, slots=True)
class QuantizedActivation:
    """Activations already quantized for a W8A8 linear, by the op that produced them (the fused
    ``rms_norm_fp8`` / ``silu_and_mul_fp8``): fp8 e4m3 ``data`` [T, K] and float32 per-token
    ``scale`` [T, 1] (``fp8.quantize_activation``'s dynamic_per_token values), and the dtype
    the activations had, which the linear's output takes.

    A ``quant_linear`` kernel takes one only if it says so (``accepts_quantized_activation``);
    the model hands them to no other."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def accepts_quantized_activation(fn: Callable[..., Any]) -> bool:
    """Whether a ``quant_linear`` kernel takes a ``QuantizedActivation`` for x (its
    ``accepts_quantized_activation`` attribute)."""
    return bool(getattr(fn, "accepts_quantized_activation", False))


def kernel_numerics(fn: Callable[..., Any]) -> str:
    """The numerics a ``quant_linear`` kernel declares (its ``quant_numerics`` attribute);
    ``WEIGHT_ONLY`` when it declares none."""
    return getattr(fn, "quant_numerics", WEIGHT_ONLY)


class QuantMethod(Protocol):
    """A weight format: packing, loading and the reference dequantization."""

    name: str

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype``."""
        ...

    def dequantize_rows(
        self, weight: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """(optional) Rows ``[len(rows), in]`` only: an embedding lookup on packed weights."""
        ...

    #: (optional) numerics other than weight-only that kernels of this format may declare,
    #: by name (see the module docstring). Defaults to none.
    numerics: dict[str, Numerics]


@dataclass(slots=True)
class QuantizedWeight:
    """A packed linear weight. ``data`` holds the format's tensors (qweight, scales, ...)."""

    format: str
    shape: tuple[int, int]  # (out_features, in_features)
    data: dict[str, torch.Tensor]
    method: QuantMethod
    meta: dict[str, Any] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.method.dequantize(self, dtype)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Look up rows (an embedding table kept packed). ``ids`` [T] -> [T, in]."""
        rows = getattr(self.method, "dequantize_rows", None)
        if rows is not None:
            return rows(self, ids, dtype)
        return self.dequantize(dtype)[ids]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def to(self, device: torch.device) -> QuantizedWeight:
        data = {k: v.to(device) for k, v in self.data.items()}
        return QuantizedWeight(self.format, self.shape, data, self.method, dict(self.meta))
