"""The HTTP server: app assembly, authentication, error bodies, and running under uvicorn.

``build_app(engine, ...)`` wraps an ``LLMEngine`` (or anything with its interface) in an
``AsyncEngine`` and mounts the OpenAI and Anthropic routes plus ``/health`` (never
authenticated), ``/version`` and ``/metrics``. With an API key every other route needs
``Authorization: Bearer <key>`` (or Anthropic's ``x-api-key: <key>``).

``run_server(...)`` serves the app until SIGINT/SIGTERM, then stops accepting connections,
lets in-flight requests finish for up to ``shutdown_timeout`` seconds, aborts the rest a
moment before that (their clients get an error, not a cut connection), stops the engine
thread and returns (the process exits 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from portaserve import __version__
from portaserve.errors import EngineOverloadedError, RequestError
from portaserve.serve import anthropic_routes, openai_routes
from portaserve.serve.async_engine import AsyncEngine, GenerationError, RequestAbortedError
from portaserve.serve.protocol import ApiError
from portaserve.serve.state import ServerState, api_error_of

logger = logging.getLogger(__name__)


def build_app(
    engine: Any, *, served_model_names: Sequence[str] | None = None, api_key: str | None = None
) -> FastAPI:
    """The FastAPI app serving ``engine``. The engine thread starts with the app's lifespan."""
    names = tuple(served_model_names or ()) or (engine.model_name,)
    async_engine = AsyncEngine(engine, served_model_name=names[0])
    state = ServerState(engine=async_engine, model_names=names, api_key=api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.stop()

    app = FastAPI(
        title="portaserve",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state

    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy"}, status_code=503)

    protected = APIRouter(dependencies=[Depends(_check_api_key)])

    @protected.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @protected.get("/metrics")
    async def metrics() -> Response:
        return Response(async_engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    protected.include_router(openai_routes.router)
    protected.include_router(anthropic_routes.router)
    app.include_router(protected)
    _add_error_handlers(app)
    return app


async def _check_api_key(request: Request) -> None:
    expected = request.app.state.server.api_key
    if expected is None:
        return
    given = None
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        given = token.strip()
    elif request.headers.get("x-api-key"):
        given = request.headers["x-api-key"].strip()
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        what = "Invalid API key" if given else "Missing API key"
        raise ApiError(401, f"{what}: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, error: ApiError) -> JSONResponse:
        if (400 <= error.status < 500 and error.status != 401) or error.code == "overloaded":
            request.app.state.server.engine.metrics.count_request("rejected")
        is_anthropic = request.url.path.startswith("/v1/messages")
        body = error.anthropic_body() if is_anthropic else error.openai_body()
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(body, status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return respond(request, e)

    @app.exception_handler(RequestError)
    @app.exception_handler(EngineOverloadedError)
    @app.exception_handler(GenerationError)
    @app.exception_handler(RequestAbortedError)
    async def on_engine_error(request: Request, e: Exception) -> JSONResponse:
        return respond(request, api_error_of(e))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return respond(request, ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return respond(request, ApiError(400, str(e)))


# ----------------------------------------------------------------------------------------------
# Running


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the caught signal after a graceful shutdown.

    uvicorn re-raises SIGTERM/SIGINT once it has shut down, which would kill the process with
    the signal's status; a server that shut down cleanly should exit 0 instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    #: Called when in-flight requests should be aborted so they end before the deadline.
    abort_in_flight: Callable[[], None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn cancels what is still running at timeout_graceful_shutdown, which cuts the
        # connections. Abort the requests a little earlier instead, so that each client gets
        # a proper error (an SSE error event, or a 503) and a complete response.
        timeout = self.config.timeout_graceful_shutdown
        timer = None
        if self.abort_in_flight is not None and timeout is not None:
            delay = max(timeout - 1.0, timeout * 0.5)
            timer = asyncio.get_running_loop().call_later(delay, self.abort_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("portaserve listening on http://%s:%s", host, port)


def make_server(
    app: FastAPI, *, host: str, port: int, shutdown_timeout: float = 30.0
) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=shutdown_timeout,
        lifespan="on",
    )
    server = _Server(config)
    server.abort_in_flight = app.state.server.engine.abort_all
    return server


def run_server(
    engine: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_names: Sequence[str] | None = None,
    shutdown_timeout: float = 30.0,
) -> None:
    """Serve ``engine`` until SIGINT/SIGTERM; returns after a graceful shutdown."""
    app = build_app(engine, served_model_names=served_model_names, api_key=api_key)
    server = make_server(app, host=host, port=port, shutdown_timeout=shutdown_timeout)
    server.run()
    if not server.started:
        raise OSError(f"the server could not start on {host}:{port} (see the log above)")
    logger.info("portaserve stopped")
