"""The async engine on its own (no HTTP): streaming, abort, failures, shutdown, no hangs."""

from __future__ import annotations

import asyncio
import random

import pytest
from serve_fake_engine import FakeEngine

from portaserve.core.sampling import SamplingParams
from portaserve.errors import EngineOverloadedError, RequestError
from portaserve.serve.async_engine import AsyncEngine, GenerationError, RequestAbortedError


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def _prompt() -> list[int]:
    rng = random.Random()
    return [rng.randrange(97, 123) for _ in range(rng.randint(5, 30))]


def test_streams_match_the_engine_run_alone():
    prompts = [_prompt() for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=7)

    def alone(prompt: list[int]) -> list[int]:
        engine = FakeEngine()
        engine.add_request("x", prompt, params)
        last = None
        while engine.has_unfinished_requests():
            last = engine.step()[-1]
        return last.outputs[0].token_ids

    async def main():
        ae = AsyncEngine(FakeEngine(step_delay=0.001))
        ae.start()
        try:

            async def one(i: int, prompt: list[int]) -> tuple[list[int], int]:
                stream = await ae.add_request(f"r{i}", prompt, params)
                seen = 0
                async for out in stream:
                    seen += 1
                    last = out
                assert last.finished and stream.is_finished
                return last.outputs[0].token_ids, seen

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await ae.stop()

    results = _run(main())
    assert [ids for ids, _ in results] == [alone(p) for p in prompts]
    assert all(1 <= seen <= 7 for _, seen in results)


def test_add_errors_surface_before_streaming():
    async def main():
        ae = AsyncEngine(FakeEngine(max_waiting_requests=1, max_num_seqs=1, step_delay=0.05))
        ae.start()
        try:
            with pytest.raises(RequestError) as e:
                await ae.add_request("empty", [], SamplingParams())
            assert e.value.param == "prompt"
            streams = []
            with pytest.raises(EngineOverloadedError):
                for i in range(6):
                    streams.append(await ae.add_request(f"r{i}", _prompt(), SamplingParams()))
            for stream in streams:
                stream.close()
        finally:
            await ae.stop()

    _run(main())


def test_close_aborts_and_frees_blocks():
    engine = FakeEngine(step_delay=0.01)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            stream = await ae.add_request("r", _prompt(), SamplingParams(max_tokens=500))
            await stream.__anext__()
            assert engine.stats().kv_usage > 0.0
            stream.close()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            for _ in range(100):
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
        finally:
            await ae.stop()

    _run(main())
    assert engine.num_aborted == 1 and engine.stats().kv_usage == 0.0


def test_stop_aborts_in_flight_and_refuses_new_requests():
    async def main():
        ae = AsyncEngine(FakeEngine(step_delay=0.01))
        ae.start()
        stream = await ae.add_request("r", _prompt(), SamplingParams(max_tokens=500))
        await stream.__anext__()
        await ae.stop()
        with pytest.raises(RequestAbortedError):
            async for _ in stream:
                pass
        with pytest.raises(RequestAbortedError):
            await ae.add_request("late", _prompt(), SamplingParams())
        assert not ae.is_healthy

    _run(main())


class _BrokenLoopEngine(FakeEngine):
    """has_unfinished_requests() breaks: a bug outside step()."""

    def has_unfinished_requests(self) -> bool:
        if self.waiting:
            raise RuntimeError("scheduler state corrupted")
        return super().has_unfinished_requests()


def test_engine_loop_crash_fails_requests_and_never_hangs():
    async def main():
        ae = AsyncEngine(_BrokenLoopEngine())
        ae.start()
        stream = await ae.add_request("r", _prompt(), SamplingParams())
        with pytest.raises(GenerationError, match="scheduler state corrupted"):
            async for _ in stream:
                pass
        for _ in range(100):
            if not ae.is_healthy:
                break
            await asyncio.sleep(0.01)
        assert not ae.is_healthy
        with pytest.raises(GenerationError):
            await ae.add_request("late", _prompt(), SamplingParams())
        await ae.stop()

    _run(main())
