"""The scheduler: waiting and running queues, the per-step token budget, preemption, policies.

Each step it decides which requests advance by how many tokens. There are no prefill and decode
phases: a request has ``num_tokens`` (prompt + output so far) and ``num_computed_tokens`` (in
the KV cache), and each step moves the second toward the first. One token budget
(``max_num_batched_tokens``) is shared by all requests of a step, so a prompt longer than the
budget runs in chunks (chunked prefill is always on) and decodes ride along with prefills.

Order within a step: running requests first (each decode needs one token), then waiting ones in
policy order, until the budget, ``max_num_seqs`` or the free blocks run out. A new request
starts from its longest cached prefix (``BlockPool.find_cached_prefix``). When a running request
needs a block and none is free, the scheduler preempts by recompute: the most recently admitted
running request (under "priority": the lowest priority, latest arrival) releases all its blocks
and goes back to the front of the waiting queue with ``num_computed_tokens = 0``; its output
tokens stay and are re-prefilled with its prompt (usually cheaply, from the prefix cache), so
nothing is lost or repeated. No new request is admitted in a step that preempted.

Admission can also keep room for growth (off by default): with
``SchedulerConfig.expected_output_prior`` set, beside the blocks a waiting request needs now it
must leave free the blocks every running request (and itself) is expected to still write, each
the smaller of what max_tokens / max_model_len leave it and ``expected_output`` tokens. That
estimate starts at the prior, follows the output lengths of finished requests (an EMA), and
grows by a quarter at each preemption; a request alone is admitted on its present needs.
Without it (None, vLLM's admission) a wave of requests admitted together can outgrow the cache
and preemption recomputes what it had. Measured on the H200 (1000 in / 1000 out, bf16 KV cache
of 852k tokens, 512 sequences; docs/benchmarks.md section 3, run 7): 104.3 s with 140
preemptions without the reserve, 107.2 s with none with it (prior 1024): the smaller batches
it runs cost more than the recompute they save, hence off by default. A waiting
request whose next uncached block is being computed right now by a running request waits
(a bounded time) and then reuses that block, so a burst sharing a system prompt, or the n
sequences of one prompt, compute the shared prefix once.

Policies (order of the waiting queue):

- ``fcfs``: arrival order; preempted requests at the front.
- ``priority``: lower ``Request.priority`` first, ties by arrival. Strict by design: a stream of
  higher-priority work can hold lower-priority work back indefinitely.
- ``cache-aware``: longest cached prefix first (SGLang's longest-prefix-match), scored over the
  first ``cache_aware_window`` waiting requests; a preempted request, or one that has waited more
  than ``cache_aware_max_wait_steps`` scheduling steps, goes before every scored one, in arrival
  order, so nobody starves.

The scheduler never finishes a request on its own: the engine decides (EOS, stop, length) and
calls ``finish_request``, which frees the blocks at once (also for aborts).

A step is committed when it is scheduled: each scheduled request's ``num_computed_tokens``
advances then, and a request whose last known token runs gains an output *placeholder*
(``Request.num_output_placeholders``) for the token the step will sample. ``update_from_output``
later replaces the placeholder with the real id and enters the newly full blocks in the prefix
cache (hashing needs real ids, so it waits for them). This is what lets the engine schedule step
N+1 while the device still runs step N (async scheduling): a request decoding in both steps gets
its N+1 input token from N's sampled ids on the device (``ScheduledBatch.prev_token_rows`` /
``prev_sample_rows``). A request whose length limit its placeholders already reach is not
scheduled again; one that turns out to have stopped at N (EOS, stop string) ran one extra token
at N+1, which the engine discards (its blocks are freed when it finishes, as always). A request
preempted while its token is in flight keeps the placeholder and is not re-admitted until the
token arrives.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import numpy as np

from portaserve.core.batch import ScheduledBatch, build_batch_columns
from portaserve.core.block_pool import BlockHash, BlockPool, ExtraKeys, hash_block_tokens
from portaserve.core.request import FinishReason, Request, RequestStatus
from portaserve.errors import ConfigError, EngineOverloadedError, PortaserveError, RequestError

POLICIES = ("fcfs", "priority", "cache-aware")
#: Weight of each finished request's output length in ``Scheduler.expected_output`` (an EMA).
EXPECTED_OUTPUT_EMA = 0.05
#: A preemption scales ``Scheduler.expected_output`` by this (the reserve was too small).
PREEMPTION_GROWTH = 1.25


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits and policy of one scheduler (validated; never changed afterwards)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # "fcfs", "priority", "cache-aware"
    max_waiting_requests: int | None = None
    #: cache-aware: a request waiting more than this many steps goes first.
    cache_aware_max_wait_steps: int = 32
    #: cache-aware: how many waiting requests (from the front) are scored per step.
    cache_aware_window: int = 128
    #: Admission keeps blocks free for the output the running requests are still expected to
    #: write (see the module docstring); this is the expected output length, in tokens, until
    #: requests have finished and their lengths take over. None: admit on present needs alone
    #: (vLLM's behaviour: preemption by recompute absorbs the growth), the default: the reserve
    #: measured slower on the H200 (module docstring).
    expected_output_prior: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "block_size",
            "num_blocks",
            "cache_aware_max_wait_steps",
            "cache_aware_window",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"scheduler {name} must be a positive integer; got {value!r}", field=name
                )
        if self.max_waiting_requests is not None and (
            not isinstance(self.max_waiting_requests, int) or self.max_waiting_requests < 1
        ):
            raise ConfigError(
                "scheduler max_waiting_requests must be a positive integer or None; "
                f"got {self.max_waiting_requests!r}",
                field="max_waiting_requests",
            )
        prior = self.expected_output_prior
        if prior is not None and (isinstance(prior, bool) or not isinstance(prior, int) or prior < 0):
            raise ConfigError(
                f"scheduler expected_output_prior must be a non-negative integer or None; got {prior!r}",
                field="expected_output_prior",
            )
        if self.policy not in POLICIES:
            raise ConfigError(
                f"scheduling policy must be one of {', '.join(POLICIES)}; got {self.policy!r}",
                field="policy",
            )
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ConfigError(
                f"the KV cache ({self.num_blocks} blocks of {self.block_size} = "
                f"{self.num_blocks * self.block_size} tokens) cannot hold one sequence of "
                f"max_model_len {self.max_model_len}; raise num_blocks or lower max_model_len",
                field="max_model_len",
            )


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int
    #: Whether this step's last token of the request is sampled (the chunk reaches the end of
    #: the request's known tokens).
    needs_logits: bool
    #: The request's computed tokens before this step (the step covers the next num_new_tokens).
    num_computed_before: int = 0


@dataclass(slots=True)
class SchedulerOutput:
    """One step's decision: the batch to run and who is in it (``scheduled`` follows batch order)."""

    batch: ScheduledBatch
    scheduled: list[ScheduledRequest]
    #: Requests preempted during this step (back in the waiting queue, blocks released).
    preempted: list[Request]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_steps: int
    kv_usage: float
    num_free_blocks: int
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int


@dataclass(slots=True)
class _Entry:
    """Scheduler-private state of a request."""

    request: Request
    add_seq: int  # order of add_request calls (tie-break)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks of block_ids already in the prefix-cache map
    waiting_since: int = 0  # step count when it (re)entered the waiting queue
    extra_keys: ExtraKeys = ()
    #: Row of the last scheduled step's sampled ids that holds this request's placeholder.
    sample_row: int = 0
    #: ``block_table()``'s numpy mirror of ``block_ids`` and the list it mirrors.
    table: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    table_of: list[int] | None = None

    def block_table(self) -> np.ndarray:
        """``block_ids`` as int32 numpy for the batch builder, kept up to date incrementally:
        the list is only ever extended or replaced by another list (never edited in place),
        so a mirror of the same list object is current up to its length."""
        ids = self.block_ids
        if self.table_of is not ids:
            self.table, self.table_of = np.asarray(ids, dtype=np.int32), ids
        elif len(self.table) != len(ids):
            tail = np.asarray(ids[len(self.table):], dtype=np.int32)
            self.table = np.concatenate((self.table, tail))
        return self.table


class SchedulerError(PortaserveError, RuntimeError):
    """The scheduler was driven out of contract (e.g. a sampled token missing)."""


class Scheduler:
    """Continuous batching over a ``BlockPool``; see the module docstring."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.block_pool = BlockPool(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self._entries: dict[str, _Entry] = {}
        self.waiting: list[Request] = []  # base order of the policy (see _waiting_order)
        self.running: list[Request] = []  # admission order
        self.num_preemptions = 0
        self.num_steps = 0
        self._add_seq = 0
        #: Output tokens a running request is expected to still write (at most what max_tokens
        #: leaves it): admission keeps that many free for each; None when the reserve is off.
        self.expected_output: float | None = config.expected_output_prior

    # -- queries ------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Request | None:
        entry = self._entries.get(request_id)
        return entry.request if entry is not None else None

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy; empty while it holds no blocks)."""
        entry = self._entries.get(request_id)
        return list(entry.block_ids) if entry is not None else []

    def block_tables(self) -> dict[str, list[int]]:
        """Every unfinished request's block table (copies), for invariant checks."""
        return {rid: list(e.block_ids) for rid, e in self._entries.items()}

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._entries)

    @property
    def stats(self) -> SchedulerStats:
        pool = self.block_pool.stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            kv_usage=pool.usage,
            num_free_blocks=pool.num_free_blocks,
            prefix_cache_query_tokens=pool.query_tokens,
            prefix_cache_hit_tokens=pool.hit_tokens,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request.

        Raises ``RequestError`` if the id is taken or the prompt can never fit (empty, longer
        than ``max_model_len``, or more blocks than the pool has), and ``EngineOverloadedError``
        when ``max_waiting_requests`` requests are already waiting.
        """
        cfg = self.config
        if request.request_id in self._entries:
            raise RequestError(
                f"request_id {request.request_id!r} is already in use", param="request_id"
            )
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("prompt must not be empty", param="prompt")
        if request.num_tokens > cfg.max_model_len:
            raise RequestError(
                f"the prompt has {request.num_tokens} tokens, more than max_model_len "
                f"{cfg.max_model_len}",
                param="prompt",
                code="context_length_exceeded",
            )
        num_blocks = -(-request.num_tokens // self.block_size)
        if num_blocks > cfg.num_blocks:
            raise RequestError(
                f"the prompt needs {num_blocks} KV blocks of {self.block_size} tokens; the cache "
                f"has {cfg.num_blocks}",
                param="prompt",
                code="context_length_exceeded",
            )
        if cfg.max_waiting_requests is not None and len(self.waiting) >= cfg.max_waiting_requests:
            raise EngineOverloadedError(
                f"{len(self.waiting)} requests are waiting (max_waiting_requests="
                f"{cfg.max_waiting_requests}); try again later"
            )
        extra: ExtraKeys = (request.cache_salt,) if request.cache_salt else ()
        entry = _Entry(request, self._add_seq, waiting_since=self.num_steps, extra_keys=extra)
        self._add_seq += 1
        self._entries[request.request_id] = entry
        request.status = RequestStatus.WAITING
        self._enqueue(request, front=False)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish (or abort) a request: free its blocks now, drop it from the queues.

        Returns the request, or None if the id is unknown or already finished.
        """
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        request = entry.request
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_pool.free(entry.block_ids)
        entry.block_ids = []
        if self.expected_output is not None and reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.expected_output += EXPECTED_OUTPUT_EMA * (request.num_output_tokens - self.expected_output)
        request.num_computed_tokens = 0  # its KV is gone with its blocks
        request.num_output_placeholders = 0
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.metrics.finished_time = time.monotonic()
        return request

    # -- the step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work and build its batch (empty when nothing can run)."""
        self.num_steps += 1
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[Request] = []

        # The hot loop of a decode step (hundreds of requests): lengths are read with len() on
        # the token lists rather than through Request's properties, and a request that stays
        # within its blocks (15 steps of 16) touches neither the pool nor the preemption logic.
        max_model_len = self.config.max_model_len
        block_size = self.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_computed = request.num_computed_tokens
            num_known = (len(request.prompt_token_ids) + len(request.output_token_ids)
                         + request.num_output_placeholders)
            if request.num_output_placeholders and self._reaches_length_limit(request):
                i += 1  # its last token is in flight: the engine finishes it when it lands
                continue
            num_new = min(num_known - num_computed, budget, max_model_len - num_computed)
            if num_new <= 0:
                i += 1
                continue
            entry = self._entries[request.request_id]
            need = -(-(num_computed + num_new) // block_size) - len(entry.block_ids)
            if need > 0:
                self_preempted = False
                while not self.block_pool.can_allocate(need):
                    victim = self._pick_victim()
                    if self.running.index(victim) < i:  # (priority) it was scheduled earlier
                        i -= 1
                    budget += self._preempt(victim, scheduled)
                    preempted.append(victim)
                    if victim is request:
                        self_preempted = True
                        break
                if self_preempted:
                    continue  # self.running shifted: index i is already the next request
                entry.block_ids.extend(self.block_pool.allocate(need))
            scheduled[request.request_id] = ScheduledRequest(
                request, num_new, num_computed + num_new == num_known, num_computed)
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._admit_waiting(budget, scheduled)

        batch = self._build_batch(list(scheduled.values()))
        return SchedulerOutput(
            batch=batch,
            scheduled=list(scheduled.values()),
            preempted=preempted,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
        )

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, int]
    ) -> list[ScheduledRequest]:
        """Append each scheduled request's sampled token in place of its placeholder.

        ``sampled`` maps request id -> token id for every scheduled request with
        ``needs_logits`` that is still unfinished. Requests finished or aborted since
        ``schedule`` are skipped; a request preempted since then still gets its token. Newly
        full blocks of running requests enter the prefix cache. Returns the scheduled requests
        that received a token (the ones whose stop conditions the engine must check).
        """
        appended: list[ScheduledRequest] = []
        caching = self.block_pool.enable_prefix_caching
        block_size = self.block_size
        for sched in output.scheduled:
            request = sched.request
            entry = self._entries.get(request.request_id)
            if entry is None or entry.request is not request:
                continue  # finished or aborted since it was scheduled
            if sched.needs_logits:
                token = sampled.get(request.request_id)
                if token is None:
                    raise SchedulerError(
                        f"no sampled token for request {request.request_id!r}, which needed logits"
                    )
                request.output_token_ids.append(int(token))
                request.num_output_placeholders -= 1
                appended.append(sched)
            num_computed = sched.num_computed_before + sched.num_new_tokens
            # most decode steps fill no block: skip the call unless one may have filled
            if (caching and num_computed // block_size > entry.num_cached_blocks
                    and request.status is RequestStatus.RUNNING):
                self._cache_blocks(entry, num_computed)
        return appended

    # -- internals ----------------------------------------------------------------------------

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        num_known = request.num_tokens + request.num_output_placeholders
        reaches_end = request.num_computed_tokens + num_new == num_known
        return ScheduledRequest(request, num_new, reaches_end, request.num_computed_tokens)

    def _reaches_length_limit(self, request: Request) -> bool:
        """Whether the tokens in flight already take the request to max_tokens / max_model_len."""
        if not request.num_output_placeholders:
            return False
        max_tokens = request.sampling_params.max_tokens
        num_out = len(request.output_token_ids) + request.num_output_placeholders
        return (max_tokens is not None and num_out >= max_tokens) or (
            len(request.prompt_token_ids) + num_out >= self.config.max_model_len
        )

    def _build_batch(self, scheduled: list[ScheduledRequest]) -> ScheduledBatch:
        """Flatten the step and commit it (computed counts, placeholders, sample rows).

        Gathers ``build_batch_columns``' columns directly (no per-request item tuples): this
        runs every step for every scheduled request."""
        req_ids: list[str] = []
        token_ids: list[int] = []  # the new tokens of every request, flattened
        num_new: list[int] = []
        num_computed: list[int] = []
        tables: list[np.ndarray] = []
        needs_logits: list[bool] = []
        placeholder_items: list[int] = []
        placeholder_rows: list[int] = []  # rows of the previous step's samples
        num_rows = 0  # logits rows so far (they follow item order)
        entries = self._entries
        for index, s in enumerate(scheduled):
            request = s.request
            entry = entries[request.request_id]
            start = request.num_computed_tokens
            end = start + s.num_new_tokens
            num_known = len(request.prompt_token_ids) + len(request.output_token_ids)
            if end <= num_known:
                token_ids += _token_slice(request, start, end)
            else:  # its last token was sampled by the step in flight
                if end - num_known != 1 or request.num_output_placeholders != 1:
                    raise SchedulerError(
                        f"request {request.request_id!r} would run {end - num_known} "
                        "unknown tokens; only one step may be in flight"
                    )
                if start < num_known:
                    token_ids += _token_slice(request, start, num_known)
                token_ids.append(0)  # filled on the device
                placeholder_items.append(index)
                placeholder_rows.append(entry.sample_row)
            req_ids.append(request.request_id)
            num_new.append(s.num_new_tokens)
            num_computed.append(start)
            tables.append(entry.block_table())
            needs_logits.append(s.needs_logits)
            request.num_computed_tokens = end
            if s.needs_logits:
                request.num_output_placeholders += 1
                entry.sample_row = num_rows
                num_rows += 1
        return build_batch_columns(
            req_ids, token_ids, num_new, num_computed, tables, needs_logits, self.block_size,
            placeholder_items, placeholder_rows,
        )

    def _blocks_needed(self, entry: _Entry, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(entry.block_ids))

    def _growth_blocks(self, request: Request) -> int:
        """Blocks beyond those it holds (or, waiting, will hold for its known tokens) that
        ``request`` needs for the output it is expected to still write: the expected output
        length (whatever it wrote so far: lengths are taken as memoryless), capped by what
        max_tokens and max_model_len leave it."""
        if self.expected_output is None:
            return 0
        known = request.num_tokens + request.num_output_placeholders
        written = request.num_output_tokens + request.num_output_placeholders
        left = self.config.max_model_len - known
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            left = min(left, max_tokens - written)
        more = int(min(max(left, 0), self.expected_output))
        final = known + max(more - 1, 0)  # the KV never holds the last token sampled
        held = max(len(self._entries[request.request_id].block_ids), -(-known // self.block_size))
        return max(0, -(-final // self.block_size) - held)

    def _cache_blocks(self, entry: _Entry, num_computed: int) -> None:
        """Cache the full blocks of the first ``num_computed`` tokens whose ids are known."""
        if not self.block_pool.enable_prefix_caching:
            return
        request = entry.request
        num_full = min(num_computed, request.num_tokens) // self.block_size
        if num_full <= entry.num_cached_blocks:
            return
        self._hash_blocks(entry, num_full)
        self.block_pool.cache_full_blocks(
            entry.block_ids, entry.block_hashes, entry.num_cached_blocks, num_full
        )
        entry.num_cached_blocks = num_full

    def _hash_blocks(self, entry: _Entry, num_blocks: int) -> None:
        """Make sure the first ``num_blocks`` (full) blocks of the request are hashed."""
        start = len(entry.block_hashes)
        if num_blocks <= start:
            return
        bs = self.block_size
        # only the new blocks' tokens are sliced out; the chain continues from the last hash
        tokens = _token_slice(entry.request, start * bs, num_blocks * bs)
        parent = entry.block_hashes[-1] if start else None
        for i in range(num_blocks - start):
            parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], entry.extra_keys)
            entry.block_hashes.append(parent)

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=self._priority_key)
        return self.running[-1]

    def _priority_key(self, request: Request) -> tuple[int, int, int]:
        return (request.priority, request.arrival_seq, self._entries[request.request_id].add_seq)

    def _arrival_key(self, request: Request) -> tuple[int, int]:
        return (request.arrival_seq, self._entries[request.request_id].add_seq)

    def _preempt(self, request: Request, scheduled: dict[str, ScheduledRequest]) -> int:
        """Send a running request back to waiting; returns the budget it gave back this step."""
        entry = self._entries[request.request_id]
        self.running.remove(request)
        self.block_pool.free(entry.block_ids)
        entry.block_ids = []
        entry.num_cached_blocks = 0
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        if self.expected_output is not None:  # the reserve was too small: admit more carefully
            self.expected_output = max(self.expected_output * PREEMPTION_GROWTH, self.block_size)
        entry.waiting_since = self.num_steps
        self._enqueue(request, front=True)
        undone = scheduled.pop(request.request_id, None)
        return undone.num_new_tokens if undone is not None else 0

    def _enqueue(self, request: Request, front: bool) -> None:
        if self.config.policy == "priority":
            bisect.insort(self.waiting, request, key=self._priority_key)
        elif front:
            # preempted requests keep their admission order among themselves: victims leave
            # newest first, so each goes in front of the ones preempted before it
            self.waiting.insert(0, request)
        else:
            self.waiting.append(request)

    def _waiting_order(self) -> list[Request]:
        if self.config.policy != "cache-aware":
            return self.waiting
        cfg = self.config
        window = self.waiting[: cfg.cache_aware_window]
        first: list[Request] = []
        scored: list[tuple[int, int, Request]] = []
        for pos, request in enumerate(window):
            entry = self._entries[request.request_id]
            aged = self.num_steps - entry.waiting_since > cfg.cache_aware_max_wait_steps
            if aged or request.status is RequestStatus.PREEMPTED:
                first.append(request)
            else:
                scored.append((-len(self._lookup_prefix(entry)), pos, request))
        scored.sort(key=lambda t: (t[0], t[1]))
        return first + [r for _, _, r in scored] + self.waiting[cfg.cache_aware_window :]

    def _lookup_prefix(self, entry: _Entry) -> list[int]:
        """Cached block ids for the request's prefix, leaving at least one token to compute."""
        if not self.block_pool.enable_prefix_caching:
            return []
        request = entry.request
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_blocks(entry, max_blocks)
        return self.block_pool.find_cached_prefix(entry.block_hashes, max_blocks)

    def _admit_waiting(self, budget: int, scheduled: dict[str, ScheduledRequest]) -> int:
        admitted: list[Request] = []
        if budget <= 0 or len(self.running) >= self.config.max_num_seqs or not self.waiting:
            return budget
        pending = self._pending_block_hashes()
        # blocks kept for the running requests' expected output (a pass over them: skip it when off)
        reserve = 0 if self.expected_output is None else sum(map(self._growth_blocks, self.running))
        for request in self._waiting_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            entry = self._entries[request.request_id]
            if request.num_output_placeholders:
                continue  # preempted while its last token was in flight: wait for the token
            cached = self._lookup_prefix(entry)
            max_blocks = (request.num_tokens - 1) // self.block_size
            if pending and len(cached) < max_blocks and entry.block_hashes[len(cached)] in pending:
                continue  # its next block is being computed by another request: reuse it later
            num_hit = len(cached) * self.block_size
            num_new = min(request.num_tokens - num_hit, budget)
            need = self._blocks_needed(entry, num_hit + num_new) - len(cached)
            # admit only if all its known tokens fit now (vLLM's full-input check): a long
            # prompt admitted on its first chunk alone would be preempted at a later chunk
            need_all = self._blocks_needed(entry, request.num_tokens) - len(cached)
            growth = self._growth_blocks(request)
            # beside others, it must also leave room for everyone's expected output (alone it
            # runs whatever its growth: preemption by recompute is the fallback)
            if not self.block_pool.can_allocate(need_all + (reserve + growth if self.running else 0), cached):
                break  # head-of-line waits rather than being overtaken forever
            reserve += growth
            entry.block_ids = self.block_pool.allocate(need, cached)
            entry.num_cached_blocks = len(cached)
            self.block_pool.record_prefix_lookup(request.num_tokens, num_hit)
            if request.metrics.num_preemptions == 0:
                request.num_cached_tokens = num_hit
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            scheduled[request.request_id] = self._scheduled(request, num_new)
            budget -= num_new
            if self.block_pool.enable_prefix_caching:
                pending.update(self._uncomputed_block_hashes(entry))
        if admitted:
            gone = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in gone]
        return budget

    def _uncomputed_block_hashes(self, entry: _Entry) -> list[BlockHash]:
        """Hashes of the request's full blocks that are not in the prefix cache yet."""
        request = entry.request
        num_full = request.num_tokens // self.block_size
        self._hash_blocks(entry, num_full)
        return entry.block_hashes[entry.num_cached_blocks : num_full]

    def _pending_block_hashes(self) -> set[BlockHash]:
        """Full blocks that running requests are computing now (in-batch prefix sharing).

        A waiting request whose next uncached block is among these is held back a step or
        a few, then finds that block in the cache instead of computing a second copy (as
        SGLang does within a batch). The wait is bounded: the blocks get computed.
        """
        if not self.block_pool.enable_prefix_caching:
            return set()
        pending: set[BlockHash] = set()
        for request in self.running:
            pending.update(self._uncomputed_block_hashes(self._entries[request.request_id]))
        return pending


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """``request.all_token_ids[start:end]`` without concatenating the whole sequence."""
    prompt = request.prompt_token_ids
    num_prompt = len(prompt)
    if end <= num_prompt:
        return prompt[start:end]
    outputs = request.output_token_ids
    if start >= num_prompt:
        return outputs[start - num_prompt : end - num_prompt]
    return prompt[start:] + outputs[: end - num_prompt]
