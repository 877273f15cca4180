"""The model runner: a ``ScheduledBatch`` in, float32 logits of the sampling rows out.

It moves the host batch to the device, runs the model op by op over the device's kernel table,
or hands the batch to the device's whole-model executor when the device compiled one. It only
reads block tables; it never allocates or frees blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from portaserve.core.batch import ScheduledBatch
from portaserve.plugins.device import Device, Executor


class ModelRunner:
    def __init__(
        self, model: Any, device: Device, kv_caches: list[Any], executor: Executor | None = None
    ) -> None:
        self.model = model
        self.device = device
        self.kv_caches = kv_caches
        self.executor = executor
        self._torch_device = device.torch_device

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step. Returns logits [len(batch.logits_indices), vocab] float32."""
        if self.executor is not None:
            return self.executor.execute(batch).float()
        dev = self._torch_device
        input_ids = batch.token_ids.to(dev, non_blocking=True)  # [T]
        positions = batch.positions.to(dev, non_blocking=True)  # [T]
        attn = batch.attention_metadata(dev)
        hidden = self.model.forward(input_ids, positions, attn, self.kv_caches)  # [T, H]
        if batch.logits_indices.numel() == 0:
            return torch.empty((0, 0), dtype=torch.float32, device=dev)
        hidden = hidden[batch.logits_indices.to(dev, non_blocking=True)]  # [L, H]
        return self.model.compute_logits(hidden).float()  # [L, V]
