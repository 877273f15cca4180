"""What every route shares: the server state and the request plumbing around the engine.

Owns ``ServerState`` (the async engine, served model names, API key), reading and validating
a JSON body into a protocol model, checking the model name and the prompt length, turning
engine exceptions into ``ApiError``, and watching for a client that disconnects.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from portaserve.core.request import RequestOutput
from portaserve.core.sampling import SamplingParams
from portaserve.errors import ConfigError, EngineOverloadedError, RequestError
from portaserve.serve.async_engine import (
    AsyncEngine,
    GenerationError,
    RequestAbortedError,
    RequestStream,
)
from portaserve.serve.protocol import ApiError, validation_error

M = TypeVar("M", bound=BaseModel)


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    model_names: tuple[str, ...]
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.engine.max_model_len)

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise ApiError(
                404,
                f"The model {name!r} does not exist; this server serves "
                f"{', '.join(repr(n) for n in self.model_names)}",
                param="model",
                code="model_not_found",
            )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ConfigError as e:  # the model's template refused the conversation
            raise ApiError(400, str(e), param="messages") from e
        # The chat template writes its own special tokens.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        vocab = getattr(self.tokenizer, "vocab_size", None)
        for token_id in prompt:
            if token_id < 0 or (vocab is not None and token_id >= vocab):
                raise ApiError(
                    400,
                    f"{param} contains token id {token_id}, outside the vocabulary [0, {vocab})",
                    param=param,
                )
        return list(prompt)

    def fit_max_tokens(
        self,
        num_prompt_tokens: int,
        max_tokens: int | None,
        *,
        prompt_param: str,
        max_tokens_param: str = "max_tokens",
    ) -> int:
        """Check the prompt fits the context and return max_tokens (defaulting to the rest)."""
        limit = self.max_model_len
        if num_prompt_tokens == 0:
            raise ApiError(400, f"{prompt_param} is empty", param=prompt_param)
        if num_prompt_tokens >= limit:
            raise ApiError(
                400,
                f"{prompt_param} is {num_prompt_tokens} tokens but this model's "
                f"maximum context length is {limit} tokens, leaving no room to "
                "generate; shorten the prompt",
                param=prompt_param,
                code="context_length_exceeded",
            )
        room = limit - num_prompt_tokens
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ApiError(
                400,
                f"{max_tokens_param}={max_tokens} is too large: the prompt is "
                f"{num_prompt_tokens} tokens and this model's maximum context length "
                f"is {limit} tokens, so at most {room} can be generated",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        return max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


async def read_body(request: Request, model: type[M]) -> M:
    """Parse and validate the JSON body; 400 naming the field on any problem."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def api_error_of(e: Exception, *, prompt_param: str = "prompt") -> ApiError:
    """Map an engine-side exception to the error the client sees."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, RequestError):
        param = e.param if e.param != "prompt" else prompt_param
        return ApiError(400, str(e), param=param, code=e.code)
    if isinstance(e, EngineOverloadedError):
        return ApiError(503, f"The server is overloaded: {e}. Retry later.", code="overloaded")
    if isinstance(e, RequestAbortedError):
        return ApiError(503, str(e), code="shutting_down")
    if isinstance(e, GenerationError):
        return ApiError(500, str(e), code="engine_error")
    raise e


async def add_request(
    state: ServerState,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    *,
    priority: int = 0,
    prompt_param: str = "prompt",
) -> RequestStream:
    try:
        return await state.engine.add_request(request_id, prompt, params, priority=priority)
    except (RequestError, EngineOverloadedError, GenerationError, RequestAbortedError) as e:
        raise api_error_of(e, prompt_param=prompt_param) from e


@asynccontextmanager
async def closing_on_disconnect(
    request: Request, streams: list[RequestStream]
) -> AsyncIterator[None]:
    """Within the block, a client disconnect closes (aborts) ``streams``; they close on exit."""
    watcher = asyncio.ensure_future(_wait_disconnect(request, lambda: _close(streams)))
    try:
        yield
    finally:
        watcher.cancel()
        _close(streams)


def _close(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def _wait_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


async def collect(stream: RequestStream) -> RequestOutput | None:
    """The finished output of a stream; None if it was closed (client gone) first."""
    last: RequestOutput | None = None
    async for output in stream:
        last = output
    return last if last is not None and last.finished else None


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"
