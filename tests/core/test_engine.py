"""The engine end to end on the real model (SmolLM2-135M, cpu): batching, preemption, prefix
caching, chunked prefill, stop handling, n > 1, logprobs, seeds, and bad inputs.

Every "same output" check compares against the same prompt run alone, greedy.
"""

from __future__ import annotations

import random

import pytest

from portaserve import LLM, SamplingParams
from portaserve.core.request import FinishReason
from portaserve.errors import ConfigError, ModelError, RequestError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm_path) -> LLM:
    return LLM(str(smollm_path), device="cpu", num_kv_blocks=512, max_num_batched_tokens=512)


def random_prompts(llm: LLM, n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = llm.llm_engine.model_config.vocab_size
    # ordinary-text token ids (skip the special tokens at the start of the vocabulary)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]


def test_batch_of_16_matches_each_prompt_alone(llm):
    prompts = random_prompts(llm, 16, seed=1)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert batched == alone(llm, prompts)
    assert all(len(t) == GREEDY.max_tokens for t in batched)


def test_preemption_under_a_tiny_kv_budget_loses_nothing(llm, smollm_path):
    prompts = random_prompts(llm, 24, seed=2, lo=20, hi=50)
    expected = alone(llm, prompts)
    # 12 blocks of 16 tokens: room for about 3 of these sequences at once. Without the admission
    # reserve (expected_output_tokens=None, the default) their growth preempts; with it they
    # wait instead. The same tokens either way.
    for reserve, preempts in ((None, True), (1024, False)):
        tiny = LLM(str(smollm_path), device="cpu", num_kv_blocks=12, max_num_batched_tokens=128,
                   expected_output_tokens=reserve)
        outs = tiny.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
        stats = tiny.llm_engine.stats()
        assert (stats.num_preemptions > 0) is preempts, (reserve, stats.num_preemptions)
        assert stats.kv_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0


def test_shared_prefix_hits_the_cache_and_changes_nothing(llm, smollm_path):
    rng = random.Random(3)
    vocab = llm.llm_engine.model_config.vocab_size
    system = [rng.randrange(100, vocab) for _ in range(400)]
    prompts = [system + [rng.randrange(100, vocab) for _ in range(rng.randint(5, 20))]
               for _ in range(6)]
    before = llm.llm_engine.stats().prefix_cache_hits
    cached = [llm.generate(p, GREEDY)[0] for p in prompts]
    hits = llm.llm_engine.stats().prefix_cache_hits - before
    assert hits >= 5 * 400 // 16 * 16  # every request after the first reuses the full blocks
    assert all(o.num_cached_tokens >= 384 for o in cached[1:])
    off = LLM(str(smollm_path), device="cpu", num_kv_blocks=512, enable_prefix_caching=False)
    uncached = [off.generate(p, GREEDY)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in cached] == [o.outputs[0].token_ids for o in uncached]
    assert off.llm_engine.stats().prefix_cache_hits == 0


def test_chunked_prefill_gives_identical_output(llm, smollm_path):
    prompt = random_prompts(llm, 1, seed=4, lo=300, hi=300)[0]
    chunked = LLM(str(smollm_path), device="cpu", num_kv_blocks=256, max_num_batched_tokens=64,
                  enable_prefix_caching=False)
    assert chunked.generate(prompt, GREEDY)[0].outputs[0].token_ids == alone(llm, [prompt])[0]


def test_chat_stop_string_and_finish_reasons(llm):
    messages = [{"role": "user", "content": "Count from one to ten, in words, separated by commas."}]
    free = llm.chat(messages, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert len(free.text) > 14
    stop = free.text[10:13]  # a stop string the greedy text is known to contain
    stop_at = free.text.index(stop)  # generation stops at its first occurrence
    stopped = llm.chat(messages, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))
    out = stopped[0].outputs[0]
    assert out.text == free.text[:stop_at]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop
    kept = llm.chat(messages, SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                             include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == free.text[: stop_at + len(stop)]
    short = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert short.finish_reason is FinishReason.LENGTH and len(short.token_ids) == 3


def test_eos_ends_generation_unless_ignored(llm):
    messages = [{"role": "user", "content": "Say hello."}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    eos = set(llm.get_tokenizer().eos_token_ids)
    assert out.finish_reason is FinishReason.STOP and out.token_ids[-1] in eos
    ignored = llm.chat(messages, SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 5,
                                                ignore_eos=True))[0].outputs[0]
    assert len(ignored.token_ids) == len(out.token_ids) + 5
    stop_id = out.token_ids[2]
    first = out.token_ids.index(stop_id)  # generation stops at its first occurrence
    cut = llm.chat(messages, SamplingParams(temperature=0, max_tokens=200,
                                            stop_token_ids=[stop_id]))[0].outputs[0]
    assert cut.token_ids == out.token_ids[: first + 1] and cut.stop_reason == stop_id
    assert cut.finish_reason is FinishReason.STOP


def test_seeded_sampling_is_reproducible_and_n_shares_the_prompt(llm):
    prompt = "Once upon a time"
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=16, n=3)
    a = llm.generate(prompt, params)[0]
    b = llm.generate(prompt, params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # children draw differently
    other = llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=43,
                                                max_tokens=16))[0]
    assert other.outputs[0].token_ids != a.outputs[0].token_ids


def test_logprobs_are_reported_per_token(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5,
                                                                  logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in entry and len(entry) == 3  # greedy: the chosen token is the top-1
        assert entry[tok] == pytest.approx(max(entry.values()))
        assert all(v <= 0.0 for v in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs, strict=True)))


def test_bad_inputs_raise_clear_errors(llm):
    with pytest.raises(RequestError, match="prompt"):
        llm.generate("", GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        llm.generate("hi", SamplingParams(max_tokens=0))
    with pytest.raises(RequestError, match="top_p"):
        llm.generate("hi", SamplingParams(top_p=1.5))
    too_long = [200] * (llm.llm_engine.max_model_len + 1)
    with pytest.raises(RequestError, match="maximum context length") as err:
        llm.generate(too_long, GREEDY)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(ModelError):
        LLM("/no/such/model.gguf", device="cpu")
    with pytest.raises(ConfigError, match="max_num_seq"):
        LLM("smollm2-135m", device="cpu", max_num_seq=4)
    # the engine is still usable and holds nothing after the errors
    assert llm.generate("hi", GREEDY)[0].outputs[0].token_ids
    assert llm.llm_engine.stats().num_running == 0
