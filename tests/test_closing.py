"""Budget-aware JSON endings and the string-loop guard (relay_llm.closing): unit tests of the JSON scanner,
and a tiny random model, whose free strings never end by themselves, under small budgets."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from relay_llm.closing import Candidates, JsonDepth

NESTED = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "tags": {
        "type": "array", "items": {"type": "string"}}}, "required": ["city", "tags"]}},
    "required": ["name", "age", "address"]}
TAGS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["tags"]}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["query", "limit"]}}},
         {"type": "function", "function": {"name": "note", "parameters": {
             "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]


def test_json_depth_tracks_strings_escapes_and_containers():
    d = JsonDepth()
    d.feed('<tool_call>\n{"name": "x", "arguments": {"q": "a \\" } [')
    assert d.in_string and d.stack == ["{", "{"] and d.open == 3 and d.string == 'a \\" } ['
    d.feed('"}')
    assert not d.in_string and d.open == 1
    assert JsonDepth().open == 0


@pytest.mark.parametrize(("text", "loops"), [
    ("0000000000000", True), ("7000-7000-7000-", True), ("hahahahahaha", True), ("abcabcab", False),
    ("Alice Smith, 12 Rue de la Paix", False), ("1000000", False)])
def test_a_looping_string_is_recognised(text, loops):
    d = JsonDepth()
    d.feed('{"s": "' + text)
    assert d.looping() is loops


def test_candidates_know_how_much_each_token_closes():
    cands = Candidates(["a", '"', '"}', "}", "]", ' "', "{", "12", "true", "hello", '""'])
    by_text = dict(zip(cands.texts, zip(cands.change[0].tolist(), cands.change[1].tolist(), strict=True),
                       strict=True))
    assert "a" not in by_text and "hello" not in by_text
    assert by_text['"'] == (1, -1) and by_text['"}'] == (1, -2) and by_text["}"] == (-1, 0)
    assert by_text['""'] == (0, 0) and by_text["12"] == (0, 0) and by_text["{"] == (1, 0)


@pytest.fixture
def tiny(tiny_engines):
    return tiny_engines["llama"]


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.parametrize(("schema", "budget"), [(NESTED, 90), (TAGS, 40)], ids=["nested", "array"])
def test_budget_ending_turns_runaway_strings_into_valid_json(tiny, schema, budget):
    """A random model rarely closes a free string: without the ending most replies are cut invalid, with it
    every reply is valid JSON within the budget, and the budget is used (the text is cut, not skipped)."""
    msgs = [{"role": "user", "content": "Describe the reviewer as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    seeds = range(6)
    off = [tiny.chat(msgs, response_format=fmt, max_new_tokens=budget, temperature=1.0, seed=s,
                     budget_ending=False, string_guard=False) for s in seeds]
    assert sum(_valid(r.text, schema) for r in off) <= len(seeds) // 2
    on = [tiny.chat(msgs, response_format=fmt, max_new_tokens=budget, temperature=1.0, seed=s, string_guard=False)
          for s in seeds]
    assert all(_valid(r.text, schema) for r in on), [r.text for r in on]
    ran_on = [b for a, b in zip(off, on, strict=True) if not _valid(a.text, schema)]
    assert all(r.stats.completion_tokens >= 0.75 * budget for r in ran_on)  # closed near the end, not at once
    # Far from the budget nothing changes: the same seed gives the same first tokens.
    assert all(a.token_ids[:10] == b.token_ids[:10] for a, b in zip(off, on, strict=True))


def test_a_required_tool_call_always_comes_back(tiny):
    """Cut by the budget: the call is returned (finish "length", partial arguments); with the budget-aware
    ending and a budget that fits the shortest call, the call is complete and valid."""
    msgs = [{"role": "user", "content": "Look it up."}]
    for seed in range(4):
        cut = tiny.chat(msgs, tools=TOOLS, tool_choice="required", max_new_tokens=30, temperature=1.0, seed=seed,
                        budget_ending=False, string_guard=False)
        assert cut.tool_calls, cut.text
        assert cut.finish_reason == "length" and cut.tool_calls[0]["function"]["name"] in ("lookup", "note")
        whole = tiny.chat(msgs, tools=TOOLS, tool_choice="required", max_new_tokens=100, temperature=1.0,
                          seed=seed, string_guard=False)  # the tiny tokenizer's call block alone is ~60 tokens
        assert whole.finish_reason == "tool_calls" and len(whole.tool_calls) == 1
        fn = whole.tool_calls[0]["function"]
        params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[fn["name"]]
        assert _valid(fn["arguments"], params), fn


def test_the_string_guard_closes_a_looping_string(tiny, monkeypatch):
    """A string found looping is closed at once and the reply goes on; without the guard it runs on. (A
    random model's strings do not loop in a pattern, so "looping" is patched to: longer than 6 characters.)"""
    from relay_llm import closing

    monkeypatch.setattr(closing.JsonDepth, "looping", lambda self, *a, **k: len(self.string) >= 6)
    msgs = [{"role": "user", "content": "Tags."}]
    fmt = {"type": "json_schema", "schema": TAGS}
    strings = re.compile(r'"((?:[^"\\]|\\.)*)"')
    kw = dict(response_format=fmt, max_new_tokens=60, temperature=1.0, seed=5, budget_ending=False)
    guarded = tiny.chat(msgs, **kw)
    values = strings.findall(guarded.text)[1:]  # after the key "tags"
    assert guarded.finish_reason == "stop" and _valid(guarded.text, TAGS)
    assert values and all(len(v) <= 12 for v in values)
    free = tiny.chat(msgs, string_guard=False, **kw)
    assert free.finish_reason == "length" and not _valid(free.text, TAGS)  # its first string ran on
