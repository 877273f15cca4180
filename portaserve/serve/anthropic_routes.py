"""The Anthropic Messages API: ``POST /v1/messages``, plain or streamed.

The system prompt and messages go through the model's chat template like OpenAI chat. A
streamed answer sends the events Anthropic's SDKs expect, in order: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta``..., ``content_block_stop``,
``message_delta`` (stop reason and output tokens), ``message_stop``. Errors use Anthropic's
shape ``{"type": "error", "error": {"type", "message"}}`` (the app's error handler picks it
for this path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from portaserve.core.request import CompletionOutput, FinishReason, RequestOutput
from portaserve.errors import RequestError
from portaserve.serve.async_engine import GenerationError, RequestAbortedError, RequestStream
from portaserve.serve.openai_routes import CLIENT_CLOSED
from portaserve.serve.protocol import ApiError, MessagesRequest
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


@router.post("/v1/messages", response_model=None)
async def messages(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = await read_body(request, MessagesRequest)
    state.check_model(body.model)
    body.check_supported()
    prompt = state.encode_chat(body.chat_messages())
    state.fit_max_tokens(len(prompt), body.max_tokens, prompt_param="messages")
    try:
        params = body.to_sampling_params()
    except RequestError as e:
        raise ApiError(400, str(e), param=e.param) from e
    message_id = new_id("msg_")
    stream = await add_request(state, message_id, prompt, params, prompt_param="messages")
    if body.stream:
        events = _events(request, body, stream, message_id, len(prompt))
        return StreamingResponse(events, media_type="text/event-stream")
    async with closing_on_disconnect(request, [stream]):
        try:
            output = await collect(stream)
        except (GenerationError, RequestAbortedError) as e:
            raise api_error_of(e) from e
    if output is None:
        return Response(status_code=CLIENT_CLOSED)
    c = output.outputs[0]
    if c.finish_reason == FinishReason.ERROR:
        raise ApiError(500, "the engine failed while generating this request")
    stop_reason, stop_sequence = _stop_reason(c)
    return JSONResponse(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body.model,
            "content": [{"type": "text", "text": c.text}],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": len(output.prompt_token_ids),
                "output_tokens": len(c.token_ids),
            },
        }
    )


async def _events(
    request: Request,
    body: MessagesRequest,
    stream: RequestStream,
    message_id: str,
    num_prompt_tokens: int,
) -> AsyncIterator[str]:
    def event(name: str, data: dict[str, Any]) -> str:
        return sse({"type": name, **data}, event=name)

    async with closing_on_disconnect(request, [stream]):
        yield event(
            "message_start",
            {
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": body.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": num_prompt_tokens, "output_tokens": 0},
                }
            },
        )
        yield event(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
        )
        yield event("ping", {})
        num_sent = 0
        last: RequestOutput | None = None
        try:
            async for output in stream:
                last = output
                c = output.outputs[0]
                if c.finish_reason == FinishReason.ERROR:
                    raise GenerationError("the engine failed while generating this request")
                if len(c.text) > num_sent:
                    yield event(
                        "content_block_delta",
                        {"index": 0, "delta": {"type": "text_delta", "text": c.text[num_sent:]}},
                    )
                    num_sent = len(c.text)
        except (GenerationError, RequestAbortedError) as e:
            yield sse(api_error_of(e).anthropic_body(), event="error")
            return
        if last is None or not last.finished:
            return  # the client went away
        c = last.outputs[0]
        stop_reason, stop_sequence = _stop_reason(c)
        yield event("content_block_stop", {"index": 0})
        yield event(
            "message_delta",
            {
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": len(c.token_ids)},
            },
        )
        yield event("message_stop", {})


def _stop_reason(c: CompletionOutput) -> tuple[str, str | None]:
    if c.finish_reason == FinishReason.LENGTH:
        return "max_tokens", None
    if isinstance(c.stop_reason, str):
        return "stop_sequence", c.stop_reason
    return "end_turn", None
