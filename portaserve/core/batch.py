"""``ScheduledBatch``: the one device-agnostic description of an engine step.

The scheduler decides which requests advance by how many tokens; the engine flattens that into
this batch on the host; the runner moves it to the device (or a graph executor reads it as is).
Every backend consumes exactly this. Host tensors only; nothing here touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from portaserve.plugins.device import AttentionMetadata


@dataclass(slots=True)
class ScheduledBatch:
    """One step, flattened over R scheduled requests and T new tokens (host tensors)."""

    req_ids: list[str]  # [R]
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32, tokens in cache after this step
    context_lens: torch.Tensor  # [R] int32, tokens in cache before this step
    block_tables: torch.Tensor  # [R, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64
    #: Rows of the flattened tokens whose logits are needed (last token of each request that
    #: samples this step), and which request each belongs to.
    logits_indices: torch.Tensor  # [L] int64
    logits_req_ids: list[str]  # [L]
    block_size: int

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max().item()) if self.req_ids else 0

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max().item()) if self.req_ids else 0

    def attention_metadata(self, device: torch.device) -> AttentionMetadata:
        """The attention inputs on ``device`` (host copies kept for host-side kernels)."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            seq_lens=self.seq_lens.to(device, non_blocking=True),
            context_lens=self.context_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            block_size=self.block_size,
            query_start_loc_cpu=tuple(self.query_start_loc.tolist()),
            seq_lens_cpu=tuple(self.seq_lens.tolist()),
            context_lens_cpu=tuple(self.context_lens.tolist()),
        )


def build_batch(
    items: list[tuple[str, list[int], int, list[int], bool]],
    block_size: int,
) -> ScheduledBatch:
    """Flatten scheduled work into a ``ScheduledBatch``.

    Each item is ``(req_id, new_token_ids, num_computed_tokens, block_ids, needs_logits)``:
    the tokens to run this step, how many of the request's tokens are already in the cache,
    the request's block table, and whether its last new token must be sampled from.
    """
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    context_lens: list[int] = []
    logits_indices: list[int] = []
    logits_req_ids: list[str] = []
    max_blocks = max((len(item[3]) for item in items), default=0)
    tables = torch.zeros((len(items), max(max_blocks, 1)), dtype=torch.int32)
    for row, (req_id, new_ids, num_computed, block_ids, needs_logits) in enumerate(items):
        n = len(new_ids)
        token_ids.extend(new_ids)
        pos = range(num_computed, num_computed + n)
        positions.extend(pos)
        slots.extend(block_ids[p // block_size] * block_size + p % block_size for p in pos)
        starts.append(starts[-1] + n)
        seq_lens.append(num_computed + n)
        context_lens.append(num_computed)
        if block_ids:
            tables[row, : len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)
        if needs_logits:
            logits_indices.append(starts[-1] - 1)
            logits_req_ids.append(req_id)
    return ScheduledBatch(
        req_ids=[item[0] for item in items],
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        logits_req_ids=logits_req_ids,
        block_size=block_size,
    )
