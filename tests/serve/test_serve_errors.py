"""Bad input, authentication and unknown routes: the right status and body, and the server
stays healthy. Runs on the fake and (once it exists) the real engine."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = "/v1/messages"


def _chat(**overrides):
    body = {"model": "MODEL", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
    body.update(overrides)
    return body


def _missing(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (name, path, body, status, param, code) -- "MODEL" is replaced by the served model name.
BAD_REQUESTS = [
    ("invalid json", CHAT, b'{"model": "MODEL", "messages": [', 400, None, None),
    ("not an object", CHAT, b"[1, 2]", 400, None, None),
    ("missing messages", CHAT, _missing(_chat(), "messages"), 400, "messages", None),
    ("empty messages", CHAT, _chat(messages=[]), 400, "messages", None),
    (
        "wrong role",
        CHAT,
        _chat(messages=[{"role": "robot", "content": "x"}]),
        400,
        "messages[0].role",
        None,
    ),
    (
        "content wrong type",
        CHAT,
        _chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        None,
    ),
    ("max_tokens string", CHAT, _chat(max_tokens="4"), 400, "max_tokens", None),
    ("max_tokens zero", CHAT, _chat(max_tokens=0), 400, "max_tokens", None),
    ("temperature too high", CHAT, _chat(temperature=2.5), 400, "temperature", None),
    ("top_p zero", CHAT, _chat(top_p=0.0), 400, "top_p", None),
    ("n zero", CHAT, _chat(n=0), 400, "n", None),
    ("presence_penalty", CHAT, _chat(presence_penalty=3.0), 400, "presence_penalty", None),
    ("top_logprobs 21", CHAT, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("stop wrong type", CHAT, _chat(stop=7), 400, "stop", None),
    ("logit_bias", CHAT, _chat(logit_bias={"1": 5.0}), 400, "logit_bias", None),
    (
        "tools",
        CHAT,
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tools",
        None,
    ),
    ("unknown model", CHAT, _chat(model="no-such-model"), 404, "model", "model_not_found"),
    (
        "prompt too long",
        CHAT,
        _chat(messages=[{"role": "user", "content": "hello " * 3000}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "max_tokens beyond context",
        CHAT,
        _chat(max_tokens=100_000),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("completion prompt missing", COMPLETIONS, {"model": "MODEL"}, 400, "prompt", None),
    ("completion prompt empty", COMPLETIONS, {"model": "MODEL", "prompt": ""}, 400, "prompt", None),
    (
        "completion logprobs 30",
        COMPLETIONS,
        {"model": "MODEL", "prompt": "a", "logprobs": 30},
        400,
        "logprobs",
        None,
    ),
    (
        "completion bad token id",
        COMPLETIONS,
        {"model": "MODEL", "prompt": [1, -5]},
        400,
        "prompt",
        None,
    ),
]


@pytest.mark.parametrize(
    "name,path,body,status,param,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_openai_request(server, name, path, body, status, param, code):
    if isinstance(body, dict):
        content = httpx.Request("POST", "/", json=body).content.replace(
            b'"MODEL"', f'"{server.model}"'.encode()
        )
    else:
        content = body.replace(b'"MODEL"', f'"{server.model}"'.encode())
    resp = httpx.post(
        server.base_url + path,
        content=content,
        headers={**server.headers, "content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["code"] == code
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    if param:
        assert param.split("[")[0] in error["message"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_bad_requests_through_clients_then_healthy(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    aclient = anthropic.Anthropic(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        aclient.messages.create(
            model=server.model,
            max_tokens=4,
            extra_body={"temperature": 1.5},
            messages=[{"role": "user", "content": "x"}],
        )
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        aclient.messages.create(
            model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.body["error"]["type"] == "not_found_error"
    # A good request still works after all that.
    res = client.chat.completions.create(
        model=server.model,
        max_tokens=2,
        temperature=0,
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert res.usage.completion_tokens >= 1


def test_anthropic_missing_max_tokens(server):
    resp = httpx.post(
        f"{server.base_url}{MESSAGES}",
        headers=server.headers,
        json={"model": server.model, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_unknown_route_and_method(server):
    resp = httpx.get(f"{server.base_url}/v1/nothing", headers=server.headers)
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    resp = httpx.get(f"{server.base_url}{CHAT}", headers=server.headers)
    assert resp.status_code == 405 and "error" in resp.json()


@pytest.mark.parametrize(
    "path,method",
    [
        ("/v1/models", "GET"),
        (CHAT, "POST"),
        (COMPLETIONS, "POST"),
        (MESSAGES, "POST"),
        ("/metrics", "GET"),
        ("/version", "GET"),
    ],
)
def test_api_key_required(server, path, method):
    url = server.base_url + path
    body = _chat(model=server.model) if method == "POST" else None
    if path == COMPLETIONS:
        body = {"model": server.model, "prompt": "Hi", "max_tokens": 2}
    no_key = httpx.request(method, url, json=body, timeout=60)
    assert no_key.status_code == 401
    wrong = httpx.request(
        method, url, json=body, timeout=60, headers={"Authorization": "Bearer wrong-key"}
    )
    assert wrong.status_code == 401
    if path == MESSAGES:
        assert no_key.json()["error"]["type"] == "authentication_error"
        assert no_key.json()["type"] == "error"
    else:
        assert no_key.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.request(method, url, json=body, headers=server.headers, timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # never needs the key


def test_api_key_clients(server):
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # The anthropic client sends x-api-key.
    good = anthropic.Anthropic(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    msg = good.messages.create(
        model=server.model, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
    )
    assert msg.usage.output_tokens >= 1
    bad_an = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad_an.messages.create(
            model=server.model, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
