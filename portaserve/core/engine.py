"""``LLMEngine``: the step loop. Schedule, run, sample, update, free.

The engine owns the device, the model, the KV cache, the scheduler and the sampler, and turns
sampled tokens into outputs: incremental detokenization, stop tokens, stop strings, length
limits. It is single-threaded; the server's ``AsyncEngine`` drives it from a background thread.
Nothing is ever dropped: every request finishes, is aborted, or fails with a reason.

Async scheduling (``EngineConfig.async_scheduling``, by default the device's
``Capabilities.async_scheduling``): one step stays in flight. ``step()`` schedules and launches
step N+1 while the device still runs step N (decoding requests read their N+1 input token from
N's sampled ids on the device), then waits for N's ids (one device-to-host copy, started when
N was launched), appends them and does the stop checks and detokenization, so the host's work
hides behind the device's. A request that stopped at N ran one token too many at N+1; that
token is dropped. Penalties count the token still in flight from the device (the sampler's
``pending``), and logprobs are computed on the device and copied back with the ids, so every
request overlaps; devices without async scheduling complete each step before the next.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from portaserve.core.config import EngineConfig, ModelConfig
from portaserve.core.request import (
    CompletionOutput,
    FinishReason,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestStatus,
)
from portaserve.core.runner import ModelRunner
from portaserve.core.sampler import Sampler, logprob_dicts
from portaserve.core.sampling import SamplingParams
from portaserve.core.scheduler import SchedulerOutput
from portaserve.errors import ConfigError, RequestError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Default context limit when the user sets none: long enough for chat, small enough that a
#: host device's default KV budget holds a few sequences at full length.
_DEFAULT_MAX_MODEL_LEN = 8192


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    num_kv_blocks: int


@dataclass(slots=True)
class _LaunchedStep:
    """A step whose work is queued on the device; its sampled ids reach the host later."""

    out: SchedulerOutput
    #: Sampled ids [L] on the device (read by the next step's placeholders); None once known.
    sampled: torch.Tensor | None
    #: Host copy of ``sampled`` being filled (pinned) and the event that says it is done.
    host_ids: torch.Tensor | None = None
    event: Any = None
    token_ids: list[int] | None = None
    #: Host copies (being filled) of ``Sampler.logprob_tensors``, and the rows' requests.
    host_logprobs: tuple[torch.Tensor, ...] | None = None
    requests: list[Request] | None = None
    logprobs: list[dict[int, float] | None] | None = None

    def wait_token_ids(self) -> list[int]:
        if self.token_ids is None:
            if self.event is not None:
                self.event.synchronize()
            self.token_ids = self.host_ids.tolist() if self.host_ids is not None else []
        if self.logprobs is None and self.host_logprobs is not None:
            self.logprobs = logprob_dicts(self.host_logprobs, self.token_ids, self.requests or [])
        return self.token_ids


def _copy_to_host(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Start copying ``tensors`` to (pinned) host memory; returns (host tensors, one event
    that says all are done, or None on a CPU device)."""
    if tensors[0].device.type == "cpu":
        return tensors, None
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        hosts.append(host)
    event = torch.Event(device=tensors[0].device)
    event.record()
    return tuple(hosts), event


def _pending_tokens(
    batch: Any, prev_sampled: torch.Tensor | None, requests: list[Request]
) -> dict[int, torch.Tensor] | None:
    """Logits row -> the token still in flight for that row's request (a 1-element device
    tensor), for rows whose request has penalties: the sampler counts it from the device.

    A row's in-flight token is its batch placeholder (its last input token this step, the
    previous step's sample ``prev_sampled[prev_sample_rows[j]]``); the placeholder's token
    position is the row's logits index, which finds the row."""
    if prev_sampled is None or batch.prev_token_rows is None:
        return None
    penalized = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
    if not penalized:
        return None
    row_of_position = {int(p): i for i, p in enumerate(batch.logits_indices.tolist())}
    pending: dict[int, torch.Tensor] = {}
    wanted = set(penalized)
    for position, sample_row in zip(batch.prev_token_rows.tolist(),
                                    batch.prev_sample_rows.tolist(), strict=True):
        row = row_of_position.get(int(position))
        if row in wanted:
            pending[row] = prev_sampled[sample_row : sample_row + 1]
    return pending


class _Sequence:
    """Output state of one child request: detokenizer, visible text, logprobs."""

    __slots__ = ("request", "index", "detok", "text", "logprobs", "cumulative_logprob",
                 "finished_text", "hold", "is_cumulative")

    def __init__(self, request: Request, index: int, detok: Any) -> None:
        self.request = request
        self.index = index
        self.detok = detok
        self.text = ""
        self.logprobs: list[dict[int, float]] | None = (
            [] if request.sampling_params.logprobs is not None else None
        )
        self.cumulative_logprob = 0.0
        self.finished_text: str | None = None
        params = request.sampling_params
        #: Characters of text held back while they could still grow into a stop string.
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        #: Whether every step reports it (else only its parent's final output does).
        self.is_cumulative = params.output_kind == "cumulative"


class _Parent:
    """A user request: n child sequences sharing one prompt."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "children", "metrics")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.children: list[_Sequence] = []
        self.metrics = RequestMetrics()


class LLMEngine:
    """The synchronous engine. Build with ``LLMEngine.from_config(EngineConfig(...))``."""

    def __init__(self, config: EngineConfig) -> None:
        from portaserve.core.loaders import load_model
        from portaserve.core.scheduler import Scheduler, SchedulerConfig
        from portaserve.plugins.device import KVCacheSpec, compile_executor
        from portaserve.plugins.manager import get_registry

        self.config = config
        registry = get_registry()
        self.device, self.device_reason = registry.select_device(config.device)
        caps = self.device.capabilities()
        self.capabilities = caps
        self.dtype = self._resolve_dtype(config.dtype, caps.dtypes)
        #: Element type of the KV cache: the compute dtype, or an fp8 format the device declares.
        self.kv_cache_dtype = self._resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        logger.info("device %s (%s), dtype %s", self.device.describe(), self.device_reason,
                    str(self.dtype).removeprefix("torch."))

        keep_packed = config.keep_packed_weights
        if keep_packed is None:
            keep_packed = caps.keep_packed_weights
        if keep_packed is None:
            keep_packed = self.dtype != torch.float32
        loaded = load_model(config.model, dtype=self.dtype, device=self.device.torch_device,
                            quantization=config.quantization, keep_packed=keep_packed)
        self.model_config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = config.extra.get("served_model_name") or config.model
        kernels = registry.kernel_table(self.device)
        fallback = list(kernels.fallback_ops)
        if "quant_linear" in fallback and kernels.quant_ops:  # per-format kernels cover the rest
            fallback[fallback.index("quant_linear")] = (
                f"quant_linear of formats other than {', '.join(sorted(kernels.quant_ops))}")
        if fallback:
            logger.info("device %s falls back to the reference for: %s", self.device.name,
                        ", ".join(fallback))
        model_cls = self._model_class(registry, loaded.config.architecture)
        self.model = model_cls(loaded.config, loaded.weights, kernels, dtype=self.dtype,
                               device=self.device.torch_device)
        self.kernels = kernels

        mc = self.model_config
        self.max_model_len = self._resolve_max_model_len(config.max_model_len, mc)
        block_size = config.block_size or caps.kv_block_sizes[0]
        max_num_seqs = config.max_num_seqs or caps.default_max_num_seqs
        max_batched = config.max_num_batched_tokens or caps.default_max_num_batched_tokens
        spec = KVCacheSpec(mc.num_layers, 1, block_size, mc.num_kv_heads, mc.head_dim,
                           self.kv_cache_dtype)
        num_blocks = config.num_kv_blocks or self._size_kv_cache(spec, max_num_seqs)
        spec = replace(spec, num_blocks=num_blocks)
        if config.max_model_len is None and num_blocks * block_size < self.max_model_len:
            logger.warning("max_model_len lowered from %d to the KV capacity %d tokens",
                           self.max_model_len, num_blocks * block_size)
            self.max_model_len = num_blocks * block_size
        self.kv_caches = self.device.allocate_kv_cache(spec)
        self.kv_spec = spec
        self.kv_capacity_tokens = num_blocks * block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens, %s, %.1f MiB", num_blocks,
                    block_size, self.kv_capacity_tokens,
                    str(spec.dtype).removeprefix("torch."), num_blocks * spec.bytes_per_block / 2**20)

        executor = compile_executor(self.device, self.model, self.kv_caches, max_num_seqs)
        self.runner = ModelRunner(self.model, self.device, self.kv_caches, executor)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_batched, 1),
            max_model_len=self.max_model_len,
            block_size=block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            policy=config.scheduling_policy,
            max_waiting_requests=config.max_waiting_requests,
            expected_output_prior=config.expected_output_tokens,
        ))
        self.sampler = Sampler(seed=config.seed)
        self.async_scheduling = (caps.async_scheduling if config.async_scheduling is None
                                 else config.async_scheduling)
        logger.info("async scheduling: %s", "on" if self.async_scheduling else "off")
        self._in_flight: _LaunchedStep | None = None
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, _Sequence]] = {}
        self._arrival = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        return cls(config)

    @property
    def device_description(self) -> str:
        return f"{self.device.describe()} ({self.device_reason})"

    # -- setup helpers ---------------------------------------------------------------------

    @staticmethod
    def _resolve_dtype(name: str, supported: tuple[torch.dtype, ...]) -> torch.dtype:
        if name == "auto":
            return supported[0]
        dtype = _DTYPES[name]
        if dtype not in supported:
            names = ", ".join(str(d).removeprefix("torch.") for d in supported)
            raise ConfigError(f"dtype {name!r} is not supported by this device (it supports "
                              f"{names})", field="dtype")
        return dtype

    def _resolve_kv_cache_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The cache dtype for ``EngineConfig.kv_cache_dtype``; refused unless it is the compute
        dtype or the device declares it (``Capabilities.kv_cache_dtypes``)."""
        from portaserve.quant.fp8 import kv_cache_dtype

        cache_dtype = kv_cache_dtype(name, dtype)
        if cache_dtype == dtype or cache_dtype in self.capabilities.kv_cache_dtypes:
            return cache_dtype
        offered = "".join(f" or {str(d).removeprefix('torch.')}"
                          for d in self.capabilities.kv_cache_dtypes)
        raise ConfigError(
            f"kv_cache_dtype {name!r} ({str(cache_dtype).removeprefix('torch.')}) is not supported "
            f"by device {self.device.describe()}: it keeps the KV cache in the compute dtype "
            f"('auto'){offered}", field="kv_cache_dtype")

    @staticmethod
    def _model_class(registry: Any, architecture: str) -> type:
        from portaserve.core.models import get_model_class

        if architecture in registry.models:
            return registry.models[architecture]
        return get_model_class(architecture)

    @staticmethod
    def _resolve_max_model_len(requested: int | None, mc: ModelConfig) -> int:
        if requested is None:
            return min(mc.max_position_embeddings, _DEFAULT_MAX_MODEL_LEN)
        if requested > mc.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {requested} exceeds the model's max_position_embeddings "
                f"{mc.max_position_embeddings}", field="max_model_len")
        return requested

    def _size_kv_cache(self, spec: Any, max_num_seqs: int) -> int:
        caps = self.capabilities
        util = self.config.memory_utilization or caps.default_memory_utilization
        budget = int(self.device.memory_info().free_bytes * util)
        if caps.default_kv_cache_bytes is not None and self.config.memory_utilization is None:
            budget = min(budget, caps.default_kv_cache_bytes)
        # never more than every sequence at full length could use
        blocks_per_seq = -(-self.max_model_len // spec.block_size)
        num_blocks = min(budget // spec.bytes_per_block, max_num_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:
            logger.warning("KV budget holds %d blocks, fewer than one sequence at max_model_len "
                           "needs (%d)", num_blocks, blocks_per_seq)
        if num_blocks < 1:
            raise ConfigError(f"no memory left for the KV cache on {self.device.describe()} "
                              f"(budget {budget} bytes)", field="memory_utilization")
        return int(num_blocks)

    # -- requests --------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request. Raises ``RequestError`` (bad prompt) or ``EngineOverloadedError``."""
        params = params or SamplingParams()
        if request_id in self._parents:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        prompt_text, prompt_ids = self._tokenize(prompt)
        max_tokens = self._check_lengths(prompt_ids, params)
        if max_tokens != params.max_tokens:
            params = replace(params, max_tokens=max_tokens)
        parent = _Parent(request_id, prompt_text, prompt_ids)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = replace(params, seed=params.seed + i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            request = Request(
                request_id=child_id,
                prompt_token_ids=prompt_ids,
                sampling_params=child_params,
                eos_token_ids=tuple(self.tokenizer.eos_token_ids),
                priority=priority,
                cache_salt=cache_salt,
                arrival_seq=next(self._arrival),
            )
            children.append(request)
        added: list[Request] = []
        try:
            for request in children:
                self.scheduler.add_request(request)
                added.append(request)
        except Exception:
            for request in added:
                self.scheduler.finish_request(request.request_id, FinishReason.ABORT)
            raise
        for i, request in enumerate(children):
            seq = _Sequence(request, i, self._detokenizer(prompt_ids, params))
            parent.children.append(seq)
            self._children[request.request_id] = (parent, seq)
        self._parents[request_id] = parent

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty", param="prompt")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, list | tuple) or not all(isinstance(t, int) for t in prompt):
            raise RequestError("prompt must be a string or a list of token ids", param="prompt")
        ids = list(prompt)
        if not ids:
            raise RequestError("prompt must not be empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}",
                               param="prompt")
        return None, ids

    def _check_lengths(self, prompt_ids: list[int], params: SamplingParams) -> int:
        n_prompt = len(prompt_ids)
        limit = self.max_model_len
        if n_prompt >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{n_prompt} tokens, which leaves no room to generate", param="prompt",
                code="context_length_exceeded")
        if params.max_tokens is None:
            return limit - n_prompt
        if n_prompt + params.max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the prompt, "
                f"{params.max_tokens} for the completion)", param="max_tokens",
                code="context_length_exceeded")
        return params.max_tokens

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> Any:
        from portaserve.core.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                      skip_special_tokens=params.skip_special_tokens)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks. Unknown or finished ids are ignored."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for seq in parent.children:
            self.scheduler.finish_request(seq.request.request_id, FinishReason.ABORT)
            self._children.pop(seq.request.request_id, None)
            self.sampler.forget(seq.request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def has_step_in_flight(self) -> bool:
        """Whether a launched step's results are still to be read (async scheduling)."""
        return self._in_flight is not None

    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    def stats(self) -> EngineStats:
        s = self.scheduler.stats
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_usage=s.kv_usage,
            prefix_cache_queries=s.prefix_cache_query_tokens,
            prefix_cache_hits=s.prefix_cache_hit_tokens,
            num_preemptions=s.num_preemptions,
            num_kv_blocks=self.kv_spec.num_blocks,
        )

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return outputs of every user request that progressed.

        With async scheduling, the step launched here completes in the next call, and the
        outputs returned are those of the step launched in the previous call.
        """
        prev, self._in_flight = self._in_flight, None  # only ever set with async scheduling
        outputs: list[RequestOutput] = []
        out = self.scheduler.schedule()
        launched: _LaunchedStep | None = None
        if out.batch is not None and out.batch.num_reqs:
            now = time.monotonic()
            for sched in out.scheduled:
                if sched.request.metrics.first_scheduled_time is None:
                    sched.request.metrics.first_scheduled_time = now
            try:
                launched = self._launch(out, prev)
            except Exception as e:  # the step failed: fail its requests, keep the engine alive
                logger.exception("engine step failed for %d requests", out.batch.num_reqs)
                if prev is not None:
                    outputs += self._complete(prev)
                return outputs + self._fail([s.request for s in out.scheduled], e)
        if prev is not None:
            outputs += self._complete(prev)
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs += self._complete(launched)
        return outputs

    def _launch(self, out: SchedulerOutput, prev: _LaunchedStep | None) -> _LaunchedStep:
        """Queue the step's forward pass and sampling on the device; wait for nothing unless
        scheduling is synchronous (then read its ids at once: one plain copy, no event)."""
        prev_sampled = prev.sampled if prev is not None else None
        logits = self.runner.execute(out.batch, prev_sampled)
        requests = [s.request for s in out.scheduled if s.needs_logits]  # logits row order
        if not requests:
            return _LaunchedStep(out, None, token_ids=[])
        # tokens generated before this one: the outputs so far and the placeholders in flight,
        # less this step's own placeholder
        num_generated = [r.num_output_tokens + r.num_output_placeholders - 1 for r in requests]
        pending = _pending_tokens(out.batch, prev_sampled, requests)
        ids = self.sampler.sample_ids(logits, requests, num_generated, pending)  # [L] on the device
        lp = self.sampler.logprob_tensors(logits, ids, requests)
        if not self.async_scheduling:
            token_ids = ids.tolist()
            logprobs = None if lp is None else logprob_dicts(tuple(t.cpu() for t in lp), token_ids,
                                                            requests)
            return _LaunchedStep(out, ids, token_ids=token_ids, logprobs=logprobs)
        hosts, event = _copy_to_host(ids, *(lp or ()))
        return _LaunchedStep(out, ids, hosts[0], event,
                             host_logprobs=hosts[1:] if lp is not None else None,
                             requests=requests)

    def _complete(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's sampled ids and turn them into outputs."""
        try:
            token_ids = step.wait_token_ids()
            batch = step.out.batch
            token_map = dict(zip(batch.logits_req_ids, token_ids, strict=True))
            appended = self.scheduler.update_from_output(step.out, token_map)
        except Exception as e:
            logger.exception("engine step failed for %d requests", step.out.batch.num_reqs)
            return self._fail([s.request for s in step.out.scheduled], e)
        rows = None
        if step.logprobs is not None:
            rows = {rid: i for i, rid in enumerate(batch.logits_req_ids)}
        touched: dict[str, _Parent] = {}
        now = time.monotonic()
        for sched in appended:
            request = sched.request
            entry = self._children.get(request.request_id)
            if entry is None or entry[1].request is not request:
                continue
            parent, seq = entry
            logprobs = step.logprobs[rows[request.request_id]] if rows is not None else None
            self._process_token(seq, request.output_token_ids[-1], logprobs, now)
            # a final_only parent can only become reportable when one of its children finishes
            if seq.is_cumulative or request.status is RequestStatus.FINISHED:
                touched[parent.request_id] = parent
        return [self._make_output(p) for p in touched.values() if self._should_report(p)]

    @staticmethod
    def _should_report(parent: _Parent) -> bool:
        """final_only requests report once, when every child has finished."""
        if parent.children[0].request.sampling_params.output_kind == "cumulative":
            return True
        return all(seq.request.status is RequestStatus.FINISHED for seq in parent.children)

    def _process_token(
        self, seq: _Sequence, token_id: int, logprobs: dict[int, float] | None, now: float
    ) -> None:
        request = seq.request
        params = request.sampling_params
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id]
        seq.detok.add(token_id)
        num_out = len(request.output_token_ids)
        num_tokens = len(request.prompt_token_ids) + num_out
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        text = seq.detok.text
        if not params.ignore_eos and token_id in request.eos_token_ids and num_out >= params.min_tokens:
            reason = FinishReason.STOP
        elif token_id in params.stop_token_ids and num_out >= params.min_tokens:
            reason, stop_reason = FinishReason.STOP, token_id
        elif params.stop and num_out >= params.min_tokens:
            hit = _find_stop(text, params.stop, len(seq.text))
            if hit is not None:
                stop, at = hit
                text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
                reason, stop_reason = FinishReason.STOP, stop
        if reason is None and (num_out >= (params.max_tokens or 0) or num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is None:
            # hold back a tail that could still grow into a stop string
            hold = seq.hold
            seq.text = text[: len(text) - hold] if hold > 0 else text
            return
        seq.text = text
        request.stop_reason = stop_reason
        self.scheduler.finish_request(request.request_id, reason)
        self.sampler.forget(request.request_id)

    def _fail(self, requests: list[Request], error: Exception) -> list[RequestOutput]:
        touched: dict[str, _Parent] = {}
        for request in requests:
            if request.status is RequestStatus.FINISHED:
                continue  # it finished (or was aborted) before the step failed
            entry = self._children.get(request.request_id)
            self.scheduler.finish_request(request.request_id, FinishReason.ERROR)
            request.error = f"{type(error).__name__}: {error}"
            if entry is not None:
                touched[entry[0].request_id] = entry[0]
        return [self._make_output(p) for p in touched.values()]

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outputs = []
        finished = True
        for seq in parent.children:
            r = seq.request
            is_done = r.status is RequestStatus.FINISHED
            finished = finished and is_done
            outputs.append(CompletionOutput(
                index=seq.index,
                text=seq.text,
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason if is_done else None,
                stop_reason=r.stop_reason,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            ))
        first = parent.children[0].request
        if finished:
            self._parents.pop(parent.request_id, None)
            for seq in parent.children:
                self._children.pop(seq.request.request_id, None)
        metrics = first.metrics
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
        )


def _find_stop(text: str, stops: list[str], searched_upto: int) -> tuple[str, int] | None:
    """The earliest stop string in ``text`` that ends after ``searched_upto``."""
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, searched_upto - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[1]):
            best = (stop, at)
    return best
