"""Structured generation: JSON Schema output and tool calls by grammar-constrained decoding (relay_llm.structured).

Pure unit tests (plans, parsing, rendering), a tiny random model (the grammar cache, bad input, validity by
construction), and the default model (schemas, tool_choice behaviour, streaming, a tool round trip).
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from relay_llm import structured
from relay_llm.engine import EngineConfig, RelayEngine
from relay_llm.structured import ToolCallParser, plan_request, template_messages, tool_call_text

from .tiny import make_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def assert_valid_calls(calls: list[dict], allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in allowed
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


# ---- pure units -------------------------------------------------------------------------------------


def test_plan_modes_and_choice_spellings():
    assert plan_request().mode == "none" and plan_request().grammar_spec() is None
    assert plan_request(tools=TOOLS).mode == "auto"
    assert plan_request(tools=TOOLS, tool_choice="none").grammar_spec() is None
    for choice in ("required", "any"):
        assert plan_request(tools=TOOLS, tool_choice=choice).allowed == ("get_weather", "get_time")
    for choice in ("get_time", {"type": "function", "function": {"name": "get_time"}},
                   {"type": "function", "name": "get_time"}):
        plan = plan_request(tools=TOOLS, tool_choice=choice)
        assert plan.mode == "named" and plan.allowed == ("get_time",)
    assert plan_request(tools=[{"type": "function", "function": {"name": "ping"}}], tool_choice="required").tools[0][
        "function"]["parameters"] == {"type": "object"}
    assert plan_request({"type": "json_object"}).grammar_spec() == {"json_schema": {"type": "object"}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                {"type": "json_schema", "schema": schema}):
        assert plan_request(fmt).grammar_spec() == {"json_schema": schema}
    assert plan_request({"type": "text"}).grammar_spec() is None


@pytest.mark.parametrize("kwargs, words", [
    (dict(tools=TOOLS, tool_choice="get_date"), ["unknown tool", "get_date"]),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), ["unknown tool", "nope"]),
    (dict(tools=TOOLS, tool_choice=42), ["tool_choice"]),
    (dict(tools=[{"type": "function"}]), ["tools[0]"]),
    (dict(tools=[{"function": {"name": "has space"}}]), ["tools[0].function.name"]),
    (dict(tools=[WEATHER, WEATHER]), ["duplicate", "get_weather"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     ["parameters", "object"]),
    (dict(tools="not a list"), ["tools must be a list"]),
    (dict(tools=[], tool_choice="required"), ["needs at least one tool"]),
    (dict(response_format={"type": "yaml"}), ["response_format", "yaml"]),
    (dict(response_format={"type": "json_schema"}), ["schema"]),
    (dict(response_format={"type": "json_schema", "schema": {"type": "string", "not": {"const": "a"}}}), ["'not'"]),
    (dict(response_format={"type": "json_schema", "schema": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}), ["'uniqueItems'", "/xs"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "allOf": [{"required": ["a"]}]}}}]), ["tools[0]", "'allOf'"]),
    (dict(parallel_tool_calls="yes"), ["parallel_tool_calls"]),
])
def test_bad_structured_input_is_a_value_error(kwargs, words):
    with pytest.raises(ValueError) as err:
        plan_request(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_parser_streams_content_and_call_deltas_that_join_to_the_calls():
    text = ("  Let me look.\n" + tool_call_text("get_weather", {"city": "Paris", "unit": "celsius"}) + "\n"
            + tool_call_text("get_time", {"timezone": "CET"}) + "\nDone.")
    for step in (1, 2, 5, len(text)):
        parser, content, deltas = ToolCallParser(seed="s"), "", []
        for end in range(step, len(text) + step, step):
            c, d = parser.feed(text[:end])
            content, deltas = content + c, deltas + d
        c, d = parser.finish(text)
        content, deltas = content + c, deltas + d
        assert content == "Let me look.\nDone."
        assert [c["function"] for c in parser.calls] == [
            {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            {"name": "get_time", "arguments": '{"timezone": "CET"}'}]
        for i, call in enumerate(parser.calls):
            mine = [d for d in deltas if d["index"] == i]
            assert mine[0]["id"] == call["id"] and mine[0]["name"] == call["function"]["name"]
            assert all(d["id"] is None and d["name"] is None for d in mine[1:])
            assert "".join(d["arguments"] for d in mine) == call["function"]["arguments"]
    assert ToolCallParser(seed="s").calls == [] and parser.calls[0]["id"] != parser.calls[1]["id"]


def test_parser_keeps_a_call_cut_off_by_the_budget_and_a_partial_tag_as_text():
    """As OpenAI does on finish "length": the cut call comes back with the arguments written so far."""
    parser = ToolCallParser()
    assert parser.finish('<tool_call>\n{"name": "get_time", "arguments": {"timez') == ("", [
        {"index": 0, "id": structured.call_id("", 0, "get_time"), "name": "get_time", "arguments": '{"timez'}])
    assert parser.calls == [{"id": structured.call_id("", 0, "get_time"), "type": "function",
                             "function": {"name": "get_time", "arguments": '{"timez'}}]
    assert ToolCallParser().finish("a <tool_c")[0] == "a <tool_c"
    # Arguments complete, the closing tag cut: the arguments' last brace is theirs, not the tag's.
    done = ToolCallParser()
    _, deltas = done.finish('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}')
    assert done.calls[0]["function"]["arguments"] == '{"timezone": "UTC"}'
    assert "".join(d["arguments"] for d in deltas) == '{"timezone": "UTC"}'
    # Cut inside the name: kept when the prefix names one known tool, dropped when it is ambiguous.
    names = ("get_time", "get_weather")
    cut = ToolCallParser(names=names)
    cut.finish('<tool_call>\n{"name": "get_ti')
    assert cut.calls[0]["function"] == {"name": "get_time", "arguments": ""}
    ambiguous = ToolCallParser(names=names)
    ambiguous.finish('<tool_call>\n{"name": "get_')
    assert ambiguous.calls == []


def test_history_with_tool_calls_and_results_renders_as_text():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out = template_messages(messages, plan_request(tools=TOOLS, tool_choice="auto"))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert json.dumps(WEATHER) in out[0]["content"] and "get_time" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": ' \
                                '"celsius"}}\n</tool_call>'
    assert "tool_calls" not in out[2] and out[3]["content"] == "sunny, 21 C"
    assert template_messages(messages[1:], plan_request(tools=TOOLS, tool_choice="none"))[0]["role"] == "user"
    with pytest.raises(ValueError, match="only assistant"):
        template_messages([{"role": "user", "content": "", "tool_calls": [{"function": {"name": "x"}}]}])


# ---- tiny random model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    engine = RelayEngine.load(str(make_model("llama", tmp_path_factory.mktemp("structured") / "llama")),
                              config=EngineConfig(min_match_tokens=8))
    yield engine
    engine.close()


CHOICE = {"type": "object", "properties": {"pick": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
          "required": ["pick", "ok"]}


def test_grammar_is_compiled_once_per_schema(tiny_llama):
    cache = structured.grammar_cache(tiny_llama)
    assert structured.grammar_cache(tiny_llama) is cache
    msgs = [{"role": "user", "content": "Choose."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "choice", "schema": CHOICE}}
    before, hits = cache.compiles, cache.hits
    first = tiny_llama.chat(msgs, response_format=fmt, max_new_tokens=40, temperature=1.0, seed=0)
    assert cache.compiles == before + 1
    second = tiny_llama.chat(msgs, response_format={"type": "json_schema", "schema": CHOICE}, max_new_tokens=40,
                             temperature=1.0, seed=1)
    assert cache.compiles == before + 1 and cache.hits == hits + 1  # same schema, other spelling: a cache hit
    tiny_llama.chat(msgs, tools=TOOLS, tool_choice="get_time", max_new_tokens=4)
    tiny_llama.chat(msgs, tools=TOOLS, tool_choice="get_time", max_new_tokens=4)
    assert cache.compiles == before + 2 and cache.hits == hits + 2
    for result in (first, second):  # a random model, but valid by construction
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), CHOICE)


def test_named_tool_on_a_random_model_is_a_valid_call(tiny_llama):
    tool = {"type": "function", "function": {"name": "vote", "parameters": CHOICE}}
    res = tiny_llama.chat([{"role": "user", "content": "Vote."}], tools=[tool], tool_choice="vote",
                          max_new_tokens=120, temperature=1.0, seed=2)
    assert res.finish_reason == "tool_calls" and res.text == "" and len(res.tool_calls) == 1
    assert res.tool_calls[0]["function"]["name"] == "vote"
    jsonschema.validate(json.loads(res.tool_calls[0]["function"]["arguments"]), CHOICE)
    streamed = list(tiny_llama.stream([{"role": "user", "content": "Vote."}], tools=[tool], tool_choice="vote",
                                      max_new_tokens=120, temperature=1.0, seed=2))
    assert streamed[-1].tool_calls == res.tool_calls and streamed[-1].finish_reason == "tool_calls"
    deltas = [d for c in streamed for d in c.tool_call_deltas or []]
    assert "".join(d["arguments"] for d in deltas) == res.tool_calls[0]["function"]["arguments"]


def test_auto_tools_with_a_response_format_give_calls_or_valid_json(tiny_llama):
    tool = {"type": "function", "function": {"name": "vote", "parameters": CHOICE}}
    for seed in range(3):
        res = tiny_llama.chat([{"role": "user", "content": "Vote or answer."}], tools=[tool], max_new_tokens=120,
                              response_format={"type": "json_schema", "schema": CHOICE}, temperature=1.0, seed=seed)
        assert res.finish_reason in ("stop", "tool_calls")
        for args in [json.loads(c["function"]["arguments"]) for c in res.tool_calls] or [json.loads(res.text)]:
            jsonschema.validate(args, CHOICE)


@pytest.mark.parametrize("kwargs, words", [
    (dict(response_format={"type": "json_schema", "schema": {"type": "foo"}}), ["cannot be compiled", "foo"]),
    (dict(response_format={"type": "json_schema", "schema": {"type": "string", "pattern": "(?<=a)b"}}),
     ["cannot be compiled", "Lookbehind"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}}}}],
          tool_choice="required"), ["tool 'f'", "minimum greater than maximum"]),
    (dict(tools=TOOLS, tool_choice="get_date"), ["unknown tool 'get_date'"]),
    (dict(tools=[{"type": "function", "function": {}}]), ["tools[0].function.name"]),
])
def test_engine_refuses_bad_structured_input_before_generating(tiny_llama, kwargs, words):
    with pytest.raises(ValueError) as err:
        tiny_llama.chat([{"role": "user", "content": "Hi."}], max_new_tokens=2, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_no_tools_or_tool_choice_none_leave_plain_generation_unchanged(tiny_llama):
    msgs = [{"role": "user", "content": "Say something."}]
    plain = tiny_llama.chat(msgs, max_new_tokens=6)
    none = tiny_llama.chat(msgs, tools=TOOLS, tool_choice="none", max_new_tokens=6)
    assert none.text == plain.text and none.tool_calls == [] and none.finish_reason == plain.finish_reason
    assert tiny_llama.render(msgs, TOOLS, "none") == tiny_llama.render(msgs)


# ---- the default model ---------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "country": {"type": "string", "maxLength": 20}},
                "required": ["city", "country"]}},
    "required": ["name", "age", "address"]}
REVIEW = {"type": "object", "properties": {
    "verdict": {"enum": ["approve", "request_changes", "reject"]},
    "severity": {"type": "string", "enum": ["low", "medium", "high"]}},
    "required": ["verdict", "severity"]}
COLOURS = {"type": "object", "properties": {
    "colours": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}},
    "required": ["colours"]}
CASES = {
    "nested": (PERSON, "Alice is 30 years old and lives in Paris, France. Give her details as JSON."),
    "enums": (REVIEW, "Review this change: it deletes the production database. Give your verdict as JSON."),
    "arrays": (COLOURS, "Name the colours of the French flag as JSON."),
}


@pytest.mark.real_model
@pytest.mark.parametrize("case", list(CASES))
def test_json_schema_output_validates(default_engine, case):
    schema, question = CASES[case]
    fmt = {"type": "json_schema", "json_schema": {"name": case, "schema": schema}}
    for seed, temperature in ((0, 0.0), (1, 0.8)):
        res = default_engine.chat([{"role": "user", "content": question}], response_format=fmt, max_new_tokens=48,
                                  temperature=temperature, seed=seed)
        assert res.finish_reason == "stop", res.text
        jsonschema.validate(json.loads(res.text), schema)


@pytest.mark.real_model
def test_json_object_output_is_a_json_object(default_engine):
    res = default_engine.chat([{"role": "user", "content": "Give the capital of France as a JSON object."}],
                              response_format={"type": "json_object"}, max_new_tokens=32)
    if res.finish_reason == "stop":
        assert isinstance(json.loads(res.text), dict)
    else:  # an unbounded object may run out of tokens; it is still a JSON object so far
        assert res.text.startswith("{")


WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def weather_call(default_engine):
    """tool_choice="required" with two tools, greedy (shared by the streaming test)."""
    return default_engine.chat(WEATHER_Q, tools=TOOLS, tool_choice="required", max_new_tokens=40)


@pytest.mark.real_model
def test_required_tool_choice_gives_a_valid_call_of_an_offered_tool(weather_call):
    assert weather_call.finish_reason == "tool_calls" and weather_call.text == ""
    assert len(weather_call.tool_calls) == 1
    assert_valid_calls(weather_call.tool_calls, {"get_weather", "get_time"})


@pytest.mark.real_model
def test_streamed_tool_call_deltas_join_to_the_non_streamed_call(default_engine, weather_call):
    chunks = list(default_engine.stream(WEATHER_Q, tools=TOOLS, tool_choice="required", max_new_tokens=40))
    last = chunks[-1]
    assert last.finish_reason == "tool_calls" and last.tool_calls == weather_call.tool_calls
    deltas = [d for c in chunks for d in c.tool_call_deltas or []]
    assert len(deltas) > 2  # arguments arrive in pieces as they are generated
    assert deltas[0]["id"] == weather_call.tool_calls[0]["id"]
    assert deltas[0]["name"] == weather_call.tool_calls[0]["function"]["name"]
    assert "".join(d["arguments"] for d in deltas) == weather_call.tool_calls[0]["function"]["arguments"]
    assert "".join(c.text for c in chunks) == ""


@pytest.mark.real_model
def test_named_tool_choice_yields_that_tool(default_engine):
    named = {"type": "function", "function": {"name": "get_time"}}
    res = default_engine.chat(WEATHER_Q, tools=TOOLS, tool_choice=named, max_new_tokens=40)
    assert res.finish_reason == "tool_calls" and [c["function"]["name"] for c in res.tool_calls] == ["get_time"]
    assert_valid_calls(res.tool_calls, {"get_time"})


@pytest.mark.real_model
def test_tool_choice_none_yields_text(default_engine):
    res = default_engine.chat(WEATHER_Q, tools=TOOLS, tool_choice="none", max_new_tokens=16)
    assert res.tool_calls == [] and res.finish_reason in ("stop", "length") and res.text.strip()


@pytest.mark.real_model
def test_auto_tool_choice_gives_text_or_valid_calls(default_engine):
    res = default_engine.chat(WEATHER_Q, tools=TOOLS, max_new_tokens=24)
    if res.tool_calls:
        assert_valid_calls(res.tool_calls, {"get_weather", "get_time"})
    else:
        assert res.text and "<tool_call>" not in res.text and res.finish_reason in ("stop", "length")


@pytest.mark.real_model
def test_parallel_calls_are_all_valid(default_engine):
    msgs = [{"role": "user", "content": "What are the weather and the time in Paris and in Tokyo?"}]
    res = default_engine.chat(msgs, tools=TOOLS, tool_choice="required", parallel_tool_calls=True,
                              max_new_tokens=64)
    assert_valid_calls(res.tool_calls, {"get_weather", "get_time"})  # every complete call; an unfinished one drops
    if res.finish_reason == "stop" or res.finish_reason == "tool_calls":
        assert res.finish_reason == "tool_calls"
    raw = default_engine._decode(res.token_ids)
    assert raw.count("<tool_call>") >= len(res.tool_calls)


@pytest.mark.real_model
def test_tool_result_round_trips_into_a_follow_up_answer(default_engine, weather_call):
    call = weather_call.tool_calls[0]
    history = WEATHER_Q + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 degrees celsius"},
    ]
    prompt = default_engine.tokenizer.decode(default_engine.render(history, TOOLS, "auto"))
    assert tool_call_text(call["function"]["name"], call["function"]["arguments"]) in prompt
    assert "<start_of_turn>tool\nsunny, 21 degrees celsius<end_of_turn>" in prompt
    answer = default_engine.chat(history, tools=TOOLS, tool_choice="none", max_new_tokens=16)
    assert answer.tool_calls == [] and answer.text.strip()
