"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``
(and vLLM's ``/tokenize`` and ``/detokenize``).

Each route validates the body, tokenizes the prompt (the chat template for chat), checks it
against the context length, adds the request(s) to the async engine and answers with one JSON
body or an SSE stream of chunks ending in ``data: [DONE]``. A client that disconnects has its
requests aborted (see ``state.closing_on_disconnect``). An engine failure answers 500, or an
error event inside a stream that already started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from portaserve.core.request import CompletionOutput, FinishReason, RequestOutput
from portaserve.core.sampling import SamplingParams
from portaserve.errors import RequestError
from portaserve.serve.async_engine import GenerationError, RequestAbortedError, RequestStream
from portaserve.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from portaserve.serve.state import (
    ServerState,
    add_request,
    api_error_of,
    closing_on_disconnect,
    collect,
    new_id,
    read_body,
    sse,
)

router = APIRouter()

#: Logprob reported for a chosen token the engine gave no logprob for (JSON has no -inf).
_MISSING_LOGPROB = -9999.0

#: Status for a response nobody is left to read (nginx's "client closed request").
CLIENT_CLOSED = 499


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.server
    created_at = datetime.fromtimestamp(state.created, tz=timezone.utc).isoformat()
    data = [
        {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "portaserve",
            "max_model_len": state.max_model_len,
            # Anthropic's ModelInfo fields, so both clients can list models.
            "type": "model",
            "display_name": name,
            "created_at": created_at,
        }
        for name in state.model_names
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"],
        "last_id": data[-1]["id"],
    }


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    """Token ids of a prompt or of chat messages, exactly as the generation routes make them."""
    state: ServerState = request.app.state.server
    body = await read_body(request, TokenizeRequest)
    if body.model is not None:
        state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = state.encode_chat(messages)
    else:
        ids = list(state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    state: ServerState = request.app.state.server
    body = await read_body(request, DetokenizeRequest)
    if body.model is not None:
        state.check_model(body.model)
    state.encode_prompt(body.tokens, param="tokens")  # range check
    return {"prompt": state.tokenizer.decode(body.tokens)}


# ----------------------------------------------------------------------------------------------
# Chat completions


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = await read_body(request, ChatCompletionRequest)
    state.check_model(body.model)
    body.check_supported()
    prompt = state.encode_chat(body.chat_messages())
    max_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = state.fit_max_tokens(
        len(prompt),
        body.max_completion_tokens or body.max_tokens,
        prompt_param="messages",
        max_tokens_param=max_param,
    )
    params = _params(body.to_sampling_params, max_tokens)
    request_id = new_id("chatcmpl-")
    stream = await add_request(
        state, request_id, prompt, params, priority=body.priority, prompt_param="messages"
    )
    created = _now()
    if body.stream:
        chunks = _chat_chunks(request, state, body, stream, request_id, created)
        return StreamingResponse(chunks, media_type="text/event-stream")
    output = await _collect_one(request, stream)
    if output is None:
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for c in output.outputs:
        logprobs = None
        if body.logprobs:
            logprobs = {
                "content": _chat_logprobs(state, c.token_ids, c.logprobs, body.top_logprobs or 0)
            }
        choices.append(
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs,
                "finish_reason": _finish(c),
            }
        )
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage([output]),
            "system_fingerprint": None,
        }
    )


async def _chat_chunks(
    request: Request,
    state: ServerState,
    body: ChatCompletionRequest,
    stream: RequestStream,
    request_id: str,
    created: int,
) -> AsyncIterator[str]:
    include_usage = body.include_usage

    def chunk(choices: list[dict[str, Any]]) -> str:
        data: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    async with closing_on_disconnect(request, [stream]):
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(body.n)
            ]
        )
        deltas = _Deltas(body.n)
        last: RequestOutput | None = None
        try:
            async for output in stream:
                last = output
                choices = []
                for c in output.outputs:
                    text, token_ids, logprobs = deltas.advance(c)
                    if not (text or c.finish_reason or (body.logprobs and token_ids)):
                        continue
                    lp = None
                    if body.logprobs and token_ids:
                        lp = {
                            "content": _chat_logprobs(
                                state, token_ids, logprobs, body.top_logprobs or 0
                            )
                        }
                    choices.append(
                        {
                            "index": c.index,
                            "delta": {"content": text} if text else {},
                            "logprobs": lp,
                            "finish_reason": _finish(c),
                        }
                    )
                if choices:
                    yield chunk(choices)
        except (GenerationError, RequestAbortedError) as e:
            yield sse(api_error_of(e).openai_body())
            yield sse("[DONE]")
            return
        if last is None or not last.finished:
            return  # the client went away
        if include_usage:
            yield sse(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body.model,
                    "choices": [],
                    "usage": _usage([last]),
                }
            )
        yield sse("[DONE]")


# ----------------------------------------------------------------------------------------------
# Completions


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = await read_body(request, CompletionRequest)
    state.check_model(body.model)
    body.check_supported()
    prompts = [state.encode_prompt(p) for p in body.prompts()]
    request_id = new_id("cmpl-")
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            max_tokens = state.fit_max_tokens(len(prompt), body.max_tokens, prompt_param=param)
            params = _params(body.to_sampling_params, max_tokens)
            streams.append(
                await add_request(
                    state,
                    f"{request_id}-{i}",
                    prompt,
                    params,
                    priority=body.priority,
                    prompt_param=param,
                )
            )
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    created = _now()
    if body.stream:
        chunks = _completion_chunks(request, state, body, streams, request_id, created)
        return StreamingResponse(chunks, media_type="text/event-stream")
    async with closing_on_disconnect(request, streams):
        try:
            outputs = await asyncio.gather(*(collect(s) for s in streams))
        except (GenerationError, RequestAbortedError) as e:
            raise api_error_of(e) from e
    if any(o is None for o in outputs):
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for i, output in enumerate(outputs):
        for c in output.outputs:
            _raise_if_failed(c)
            logprobs = None
            if body.logprobs is not None:
                logprobs = _completion_logprobs(state, c.token_ids, c.logprobs, body.logprobs, 0)
            choices.append(
                {
                    "index": i * body.n + c.index,
                    "text": c.text,
                    "logprobs": logprobs,
                    "finish_reason": _finish(c),
                }
            )
    return JSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(outputs),
            "system_fingerprint": None,
        }
    )


async def _completion_chunks(
    request: Request,
    state: ServerState,
    body: CompletionRequest,
    streams: list[RequestStream],
    request_id: str,
    created: int,
) -> AsyncIterator[str]:
    include_usage = body.include_usage
    async with closing_on_disconnect(request, streams):
        deltas = [_Deltas(body.n) for _ in streams]
        offsets = [[0] * body.n for _ in streams]
        lasts: list[RequestOutput | None] = [None] * len(streams)
        try:
            async for i, output in _merge(streams):
                lasts[i] = output
                choices = []
                for c in output.outputs:
                    text, token_ids, logprobs = deltas[i].advance(c)
                    if not (text or c.finish_reason or (body.logprobs is not None and token_ids)):
                        continue
                    lp = None
                    if body.logprobs is not None and token_ids:
                        lp = _completion_logprobs(
                            state, token_ids, logprobs, body.logprobs, offsets[i][c.index]
                        )
                        if lp["tokens"]:
                            offsets[i][c.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                    choices.append(
                        {
                            "index": i * body.n + c.index,
                            "text": text,
                            "logprobs": lp,
                            "finish_reason": _finish(c),
                        }
                    )
                if choices:
                    data: dict[str, Any] = {
                        "id": request_id,
                        "object": "text_completion",
                        "created": created,
                        "model": body.model,
                        "choices": choices,
                    }
                    if include_usage:
                        data["usage"] = None
                    yield sse(data)
        except (GenerationError, RequestAbortedError) as e:
            yield sse(api_error_of(e).openai_body())
            yield sse("[DONE]")
            return
        if any(last is None or not last.finished for last in lasts):
            return  # the client went away
        if include_usage:
            yield sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": body.model,
                    "choices": [],
                    "usage": _usage(lasts),
                }
            )
        yield sse("[DONE]")


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await merged.put((i, output))
        except (GenerationError, RequestAbortedError) as e:
            await merged.put((i, e))
        await merged.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            i, item = await merged.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


# ----------------------------------------------------------------------------------------------
# Helpers


class _Deltas:
    """What of each choice's cumulative output has been sent already."""

    def __init__(self, n: int) -> None:
        self.num_chars = [0] * n
        self.num_tokens = [0] * n
        self.is_done = [False] * n

    def advance(self, c: CompletionOutput) -> tuple[str, list[int], list[dict[int, float]]]:
        """The new text, token ids and logprobs of ``c``; empty once it finished."""
        if self.is_done[c.index]:
            return "", [], []
        _raise_if_failed(c)
        text = c.text[self.num_chars[c.index] :]
        start = self.num_tokens[c.index]
        token_ids = c.token_ids[start:]
        logprobs = (c.logprobs or [])[start:]
        self.num_chars[c.index] = len(c.text)
        self.num_tokens[c.index] = len(c.token_ids)
        self.is_done[c.index] = c.finish_reason is not None
        return text, token_ids, logprobs


def _raise_if_failed(c: CompletionOutput) -> None:
    if c.finish_reason == FinishReason.ERROR:
        raise GenerationError("the engine failed while generating this request")


async def _collect_one(request: Request, stream: RequestStream) -> RequestOutput | None:
    async with closing_on_disconnect(request, [stream]):
        try:
            output = await collect(stream)
        except (GenerationError, RequestAbortedError) as e:
            raise api_error_of(e) from e
    if output is not None:
        for c in output.outputs:
            try:
                _raise_if_failed(c)
            except GenerationError as e:
                raise api_error_of(e) from e
    return output


def _params(build: Any, max_tokens: int) -> SamplingParams:
    try:
        return dataclasses.replace(build(), max_tokens=max_tokens)
    except RequestError as e:
        raise ApiError(400, str(e), param=e.param) from e


def _finish(c: CompletionOutput) -> str | None:
    return None if c.finish_reason is None else str(c.finish_reason)


def _usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    num_cached = sum(o.num_cached_tokens for o in outputs)
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


def _token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


def _chat_logprobs(
    state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]] | None, top_n: int
) -> list[dict[str, Any]]:
    content = []
    for token_id, record in zip(token_ids, logprobs or [], strict=False):  # [] if none
        text = _token_text(state, token_id)
        top = sorted(record.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        content.append(
            {
                "token": text,
                "logprob": record.get(token_id, _MISSING_LOGPROB),
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": (t := _token_text(state, tid)),
                        "logprob": lp,
                        "bytes": list(t.encode()),
                    }
                    for tid, lp in top
                ],
            }
        )
    return content


def _completion_logprobs(
    state: ServerState,
    token_ids: list[int],
    logprobs: list[dict[int, float]] | None,
    top_n: int,
    start_offset: int,
) -> dict[str, Any]:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = start_offset
    for token_id, record in zip(token_ids, logprobs or [], strict=False):  # [] if none
        text = _token_text(state, token_id)
        tokens.append(text)
        token_logprobs.append(record.get(token_id, _MISSING_LOGPROB))
        top = sorted(record.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        tops.append({_token_text(state, tid): lp for tid, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _now() -> int:
    return int(time.time())
