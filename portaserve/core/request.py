"""Requests and what the engine returns for them.

A ``Request`` is one sequence being generated (``n > 1`` fans out into n requests that share
the prompt's KV blocks through the prefix cache). Only the scheduler changes a request's
computed-token count and status; only the engine appends output tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from portaserve.core.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # the client went away or asked to stop
    ERROR = "error"  # the engine failed this request

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (time.monotonic) for /metrics: arrival, first scheduled, first token, finish."""

    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower runs first under the priority policy (as in vLLM)
    cache_salt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    #: Output tokens already sampled on the device by a step whose results the host has not
    #: read yet (async scheduling): the scheduler counts them as known tokens, the next step
    #: reads them from the device, and ``output_token_ids`` gets them when the step completes.
    num_output_placeholders: int = 0
    #: Prompt tokens found in the prefix cache when the request was first scheduled.
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    #: Per-token logprob records, filled by the sampler when sampling_params.logprobs is set.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    #: Monotonic arrival sequence number, used to break ties and for fairness.
    arrival_seq: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request (index < n)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    #: One dict per generated token: token id -> logprob (the chosen token and the top-n).
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """What ``LLM.generate`` returns and the async engine streams, per request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
