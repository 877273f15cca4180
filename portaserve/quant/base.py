"""Quantized weights as the model and the kernels see them.

A ``QuantizedWeight`` keeps a linear layer's weight packed (the format decides how) and knows
its logical shape ``[out_features, in_features]``. Its quant method provides the reference
dequantization; fast kernels are registered per (format, device) and read ``data`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


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
