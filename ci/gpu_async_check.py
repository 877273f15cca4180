"""GPU check of async scheduling: the overlapped engine gives the synchronous engine's tokens.

    PYTHONPATH=. python3 ci/gpu_async_check.py [MODEL ...] [--device cuda]   # default: random:tiny

For each model, one batch of mixed-length prompts (all admitted in the first step, so both
engines run the same batches) is generated greedily with ``async_scheduling`` off and on, a
third of the prompts with repetition/frequency penalties and a quarter with logprobs (both
overlap too: penalties count the token in flight from the device); the token ids must be
identical and the logprobs equal to 1e-4, every KV block must be free afterwards, and the async
run must really have overlapped (steps launched before the previous one's ids were read). A second
round adds aborts mid-stream and stop token ids and checks only for leaks and sane outputs
(batches differ there, so bf16 rounding may differ). Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time

from portaserve import LLM, SamplingParams


def run(model: str, device: str, overlapped: bool, prompts: list[list[int]]
        ) -> tuple[list[list[int]], list, float, int]:
    llm = LLM(model, device=device, async_scheduling=overlapped, max_num_seqs=64,
              memory_utilization=0.3)
    engine = llm.llm_engine
    assert engine.async_scheduling is overlapped
    params = [SamplingParams(temperature=0, max_tokens=16 + 8 * (i % 7), ignore_eos=True,
                             repetition_penalty=1.3 if i % 3 == 0 else 1.0,
                             frequency_penalty=0.5 if i % 3 == 0 else 0.0,
                             logprobs=2 if i % 4 == 0 else None)
              for i in range(len(prompts))]
    llm.generate(prompts[:2], params[:2])  # warm-up
    in_flight = 0
    step = engine.step

    def counting_step():  # how many steps returned with a step still in flight
        nonlocal in_flight
        out = step()
        in_flight += engine.has_step_in_flight()
        return out

    engine.step = counting_step
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    secs = time.perf_counter() - t0
    ids = [o.outputs[0].token_ids for o in outs]
    logprobs = [o.outputs[0].logprobs for o in outs]
    assert [len(t) for t in ids] == [p.max_tokens for p in params]
    # second round: aborts mid-stream and early stops
    for i, p in enumerate(prompts[:16]):
        engine.add_request(f"x{i}", p, SamplingParams(temperature=0, max_tokens=40,
                                                      stop_token_ids=[ids[i][5]]))
    for n in range(400):
        if n == 3:
            for i in range(0, 16, 3):
                engine.abort_request(f"x{i}")
        for out in engine.step():
            if out.finished:
                assert len(out.outputs[0].token_ids) <= 40
        if not engine.has_unfinished_requests():
            break
    engine.step()  # drain a step still in flight
    pool = engine.scheduler.block_pool
    assert not engine.has_unfinished_requests() and not engine.has_step_in_flight()
    assert pool.num_free_blocks == engine.kv_spec.num_blocks, (pool.num_free_blocks,
                                                               engine.kv_spec.num_blocks)
    return ids, logprobs, secs, in_flight


def _close_logprobs(a: list | None, b: list | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-4 for k in x) for x, y in zip(a, b, strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="*", default=["random:tiny"])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    models = args.models
    status = 0
    for model in models:
        rng = random.Random(0)
        vocab = 500  # ordinary ids, below every preset's vocabulary size
        prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(5, 200))] for _ in range(48)]
        sync_ids, sync_lp, sync_s, _ = run(model, args.device, False, prompts)
        gc.collect()
        async_ids, async_lp, async_s, in_flight = run(model, args.device, True, prompts)
        gc.collect()
        same = sum(a == b for a, b in zip(sync_ids, async_ids, strict=True))
        lp_same = all(_close_logprobs(a, b) for a, b in zip(sync_lp, async_lp, strict=True))
        ok = same == len(prompts) and lp_same and in_flight > 0
        status |= not ok
        print(f"{model}: {same}/{len(prompts)} prompts identical greedy tokens sync vs async; "
              f"logprobs equal: {'yes' if lp_same else 'NO'}; "
              f"async steps returning with a step in flight: {in_flight}; "
              f"sync {sync_s:.2f} s, async {async_s:.2f} s; blocks all free: yes; "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
