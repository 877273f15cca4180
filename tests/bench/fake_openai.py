"""A fake OpenAI-compatible server that streams tokens on a known schedule.

Each request waits ``ttft`` seconds, sends its first token, then one token every ``tpot``
seconds until ``max_tokens``; the last chunk carries ``usage`` when the client asks for it and
``send_usage`` is on. ``fail_every`` > 0 answers every n-th request with HTTP 500. The server records, per request,
when it actually wrote the first and the last token (``time.perf_counter``, the clock the
client uses too), so tests can check the client against what really happened as well as
against what was asked.

It is a bare asyncio HTTP/1.1 server (keep-alive, chunked SSE) on 127.0.0.1 on a free port,
in a background thread, for the length of a ``with`` block: a web framework's own overhead
(~10 ms per request on a busy 2-core machine) would blur the delays the tests check.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

TOKEN = "tok "  # every streamed token is this text


@dataclass
class FakeServerConfig:
    ttft: float = 0.05
    tpot: float = 0.01
    send_usage: bool = True
    fail_every: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)  # request bodies received
    #: prompt (or first message) -> (first token written, last token written), perf_counter s
    sent: dict[str, tuple[float, float]] = field(default_factory=dict)


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class FakeOpenAIServer:
    """``with FakeOpenAIServer(cfg) as base_url: ...``"""

    def __init__(self, config: FakeServerConfig) -> None:
        self.config = config
        self.counter = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task] = set()

    def __enter__(self) -> str:
        self.thread.start()
        start = asyncio.start_server(self._serve_connection, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(timeout=10)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()  # the reader sees EOF and its task ends
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=5)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.writers.add(writer)
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self._respond(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection: nothing left to serve
        finally:
            writer.close()
            self.writers.discard(writer)
            self.tasks.discard(asyncio.current_task())

    async def _respond(
        self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter
    ) -> None:
        if method == "GET" and path == "/v1/models":
            payload = json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return
        body = json.loads(raw)
        self.config.bodies.append(body)
        if self.config.fail_every and next(self.counter) % self.config.fail_every == 0:
            payload = b'{"error": {"message": "injected failure"}}'
            writer.write(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await self._stream(body, path.endswith("/chat/completions"), writer)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _stream(self, body: dict[str, Any], chat: bool, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        n = int(body["max_tokens"])
        await writer.drain()
        await asyncio.sleep(cfg.ttft)
        if chat:  # a role-only chunk first, as real servers send: must not count as a token
            writer.write(_chunk(_sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})))
        first = last = 0.0
        for i in range(n):
            if i:
                await asyncio.sleep(cfg.tpot)
            choice = (
                {"index": 0, "delta": {"content": TOKEN}} if chat else {"index": 0, "text": TOKEN}
            )
            last = time.perf_counter()  # before the write: the client cannot see it earlier
            first = first or last
            writer.write(_chunk(_sse({"choices": [choice]})))
            await writer.drain()
        key = body["messages"][0]["content"] if chat else body["prompt"]
        cfg.sent[key] = (first, last)
        if cfg.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            writer.write(_chunk(_sse({"choices": [], "usage": usage})))
        writer.write(_chunk(b"data: [DONE]\n\n"))
