"""OpenAI `logprobs` over real HTTP with the official client: chat and completions shapes, values, streaming, 400s."""

from __future__ import annotations

import openai
import pytest

from .conftest import MODEL
from .test_api import FULL, msgs

PROMPT = "The architect writes"


def _chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=msgs(PROMPT), max_tokens=8, temperature=0,
                                          extra_body=FULL, **kwargs)


def test_chat_logprobs_match_the_engine(client, server_engine):
    res = _chat(client, logprobs=True, top_logprobs=3)
    direct = server_engine.chat(msgs(PROMPT), max_new_tokens=8, schedule="full", logprobs=3)
    content = res.choices[0].logprobs.content
    assert len(content) == len(direct.token_ids) == res.usage.completion_tokens
    assert "".join(t.token for t in content) == res.choices[0].message.content
    for item, entry in zip(content, direct.logprobs, strict=True):
        assert item.token == entry["token"] and bytes(item.bytes).decode("utf-8") == item.token
        assert item.logprob == pytest.approx(entry["logprob"], abs=1e-4)
        assert [t.token for t in item.top_logprobs] == [t for _, t, _ in entry["top"]]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v for _, _, v in entry["top"]], abs=1e-4)
        assert all(bytes(t.bytes).decode("utf-8") == t.token for t in item.top_logprobs)
    assert _chat(client).choices[0].logprobs is None


def test_chat_stream_carries_the_same_logprobs(client):
    whole = _chat(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    chunks = list(_chat(client, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-4)
    assert [[t.token for t in s.top_logprobs] for s in streamed] == [[t.token for t in w.top_logprobs] for w in whole]
    with_logprobs = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].logprobs]
    assert len(with_logprobs) == 1 and chunks[with_logprobs[0] + 1].choices[0].finish_reason == "length"


def test_completion_logprobs_shape(client, server_engine):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                    extra_body=FULL)
    direct = server_engine.complete(PROMPT, max_new_tokens=6, schedule="full", logprobs=2)
    lp = res.choices[0].logprobs
    assert lp.tokens == [e["token"] for e in direct.logprobs] and "".join(lp.tokens) == res.choices[0].text
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in direct.logprobs], abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, extra_body=FULL, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert len(streamed) == 1 and streamed[0].tokens == lp.tokens


@pytest.mark.parametrize("kwargs", [{"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 2},
                                    {"logprobs": True, "top_logprobs": 21}])
def test_bad_logprobs_requests_are_400s(client, kwargs):
    with pytest.raises(openai.BadRequestError):
        _chat(client, **kwargs)
