"""Sampling penalties over real HTTP (official `openai` client, tiny model): applied, and validated."""

from __future__ import annotations

import openai
import pytest

from .conftest import MODEL

FULL = {"schedule": "full"}  # full prefill: outputs comparable with a direct engine call
MESSAGES = [{"role": "user", "content": "The architect writes a specification for the developer."}]


def _chat(client, body: dict | None = None, **kwargs) -> str:
    """The greedy reply to MESSAGES (16 tokens, full prefill); `body`: extra body fields."""
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                         extra_body={"relay": FULL, **(body or {})}, **kwargs)
    return res.choices[0].message.content


def test_penalties_are_applied(client, server_engine):
    penalised = _chat(client, frequency_penalty=2.0)
    assert penalised != _chat(client)
    assert penalised == server_engine.chat(MESSAGES, max_new_tokens=16, schedule="full", frequency_penalty=2.0).text
    repeated = _chat(client, {"repetition_penalty": 1.5}, presence_penalty=1.0)
    assert repeated == server_engine.chat(MESSAGES, max_new_tokens=16, schedule="full", presence_penalty=1.0,
                                          repetition_penalty=1.5).text
    text = client.completions.create(model=MODEL, prompt="The architect writes", max_tokens=8, temperature=0,
                                     extra_body={"relay": FULL, "repetition_penalty": 1.5}).choices[0].text
    assert text == server_engine.complete("The architect writes", max_new_tokens=8, schedule="full",
                                          repetition_penalty=1.5).text


@pytest.mark.parametrize("field, value", [("repetition_penalty", 0), ("repetition_penalty", -1),
                                          ("frequency_penalty", 2.5), ("presence_penalty", -3)])
def test_bad_penalties_are_400s(client, field, value):
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={field: value})
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={field: value})
    for exc in (chat.value, completion.value):
        assert exc.status_code == 400 and exc.body["param"] == field and exc.body["type"] == "invalid_request_error"
