"""End-to-end tests of the HTTP APIs with the official openai and anthropic clients.

Each test runs against the fake engine and, once it exists, the real engine with the real
SmolLM2-135M model (the ``server`` fixture is parametrized). Greedy decoding makes outputs
comparable: streamed == non-streamed, concurrent == solo.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import string
import time

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

#: Questions whose answers differ, so a mixed-up batch shows.
QUESTIONS = [
    "Name a color.",
    "What is 2+2?",
    "Say hello in French.",
    "List three fruits.",
    "Who wrote Hamlet?",
    "Translate 'cat' to Spanish.",
    "What is the capital of Japan?",
    "Write a haiku about rain.",
]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(n)
    )


def fresh_prompt(tag: str = "") -> str:
    rng = random.Random()
    return f"Repeat after me{tag}: {_words(rng, 5)}"


def oa(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=120
    )


#: This anthropic client has no sampling arguments; the API (and portaserve) still takes them.
GREEDY = {"temperature": 0}


def an(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120
    )


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if "status" in sample.labels:
                key += f"{{{sample.labels['status']}}}"
            values[key] = sample.value
    return values


def chat(client: openai.OpenAI, server, prompt: str, **kw):
    return client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": prompt}], **kw
    )


# ----------------------------------------------------------------------------------------------


def test_health_models_version(server):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    models = oa(server).models.list()
    assert [m.id for m in models.data] == [server.model]
    version = httpx.get(f"{server.base_url}/version", headers=server.headers).json()
    import portaserve

    assert version == {"version": portaserve.__version__}


def test_startup_log(server):
    log = server.log()
    assert f"listening on http://127.0.0.1:{server.port}" in log
    if server.kind == "real":
        assert "device: cpu" in log and "KV cache capacity 4096 tokens" in log


def test_chat_stream_equals_non_stream(server):
    client = oa(server)
    prompt = fresh_prompt()
    full = chat(client, server, prompt, max_tokens=10, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 10

    chunks = list(
        chat(
            client,
            server,
            prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_stream_equals_non_stream(server):
    client = oa(server)
    prompt = fresh_prompt()
    full = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=8, temperature=0, logprobs=2
    )
    choice = full.choices[0]
    assert len(choice.logprobs.tokens) == full.usage.completion_tokens
    assert "".join(choice.logprobs.tokens) == choice.text  # single-token strings join up
    for chosen, lp, top in zip(
        choice.logprobs.tokens,
        choice.logprobs.token_logprobs,
        choice.logprobs.top_logprobs,
        strict=True,
    ):
        assert lp <= 0.0 and len(top) == 2
        assert max(top.values()) == pytest.approx(lp)  # greedy picks the most likely
        assert top[chosen] == pytest.approx(lp)
    stream = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == choice.text


def test_chat_logprobs_and_n(server):
    client = oa(server)
    prompt = fresh_prompt()
    solo = chat(client, server, prompt, max_tokens=6, temperature=0)
    res = chat(
        client, server, prompt, max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=3
    )
    assert [c.index for c in res.choices] == [0, 1]
    for c in res.choices:
        assert c.message.content == solo.choices[0].message.content
        entries = c.logprobs.content
        assert len(entries) == solo.usage.completion_tokens
        for entry in entries:
            tops = [t.logprob for t in entry.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True)
            assert entry.logprob == pytest.approx(tops[0]) and entry.logprob <= 0.0
            assert bytes(entry.bytes).decode(errors="replace") == entry.token
    assert res.usage.completion_tokens == 2 * solo.usage.completion_tokens
    assert res.usage.prompt_tokens == solo.usage.prompt_tokens
    # Streamed logprobs cover the same tokens, in order.
    streamed = [
        (entry.token, entry.logprob)
        for chunk in chat(
            client,
            server,
            prompt,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=1,
            stream=True,
        )
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    expected = [(e.token, e.logprob) for e in res.choices[0].logprobs.content]
    assert [t for t, _ in streamed] == [t for t, _ in expected]
    assert [lp for _, lp in streamed] == pytest.approx([lp for _, lp in expected], abs=1e-3)


def test_seeded_sampling_is_reproducible(server):
    client = oa(server)
    prompt = fresh_prompt()
    kw = dict(
        max_tokens=8,
        temperature=1.0,
        top_p=0.95,
        top_k=40,
        min_p=0.01,
        presence_penalty=0.5,
        frequency_penalty=0.3,
    )
    extra = {"top_k": kw.pop("top_k"), "min_p": kw.pop("min_p"), "repetition_penalty": 1.1}
    a = chat(client, server, prompt, seed=1234, extra_body=extra, **kw)
    b = chat(client, server, prompt, seed=1234, extra_body=extra, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens >= 1


def test_stop_sequence(server):
    client = oa(server)
    prompt = fresh_prompt()
    base = chat(client, server, prompt, max_tokens=12, temperature=0).choices[0].message.content
    stop = next((base[i : i + 2] for i in range(2, len(base) - 1) if base[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"greedy output {base!r} has no usable stop string")
    cut = base[: base.index(stop)]
    res = chat(client, server, prompt, max_tokens=12, temperature=0, stop=[stop])
    assert res.choices[0].message.content == cut
    assert res.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat(client, server, prompt, max_tokens=12, temperature=0, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == cut
    msg = an(server).messages.create(
        model=server.model,
        max_tokens=12,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": prompt}],
        stop_sequences=[stop],
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == cut


def test_messages_stream_equals_non_stream(server):
    client = an(server)
    prompt = fresh_prompt()
    kw = dict(
        model=server.model,
        max_tokens=8,
        extra_body=GREEDY,
        system="You are a careful assistant.",
        messages=[{"role": "user", "content": prompt}],
    )
    msg = client.messages.create(**kw)
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.output_tokens >= 1 and msg.usage.input_tokens > 5
    with client.messages.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == msg.content[0].text
    assert final.stop_reason == msg.stop_reason
    assert final.usage.output_tokens == msg.usage.output_tokens
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events
    # The system prompt reaches the model: a longer one makes a longer prompt.
    longer = client.messages.create(
        model=server.model,
        max_tokens=1,
        extra_body=GREEDY,
        system="You are a careful assistant. Answer in one short "
        "sentence, and check every fact twice.",
        messages=[{"role": "user", "content": prompt}],
    )
    assert longer.usage.input_tokens > msg.usage.input_tokens


def test_32_concurrent_streams_match_solo(server):
    # 8 distinct prompts, each sent by 4 of the 32 clients: every stream is compared with the
    # greedy output of its prompt run alone (8 solo runs keep the test fast on a CPU).
    distinct = [f"{q} ({_words(random.Random(), 2)})" for q in QUESTIONS]
    client = oa(server)
    solo_of = {
        p: chat(client, server, p, max_tokens=5, temperature=0).choices[0].message.content
        for p in distinct
    }
    assert len(set(solo_of.values())) > 1  # the prompts lead to different answers
    prompts = [distinct[i % 8] for i in range(32)]
    solo = [solo_of[p] for p in prompts]

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await aclient.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=5,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=300
        )
        async with aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    before = metrics(server)
    results = asyncio.run(main())
    assert results == solo
    after = metrics(server)
    assert (
        after["portaserve_requests_total{length}"]
        + after["portaserve_requests_total{stop}"]
        - before["portaserve_requests_total{length}"]
        - before["portaserve_requests_total{stop}"]
        == 32
    )


def _poll(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_disconnect_mid_stream_aborts(server):
    before = metrics(server)
    body = {
        "model": server.model,
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": fresh_prompt()}],
    }
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = list(itertools.islice((ln for ln in lines if ln.startswith("data:")), 3))
            assert len(got) == 3
            during = metrics(server)
            assert during["portaserve_num_requests_running"] == 1
            assert during["portaserve_kv_cache_usage_perc"] > 0.0
        # leaving the block closes the connection mid-stream
    aborted = "portaserve_requests_total{abort}"
    after = _poll(lambda: (m := metrics(server))[aborted] > before[aborted] and m)
    assert after, "the disconnected request was not aborted"
    assert after[aborted] == before[aborted] + 1
    assert after["portaserve_num_requests_running"] == 0
    assert after["portaserve_kv_cache_usage_perc"] < during["portaserve_kv_cache_usage_perc"]
    assert after["portaserve_kv_cache_usage_perc"] == 0.0
    # The server is fine afterwards.
    assert (
        chat(
            oa(server), server, fresh_prompt(), max_tokens=2, temperature=0
        ).usage.completion_tokens
        >= 1
    )


def test_disconnect_non_streaming_aborts(server):
    before = metrics(server)
    body = {
        "model": server.model,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": fresh_prompt()}],
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json=body,
            headers=server.headers,
            timeout=httpx.Timeout(60, read=0.5),
        )
    aborted = "portaserve_requests_total{abort}"
    after = _poll(lambda: (m := metrics(server))[aborted] > before[aborted] and m)
    assert after and after[aborted] == before[aborted] + 1
    assert after["portaserve_num_requests_running"] == 0


def test_metrics_count_tokens_and_latency(server):
    before = metrics(server)
    res = chat(
        oa(server),
        server,
        fresh_prompt(),
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = metrics(server)
    assert res.usage.completion_tokens == 5
    assert (
        after["portaserve_generation_tokens_total"] - before["portaserve_generation_tokens_total"]
        == res.usage.completion_tokens
    )
    assert (
        after["portaserve_prompt_tokens_total"] - before["portaserve_prompt_tokens_total"]
        == res.usage.prompt_tokens
    )
    for name in (
        "portaserve_time_to_first_token_seconds_count",
        "portaserve_time_per_output_token_seconds_count",
        "portaserve_e2e_request_latency_seconds_count",
    ):
        assert after[name] == before[name] + 1
    assert (
        after["portaserve_e2e_request_latency_seconds_sum"]
        > before["portaserve_e2e_request_latency_seconds_sum"]
    )
    assert 0.0 <= after["portaserve_prefix_cache_hit_rate"] <= 1.0
    if server.kind == "real":  # the same long prompt again is served from the prefix cache
        prompt = fresh_prompt() + " " + _words(random.Random(), 40)
        chat(oa(server), server, prompt, max_tokens=1)
        hits = metrics(server)["portaserve_prefix_cache_hits"]
        again = chat(oa(server), server, prompt, max_tokens=1)
        assert again.usage.prompt_tokens_details.cached_tokens >= 16
        m = metrics(server)
        assert m["portaserve_prefix_cache_hits"] >= hits + 16
        assert m["portaserve_prefix_cache_queries"] >= m["portaserve_prefix_cache_hits"]
        assert m["portaserve_prefix_cache_hit_rate"] > 0.0


def test_completions_prompt_list_and_token_ids(server):
    client = oa(server)
    prompts = [fresh_prompt(" A"), fresh_prompt(" B")]
    solo = [
        client.completions.create(model=server.model, prompt=p, max_tokens=3, temperature=0)
        for p in prompts
    ]
    both = client.completions.create(
        model=server.model, prompt=prompts, max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [solo[0].choices[0].text] * 2 + [
        solo[1].choices[0].text
    ] * 2
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in solo)
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(
        model=server.model, prompt=prompts, max_tokens=3, temperature=0, n=2, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in both.choices]
    # Token ids as the prompt (from /tokenize) give what their text gives.
    tok = httpx.post(
        f"{server.base_url}/tokenize",
        headers=server.headers,
        json={"model": server.model, "prompt": prompts[0]},
    ).json()
    assert tok["count"] == len(tok["tokens"]) == solo[0].usage.prompt_tokens
    by_ids = client.completions.create(
        model=server.model, prompt=tok["tokens"], max_tokens=3, temperature=0
    )
    assert by_ids.choices[0].text == solo[0].choices[0].text
    back = httpx.post(
        f"{server.base_url}/detokenize", headers=server.headers, json={"tokens": tok["tokens"]}
    ).json()
    assert back["prompt"].strip() == prompts[0]
    # Chat messages tokenize as the chat route sends them.
    chat_tok = httpx.post(
        f"{server.base_url}/tokenize",
        headers=server.headers,
        json={"messages": [{"role": "user", "content": prompts[0]}]},
    ).json()
    reply = chat(client, server, prompts[0], max_tokens=1)
    assert chat_tok["count"] == reply.usage.prompt_tokens
