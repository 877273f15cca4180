"""Decode steps replayed from CUDA graphs: ``Device.compile`` for the cuda device.

A decode step of a small batch is dominated by launch overhead (a Llama layer is ~10 kernel
launches; 32 layers of them at batch 1 cost more than the ~15 GB of weights take to stream).
``GraphExecutor`` captures ``model.forward`` once per batch size of a ladder
(1, 2, 4, 8, then steps of 8, 16, 32 up to ``max_batch``: the engine's ``max_num_seqs``, 512
when it names none; the Llama-3-8B benchmark's graphs up to 512 captured within the memory left
beside a KV cache sized at 0.9 of free memory), over static input buffers, and
replays the smallest graph that fits each pure-decode step (every request has one new token),
padding the batch: padded rows attend to one key of block 0 and write no KV (slot -1, which
``write_kv`` skips). Everything else (prefill, mixed steps, bigger batches, contexts longer than
the captured block-table width) runs op by op, exactly as the core's runner would.

The decode attention's split count is fixed at capture from the largest context the graph
allows; each request's chunks are sized from its own length at run time, so short contexts
only leave empty splits. Logits are computed outside the graph from the graph's hidden states.
A step's inputs arrive in one packed host-to-device copy (``ScheduledBatch.to_device``) and are
copied into the static buffers on the device; token ids the previous step sampled (async
scheduling) are read there from its sampled ids, so the host never waits for them.

Guards: graphs are used only when the model's ``write_kv`` and ``paged_attention`` are this
package's Triton kernels (a reference fallback reads host copies of the metadata, which a
replay would not refresh), and ``PORTASERVE_CUDA_GRAPHS=0`` turns them off.
On a CPU device the same executor runs with ``eager_replay=True`` (the captured function is
called again instead of replayed), which is how the padding logic is tested without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from portaserve import envs
from portaserve.core.batch import DeviceBatch, ScheduledBatch, build_batch
from portaserve.plugins.device import AttentionMetadata

logger = logging.getLogger(__name__)

#: Graphs up to this batch when the engine names no ``max_batch`` (its ``max_num_seqs``).
DEFAULT_MAX_BATCH = 512

_TRITON_MODULES = ("portaserve.devices.cuda.kv", "portaserve.devices.cuda.attention")


def batch_size_ladder(max_batch: int) -> list[int]:
    """Captured sizes: 1, 2, 4, 8, 16, 24, 32, 48, 64, 80, ..., 128, 160, ... up to max_batch."""
    sizes, size = [], 1
    while size <= max_batch:
        sizes.append(size)
        size = size * 2 if size < 8 else size + (8 if size < 32 else 16 if size < 128 else 32)
    if sizes and sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def is_pure_decode(batch: ScheduledBatch) -> bool:
    """Every request advances by exactly one token."""
    return batch.num_reqs > 0 and batch.num_tokens == batch.num_reqs and batch.max_query_len == 1


class GraphExecutor:
    """``Executor`` replaying captured decode graphs (see the module docstring)."""

    #: Placeholder token ids (async scheduling) are filled in on the device.
    accepts_device_input_ids = True

    def __init__(
        self,
        model: Any,
        kv_caches: list[Any],
        device: torch.device,
        *,
        max_batch: int,
        max_blocks_per_seq: int,
        block_size: int,
        eager_replay: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.eager_replay = eager_replay
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        with torch.inference_mode():
            b, dev = self.max_batch, device
            self.input_ids = torch.zeros(b, dtype=torch.int64, device=dev)  # [B]
            self.positions = torch.zeros(b, dtype=torch.int64, device=dev)  # [B]
            self.seq_lens = torch.ones(b, dtype=torch.int32, device=dev)  # [B]
            self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=dev)  # [B]
            self.block_tables = torch.zeros(b, max_blocks_per_seq, dtype=torch.int32, device=dev)
            self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=dev)  # [B + 1]
            self.context_lens = torch.zeros(b, dtype=torch.int32, device=dev)  # [B]
        #: batch size -> (replay, hidden states [B, H] the replay refreshes)
        self.graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        self.num_replays = 0
        self.num_eager = 0

    # -- capture ----------------------------------------------------------------------------

    def _metadata(self, size: int) -> AttentionMetadata:
        max_seq_len = self.max_blocks_per_seq * self.block_size
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=max_seq_len,  # fixes the decode split count for every replay
            block_size=self.block_size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:size], self.positions[:size],
                                  self._metadata(size), self.kv_caches)

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> None:
        """Capture every size of the ladder (or only ``sizes``, which replaces those graphs: a
        benchmark re-captures after changing a kernel setting), largest first (they share one
        memory pool)."""
        start = time.perf_counter()
        if sizes is not None and not set(sizes) <= set(self.sizes):
            raise ValueError(f"sizes={sizes}: not in the captured ladder {self.sizes}")
        sizes = self.sizes if sizes is None else sorted(sizes)
        if self.eager_replay:
            for size in sizes:
                hidden = self._forward(size)
                self.graphs[size] = (self._eager_replayer(size, hidden), hidden)
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(sizes):
                self._forward(size)  # warm-up: compiles the Triton kernels for this shape
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden = self._forward(size)
                self.graphs[size] = (graph.replay, hidden)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self.warm_up_eager()
        torch.cuda.synchronize(self.device)
        logger.info("cuda graphs: captured decode batch sizes %s in %.1f s", sizes,
                    time.perf_counter() - start)

    def warm_up_eager(self) -> None:
        """Run one small mixed step op by op (two decodes beside a prompt chunk), so the kernels
        of prefill and mixed steps compile now rather than at the first request (~1 s each).
        It writes K/V into blocks 0..6, free at startup; nothing reads them before a request
        writes its own."""
        bs = self.block_size
        if self.kv_caches[0].shape[1] < 7:
            return
        batch = build_batch([("warm-0", [1], bs - 1, [0, 1], True),
                             ("warm-1", [2], bs + 3, [2, 3], True),
                             ("warm-2", [3] * (2 * bs + 5), 0, [4, 5, 6], True)], bs)
        try:
            self._execute_eager(batch.to_device(self.device), None)
        except Exception:  # only a head start: the first real step compiles instead
            logger.warning("cuda graphs: the mixed-step warm-up failed; kernels compile at first use",
                           exc_info=True)

    def _eager_replayer(self, size: int, hidden: torch.Tensor) -> Callable[[], None]:
        def replay() -> None:
            hidden.copy_(self._forward(size))

        return replay

    # -- execution --------------------------------------------------------------------------

    def graph_size_for(self, batch: ScheduledBatch) -> int | None:
        """The captured size that will run ``batch``, or None when it runs op by op."""
        if not self.graphs or not is_pure_decode(batch) or batch.num_reqs > self.max_batch:
            return None
        if batch.block_tables.shape[1] > self.max_blocks_per_seq:
            used = (batch.seq_lens.max().item() + self.block_size - 1) // self.block_size
            if used > self.max_blocks_per_seq:
                return None
        return next(size for size in self.sizes if size >= batch.num_reqs)

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, prev_sampled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] float32, on the device.

        ``prev_sampled``: the previous step's sampled ids, read for the batch's placeholders.
        """
        size = self.graph_size_for(batch)
        moved = batch.to_device(self.device)  # one packed host-to-device copy
        if size is None:
            self.num_eager += 1
            return self._execute_eager(moved, prev_sampled)
        self.num_replays += 1
        r = batch.num_reqs
        width = min(batch.block_tables.shape[1], self.max_blocks_per_seq)
        attn = moved.attn
        self.input_ids[:r].copy_(moved.input_ids(prev_sampled))
        self.positions[:r].copy_(moved.positions)
        self.seq_lens[:r].copy_(attn.seq_lens)
        self.slot_mapping[:r].copy_(attn.slot_mapping)
        self.block_tables[:r, :width].copy_(attn.block_tables[:, :width])
        if size > r:  # padding rows: one key of block 0, no KV write
            self.seq_lens[r:size].fill_(1)
            self.slot_mapping[r:size].fill_(-1)
            self.block_tables[r:size, 0].fill_(0)
        replay, hidden = self.graphs[size]
        replay()
        if batch.logits_indices.numel() == 0:
            return torch.empty((0, 0), dtype=torch.float32, device=self.device)
        rows = hidden[moved.logits_indices]  # [L, H]
        return self.model.compute_logits(rows, upcast=False)

    def _execute_eager(self, moved: DeviceBatch, prev_sampled: torch.Tensor | None) -> torch.Tensor:
        hidden = self.model.forward(moved.input_ids(prev_sampled), moved.positions, moved.attn,
                                    self.kv_caches)  # [T, H]
        if moved.logits_indices.numel() == 0:
            return torch.empty((0, 0), dtype=torch.float32, device=self.device)
        hidden = hidden[moved.logits_indices]  # [L, H]
        return self.model.compute_logits(hidden, upcast=False)


def uses_triton_kv_ops(model: Any) -> bool:
    """Whether the model's KV ops are this package's kernels (safe to replay from a graph)."""
    kernels = getattr(model, "kernels", None)
    if kernels is None:
        return False
    return all(getattr(getattr(kernels, op, None), "__module__", None) == module
               for op, module in zip(("write_kv", "paged_attention"), _TRITON_MODULES, strict=True))


def graph_executor_for(
    model: Any,
    kv_caches: list[Any],
    device: torch.device,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    eager_replay: bool = False,
) -> GraphExecutor | None:
    """A captured ``GraphExecutor`` for ``model``, or None when graphs are off or unsafe."""
    if not envs.cuda_graphs():
        logger.info("cuda graphs: off (PORTASERVE_CUDA_GRAPHS=0)")
        return None
    if not uses_triton_kv_ops(model):
        logger.info("cuda graphs: off, the model's write_kv/paged_attention are not the Triton kernels")
        return None
    if not kv_caches or not isinstance(kv_caches[0], torch.Tensor) or kv_caches[0].dim() != 5:
        logger.info("cuda graphs: off, unrecognised KV cache")
        return None
    num_blocks, block_size = kv_caches[0].shape[1], kv_caches[0].shape[3]  # blocks_hnd
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_blocks = num_blocks if not max_positions else min(num_blocks, -(-max_positions // block_size))
    executor = GraphExecutor(model, kv_caches, device, max_batch=max(1, min(max_batch, num_blocks)),
                             max_blocks_per_seq=max_blocks, block_size=block_size,
                             eager_replay=eager_replay)
    executor.capture()
    return executor
