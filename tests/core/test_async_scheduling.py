"""Async scheduling: step N+1 scheduled and launched before step N's tokens reach the host.

Two levels. Over the fake model (fast, exact): ``drive_overlapped`` runs the scheduler with one
step in flight, placeholders filled from the previous step's sampled ids, under preemption
storms, prefix sharing, chunked prefill, stop conditions and aborts; every output must equal
``reference_generate`` and the block pool must hold nothing at the end. On the real model (cpu,
async forced on): the overlapped engine gives exactly the synchronous engine's greedy tokens,
with preemption, prefix caching, aborts mid-stream, stop strings, n > 1 and seeds, and returns
every block.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from fake_model import (
    drive,
    drive_overlapped,
    fresh_rng,
    make_request,
    make_scheduler,
    random_tokens,
    reference_generate,
    reference_generate_until,
)

from portaserve.core.batch import build_batch

# -- the scheduler with one step in flight (fake model) ----------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority", "cache-aware"])
def test_overlapped_preemption_storm_matches_the_reference(policy: str) -> None:
    rng, seed = fresh_rng()
    prefixes = [random_tokens(rng, 20) for _ in range(3)]
    requests, expected = [], {}
    for i in range(64):
        prompt = (rng.choice(prefixes) if i % 2 else []) + random_tokens(rng, rng.randrange(8, 40))
        max_tokens = rng.randrange(4, 30)
        requests.append(make_request(f"r{i}", prompt, max_tokens, priority=rng.randrange(3)))
        expected[f"r{i}"] = reference_generate(prompt, max_tokens)
    sched, model = make_scheduler(48, 4, max_model_len=96, policy=policy, expected_output_prior=None)
    got, num_discarded = drive_overlapped(sched, model, requests)
    assert sched.num_preemptions >= 10, f"seed {seed}: only {sched.num_preemptions} preemptions"
    assert got == expected, f"seed {seed}"
    assert num_discarded == 0  # length limits are known when scheduling: nothing runs past them
    assert sched.block_pool.num_free_blocks == 48
    assert not sched.has_unfinished_requests()


def test_overlapped_stops_discard_the_extra_token_and_free_everything() -> None:
    rng, seed = fresh_rng()

    def stop(token: int) -> bool:
        return token % 7 == 0

    prompts = [random_tokens(rng, rng.randrange(3, 50)) for _ in range(40)]
    expected = {f"s{i}": reference_generate_until(p, 40, stop) for i, p in enumerate(prompts)}
    assert sum(len(v) < 40 for v in expected.values()) >= 20  # most stop early
    sched, model = make_scheduler(64, 4, max_num_batched_tokens=48, max_model_len=128)
    requests = [make_request(f"s{i}", p, 40) for i, p in enumerate(prompts)]
    got, num_discarded = drive_overlapped(sched, model, requests, stop=stop)
    assert got == expected, f"seed {seed}"
    assert num_discarded > 0  # a request that stopped at N had run one more token at N+1
    assert sched.block_pool.num_free_blocks == 64
    assert sched.block_pool.stats.hit_tokens == 0 or sched.block_pool.num_cached_blocks > 0


def test_overlapped_prefix_sharing_and_chunked_prefill() -> None:
    """Blocks are hashed from real ids only once those ids have landed; sharing still works."""
    rng, seed = fresh_rng()
    system = random_tokens(rng, 400)
    prompts = [system + random_tokens(rng, rng.randrange(5, 30)) for _ in range(8)]
    expected = {f"q{i}": reference_generate(p, 24) for i, p in enumerate(prompts)}
    sched, model = make_scheduler(256, 16, max_num_batched_tokens=96)
    first = make_request("q0", prompts[0], 24)
    rest = [make_request(f"q{i}", p, 24) for i, p in enumerate(prompts) if i]
    got, _ = drive_overlapped(sched, model, [first], arrivals={12: rest})
    assert got == expected, f"seed {seed}"
    assert sched.block_pool.stats.hit_tokens >= 7 * 400  # later requests reuse the prefix
    # a request re-reading blocks that hold generated tokens sees them (hashed from real ids)
    again = make_request("again", prompts[0] + expected["q0"][:20], 4)
    got_again, _ = drive_overlapped(sched, model, [again])
    assert got_again["again"] == reference_generate(again.prompt_token_ids, 4)
    # every full block q0 computed, generated tokens included, is found under its real hash
    assert again.num_cached_tokens == (len(again.prompt_token_ids) - 1) // 16 * 16
    assert sched.block_pool.num_free_blocks == 256


def test_overlapped_aborts_mid_stream_leak_nothing() -> None:
    rng, seed = fresh_rng()
    prompts = [random_tokens(rng, rng.randrange(3, 40)) for _ in range(20)]
    requests = [make_request(f"a{i}", p, 30) for i, p in enumerate(prompts)]
    aborts = {5: ["a0", "a3"], 9: ["a7", "a12"], 14: ["a1", "a19"]}
    sched, model = make_scheduler(40, 4, max_num_batched_tokens=40, max_model_len=80)
    got, _ = drive_overlapped(sched, model, requests, abort_at=aborts)
    aborted = {rid for ids in aborts.values() for rid in ids}
    for i, p in enumerate(prompts):
        if f"a{i}" not in aborted:
            assert got[f"a{i}"] == reference_generate(p, 30), f"seed {seed}"
    assert sched.block_pool.num_free_blocks == 40
    assert not sched.has_unfinished_requests()


def test_overlapped_and_synchronous_schedules_give_the_same_tokens() -> None:
    rng, seed = fresh_rng()
    prompts = [random_tokens(rng, rng.randrange(3, 90)) for _ in range(30)]
    outs = []
    for overlapped in (False, True):
        sched, model = make_scheduler(64, 8, max_num_batched_tokens=64, max_model_len=256)
        requests = [make_request(f"m{i}", p, 20) for i, p in enumerate(prompts)]
        if overlapped:
            outs.append(drive_overlapped(sched, model, requests)[0])
        else:
            outs.append(drive(sched, model, requests))
        assert sched.block_pool.num_free_blocks == 64
    assert outs[0] == outs[1], f"seed {seed}"


def test_placeholder_is_the_last_token_of_its_row() -> None:
    items = [("a", [1, 2, 3], 0, [4], True), ("b", [0], 7, [5, 6], True), ("c", [0], 2, [7], True)]
    batch = build_batch(items, 4, placeholders=[(1, 2), (2, 0)])
    assert batch.prev_token_rows.tolist() == [3, 4]
    assert batch.prev_sample_rows.tolist() == [2, 0]
    filled = batch.with_host_token_ids(torch.tensor([40, 41, 42]))
    assert filled.token_ids.tolist() == [1, 2, 3, 42, 40]
    moved = batch.to_device(torch.device("cpu"), pack=True)  # the one-copy path, on the host
    assert moved.input_ids(torch.tensor([40, 41, 42])).tolist() == [1, 2, 3, 42, 40]
    assert torch.equal(moved.attn.block_tables, batch.block_tables)
    assert torch.equal(moved.attn.slot_mapping, batch.slot_mapping)
    assert torch.equal(moved.positions, batch.positions)
    assert torch.equal(moved.logits_indices, batch.logits_indices)
    assert moved.attn.seq_lens.dtype == torch.int32 and moved.attn.seq_lens.tolist() == [3, 8, 3]


# -- the engine on the real model, async forced on the cpu device ------------------------------

@pytest.fixture(scope="module")
def engines(smollm_path):
    from portaserve import LLM

    kw = dict(device="cpu", num_kv_blocks=512, max_num_batched_tokens=512)
    sync = LLM(str(smollm_path), async_scheduling=False, **kw)
    overlapped = LLM(str(smollm_path), async_scheduling=True, **kw)
    assert not sync.llm_engine.async_scheduling and overlapped.llm_engine.async_scheduling
    return sync, overlapped


def _greedy(max_tokens: int = 12, **kw: object):
    from portaserve import SamplingParams as Params

    return Params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _prompts(llm, n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = llm.llm_engine.model_config.vocab_size
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@contextlib.contextmanager
def _counting_placeholders(llm):
    """The number of placeholders (tokens read from the previous step's samples on the
    device) of every step the engine runs inside the block."""
    runner = llm.llm_engine.runner
    counts: list[int] = []
    execute = runner.execute

    def counting(batch, prev_sampled=None):
        counts.append(batch.num_placeholders)
        return execute(batch, prev_sampled)

    runner.execute = counting
    try:
        yield counts
    finally:
        del runner.execute


def _assert_idle(llm) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.block_pool.num_free_blocks == engine.kv_spec.num_blocks


@pytest.mark.slow
def test_engine_mixed_batch_same_tokens_as_sync(engines):
    sync, overlapped = engines
    prompts = _prompts(sync, 12, seed=11)
    params = [_greedy(max_tokens=4 + i % 9) for i in range(12)]  # finishing at different steps
    want = _ids(sync.generate(prompts, params))
    with _counting_placeholders(overlapped) as placeholders:
        got = _ids(overlapped.generate(prompts, params))
    # the decode steps really read their input ids from the previous step's samples
    assert sum(n > 0 for n in placeholders) >= 8 and max(placeholders) == 12
    assert got == want
    assert [len(t) for t in got] == [p.max_tokens for p in params]
    _assert_idle(overlapped)


@pytest.mark.slow
def test_engine_preemption_prefix_cache_and_chunking_same_tokens(engines, smollm_path):
    from portaserve import LLM

    sync, _ = engines
    prompts = _prompts(sync, 16, seed=12, lo=20, hi=50)
    shared = _prompts(sync, 1, seed=13, lo=100, hi=100)[0]
    prompts += [shared + p[:10] for p in prompts[:6]]
    want = _ids(sync.generate(prompts, _greedy()))
    tiny = LLM(str(smollm_path), device="cpu", num_kv_blocks=12, max_num_batched_tokens=64,
               async_scheduling=True, expected_output_tokens=None)  # no reserve: growth preempts
    got = _ids(tiny.generate(prompts, _greedy()))
    assert got == want
    stats = tiny.llm_engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    _assert_idle(tiny)


@pytest.mark.slow
def test_engine_stop_strings_and_eos_same_as_sync(engines):
    sync, overlapped = engines
    messages = [{"role": "user", "content": "Count from one to ten, in words, separated by commas."}]
    free = sync.chat(messages, _greedy(40))[0].outputs[0]
    stop = free.text[10:13]
    for kw in (dict(stop=[stop]), dict(stop=[stop], include_stop_str_in_output=True)):
        params = _greedy(40, **kw)
        want, got = sync.chat(messages, params)[0].outputs[0], overlapped.chat(messages, params)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
            (want.text, want.token_ids, want.finish_reason, want.stop_reason)
        assert len(got.token_ids) < 40
    from portaserve import SamplingParams as Params

    eos = Params(temperature=0, max_tokens=200)
    hello = [{"role": "user", "content": "Say hello."}]
    want, got = sync.chat(hello, eos)[0].outputs[0], overlapped.chat(hello, eos)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    _assert_idle(overlapped)


@pytest.mark.slow
def test_engine_aborts_mid_stream_leak_no_blocks(engines):
    sync, overlapped = engines
    engine = overlapped.llm_engine
    prompts = _prompts(sync, 6, seed=14)
    want = _ids(sync.generate(prompts, _greedy(20)))
    for i, p in enumerate(prompts):
        engine.add_request(f"ab{i}", p, _greedy(20))
    got: dict[str, list[int]] = {}
    for step in range(200):
        if step == 4:
            engine.abort_request("ab1")
            engine.abort_request("ab4")
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    assert sorted(got) == ["ab0", "ab2", "ab3", "ab5"]
    for rid, tokens in got.items():
        assert tokens == want[int(rid[2:])]
    engine.step()  # completes a step still in flight, if any: its tokens go nowhere
    assert not engine.has_step_in_flight()
    _assert_idle(overlapped)


@pytest.mark.slow
def test_engine_seeds_n_penalties_and_logprobs_overlap(engines):
    from portaserve import SamplingParams as Params

    sync, overlapped = engines
    prompt = "Once upon a time"
    seeded = Params(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=16, n=3)
    a, b = sync.generate(prompt, seeded)[0], overlapped.generate(prompt, seeded)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    # penalties count the token still in flight from the device, logprobs come back with the
    # ids: same results as the synchronous engine, with the steps overlapped
    prompts = _prompts(sync, 4, seed=15) + [prompt]
    for params in (Params(temperature=0, max_tokens=30, repetition_penalty=1.5,
                          frequency_penalty=0.8, presence_penalty=0.4, ignore_eos=True),
                   Params(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True),
                   Params(temperature=0, max_tokens=12, logprobs=1, frequency_penalty=1.0,
                          ignore_eos=True)):
        want = [o.outputs[0] for o in sync.generate(prompts, params)]
        with _counting_placeholders(overlapped) as placeholders:
            got = [o.outputs[0] for o in overlapped.generate(prompts, params)]
        assert sum(n > 0 for n in placeholders) >= params.max_tokens - 2  # overlapped
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.logprobs for g in got] == [w.logprobs for w in want]
        assert [g.cumulative_logprob for g in got] == [w.cumulative_logprob for w in want]
    _assert_idle(overlapped)
