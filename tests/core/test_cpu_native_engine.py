"""The whole engine on the cpu device with its native decode step, against transformers.

``LLM(device="cpu")`` keeps SmolLM2's GGUF blocks packed and runs decode steps through
``NativeDecodeExecutor`` (``portaserve/devices/cpu_native``); its greedy tokens must equal
transformers' ``generate`` on the same file, as the op-by-op model's do (tests/core/test_llama.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from portaserve.devices import cpu_native

pytestmark = pytest.mark.skipif(
    cpu_native.library() is None,
    reason=f"native cpu kernels unavailable: {cpu_native.unavailable_reason()}")

MAX_NEW = 40


def test_native_decode_step_matches_transformers(smollm_path: Any, chat_messages: list[Any],
                                                 hf_model: Any, greedy_hf: Any) -> None:
    from portaserve import LLM, SamplingParams
    from portaserve.devices.cpu_native.executor import NativeDecodeExecutor
    from portaserve.quant.base import QuantizedWeight

    llm = LLM(str(smollm_path), device="cpu", max_model_len=1024)
    engine = llm.llm_engine
    executor = engine.runner.executor
    assert isinstance(executor, NativeDecodeExecutor)
    assert isinstance(engine.model.layers[0].gate_up[0][0], QuantizedWeight)  # kept packed
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
               for m in chat_messages]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert executor.native_steps >= MAX_NEW // 2  # the decode steps ran natively, batched
    for prompt, out in zip(prompts, outs, strict=True):
        ours = out.outputs[0].token_ids
        theirs = greedy_hf(hf_model, prompt, MAX_NEW)
        assert len(ours) >= 32, out.outputs[0].text
        assert ours == theirs, (out.outputs[0].text, tok.decode(theirs))
