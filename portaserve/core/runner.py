"""The model runner: a ``ScheduledBatch`` in, float32 logits of the sampling rows out.

It moves the host batch to the device (one packed copy), runs the model op by op over the
device's kernel table, or hands the batch to the device's whole-model executor when the device
compiled one. It only reads block tables; it never allocates or frees blocks.

Async scheduling: a batch may name tokens that the previous step sampled on the device
(``ScheduledBatch.prev_token_rows``); ``execute`` takes that step's sampled ids and fills them
in on the device, queued behind the step that produces them, so the host never waits. An
executor that reads token ids on the host only (no ``accepts_device_input_ids``) gets the batch
with the ids filled in on the host instead, which waits for the previous step.
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
    def execute(
        self, batch: ScheduledBatch, prev_sampled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one step. Returns logits [len(batch.logits_indices), vocab] in the model's (or the
        executor's) dtype: the sampler upcasts to float32 where it needs to.

        ``prev_sampled``: the previous step's sampled ids [L_prev] int64 on the device, needed
        when the batch has placeholders.
        """
        if self.executor is not None:
            if getattr(self.executor, "accepts_device_input_ids", False):
                return self.executor.execute(batch, prev_sampled)
            return self.executor.execute(batch.with_host_token_ids(prev_sampled))
        dev = self._torch_device
        moved = batch.to_device(dev)
        input_ids = moved.input_ids(prev_sampled)  # [T]
        hidden = self.model.forward(input_ids, moved.positions, moved.attn, self.kv_caches)  # [T, H]
        if batch.logits_indices.numel() == 0:
            return torch.empty((0, 0), dtype=torch.float32, device=dev)
        hidden = hidden[moved.logits_indices]  # [L, H]
        return self.model.compute_logits(hidden, upcast=False)  # [L, V]
