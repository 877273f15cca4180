"""Scheduler tests over the fake model: preemption, prefix caching, chunking, policies, aborts.

Every test compares outputs with ``reference_generate`` (the fake model run with no cache), so a
wrong block table, slot or cached prefix shows up as a wrong token.
"""

from __future__ import annotations

import random

import pytest
from fake_model import (
    check_pool_invariants,
    drive,
    fresh_rng,
    make_request,
    make_scheduler,
    random_tokens,
    reference_generate,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portaserve.core.request import FinishReason, RequestStatus
from portaserve.core.scheduler import SchedulerConfig, SchedulerError
from portaserve.errors import ConfigError, EngineOverloadedError, RequestError


@pytest.mark.parametrize("policy", ["fcfs", "priority", "cache-aware"])
def test_preemption_storm_loses_and_repeats_nothing(policy: str) -> None:
    rng, seed = fresh_rng()
    prefixes = [random_tokens(rng, 20) for _ in range(3)]
    requests, expected = [], {}
    for i in range(64):
        prompt = (rng.choice(prefixes) if i % 2 else []) + random_tokens(rng, rng.randrange(8, 40))
        max_tokens = rng.randrange(4, 30)
        rid = f"r{i}"
        requests.append(make_request(rid, prompt, max_tokens, priority=rng.randrange(3)))
        expected[rid] = reference_generate(prompt, max_tokens)
    # 48 blocks of 4 = 192 tokens of KV for 64 requests of up to 90 tokens each; no admission
    # reserve (expected_output_prior=None), so that growth preempts: the mechanics under test
    sched, model = make_scheduler(48, 4, max_model_len=96, policy=policy, expected_output_prior=None)
    got = drive(sched, model, requests)
    assert sched.num_preemptions >= 10, f"seed {seed}: only {sched.num_preemptions} preemptions"
    assert sorted(got) == sorted(expected), f"seed {seed}"
    for rid, tokens in expected.items():
        assert got[rid] == tokens, f"seed {seed}: {rid} differs"
    assert sched.block_pool.num_free_blocks == 48
    assert not sched.has_unfinished_requests()
    assert sum(r.metrics.num_preemptions for r in requests) == sched.num_preemptions


def test_shared_prefix_hits_the_cache_and_keeps_outputs() -> None:
    rng, seed = fresh_rng()
    system = random_tokens(rng, 400)
    prompts = [system + random_tokens(rng, rng.randrange(5, 30)) for _ in range(8)]
    first = make_request("q0", prompts[0], 10)
    rest = {3: [make_request(f"q{i}", p, 10) for i, p in enumerate(prompts) if i]}
    expected = {f"q{i}": reference_generate(p, 10) for i, p in enumerate(prompts)}

    sched_on, model_on = make_scheduler(256, 16, max_num_batched_tokens=256)
    got_on = drive(sched_on, model_on, [first], arrivals={30: rest[3]})
    stats = sched_on.block_pool.stats
    assert stats.hit_tokens == 7 * 400, f"seed {seed}"
    assert stats.hit_blocks == 7 * 25
    assert stats.num_lookups == 8
    for request in rest[3]:
        assert request.num_cached_tokens == 400

    sched_off, model_off = make_scheduler(256, 16, max_num_batched_tokens=256, enable_prefix_caching=False)
    first_off = make_request("q0", prompts[0], 10)
    rest_off = [make_request(f"q{i}", p, 10) for i, p in enumerate(prompts) if i]
    got_off = drive(sched_off, model_off, [first_off], arrivals={30: rest_off})
    assert sched_off.block_pool.stats.hit_tokens == 0
    assert got_on == got_off == expected, f"seed {seed}"
    assert model_off.num_tokens_run - model_on.num_tokens_run == 7 * 400


def test_shared_prefix_all_at_once_under_pressure() -> None:
    """Hits land once the first request's prefix is computed; eviction keeps outputs right."""
    rng, seed = fresh_rng()
    system = random_tokens(rng, 400)
    prompts = [system + random_tokens(rng, rng.randrange(1, 40)) for _ in range(12)]
    expected = {f"q{i}": reference_generate(p, 12) for i, p in enumerate(prompts)}
    results = []
    for caching in (True, False):
        sched, model = make_scheduler(64, 16, max_num_batched_tokens=128, enable_prefix_caching=caching)
        got = drive(sched, model, [make_request(f"q{i}", p, 12) for i, p in enumerate(prompts)])
        assert got == expected, f"seed {seed} caching={caching}"
        results.append(sched.block_pool.stats.hit_tokens)
    assert results[0] >= 400 and results[1] == 0


@pytest.mark.parametrize("policy", ["fcfs", "cache-aware"])
def test_burst_sharing_a_prefix_computes_it_once(policy: str) -> None:
    """Requests arriving together wait for the first one's prefix instead of recomputing it."""
    rng, seed = fresh_rng()
    system = random_tokens(rng, 400)
    prompts = [system + random_tokens(rng, rng.randrange(1, 30)) for _ in range(8)]
    prompts.append(list(prompts[0]))  # an identical prompt (as n > 1 fans out)
    expected = {f"q{i}": reference_generate(p, 6) for i, p in enumerate(prompts)}
    sched, model = make_scheduler(256, 16, max_num_batched_tokens=2048, policy=policy)
    got = drive(sched, model, [make_request(f"q{i}", p, 6) for i, p in enumerate(prompts)])
    assert got == expected, f"seed {seed}"
    cached_in_q0 = (len(prompts[0]) - 1) // 16 * 16  # the copy leaves its last token to compute
    assert sched.block_pool.stats.hit_tokens == 7 * 400 + cached_in_q0
    num_prompt_tokens = sum(len(p) for p in prompts)
    decode_tokens = 9 * 5
    assert model.num_tokens_run == num_prompt_tokens - 7 * 400 - cached_in_q0 + decode_tokens


def test_cache_salt_isolates_prefixes() -> None:
    rng, _ = fresh_rng()
    prompt = random_tokens(rng, 64)
    sched, model = make_scheduler(32, 16)
    drive(sched, model, [make_request("a", prompt, 2, cache_salt="alice")])
    b = make_request("b", prompt, 2, cache_salt="bob")
    c = make_request("c", prompt, 2, cache_salt="alice")
    got = drive(sched, model, [b, c])
    assert b.num_cached_tokens == 0 and c.num_cached_tokens == 48
    assert got["b"] == got["c"] == reference_generate(prompt, 2)


def test_long_prompt_is_chunked_with_identical_output() -> None:
    rng, seed = fresh_rng()
    prompt = random_tokens(rng, 300)
    other = random_tokens(rng, 10)
    sched, model = make_scheduler(64, 8, max_num_batched_tokens=32, max_model_len=400)
    long_req = make_request("long", prompt, 5)
    short_req = make_request("short", other, 20)
    seen: list[tuple[int, bool]] = []
    sched.add_request(short_req)
    out = sched.schedule()  # the short one prefills alone
    sched.update_from_output(out, model.step(out.batch))
    sched.add_request(long_req)
    for _ in range(12):
        out = sched.schedule()
        assert out.num_batched_tokens <= 32
        by_id = {s.request.request_id: s for s in out.scheduled}
        assert (
            by_id["short"].num_new_tokens == 1 and by_id["short"].needs_logits
        )  # decode rides along
        # ... first: the batch says so, and a device may run that row through its decode kernel
        assert out.batch.req_ids[0] == "short" and out.batch.num_decodes == 1
        if "long" in by_id:
            seen.append((by_id["long"].num_new_tokens, by_id["long"].needs_logits))
        sched.update_from_output(out, model.step(out.batch))
        if long_req.output_token_ids:
            break
    # 300 tokens at 31 per step (one goes to the decode): 9 chunks of 31 then 21
    assert seen == [(31, False)] * 9 + [(21, True)]
    got = drive(sched, model)
    assert got["long"] == reference_generate(prompt, 5), f"seed {seed}"
    assert got["short"] == reference_generate(other, 20)


@pytest.mark.parametrize(
    "policy,expected",
    [
        ("fcfs", ["a", "b", "c", "d", "e"]),
        ("priority", ["b", "d", "c", "a", "e"]),
    ],
)
def test_policy_order(policy: str, expected: list[str]) -> None:
    rng, _ = fresh_rng()
    sched, model = make_scheduler(64, 8, max_num_seqs=1, policy=policy)
    priorities = {"a": 5, "b": 0, "c": 2, "d": 0, "e": 9}
    requests = [
        make_request(rid, random_tokens(rng, 12), 3, priority=p, arrival_seq=i)
        for i, (rid, p) in enumerate(priorities.items())
    ]
    got = drive(sched, model, requests)
    assert list(got) == expected
    for request in requests:
        assert got[request.request_id] == reference_generate(request.prompt_token_ids, 3)


def test_priority_preempts_lowest_priority_first() -> None:
    rng, _ = fresh_rng()
    # 8 blocks of 4: three requests of 8-token prompts growing to 20 tokens cannot all fit
    sched, model = make_scheduler(8, 4, max_model_len=32, policy="priority", expected_output_prior=None)
    reqs = [
        make_request(rid, random_tokens(rng, 8), 12, priority=p)
        for rid, p in (("low", 7), ("high", 0), ("mid", 3))
    ]
    victims: list[str] = []
    for request in reqs:
        sched.add_request(request)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        victims.extend(r.request_id for r in out.preempted)
        sched.update_from_output(out, model.step(out.batch) if out.scheduled else {})
        for s in out.scheduled:
            r = s.request
            if r.status is RequestStatus.RUNNING and r.num_output_tokens >= 12:
                sched.finish_request(r.request_id, FinishReason.LENGTH)
        check_pool_invariants(sched)
    assert victims and victims[0] == "low"
    assert "high" not in victims
    for request in reqs:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 12)


def test_cache_aware_prefers_cached_prefix() -> None:
    rng, _ = fresh_rng()
    shared = random_tokens(rng, 64)
    sched, model = make_scheduler(
        64, 16, max_num_seqs=1, policy="cache-aware", cache_aware_max_wait_steps=1000
    )
    drive(sched, model, [make_request("warm", shared + [1], 1)])
    cold = [make_request(f"cold{i}", random_tokens(rng, 66), 2) for i in range(2)]
    hot = [make_request(f"hot{i}", shared + random_tokens(rng, 2), 2) for i in range(2)]
    got = drive(sched, model, [cold[0], hot[0], cold[1], hot[1]])
    assert list(got) == ["hot0", "hot1", "cold0", "cold1"]
    assert hot[0].num_cached_tokens == 64 and cold[0].num_cached_tokens == 0


@pytest.mark.parametrize("max_wait,bound", [(5, 30), (10_000, None)])
def test_cache_aware_does_not_starve(max_wait: int, bound: int | None) -> None:
    """A stream of cache-hitting requests must not hold a cold request back for ever."""
    rng, _ = fresh_rng()
    shared = random_tokens(rng, 32)
    sched, model = make_scheduler(
        64, 16, max_num_seqs=1, policy="cache-aware", cache_aware_max_wait_steps=max_wait
    )
    drive(sched, model, [make_request("warm", shared + [7], 1)])
    cold = make_request("cold", random_tokens(rng, 40), 2)
    stream = {s: [make_request(f"hot{s}", shared + random_tokens(rng, 3), 2)] for s in range(150)}
    stream[1].append(cold)
    started: list[int] = []

    def watch(step: int) -> None:
        if not started and cold.status is RequestStatus.RUNNING:
            started.append(step)

    got = drive(sched, model, arrivals=stream, on_step=watch)
    assert got["cold"] == reference_generate(cold.prompt_token_ids, 2)
    if bound is None:
        assert started[0] >= 149  # no aging: the stream goes first while it lasts
    else:
        assert started[0] <= bound


def test_abort_frees_blocks_immediately() -> None:
    rng, _ = fresh_rng()
    sched, model = make_scheduler(32, 4, max_num_batched_tokens=256, expected_output_prior=None)
    running = make_request("run", random_tokens(rng, 30), 50)
    waiting = make_request("wait", random_tokens(rng, 90), 5)
    sched.add_request(running)
    out = sched.schedule()
    sched.update_from_output(out, model.step(out.batch))
    sched.add_request(waiting)
    out = sched.schedule()  # "run" holds 8 blocks, "wait" takes 23 of the other 24
    assert {s.request.request_id for s in out.scheduled} == {"run", "wait"}
    held = len(sched.get_block_ids("wait"))
    free_before = sched.block_pool.num_free_blocks
    aborted = sched.finish_request("wait", FinishReason.ABORT)  # mid-step, before the update
    assert aborted is waiting and waiting.finish_reason is FinishReason.ABORT
    assert waiting.metrics.finished_time is not None
    assert sched.block_pool.num_free_blocks == free_before + held
    sched.update_from_output(out, model.step(out.batch))  # the aborted one is skipped
    assert waiting.num_computed_tokens == 0 and not waiting.output_token_ids
    assert sched.get_request("wait") is None
    assert sched.finish_request("wait", FinishReason.ABORT) is None
    check_pool_invariants(sched)
    queued = make_request("queued", random_tokens(rng, 5), 5)
    sched.add_request(queued)
    assert sched.finish_request("queued", FinishReason.ABORT) is queued
    assert sched.num_waiting == 0
    sched.finish_request("run", FinishReason.ABORT)
    assert sched.block_pool.num_free_blocks == 32
    assert not sched.has_unfinished_requests()


def test_add_request_rejects_what_can_never_run() -> None:
    sched, _ = make_scheduler(16, 4, max_model_len=32, max_waiting_requests=2)
    with pytest.raises(RequestError) as err:
        sched.add_request(make_request("big", list(range(1, 34)), 1))
    assert err.value.param == "prompt" and "33" in str(err.value)
    with pytest.raises(RequestError):
        sched.add_request(make_request("empty", [], 1))
    sched.add_request(make_request("a", [1, 2, 3], 1))
    with pytest.raises(RequestError) as err:
        sched.add_request(make_request("a", [1, 2, 3], 1))
    assert err.value.param == "request_id"
    sched.add_request(make_request("b", [1, 2, 3], 1))
    with pytest.raises(EngineOverloadedError):
        sched.add_request(make_request("c", [1, 2, 3], 1))
    assert sched.num_waiting == 2


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        SchedulerConfig(
            max_num_seqs=4,
            max_num_batched_tokens=64,
            max_model_len=100,
            block_size=16,
            num_blocks=4,
        )
    assert err.value.field == "max_model_len"
    with pytest.raises(ConfigError) as err:
        SchedulerConfig(
            max_num_seqs=4,
            max_num_batched_tokens=64,
            max_model_len=64,
            block_size=16,
            num_blocks=4,
            policy="lifo",
        )
    assert err.value.field == "policy"
    with pytest.raises(ConfigError) as err:
        SchedulerConfig(
            max_num_seqs=0, max_num_batched_tokens=64, max_model_len=64, block_size=16, num_blocks=4
        )
    assert err.value.field == "max_num_seqs"
    for bad in (-1, 2.5, True, "1024"):
        with pytest.raises(ConfigError, match=repr(bad).replace(".", r"\.")) as err:
            SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=16,
                            num_blocks=4, expected_output_prior=bad)
        assert err.value.field == "expected_output_prior"


def _fixed_length_wave(prior: int | None, prompt_len: int, out_len: int,
                       num_blocks: int) -> tuple[object, list, dict]:
    """Twelve requests of fixed prompt and output lengths over ``num_blocks`` blocks of 4: too
    few for all at once at their final length, so growth must preempt or admission wait."""
    rng, _ = fresh_rng()
    requests = [make_request(f"r{i}", random_tokens(rng, prompt_len), out_len) for i in range(12)]
    expected = {r.request_id: reference_generate(r.prompt_token_ids, out_len) for r in requests}
    sched, model = make_scheduler(num_blocks, 4, max_num_batched_tokens=256,
                                  max_model_len=min(128, 4 * num_blocks), expected_output_prior=prior)
    return (sched, model), requests, expected


# (prompt, output, blocks): the KV holds prompt + output - 1 tokens (not the last one sampled):
# 64 = 16 blocks each, of 100; 9 = 3 blocks each (1 for the prompt, 2 more for the output:
# counted in blocks, not output tokens / block size), of 24
@pytest.mark.parametrize("prompt_len,out_len,num_blocks", [(16, 49, 100), (3, 7, 24)])
def test_admission_reserve_avoids_preemption_by_growth(prompt_len: int, out_len: int,
                                                       num_blocks: int) -> None:
    """With the reserve (the expected output, capped by max_tokens) admission waits instead of
    letting the running requests outgrow the cache; without it the same wave preempts."""
    (sched, model), requests, expected = _fixed_length_wave(64, prompt_len, out_len, num_blocks)
    peak_running = 0

    def watch(_: int) -> None:
        nonlocal peak_running
        peak_running = max(peak_running, sched.num_running)

    got = drive(sched, model, requests, on_step=watch)
    assert got == expected and sched.num_preemptions == 0
    final_blocks = -(-(prompt_len + out_len - 1) // 4)
    assert 1 < peak_running <= num_blocks // final_blocks  # each holds its final length
    assert sched.block_pool.num_free_blocks == num_blocks

    (sched, model), requests, expected = _fixed_length_wave(None, prompt_len, out_len, num_blocks)
    assert drive(sched, model, requests) == expected
    assert sched.num_preemptions > 0


def test_admission_reserve_learns_output_lengths() -> None:
    """Finished requests' lengths move the estimate (STOP and LENGTH; aborts do not), a
    preemption raises it, and a request never waits for a reserve when nothing else runs."""
    rng, _ = fresh_rng()
    sched, model = make_scheduler(64, 4, max_model_len=256, max_num_batched_tokens=64,
                                  expected_output_prior=150)
    first, second = (make_request(rid, random_tokens(rng, 10), 200) for rid in ("first", "second"))
    sched.add_request(first)
    sched.add_request(second)
    out = sched.schedule()  # 3 + 150/4 blocks each: the second waits for the first's reserve
    assert [s.request.request_id for s in out.scheduled] == ["first"] and sched.num_waiting == 1
    sched.update_from_output(out, model.step(out.batch))
    before = sched.expected_output
    sched.finish_request("first", FinishReason.ABORT)
    assert sched.expected_output == before
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["second"]
    sched.update_from_output(out, model.step(out.batch))
    sched.finish_request("second", FinishReason.ABORT)
    for i, n_out in enumerate((5, 7)):
        r = make_request(f"s{i}", random_tokens(rng, 4), 50)
        sched.add_request(r)
        while r.num_output_tokens < n_out:
            out = sched.schedule()
            sched.update_from_output(out, model.step(out.batch))
        estimate = sched.expected_output
        sched.finish_request(r.request_id, FinishReason.STOP)
        assert sched.expected_output == pytest.approx(estimate + 0.05 * (n_out - estimate))
    assert sched.expected_output < before
    # a preemption scales it up: two requests growing past a tiny pool
    sched, model = make_scheduler(8, 4, max_model_len=32, expected_output_prior=0)
    for i in range(2):
        sched.add_request(make_request(f"g{i}", random_tokens(rng, 8), 20))
    for _ in range(40):
        out = sched.schedule()
        if out.preempted:
            break
        sched.update_from_output(out, model.step(out.batch) if out.scheduled else {})
    assert out.preempted and sched.expected_output == 4  # max(0 x 1.25, one block)


def test_update_requires_a_token_for_every_logits_row() -> None:
    sched, model = make_scheduler(16, 4)
    sched.add_request(make_request("a", [5, 6, 7], 3))
    out = sched.schedule()
    with pytest.raises(SchedulerError, match="no sampled token"):
        sched.update_from_output(out, {})


# -- random operation sequences ----------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 60), st.integers(1, 20), st.integers(0, 3)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
    st.tuples(st.just("stop"), st.integers(0, 1000)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, min_size=1, max_size=40),
    policy=st.sampled_from(["fcfs", "priority", "cache-aware"]),
    caching=st.booleans(),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 64),
    reserve=st.sampled_from([None, 0, 8, 1024]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_operations_keep_invariants(
    ops: list[tuple], policy: str, caching: bool, block_size: int, budget: int, reserve: int | None,
    seed: int,
) -> None:
    rng = random.Random(seed)
    num_blocks = -(-96 // block_size) + 2
    sched, model = make_scheduler(
        num_blocks,
        block_size,
        max_num_seqs=6,
        max_num_batched_tokens=budget,
        max_model_len=96,
        policy=policy,
        enable_prefix_caching=caching,
        expected_output_prior=reserve,
    )
    prefixes = [random_tokens(rng, 24) for _ in range(3)]
    live: list[str] = []
    done: dict[str, object] = {}
    n = 0

    def step_once() -> None:
        out = sched.schedule()
        sampled = model.step(out.batch) if out.scheduled else {}
        sched.update_from_output(out, sampled)
        for rid in sampled:
            request = sched.get_request(rid)
            if (
                request.num_output_tokens >= request.sampling_params.max_tokens
                or request.num_tokens >= 96
            ):
                done[rid] = sched.finish_request(rid, FinishReason.LENGTH)
                live.remove(rid)

    for op in ops:
        if op[0] == "add":
            _, length, max_tokens, shared = op
            prompt = (prefixes[shared] if shared < 3 else []) + random_tokens(rng, length)
            rid = f"r{n}"
            n += 1
            sched.add_request(make_request(rid, prompt, max_tokens, priority=rng.randrange(3)))
            live.append(rid)
        elif op[0] == "step":
            for _ in range(op[1]):
                step_once()
        elif live:
            rid = live.pop(op[1] % len(live))
            reason = FinishReason.ABORT if op[0] == "abort" else FinishReason.STOP
            done[rid] = sched.finish_request(rid, reason)
        check_pool_invariants(sched)
    for _ in range(10_000):
        if not live:
            break
        step_once()
        check_pool_invariants(sched)
    assert not live and not sched.has_unfinished_requests()
    assert sched.block_pool.num_free_blocks == num_blocks
    assert all(b.ref_cnt == 0 for b in sched.block_pool.blocks)
    for request in done.values():
        want = reference_generate(request.prompt_token_ids, request.num_output_tokens)
        assert request.output_token_ids == want


def test_request_held_for_a_shared_prefix_runs_when_its_owner_is_aborted() -> None:
    rng, seed = fresh_rng()
    system = random_tokens(rng, 200)
    owner = make_request("owner", system + [1], 4)
    follower = make_request("follower", system + [2, 3], 4)
    sched, model = make_scheduler(64, 8, max_num_batched_tokens=256)
    sched.add_request(owner)
    sched.add_request(follower)
    out = sched.schedule()  # budget is left, but the follower waits for the owner's blocks
    assert [s.request.request_id for s in out.scheduled] == ["owner"]
    assert sched.num_waiting == 1
    sched.finish_request("owner", FinishReason.ABORT)  # before its blocks were cached
    model.step(out.batch)
    sched.update_from_output(out, {})
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("follower", 202)]
    sched.update_from_output(out, model.step(out.batch))
    got = drive(sched, model)
    assert follower.num_cached_tokens == 0
    assert got["follower"] == reference_generate(follower.prompt_token_ids, 4), f"seed {seed}"
    assert sched.block_pool.num_free_blocks == 64


def test_entry_block_table_mirrors_extends_and_replacements() -> None:
    # The batch builder reads numpy mirrors of the block lists: extended in place, or replaced
    # by another list (preemption frees and clears, admission assigns a new one).
    from portaserve.core.request import Request
    from portaserve.core.sampling import SamplingParams
    from portaserve.core.scheduler import _Entry

    entry = _Entry(Request("r", [1, 2, 3], SamplingParams()), add_seq=0)
    assert entry.block_table().tolist() == []
    entry.block_ids.extend([7, 3])
    assert entry.block_table().tolist() == [7, 3]
    entry.block_ids.extend([9])
    assert entry.block_table().tolist() == [7, 3, 9]
    entry.block_ids = [4, 5, 6]  # same length, other list: must not be taken for the old one
    assert entry.block_table().tolist() == [4, 5, 6]
    entry.block_ids = []
    assert entry.block_table().tolist() == []
