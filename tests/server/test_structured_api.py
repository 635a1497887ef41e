"""tools / tool_choice / response_format through the server (tiny random model: valid by construction)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from .conftest import MODEL
from .test_errors import CHAT, OK_BODY, assert_error

FULL = {"relay": {"schedule": "full"}}
CHOICE = {"type": "object", "properties": {"pick": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
          "required": ["pick", "ok"]}
VOTE = {"type": "function", "function": {"name": "vote", "description": "Cast a vote", "parameters": CHOICE}}
LEVEL = {"type": "function", "function": {"name": "level", "parameters": {
    "type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]}}}
ASK = [{"role": "user", "content": "Vote now."}]


def test_named_tool_choice_returns_openai_tool_calls(client):
    res = client.chat.completions.create(model=MODEL, messages=ASK, tools=[VOTE, LEVEL], max_tokens=120,
                                         tool_choice={"type": "function", "function": {"name": "vote"}},
                                         temperature=0, extra_body=FULL)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "vote"
    jsonschema.validate(json.loads(call.function.arguments), CHOICE)


def test_required_tool_choice_calls_one_of_the_tools(client):
    res = client.chat.completions.create(model=MODEL, messages=ASK, tools=[VOTE, LEVEL], tool_choice="required",
                                         max_tokens=120, temperature=0.9, seed=4)
    calls = res.choices[0].message.tool_calls
    assert res.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name in ("vote", "level")


def test_a_call_cut_by_max_tokens_comes_back_with_finish_length(client):
    """As OpenAI does: finish_reason "length" and the call with the arguments written so far, never an
    empty reply (the tiny model's call block alone is longer than 20 tokens)."""
    res = client.chat.completions.create(model=MODEL, messages=ASK, tools=[VOTE], tool_choice="required",
                                         max_tokens=20, temperature=0, extra_body=FULL)
    choice = res.choices[0]
    assert choice.finish_reason == "length"
    (call,) = choice.message.tool_calls
    assert call.function.name == "vote" and call.id.startswith("call_")
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)


def test_streamed_tool_call_deltas_join_to_the_whole_response(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=[VOTE], tool_choice="required", max_tokens=120, temperature=0,
                  extra_body=FULL)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(deltas) > 2 and all(d.index == 0 for d in deltas)
    assert deltas[0].id == whole.id and deltas[0].type == "function" and deltas[0].function.name == "vote"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == whole.function.arguments
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "choice", "schema": CHOICE, "strict": True}},
    {"type": "json_object"},
])
def test_response_format_constrains_the_content(client, fmt):
    res = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=60,
                                         temperature=0, extra_body=FULL)
    text = res.choices[0].message.content
    assert text.startswith("{")
    if fmt["type"] == "json_schema":
        assert res.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), CHOICE)


def test_tool_history_and_tools_render_through_the_engine(client, server_engine):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "vote", "arguments": '{"pick": "yes"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "counted"},
    ]
    res = client.chat.completions.create(model=MODEL, messages=messages, tools=[VOTE], max_tokens=2, temperature=0)
    assert res.usage.prompt_tokens == len(server_engine.render(messages, [VOTE], None))
    none = client.chat.completions.create(model=MODEL, messages=messages, tools=[VOTE], tool_choice="none",
                                          max_tokens=2, temperature=0)
    assert none.usage.prompt_tokens == len(server_engine.render(messages))
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "Unsupported type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}},
     "response_format", "'not'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"tools": [VOTE], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "(?<=a)b"}}}}}], "tool_choice": "required"},
     "tools", "Lookbehind"),
])
def test_bad_structured_requests_are_400(http, extra, param, words):
    error = assert_error(http.post(CHAT, json={**OK_BODY, **extra}), 400, code="invalid_value", param=param)
    assert words in error["message"]


def test_openai_client_sees_bad_request_for_an_unknown_tool_choice(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[VOTE], max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "missing"}})
    assert err.value.body["param"] == "tool_choice" and "missing" in err.value.body["message"]
