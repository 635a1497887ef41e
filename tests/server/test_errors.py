"""Every error path gives an OpenAI-shaped body with a matching status (httpx and the `openai` client)."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
from relay_server import create_app

from .conftest import MAX_BODY, MODEL, ServerThread

CHAT = "/v1/chat/completions"
OK_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 2}


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({**OK_BODY, "messages": []}, "messages"),
    ({**OK_BODY, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({**OK_BODY, "messages": [{"content": "no role"}]}, "messages.0.role"),
    ({**OK_BODY, "max_tokens": 0}, "max_tokens"),
    ({**OK_BODY, "temperature": 5}, "temperature"),
    ({**OK_BODY, "stop": 42}, None),
    ({**OK_BODY, "messages": "not a list"}, "messages"),
])
def test_validation_errors_are_400(http, body, param):
    error = assert_error(http.post(CHAT, json=body), 400, code="invalid_request")
    if param:
        assert error["param"] == param


def test_malformed_json_is_400(http):
    headers = {"content-type": "application/json"}
    assert_error(http.post(CHAT, content=b'{"model": "tiny", "messages": [', headers=headers), 400)
    assert_error(http.post(CHAT, content=b"[1, 2]", headers=headers), 400)


def test_unknown_role_raises_bad_request_in_the_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.status_code == 400 and err.value.body["param"] == "messages.0.role"


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.code == "model_not_found"
    assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404, "model_not_found")
    assert_error(http.get("/v1/models/gpt-9"), 404, "model_not_found")


def test_prompt_over_the_context_is_400(client, server_engine):
    long_text = "The architect writes a specification. " * 400  # > 2048 tokens for the tiny model
    assert len(server_engine.encode(long_text)) > server_engine.max_context
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Short prompt.", max_tokens=server_engine.max_context)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # refused before the stream starts
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}], stream=True)


def test_oversized_bodies_are_413(client, http):
    big = {**OK_BODY, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    assert_error(http.post(CHAT, json=big), 413, "request_too_large")
    chunked = json.dumps(big).encode()
    pieces = (chunked[i:i + 4096] for i in range(0, len(chunked), 4096))  # no Content-Length: chunked
    assert_error(http.post(CHAT, content=pieces, headers={"content-type": "application/json"}), 413)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL, messages=big["messages"])
    assert err.value.status_code == 413


def test_unknown_routes_and_methods(http):
    assert_error(http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(http.get(CHAT), 405, "method_not_allowed")


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    ({"relay": {"schedule": "no-such-schedule"}}, "relay"),
])
def test_unsupported_or_invalid_options_are_400(http, extra, param):
    error = assert_error(http.post(CHAT, json={**OK_BODY, **extra}), 400)
    assert error["param"] == param


def test_completions_refuses_batches_and_echo(http):
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]}), 400, "unsupported_feature")
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "echo": True}), 400)
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": ""}), 400)
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400)


@pytest.fixture(scope="module")
def secured(server_engine):
    with ServerThread(create_app(server_engine, model_id=MODEL, api_key="s3cret")) as srv:
        yield srv


def test_api_key(secured):
    with httpx.Client(base_url=secured.url, timeout=60) as http:
        assert_error(http.get("/v1/models"), 401, "invalid_api_key")
        assert_error(http.post(CHAT, json=OK_BODY, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
        assert http.get("/health").status_code == 200  # liveness probes need no key
        assert http.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{secured.url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{secured.url}/v1", api_key="s3cret", max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=OK_BODY["messages"], max_tokens=2).choices


VALUES = [None, True, -1, 0, 2, 2**70, 0.5, 1e308, "", "x" * 50, [], [None], {}, {"a": 1}, [{"role": "user"}],
          [{"role": "user", "content": 7}], ["hi"], [[1, 2]], [3, 4], "\u0000\ud7ff"]
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
          "stream", "stream_options", "tools", "tool_choice", "response_format", "relay", "logprobs", "echo",
          "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty"]


def fuzzed_request(rng: random.Random) -> tuple[str, dict]:
    """A valid request with one to three fields (including its messages or prompt) set to random values."""
    path, prompt_field = rng.choice([(CHAT, "messages"), ("/v1/completions", "prompt")])
    body = {"model": MODEL, "max_tokens": 1, prompt_field: OK_BODY["messages"] if path == CHAT else "Hello there."}
    for field in rng.sample([*FIELDS, prompt_field], rng.randint(1, 3)):
        body[field] = rng.choice(VALUES)
    for key in ("max_tokens", "max_completion_tokens"):  # keep generations short (the context test covers more)
        if isinstance(body.get(key), (int, float)) and body[key] > 2:
            body[key] = 2
    return path, body


def test_fuzzed_bodies_never_give_5xx(http):
    """A small, bounded property check: random values in any field give a 2xx or a well-formed 4xx."""
    rng = random.Random(8)
    for _ in range(60):
        path, body = fuzzed_request(rng)
        r = http.post(path, json=body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert_error(r, r.status_code)
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["choices"]
