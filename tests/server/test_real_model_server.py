"""The server on the real default model: a second agent quoting the first one's output gets cached tokens."""

from __future__ import annotations

import pytest
from openai import OpenAI
from relay_server import create_app

from .conftest import ServerThread

pytestmark = pytest.mark.real_model


def test_quoted_output_is_reported_as_cached_tokens(default_engine):
    default_engine.store.clear()
    default_engine.prefix_cache.clear()
    with ServerThread(create_app(default_engine)) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list()] == ["gemma-3-270m"]
        architect = client.chat.completions.create(
            model="default", temperature=0, max_tokens=32,
            messages=[{"role": "system", "content": "You are a software architect."},
                      {"role": "user", "content": "Write a short specification for a function that adds two numbers."}])
        spec = architect.choices[0].message.content
        assert architect.usage.completion_tokens >= 20, spec
        reviewer = client.chat.completions.create(
            model="gemma-3-270m", temperature=0, max_tokens=4,
            messages=[{"role": "system", "content": "You are a code reviewer."},
                      {"role": "user", "content": f"Here is the specification:\n\n{spec}\n\nList its problems."}])
    relay = reviewer.model_extra["relay"]
    cached = reviewer.usage.prompt_tokens_details.cached_tokens
    assert relay["spans"] >= 1 and relay["span_tokens"] >= 16
    # under the default relay schedule a few span tokens (the selected ones) are recomputed at every
    # layer and so do not count as reused; all the others do
    assert cached == relay["reused_tokens"] > relay["prefix_hit_tokens"]  # the quoted output is in there
    assert 0 < relay["reuse_rate"] < 1
