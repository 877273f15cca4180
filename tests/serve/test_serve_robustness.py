"""Engine failures, overload and shutdown. These need an engine that fails or stalls on
demand, so they run on the fake engine; the SIGTERM test also runs the real CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest
from serve_servers import start_server


@pytest.fixture(scope="module")
def fake():
    srv = start_server("fake", "--step-delay", "0.01")
    try:
        yield srv
    finally:
        srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{srv.base_url}/v1", api_key=srv.api_key, max_retries=0, timeout=60
    )


def _chat_body(srv, content: str, **kw) -> dict:
    return {
        "model": srv.model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        **kw,
    }


def test_failed_request_gets_500_others_unaffected(fake):
    async def main():
        async with httpx.AsyncClient(
            base_url=fake.base_url, headers=fake.headers, timeout=60
        ) as http:
            good = http.post("/v1/chat/completions", json=_chat_body(fake, "fine", max_tokens=20))
            bad = http.post(
                "/v1/chat/completions", json=_chat_body(fake, "please [fail]", max_tokens=20)
            )
            return await asyncio.gather(good, bad)

    good, bad = asyncio.run(main())
    assert good.status_code == 200
    assert good.json()["usage"]["completion_tokens"] == 20
    assert bad.status_code == 500
    assert bad.json()["error"]["type"] == "server_error"
    assert bad.json()["error"]["code"] == "engine_error"
    # Streaming: the error arrives as an SSE error event, which the client raises.
    with pytest.raises(openai.APIError):
        for _ in _client(fake).chat.completions.create(
            model=fake.model,
            messages=[{"role": "user", "content": "[fail]"}],
            max_tokens=5,
            stream=True,
        ):
            pass
    resp = httpx.post(
        f"{fake.base_url}/v1/messages",
        headers=fake.headers,
        json={
            "model": fake.model,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "[fail]"}],
        },
    )
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "api_error"


def _errors(srv) -> float:
    text = httpx.get(f"{srv.base_url}/metrics", headers=srv.headers).text
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("portaserve_requests_total{") and 'status="error"' in ln
    )
    return float(line.rsplit(" ", 1)[1])


def test_engine_step_crash_fails_in_flight_then_serves(fake):
    errors_before = _errors(fake)
    resp = httpx.post(
        f"{fake.base_url}/v1/chat/completions",
        headers=fake.headers,
        json=_chat_body(fake, "boom [crash]", max_tokens=5),
        timeout=60,
    )
    assert resp.status_code == 500
    assert "crashed on purpose" in resp.json()["error"]["message"]
    assert httpx.get(f"{fake.base_url}/health").status_code == 200
    res = _client(fake).chat.completions.create(
        model=fake.model,
        messages=[{"role": "user", "content": "after the crash"}],
        max_tokens=4,
        temperature=0,
    )
    assert res.usage.completion_tokens == 4
    assert _errors(fake) == errors_before + 1


def test_chat_template_refusal_is_a_400(fake):
    resp = httpx.post(
        f"{fake.base_url}/v1/chat/completions",
        headers=fake.headers,
        json={
            "model": fake.model,
            "max_tokens": 3,
            "messages": [{"role": "tool", "content": "42"}],
        },
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "messages" and "refused" in error["message"]


def test_eos_gives_stop_and_end_turn(fake):
    res = _client(fake).chat.completions.create(
        model=fake.model,
        messages=[{"role": "user", "content": "short [eos]"}],
        max_tokens=10,
        temperature=0,
    )
    assert res.choices[0].finish_reason == "stop"
    assert len(res.choices[0].message.content) == 3
    msg = httpx.post(
        f"{fake.base_url}/v1/messages",
        headers=fake.headers,
        json={
            "model": fake.model,
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "short [eos]"}],
        },
    ).json()
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None


def test_overload_returns_503_never_hangs():
    srv = start_server(
        "fake", "--step-delay", "0.05", "--max-num-seqs", "2", "--max-waiting-requests", "2"
    )
    try:

        async def main():
            async with httpx.AsyncClient(
                base_url=srv.base_url, headers=srv.headers, timeout=30
            ) as http:
                return await asyncio.gather(
                    *(
                        http.post(
                            "/v1/chat/completions", json=_chat_body(srv, f"load {i}", max_tokens=10)
                        )
                        for i in range(12)
                    )
                )

        started = time.monotonic()
        responses = asyncio.run(main())
        assert time.monotonic() - started < 20
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) == {200, 503}
        rejected = next(r for r in responses if r.status_code == 503).json()["error"]
        assert rejected["type"] == "overloaded_error"
        assert "max_waiting_requests=2" in rejected["message"]
        assert all(
            r.json()["usage"]["completion_tokens"] == 10 for r in responses if r.status_code == 200
        )
    finally:
        assert srv.stop() == 0


def test_sigterm_finishes_in_flight_and_exits_zero():
    # The real server's SIGTERM exit is checked when the session's shared server stops.
    srv = start_server("fake", "--step-delay", "0.02", "--shutdown-timeout", "20")
    texts: list[str] = []

    def consume() -> None:
        stream = _client(srv).chat.completions.create(
            model=srv.model,
            messages=[{"role": "user", "content": "count"}],
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    worker = threading.Thread(target=consume)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "portaserve_num_requests_running" not in _running(srv):
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0, srv.log()[-3000:]
    worker.join(30)
    assert len(texts) == 1 and texts[0]  # the in-flight stream finished
    assert "listening on http://127.0.0.1:" in srv.log()


def _running(srv) -> str:
    """The running-requests gauge line when one request runs, else ''."""
    text = httpx.get(f"{srv.base_url}/metrics", headers=srv.headers).text
    lines = [ln for ln in text.splitlines() if ln.startswith("portaserve_num_requests_running")]
    return lines[0] if lines and lines[0].endswith(" 1.0") else ""


def test_sigterm_aborts_what_outlives_the_timeout():
    srv = start_server("fake", "--step-delay", "0.05", "--shutdown-timeout", "1")
    lines: list[str] = []

    def consume() -> None:
        body = _chat_body(srv, "long", max_tokens=900, stream=True)
        with httpx.stream(
            "POST",
            f"{srv.base_url}/v1/chat/completions",
            headers=srv.headers,
            timeout=60,
            json=body,
        ) as r:
            lines.extend(ln for ln in r.iter_lines() if ln)

    worker = threading.Thread(target=consume)
    worker.start()
    time.sleep(1.0)
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.log()[-3000:]
    assert time.monotonic() - started < 5
    worker.join(30)
    # The stream was cut short with an error event and a clean end, not a broken connection.
    assert len(lines) > 3 and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    assert "Traceback" not in srv.log()
