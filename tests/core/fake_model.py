"""A fake model and engine loop that check block tables, slot mapping and prefix caching.

``FakeModel`` keeps a "KV cache" of token ids: each step writes the batch's tokens at their
``slot_mapping`` slots, then, for every request that needs logits, reads the request's whole
sequence back through its block table (positions ``0..seq_len-1``) and returns a token that is
a deterministic function of everything it read. Any bug in block tables, slot mapping, prefix
reuse or eviction changes what is read back, so it changes the outputs; ``reference_generate``
computes the right outputs without any cache.

``drive`` is a minimal engine loop (schedule, run, update, finish at max_tokens) that checks the
block pool's invariants after every step.
"""

from __future__ import annotations

import os
import random
import zlib
from array import array
from collections.abc import Callable, Sequence

from portaserve.core.batch import ScheduledBatch
from portaserve.core.request import FinishReason, Request, RequestStatus
from portaserve.core.sampling import SamplingParams
from portaserve.core.scheduler import Scheduler, SchedulerConfig

VOCAB = 997
EMPTY = -1


def next_token(seq: Sequence[int]) -> int:
    """The fake model's "logits": a hash of the whole sequence, mod the vocabulary."""
    return zlib.crc32(array("q", seq).tobytes()) % VOCAB


def reference_generate(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """What the fake model must produce for a request run alone, with no cache at all."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        token = next_token(seq)
        out.append(token)
        seq.append(token)
    return out


class FakeModel:
    """Token-id KV cache over ``num_blocks * block_size`` slots."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots = [EMPTY] * (num_blocks * block_size)
        self.num_tokens_run = 0

    def step(self, batch: ScheduledBatch) -> dict[str, int]:
        bs = self.block_size
        token_ids = batch.token_ids.tolist()
        positions = batch.positions.tolist()
        slot_mapping = batch.slot_mapping.tolist()
        starts = batch.query_start_loc.tolist()
        seq_lens = batch.seq_lens.tolist()
        context_lens = batch.context_lens.tolist()
        tables = batch.block_tables.tolist()
        for r in range(batch.num_reqs):
            expected = list(range(context_lens[r], seq_lens[r]))
            if positions[starts[r] : starts[r + 1]] != expected:
                raise AssertionError(f"positions of {batch.req_ids[r]} are not {expected}")
        for token, slot in zip(token_ids, slot_mapping, strict=True):
            self.slots[slot] = token
        self.num_tokens_run += len(token_ids)
        out: dict[str, int] = {}
        logits_rows = set(batch.logits_indices.tolist())
        for r, req_id in enumerate(batch.req_ids):
            if starts[r + 1] - 1 not in logits_rows:
                continue
            table = tables[r]
            seq = [self.slots[table[p // bs] * bs + p % bs] for p in range(seq_lens[r])]
            out[req_id] = next_token(seq)
        return out


def make_request(request_id: str, prompt: Sequence[int], max_tokens: int, **kw: object) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return Request(
        request_id=request_id, prompt_token_ids=list(prompt), sampling_params=params, **kw
    )  # type: ignore[arg-type]


def check_pool_invariants(scheduler: Scheduler) -> None:
    """The block pool agrees with the scheduler's block tables (raises AssertionError if not)."""
    pool = scheduler.block_pool
    free = pool.free_block_ids()
    free_set = set(free)
    if len(free) != len(free_set):
        raise AssertionError("a block is in the free list twice")
    refs = [0] * pool.num_blocks
    for table in scheduler.block_tables().values():
        if len(table) != len(set(table)):
            raise AssertionError(f"a block table holds a block twice: {table}")
        for block_id in table:
            refs[block_id] += 1
    cached = pool.cached_blocks()
    for block in pool.blocks:
        if block.ref_cnt != refs[block.block_id]:
            raise AssertionError(
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, "
                f"{refs[block.block_id]} table references"
            )
        if (block.ref_cnt == 0) != (block.block_id in free_set):
            raise AssertionError(
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, "
                f"in free list: {block.block_id in free_set}"
            )
        if block.block_hash is not None and cached.get(block.block_hash) != block.block_id:
            raise AssertionError(f"block {block.block_id} has a hash the cache map does not know")
    for block_hash, block_id in cached.items():
        if pool.blocks[block_id].block_hash != block_hash:
            raise AssertionError(f"cache map points at block {block_id} with another hash")
    for request in scheduler.running:
        table = scheduler.get_block_ids(request.request_id)
        if len(table) * pool.block_size < request.num_computed_tokens:
            raise AssertionError(
                f"{request.request_id}: {len(table)} blocks for "
                f"{request.num_computed_tokens} computed tokens"
            )
    for request in scheduler.waiting:
        if request.num_computed_tokens != 0 or scheduler.get_block_ids(request.request_id):
            raise AssertionError(f"waiting request {request.request_id} holds KV state")


def drive(
    scheduler: Scheduler,
    model: FakeModel,
    requests: Sequence[Request] = (),
    *,
    arrivals: dict[int, list[Request]] | None = None,
    max_steps: int = 100_000,
    on_step: Callable[[int], None] | None = None,
    check: bool = True,
) -> dict[str, list[int]]:
    """Run requests to completion like the engine does; returns request id -> output ids.

    ``arrivals`` adds more requests before given step numbers. Each request finishes (LENGTH)
    once it has ``sampling_params.max_tokens`` outputs; finishing twice or never fails.
    """
    for request in requests:
        scheduler.add_request(request)
    arrivals = dict(arrivals or {})
    finished: dict[str, list[int]] = {}
    for step in range(max_steps):
        for request in arrivals.pop(step, []):
            scheduler.add_request(request)
        if not scheduler.has_unfinished_requests() and not arrivals:
            return finished
        out = scheduler.schedule()
        sampled = model.step(out.batch) if out.scheduled else {}
        if sorted(sampled) != sorted(s.request.request_id for s in out.scheduled if s.needs_logits):
            raise AssertionError("the fake model sampled for other requests than needed logits")
        scheduler.update_from_output(out, sampled)
        for req_id in sampled:
            request = scheduler.get_request(req_id)
            if request is None:
                raise AssertionError(f"{req_id} sampled but unknown")
            max_tokens = request.sampling_params.max_tokens or 0
            if (
                request.num_output_tokens >= max_tokens
                or request.num_tokens >= scheduler.config.max_model_len
            ):
                done = scheduler.finish_request(req_id, FinishReason.LENGTH)
                if done is None or req_id in finished or done.status is not RequestStatus.FINISHED:
                    raise AssertionError(f"{req_id} finished twice or not at all")
                finished[req_id] = list(done.output_token_ids)
        if check:
            check_pool_invariants(scheduler)
        if on_step is not None:
            on_step(step)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def reference_generate_until(
    prompt: Sequence[int], max_tokens: int, stop: Callable[[int], bool]
) -> list[int]:
    """``reference_generate`` that also ends after the first token ``stop`` accepts."""
    out: list[int] = []
    for token in reference_generate(prompt, max_tokens):
        out.append(token)
        if stop(token):
            break
    return out


def drive_overlapped(
    scheduler: Scheduler,
    model: FakeModel,
    requests: Sequence[Request] = (),
    *,
    arrivals: dict[int, list[Request]] | None = None,
    stop: Callable[[int], bool] = lambda token: False,
    abort_at: dict[int, list[str]] | None = None,
    max_steps: int = 100_000,
) -> tuple[dict[str, list[int]], int]:
    """``drive`` with one step in flight, as the engine's async scheduling runs it.

    Step N+1 is scheduled before step N's tokens are appended; its placeholders take N's
    sampled ids (the fake model runs steps in launch order, as a device stream does). A request
    finishes (STOP) after a token ``stop`` accepts, or (LENGTH) at max_tokens; ``abort_at``
    aborts request ids before given step numbers. Returns (request id -> output ids of the
    finished ones, number of discarded tokens: sampled for requests already finished).
    """
    for request in requests:
        scheduler.add_request(request)
    arrivals = dict(arrivals or {})
    abort_at = dict(abort_at or {})
    finished: dict[str, list[int]] = {}
    in_flight: tuple[object, dict[str, int]] | None = None
    prev_ids: list[int] = []
    num_discarded = 0
    for step in range(max_steps):
        for request in arrivals.pop(step, []):
            scheduler.add_request(request)
        for req_id in abort_at.pop(step, []):
            scheduler.finish_request(req_id, FinishReason.ABORT)
        if not scheduler.has_unfinished_requests() and not arrivals and in_flight is None:
            return finished, num_discarded
        out = scheduler.schedule()
        launched = None
        if out.scheduled:
            import torch

            batch = out.batch.with_host_token_ids(torch.tensor(prev_ids, dtype=torch.int64))
            sampled = model.step(batch)
            needed = sorted(s.request.request_id for s in out.scheduled if s.needs_logits)
            if sorted(sampled) != needed:
                raise AssertionError("the fake model sampled for other requests than needed logits")
            launched = (out, sampled)
            prev_ids = [sampled[rid] for rid in batch.logits_req_ids]
        if in_flight is not None:
            done_out, done_sampled = in_flight
            appended = scheduler.update_from_output(done_out, done_sampled)  # type: ignore[arg-type]
            num_discarded += len(done_sampled) - len(appended)
            for sched in appended:
                request = sched.request
                token = request.output_token_ids[-1]
                max_tokens = request.sampling_params.max_tokens or 0
                if stop(token):
                    reason = FinishReason.STOP
                elif (request.num_output_tokens >= max_tokens
                      or request.num_tokens >= scheduler.config.max_model_len):
                    reason = FinishReason.LENGTH
                else:
                    continue
                done = scheduler.finish_request(request.request_id, reason)
                if done is None or request.request_id in finished:
                    raise AssertionError(f"{request.request_id} finished twice or not at all")
                finished[request.request_id] = list(done.output_token_ids)
        in_flight = launched
        check_pool_invariants(scheduler)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def fresh_rng() -> tuple[random.Random, int]:
    """A generator with a fresh seed, and the seed (for failure messages)."""
    seed = int.from_bytes(os.urandom(4), "little")
    return random.Random(seed), seed


def make_scheduler(num_blocks: int, block_size: int, **kw: object) -> tuple[Scheduler, FakeModel]:
    """A scheduler over ``num_blocks`` blocks and the fake model of the same cache."""
    defaults: dict[str, object] = dict(
        max_num_seqs=16, max_num_batched_tokens=64, max_model_len=num_blocks * block_size
    )
    defaults.update(kw)
    config = SchedulerConfig(block_size=block_size, num_blocks=num_blocks, **defaults)  # type: ignore[arg-type]
    return Scheduler(config), FakeModel(num_blocks, block_size)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]
