"""The async engine: one background thread owns the ``LLMEngine`` and streams its outputs.

``LLMEngine`` is synchronous and not thread-safe, so exactly one thread touches it. The event
loop sends it commands (add, abort) through a thread-safe queue; the engine thread drains the
queue between steps, runs ``step()`` while any request is unfinished, and hands each
``RequestOutput`` to the request's asyncio queue with ``call_soon_threadsafe``. All clients
share one running batch that way.

Outputs are cumulative (text and token ids so far), so a slow consumer reads only the newest
one and skips the rest. A consumer that stops early (client disconnected, task cancelled)
aborts its request, which frees its KV blocks before the next step. An exception from
``step()`` fails the requests then in flight with ``GenerationError`` and the loop goes on
serving new ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portaserve.core.request import FinishReason, RequestOutput
from portaserve.errors import PortaserveError
from portaserve.serve.metrics import ServerMetrics

if TYPE_CHECKING:
    from portaserve.core.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: How long the idle engine thread sleeps on the command queue before checking for shutdown.
_IDLE_WAIT_S = 0.5
#: How long to wait for a command after a step that scheduled nothing.
_STALLED_WAIT_S = 0.002


class GenerationError(PortaserveError, RuntimeError):
    """The engine failed while generating this request (the server answers 5xx)."""


class RequestAbortedError(PortaserveError, RuntimeError):
    """The request was aborted by the server (shutting down) before it finished."""


@dataclass(eq=False, slots=True)
class _Tracked:
    """Per-request state, owned by the engine thread once the request is added."""

    request_id: str
    queue: asyncio.Queue[Any]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class AsyncEngine:
    """Runs ``engine.step()`` in a background thread; ``add_request`` returns a stream."""

    def __init__(self, engine: Any, *, served_model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = served_model_name or engine.model_name
        self.metrics = ServerMetrics(self.model_name, lambda: self._stats)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._stats: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        #: Guards ``_is_accepting``, so no command is queued after the thread's last drain.
        self._accept_lock = threading.Lock()
        self._is_accepting = True

    # ------------------------------------------------------------------------------------------
    # Event-loop side

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="portaserve-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Abort what is still in flight and stop the engine thread."""
        self._stopping.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.1f s", timeout)

    @property
    def is_healthy(self) -> bool:
        return (
            self._dead is None
            and self._thread is not None
            and self._thread.is_alive()
            and not self._stopping.is_set()
        )

    async def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *, priority: int = 0
    ) -> RequestStream:
        """Add a request; iterate the returned stream for its outputs.

        Raises what ``LLMEngine.add_request`` raises (``RequestError``,
        ``EngineOverloadedError``) before anything is streamed. The stream raises
        ``GenerationError`` / ``RequestAbortedError`` if the engine fails or shuts down.
        """
        if self._stopping.is_set():
            raise RequestAbortedError("the server is shutting down")
        if not self.is_healthy:
            raise GenerationError(f"the engine is not running: {self._dead or 'not started'}")
        tracked = _Tracked(request_id, asyncio.Queue())
        added: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._accept_lock:
            if not self._is_accepting:
                raise GenerationError("the engine is not running")
            self._commands.put(("add", tracked, prompt, params, priority, added))
        try:
            await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added just before the cancel
            raise
        return RequestStream(self, tracked)

    def abort_all(self) -> None:
        """Abort every request in flight; their streams raise ``RequestAbortedError``."""
        self._commands.put(("abort_all",))

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished). Safe from any thread."""
        self._commands.put(("abort", request_id))

    # ------------------------------------------------------------------------------------------
    # Engine thread

    def _run(self) -> None:
        try:
            self._stats = self.engine.stats()
            while not self._stopping.is_set():
                idle = not self.engine.has_unfinished_requests()
                self._drain_commands(wait=_IDLE_WAIT_S if idle else None)
                if self._stopping.is_set():
                    break
                if self.engine.has_unfinished_requests() and not self._step():
                    # Nothing could be scheduled (all waiting on blocks): do not spin.
                    self._drain_commands(wait=_STALLED_WAIT_S)
        except Exception as e:  # a bug outside step(): fail everyone, report unhealthy
            logger.exception("engine loop crashed")
            self._dead = e
            self._close(GenerationError(f"engine loop crashed: {e}"), "error")
            return
        self._close(RequestAbortedError("the server is shutting down"), "abort")

    def _close(self, error: PortaserveError, status: str) -> None:
        """Last act of the engine thread: fail what is in flight and what is still queued."""
        with self._accept_lock:
            self._is_accepting = False
        self._fail_all(error, status)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add" and command[-1].set_running_or_notify_cancel():
                command[-1].set_exception(error)

    def _drain_commands(self, *, wait: float | None) -> None:
        """Handle every queued command, first waiting up to ``wait`` seconds for one."""
        try:
            command = self._commands.get(timeout=wait) if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._stats = self.engine.stats()

    def _handle(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            _, tracked, prompt, params, priority, added = command
            if not added.set_running_or_notify_cancel():
                return  # the caller gave up before we got here
            try:
                self.engine.add_request(tracked.request_id, prompt, params, priority=priority)
            except Exception as e:  # RequestError, EngineOverloadedError, or an engine bug
                added.set_exception(e)  # counted as rejected by the HTTP error handler
                return
            self._tracked[tracked.request_id] = tracked
            added.set_result(None)
        elif kind == "abort_all":
            self._fail_all(RequestAbortedError("the server is shutting down"), "abort")
        elif kind == "abort":
            tracked = self._tracked.pop(command[1], None)
            if tracked is not None:
                self.engine.abort_request(tracked.request_id)
                self._record_end(tracked, "abort")

    def _step(self) -> bool:
        """One engine step; False if it produced no output."""
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step fails the requests in flight, not the server
            logger.exception(
                "engine step failed; failing %d in-flight requests", len(self._tracked)
            )
            self._fail_all(GenerationError(f"the engine failed: {type(e).__name__}: {e}"), "error")
            return True
        finally:
            self._stats = self.engine.stats()
        now = time.monotonic()
        deliveries: list[tuple[asyncio.Queue[Any], Any]] = []
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue  # aborted meanwhile
            num_tokens = sum(len(c.token_ids) for c in output.outputs)
            if num_tokens and tracked.first_token_time is None:
                tracked.first_token_time = now
            if num_tokens > tracked.num_output_tokens:
                tracked.last_token_time = now
            tracked.num_output_tokens = num_tokens
            tracked.num_prompt_tokens = len(output.prompt_token_ids)
            if output.finished:
                del self._tracked[output.request_id]
                self._record_end(tracked, _status_of(output))
            deliveries.append((tracked.queue, output))
        self._deliver(deliveries)
        # a step that only launched work (async scheduling) made progress too
        return bool(outputs) or self.engine.has_step_in_flight()

    def _fail_all(self, error: BaseException, status: str) -> None:
        deliveries = []
        for request_id, tracked in list(self._tracked.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine is already broken; the request fails either way
                logger.exception("abort_request(%s) failed", request_id)
            self._record_end(tracked, status)
            deliveries.append((tracked.queue, error))
        self._tracked.clear()
        self._deliver(deliveries)
        try:
            self._stats = self.engine.stats()
        except Exception:  # stats are best effort once the engine failed
            logger.exception("engine.stats() failed")

    def _record_end(self, tracked: _Tracked, status: str) -> None:
        now = time.monotonic()
        first = tracked.first_token_time
        self.metrics.count_request(status)
        self.metrics.observe_finished(
            num_prompt_tokens=tracked.num_prompt_tokens,
            num_output_tokens=tracked.num_output_tokens,
            ttft=None if first is None else first - tracked.arrival_time,
            e2e=now - tracked.arrival_time,
            decode_time=None
            if first is None or tracked.last_token_time is None
            else tracked.last_token_time - first,
        )

    def _deliver(self, deliveries: list[tuple[asyncio.Queue[Any], Any]]) -> None:
        if not deliveries or self._loop is None:
            return

        def put_all() -> None:
            for q, item in deliveries:
                q.put_nowait(item)

        try:
            self._loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the event loop is closed: nobody is left to read
            logger.debug("event loop closed; dropped %d outputs", len(deliveries))


class RequestStream:
    """The outputs of one request: ``async for output in stream`` (event-loop thread only).

    Iteration ends after the finished output, or early once ``close()`` was called. ``close()``
    aborts the request if it has not finished; call it in a ``finally`` (it is idempotent and
    safe to call from a disconnect watcher while another task iterates).
    """

    def __init__(self, engine: AsyncEngine, tracked: _Tracked) -> None:
        self._engine = engine
        self._tracked = tracked
        self.request_id = tracked.request_id
        self.is_finished = False
        self.is_closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.is_finished or self.is_closed:
            raise StopAsyncIteration
        q = self._tracked.queue
        item = await q.get()
        while not q.empty():  # outputs are cumulative: keep only the newest
            item = q.get_nowait()
        if item is _CLOSED or self.is_closed:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.is_finished = True
            raise item
        self.is_finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it finished, and end any iteration in progress."""
        if self.is_finished or self.is_closed:
            return
        self.is_closed = True
        self._engine.abort(self.request_id)
        self._tracked.queue.put_nowait(_CLOSED)

    def __del__(self) -> None:  # a stream dropped without close() must not leak its blocks
        if not self.is_finished and not self.is_closed:
            self._engine.abort(self.request_id)


_CLOSED = object()


def _status_of(output: RequestOutput) -> str:
    reasons = {c.finish_reason for c in output.outputs}
    for reason in (FinishReason.ERROR, FinishReason.ABORT, FinishReason.LENGTH):
        if reason in reasons:
            return str(reason)
    return "stop"
