"""``ScheduledBatch``: the one device-agnostic description of an engine step.

The scheduler decides which requests advance by how many tokens; the engine flattens that into
this batch on the host; the runner moves it to the device (or a graph executor reads it as is).
Every backend consumes exactly this. Host tensors only; nothing here touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    Vectorized with numpy: this runs every step, for hundreds of requests.
    """
    num_reqs = len(items)
    num_new = np.fromiter((len(item[1]) for item in items), dtype=np.int64, count=num_reqs)
    computed = np.fromiter((item[2] for item in items), dtype=np.int64, count=num_reqs)
    starts = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(num_new, out=starts[1:])
    num_tokens = int(starts[-1])
    max_blocks = max((len(item[3]) for item in items), default=0)
    tables = np.zeros((num_reqs, max(max_blocks, 1)), dtype=np.int32)
    for row, item in enumerate(items):
        if item[3]:
            tables[row, : len(item[3])] = item[3]
    token_ids = np.fromiter(
        (t for item in items for t in item[1]), dtype=np.int64, count=num_tokens
    )
    # position of each new token: its request's computed count + its index within the request
    rows = np.repeat(np.arange(num_reqs), num_new)  # [T]
    positions = computed[rows] + (np.arange(num_tokens) - starts[rows])
    slots = tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
    needs = np.fromiter((item[4] for item in items), dtype=bool, count=num_reqs)
    logits_indices = starts[1:][needs] - 1
    return ScheduledBatch(
        req_ids=[item[0] for item in items],
        token_ids=torch.from_numpy(token_ids),
        positions=torch.from_numpy(positions),
        query_start_loc=torch.from_numpy(starts.astype(np.int32)),
        seq_lens=torch.from_numpy((computed + num_new).astype(np.int32)),
        context_lens=torch.from_numpy(computed.astype(np.int32)),
        block_tables=torch.from_numpy(tables),
        slot_mapping=torch.from_numpy(slots),
        logits_indices=torch.from_numpy(logits_indices),
        logits_req_ids=[item[0] for item in items if item[4]],
        block_size=block_size,
    )
