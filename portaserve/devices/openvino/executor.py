"""The whole-model executor of the ``openvino`` device: a ``ScheduledBatch`` in, logits out.

It owns one compiled model (``graph.py``) and one infer request whose per-layer
``key_cache.{i}`` / ``value_cache.{i}`` inputs are bound once, at construction, to the cache
memory the core allocated through ``Device.allocate_kv_cache``. Each step converts the batch
mechanically into paged attention's inputs; block ids are the core block pool's, unchanged:

=========================  =====================================================================
paged attention input      from the ``ScheduledBatch``
=========================  =====================================================================
``past_lens [R]``          ``context_lens`` (tokens already cached: prefix hits, earlier chunks)
``subsequence_begins``     ``query_start_loc`` ([R+1] offsets of each request's new tokens)
``block_indices [N]``      each row of ``block_tables`` cut to ``ceil(seq_lens / block_size)``,
                           rows concatenated
``block_indices_begins``   ``[0, cumsum(ceil(seq_lens / block_size))]``
``max_context_len``        ``max(seq_lens)``
=========================  =====================================================================

Cache memory: with KV precision f32 the plugin's cache layout per layer is
``[num_blocks, num_kv_heads, block_size, head_dim]`` f32, exactly ``kv_cache[0]`` and
``kv_cache[1]`` of the device's ``blocks_hnd`` tensors, so the executor and the reference ops
share the same bytes. With the plugin's default u8 cache (per-channel quantized keys
``[num_blocks, Hk, block_size + 8, D]``, per-token quantized values ``[num_blocks, Hk,
block_size, D + 8]``) the executor stores those u8 blocks inside the same allocation.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import openvino as ov
import torch

from portaserve.core.batch import ScheduledBatch
from portaserve.errors import DeviceError

logger = logging.getLogger(__name__)

_NP_OF_OV = {
    ov.Type.f32: np.float32, ov.Type.f16: np.float16, ov.Type.u8: np.uint8, ov.Type.i8: np.int8,
}


def step_inputs(batch: ScheduledBatch, block_size: int) -> dict[str, np.ndarray]:
    """The graph inputs of one step (everything but the caches), as numpy arrays."""
    if batch.block_size != block_size:
        raise DeviceError(
            f"openvino: the batch uses KV block size {batch.block_size}, but the OpenVINO CPU "
            f"plugin pages its cache in blocks of {block_size}; set block_size={block_size}")
    seq_lens = batch.seq_lens.numpy().astype(np.int32)  # [R]
    blocks_per_seq = (seq_lens + block_size - 1) // block_size  # [R]
    tables = batch.block_tables.numpy()  # [R, max_blocks]
    if tables.shape[0] and int(blocks_per_seq.max()) > tables.shape[1]:
        raise DeviceError(
            f"openvino: block_tables has {tables.shape[1]} columns but a sequence of "
            f"{int(seq_lens.max())} tokens needs {int(blocks_per_seq.max())} blocks")
    used = np.arange(tables.shape[1])[None, :] < blocks_per_seq[:, None]  # [R, max_blocks]
    begins = np.zeros(len(seq_lens) + 1, dtype=np.int32)
    np.cumsum(blocks_per_seq, out=begins[1:])
    return {
        "input_ids": batch.token_ids.numpy(),
        "positions": batch.positions.numpy(),
        "past_lens": batch.context_lens.numpy().astype(np.int32),
        "subsequence_begins": batch.query_start_loc.numpy().astype(np.int32),
        "block_indices": np.ascontiguousarray(tables[used], dtype=np.int32),  # rows in order
        "block_indices_begins": begins,
        "max_context_len": np.array(int(seq_lens.max()) if len(seq_lens) else 0, dtype=np.int32),
        "score_aggregation_window": np.zeros(len(seq_lens), dtype=np.int32),
        "logits_indices": batch.logits_indices.numpy(),
    }


def _cache_tensor(storage: torch.Tensor, port: Any, num_blocks: int, name: str) -> ov.Tensor:
    """An ov.Tensor of the plugin's cache shape/type for ``port``, backed by ``storage``'s bytes."""
    dims = list(port.get_partial_shape())
    if any(d.is_dynamic for d in dims[1:]):
        raise DeviceError(f"openvino: the plugin left cache {name} with a dynamic layout {dims}")
    shape = [num_blocks, *[d.get_length() for d in dims[1:]]]
    ov_type = port.get_element_type()
    np_type = _NP_OF_OV.get(ov_type)
    if np_type is None:
        raise DeviceError(f"openvino: cache {name} has element type {ov_type}, which the executor cannot hold")
    if not storage.is_contiguous():
        raise DeviceError(f"openvino: KV cache storage for {name} is not contiguous")
    raw = storage.view(-1).view(torch.uint8).numpy()
    needed = int(np.prod(shape)) * np.dtype(np_type).itemsize
    if needed > raw.nbytes:
        raise DeviceError(
            f"openvino: cache {name} needs {needed} bytes in layout {shape} {ov_type}, but the "
            f"allocated block storage has {raw.nbytes}")
    return ov.Tensor(raw[:needed].view(np_type).reshape(shape), shared_memory=True)


class OpenVINOExecutor:
    """Runs the compiled graph over the core's paged KV cache (see the module docstring)."""

    def __init__(
        self,
        compiled: ov.CompiledModel,
        kv_caches: list[torch.Tensor],
        block_size: int,
        vocab_size: int,
    ) -> None:
        self.compiled = compiled
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv_caches = kv_caches  # keeps the memory the request reads alive
        self.request = compiled.create_infer_request()
        inputs = {port.get_any_name(): port for port in compiled.inputs}
        num_layers = sum(1 for name in inputs if name.startswith("key_cache."))
        if num_layers != len(kv_caches):
            raise DeviceError(
                f"openvino: the graph has {num_layers} layers but {len(kv_caches)} KV caches were given")
        self.cache_layout: dict[str, tuple[list[int], str]] = {}
        for i, layer in enumerate(kv_caches):  # layer [2, num_blocks, Hk, block_size, D]
            num_blocks = layer.shape[1]
            for half, prefix in ((0, "key_cache"), (1, "value_cache")):
                name = f"{prefix}.{i}"
                tensor = _cache_tensor(layer[half], inputs[name], num_blocks, name)
                self.request.set_tensor(name, tensor)
                self.cache_layout[prefix] = (list(tensor.shape), tensor.element_type.get_type_name())
        logger.info("openvino executor: cache layout %s", self.cache_layout)

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """One step. Returns float32 logits [len(batch.logits_indices), vocab]."""
        if batch.num_tokens == 0:
            return torch.empty((0, self.vocab_size), dtype=torch.float32)
        feeds = step_inputs(batch, self.block_size)
        for name, array in feeds.items():
            self.request.set_tensor(name, ov.Tensor(array, shared_memory=True))  # contiguous
        try:
            self.request.infer()
        except RuntimeError as e:
            raise DeviceError(
                f"openvino: graph step failed ({batch.num_reqs} requests, {batch.num_tokens} "
                f"tokens): {e}") from e
        logits = self.request.get_output_tensor(0).data  # [L, V], owned by the request
        return torch.from_numpy(np.array(logits, dtype=np.float32, copy=True))
