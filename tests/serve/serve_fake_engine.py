"""A small fake ``LLMEngine`` for server tests: same interface, no model, deterministic.

Tokens are bytes (ids 0..255) plus two specials (256 ``<|im_start|>``, 257 ``<|im_end|>`` =
EOS). The "model" is a hash of the token history that picks among lowercase letters and a
space, so greedy output depends on the whole prompt and differs between prompts. It batches
like the real engine: at most ``max_num_seqs`` requests run, each step advances every running
request by one token, KV blocks are counted per sequence, the waiting queue has a cap.

A ``tool`` message makes the chat template refuse the conversation. Test hooks in the prompt: ``[eos]`` ends after three tokens with EOS, ``[fail]`` finishes with
``finish_reason="error"``, ``[crash]`` makes ``step()`` raise.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field

from portaserve.core.request import CompletionOutput, FinishReason, RequestOutput
from portaserve.core.sampling import SamplingParams
from portaserve.errors import EngineOverloadedError, ModelError, RequestError

IM_START, IM_END = 256, 257
_ALPHABET = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz "]


class FakeTokenizer:
    vocab_size = 258
    eos_token_ids = (IM_END,)
    _SPECIALS = {"<|im_start|>": IM_START, "<|im_end|>": IM_END}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for name, token_id in self._SPECIALS.items():
                if text.startswith(name, i):
                    ids.append(token_id)
                    i += len(name)
                    break
            else:
                ids.extend(text[i].encode())
                i += 1
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if any(m["role"] == "tool" for m in messages):
            raise ModelError(
                "the chat template of fake-model refused the messages: no tool role",
                field="messages",
            )
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def next_token_logprobs(history: list[int]) -> dict[int, float]:
    """The fake model: log-probabilities over the alphabet given the token history."""
    digest = hashlib.blake2b(bytes(str(history[-64:]), "ascii"), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little") + len(history))
    logits = [rng.gauss(0.0, 2.0) for _ in _ALPHABET]
    top = max(logits)
    log_z = top + math.log(sum(math.exp(x - top) for x in logits))
    return {t: x - log_z for t, x in zip(_ALPHABET, logits, strict=True)}


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


@dataclass
class _Seq:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class _Req:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]


class FakeEngine:
    """The ``LLMEngine`` interface over ``next_token_logprobs``."""

    def __init__(
        self,
        *,
        max_model_len: int = 256,
        max_num_seqs: int = 64,
        num_kv_blocks: int = 512,
        block_size: int = 16,
        max_waiting_requests: int | None = None,
        step_delay: float = 0.0,
        model_name: str = "fake-model",
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.max_waiting_requests = max_waiting_requests
        self.step_delay = step_delay
        self.device_description = "fake (test engine)"
        self.kv_capacity_tokens = num_kv_blocks * block_size
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.num_aborted = 0

    # -- interface ------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *, priority: int = 0
    ) -> None:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("prompt must not be empty", param="prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"prompt is {len(ids)} tokens; max_model_len is {self.max_model_len}",
                param="prompt",
            )
        if self.max_waiting_requests is not None and len(self.waiting) >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"{len(self.waiting)} requests are already waiting "
                f"(max_waiting_requests={self.max_waiting_requests})"
            )
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seqs.append(_Seq(rng=random.Random(seed)))
        self.waiting.append(
            _Req(request_id, prompt if isinstance(prompt, str) else None, ids, params, seqs)
        )

    def abort_request(self, request_id: str) -> None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.num_aborted += 1
                    return

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> FakeStats:
        return FakeStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_usage=self._num_used_blocks() / self.num_kv_blocks,
        )

    def step(self) -> list[RequestOutput]:
        if self.step_delay:
            time.sleep(self.step_delay)
        self._admit()
        if any(
            "[crash]" in (r.prompt or self.tokenizer.decode(r.prompt_ids)) for r in self.running
        ):
            raise RuntimeError("fake engine crashed on purpose ([crash] in a prompt)")
        outputs = []
        for req in list(self.running):
            for seq in req.seqs:
                if seq.finish_reason is None:
                    self._advance(req, seq)
            finished = all(s.finish_reason is not None for s in req.seqs)
            if finished:
                self.running.remove(req)
            outputs.append(self._output(req, finished))
        return outputs

    # -- internals ------------------------------------------------------------------------------

    def _blocks(self, req: _Req, extra: int = 0) -> int:
        return sum(
            math.ceil((len(req.prompt_ids) + len(s.token_ids) + extra) / self.block_size)
            for s in req.seqs
        )

    def _num_used_blocks(self) -> int:
        return sum(self._blocks(r) for r in self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if self._num_used_blocks() + self._blocks(req, extra=1) > self.num_kv_blocks:
                break
            self.running.append(self.waiting.pop(0))

    def _advance(self, req: _Req, seq: _Seq) -> None:
        p = req.params
        prompt_text = req.prompt or self.tokenizer.decode(req.prompt_ids)
        if "[fail]" in prompt_text:
            seq.finish_reason = FinishReason.ERROR
            return
        record = next_token_logprobs(req.prompt_ids + seq.token_ids)
        if "[eos]" in prompt_text and len(seq.token_ids) == 3 and not p.ignore_eos:
            record = {IM_END: 0.0, **{t: -30.0 for t in _ALPHABET[:4]}}
        if p.temperature == 0.0:
            token = max(record, key=record.__getitem__)
        else:
            weights = [math.exp(lp / p.temperature) for lp in record.values()]
            token = seq.rng.choices(list(record), weights=weights)[0]
        seq.token_ids.append(token)
        if p.logprobs is not None:
            top = sorted(record.items(), key=lambda kv: kv[1], reverse=True)[: p.logprobs]
            seq.logprobs.append({**dict(top), token: record[token]})
        if token in self.tokenizer.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = FinishReason.STOP
            seq.stop_reason = token
        text = self.tokenizer.decode(seq.token_ids)
        for stop in p.stop:
            at = text.find(stop)
            if at >= 0:
                seq.text = text[:at]
                seq.finish_reason = FinishReason.STOP
                seq.stop_reason = stop
                return
        if seq.finish_reason is None and (
            len(seq.token_ids) >= (p.max_tokens or self.max_model_len)
            or len(req.prompt_ids) + len(seq.token_ids) >= self.max_model_len
        ):
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is None:
            text = text[: len(text) - _partial_stop_len(text, p.stop)]  # hold back a stop prefix
        seq.text = text

    def _output(self, req: _Req, finished: bool) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=i,
                text=s.text,
                token_ids=list(s.token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=[dict(d) for d in s.logprobs] if req.params.logprobs is not None else None,
            )
            for i, s in enumerate(req.seqs)
        ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_ids),
            outputs=outs,
            finished=finished,
        )


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                best = max(best, k)
                break
    return best
