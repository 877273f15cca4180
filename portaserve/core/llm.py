"""``LLM``: the offline API, in the spirit of vLLM's ``LLM.generate`` / ``LLM.chat``.

    from portaserve import LLM, SamplingParams
    llm = LLM("smollm2-135m", device="cpu")
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(out[0].outputs[0].text)

Prompts may be strings, lists of token ids, or a list of either. Outputs come back in the order
of the prompts, each a ``RequestOutput`` with ``outputs[i].text``, ``.token_ids``,
``.finish_reason`` and ``.logprobs``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from portaserve.core.config import EngineConfig
from portaserve.core.engine import LLMEngine
from portaserve.core.request import RequestOutput
from portaserve.core.sampling import SamplingParams
from portaserve.errors import ConfigError, RequestError

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "extra"}

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Load a model on a device and generate. Keyword arguments are ``EngineConfig`` fields."""

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _ENGINE_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown LLM option(s) {unknown}; valid options are {sorted(_ENGINE_FIELDS)}",
                field=unknown[0])
        self.llm_engine = LLMEngine.from_config(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.llm_engine = LLMEngine.from_config(config)
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; returns one output per prompt, in order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Chat with one conversation (a list of messages) or a list of conversations."""
        if not isinstance(messages, list | tuple) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.llm_engine.tokenizer
        prompts: list[Prompt] = []
        for conv in conversations:
            if not conv or not all(isinstance(m, dict) for m in conv):
                raise RequestError("each conversation must be a non-empty list of messages "
                                   "({'role': ..., 'content': ...})", param="messages")
            text = tok.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt)
            # the template already holds the special tokens the model expects
            prompts.append(tok.encode(text, add_special_tokens=False))
        params_list = _as_params_list(sampling_params, len(prompts))
        return self._run(prompts, params_list, use_tqdm)

    def _run(
        self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        # offline callers only see finished outputs: skip building the per-step ones
        params = [dataclasses.replace(p, output_kind="final_only") for p in params]
        added: list[str] = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                engine.add_request(request_id, prompt, p)
                added.append(request_id)
            results: dict[str, RequestOutput] = {}
            bar = _progress(len(prompts)) if use_tqdm else None
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if not engine.has_unfinished_requests() and len(results) < len(ids):
                    missing = [i for i in ids if i not in results]
                    raise RuntimeError(f"engine lost requests {missing}")  # must never happen
            if bar is not None:
                bar.close()
            return [results[i] for i in ids]
        except BaseException:
            for request_id in added:
                engine.abort_request(request_id)
            raise


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple):
        if not prompts:
            raise RequestError("prompts must not be empty", param="prompts")
        if all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return [p if isinstance(p, str) else list(p) for p in prompts]
    raise RequestError(f"prompts must be a string, token ids or a list of those; got "
                       f"{type(prompts).__name__}", param="prompts")


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise RequestError(f"got {len(params)} sampling params for {n} prompts",
                           param="sampling_params")
    return params


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
