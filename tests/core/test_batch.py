"""The batch builders against plain-Python references, on random workloads.

``build_batch_columns`` (numpy, the one the scheduler calls) is checked against a per-token
Python loop, and the scheduler's ``_build_batch`` (which gathers the columns directly, without
item tuples) against ``build_batch`` over items made from the requests' state, step by step,
synchronously and with one step in flight, under preemption, prefix sharing and aborts.
"""

from __future__ import annotations

import random

import pytest
import torch
from fake_model import make_request, make_scheduler, random_tokens

from portaserve.core.batch import ScheduledBatch, build_batch
from portaserve.core.request import FinishReason

FIELDS = ("token_ids", "positions", "query_start_loc", "seq_lens", "context_lens", "block_tables",
          "slot_mapping", "logits_indices", "prev_token_rows", "prev_sample_rows")


def _reference_batch(items: list[tuple], block_size: int, placeholders: list[tuple[int, int]]) -> dict:
    """Every field of ``build_batch``'s result, one token at a time in plain Python."""
    width = max([len(item[3]) for item in items] + [1])
    ref: dict = {name: [] for name in FIELDS}
    ref["query_start_loc"] = [0]
    for _rid, tokens, computed, blocks, needs in items:
        for j, token in enumerate(tokens):
            pos = computed + j
            ref["token_ids"].append(token)
            ref["positions"].append(pos)
            ref["slot_mapping"].append(blocks[pos // block_size] * block_size + pos % block_size)
        ref["query_start_loc"].append(ref["query_start_loc"][-1] + len(tokens))
        ref["seq_lens"].append(computed + len(tokens))
        ref["context_lens"].append(computed)
        ref["block_tables"].append(list(blocks) + [0] * (width - len(blocks)))
        if needs:
            ref["logits_indices"].append(ref["query_start_loc"][-1] - 1)
    ref["prev_token_rows"] = [ref["query_start_loc"][i + 1] - 1 for i, _ in placeholders] or None
    ref["prev_sample_rows"] = [row for _, row in placeholders] or None
    ref["req_ids"] = [item[0] for item in items]
    ref["logits_req_ids"] = [item[0] for item in items if item[4]]
    return ref


def _assert_batch_equals(batch: ScheduledBatch, ref: dict, note: str) -> None:
    for name in FIELDS:
        got = getattr(batch, name)
        if ref[name] is None:
            assert got is None, f"{note}: {name}"
            continue
        assert got.tolist() == ref[name], f"{note}: {name}"
    assert batch.req_ids == ref["req_ids"] and batch.logits_req_ids == ref["logits_req_ids"], note
    for name in ("token_ids", "positions", "slot_mapping", "logits_indices"):
        assert getattr(batch, name).dtype == torch.int64, f"{note}: {name} dtype"
    for name in ("query_start_loc", "seq_lens", "context_lens", "block_tables"):
        assert getattr(batch, name).dtype == torch.int32, f"{note}: {name} dtype"


@pytest.mark.parametrize("seed", range(20))
def test_build_batch_matches_the_python_reference(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    items = []
    for i in range(rng.randrange(0, 12)):
        computed = rng.randrange(0, 60)
        tokens = random_tokens(rng, rng.choice([1, 1, 1, rng.randrange(1, 40)]))
        num_blocks = -(-(computed + len(tokens)) // block_size) + rng.randrange(0, 3)
        blocks = rng.sample(range(500), num_blocks)
        items.append((f"r{i}", tokens, computed, blocks, rng.random() < 0.8))
    placeholders = [(i, rng.randrange(20)) for i in range(len(items)) if rng.random() < 0.5]
    batch = build_batch(items, block_size, placeholders)
    _assert_batch_equals(batch, _reference_batch(items, block_size, placeholders), f"seed {seed}")


def _items_from_state(sched, out, tokens_before: dict[str, list[int]], prev_rows: dict[str, int]):
    """``build_batch``'s items and placeholders for a scheduled step, from the requests' tokens
    and block tables (what ``_build_batch`` must have produced)."""
    items, placeholders = [], []
    for index, s in enumerate(out.scheduled):
        rid = s.request.request_id
        known = tokens_before[rid]
        start, end = s.num_computed_before, s.num_computed_before + s.num_new_tokens
        tokens = known[start:end]
        if end > len(known):  # its last token is the one in flight
            assert end == len(known) + 1
            tokens = tokens + [0]
            placeholders.append((index, prev_rows[rid]))
        items.append((rid, tokens, start, sched.get_block_ids(rid), s.needs_logits))
    return items, placeholders


@pytest.mark.parametrize("overlapped", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_scheduler_batches_match_build_batch_over_items(seed: int, overlapped: bool) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    sched, _ = make_scheduler(
        -(-160 // block_size) + 4, block_size, max_num_seqs=rng.choice([4, 12]),
        max_num_batched_tokens=rng.choice([16, 64]), max_model_len=160,
        policy=rng.choice(["fcfs", "priority", "cache-aware"]),
        enable_prefix_caching=rng.random() < 0.8,
        expected_output_prior=rng.choice([None, 16]))
    prefix = random_tokens(rng, 24)
    for i in range(40):
        prompt = (prefix if rng.random() < 0.5 else []) + random_tokens(rng, rng.randrange(1, 60))
        sched.add_request(make_request(f"r{i}", prompt, rng.randrange(1, 50), priority=rng.randrange(3)))
    in_flight = None
    prev_rows: dict[str, int] = {}
    for step in range(2000):
        if not sched.has_unfinished_requests():
            break
        tokens_before = {r.request_id: r.all_token_ids
                         for r in sched.running + sched.waiting}
        out = sched.schedule()
        items, placeholders = _items_from_state(sched, out, tokens_before, prev_rows)
        ref = _reference_batch(items, block_size, placeholders)
        _assert_batch_equals(out.batch, ref, f"seed {seed} step {step}")
        prev_rows = {rid: row for row, rid in enumerate(out.batch.logits_req_ids)}
        done = [in_flight] if overlapped and in_flight is not None else []
        in_flight = out if overlapped else None
        if not overlapped:
            done = [out]
        for o in done:
            sampled = {rid: rng.randrange(1, 100) for rid in o.batch.logits_req_ids
                       if sched.get_request(rid) is not None}
            for s in sched.update_from_output(o, sampled):
                r = s.request
                if r.num_output_tokens >= r.sampling_params.max_tokens or r.num_tokens >= 160:
                    sched.finish_request(r.request_id, FinishReason.LENGTH)
        if rng.random() < 0.03 and sched.running:
            sched.finish_request(rng.choice(sched.running).request_id, FinishReason.ABORT)
    assert not sched.has_unfinished_requests(), f"seed {seed}"
