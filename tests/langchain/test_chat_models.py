"""ChatRelayLLM behaviour beyond the standard suites, on a tiny random model or a fake engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Literal

import langchain_relay.chat_models as chat_models
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_relay import ChatRelayLLM
from langchain_relay.chat_models import to_engine_messages
from pydantic import BaseModel
from typing_extensions import TypedDict

from relay_llm import Chunk, RequestStats, Result

from ..held import record_batch_sizes, run_once_queued
from ._models import tiny_model_dir


class SlowEngine:
    """Stands in for RelayEngine.stream / .chat: `n` one-token chunks, each after a blocking sleep."""

    def __init__(self, n: int = 5, delay: float = 0.05):
        self.n, self.delay = n, delay
        self.produced = 0
        self.closed = threading.Event()
        self.requests: list[tuple[list[dict], dict]] = []

    def stream(self, request, **opts):
        self.requests.append((request, opts))

        def gen():
            try:
                for i in range(self.n):
                    time.sleep(self.delay)
                    self.produced += 1
                    yield Chunk(f"t{i} ")
                yield Chunk("", finish_reason="length",
                            stats=RequestStats(prompt_tokens=3, completion_tokens=self.n, reused_tokens=2))
            finally:
                self.closed.set()

        return gen()

    def chat(self, request, **opts) -> Result:
        chunks = list(self.stream(request, **opts))
        return Result("".join(c.text for c in chunks), chunks[-1].finish_reason, [], chunks[-1].stats)


@pytest.fixture
def slow(monkeypatch) -> SlowEngine:
    """A slow fake engine behind every ChatRelayLLM; getting it blocks too, like a first model load."""
    engine = SlowEngine()

    def get(self, model=None):
        time.sleep(0.2)
        return engine

    monkeypatch.setattr(ChatRelayLLM, "_engine", get)
    return engine


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def _merge(chunks) -> AIMessageChunk:
    full = None
    for c in chunks:
        full = c if full is None else full + c
    return full


# ---- construction, parameters, tracing ---------------------------------------------------------


def test_construction_never_loads_a_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(chat_models, "shared_engine", refuse)
    llm = ChatRelayLLM(model="/nowhere", temperature=0.2, max_tokens=5, top_p=0.9, stop=["x"], seed=1,
                       streaming=True, schedule="full", api_key="k", timeout=3, max_retries=1)
    llm.bind_tools([_add], tool_choice="any")
    assert llm._llm_type == "relay-llm" and llm.model == "/nowhere"


def test_ls_params_report_provider_model_and_call_overrides():
    llm = ChatRelayLLM(temperature=0.5, max_tokens=7, stop=["END"])
    assert llm._get_ls_params() == {"ls_provider": "relay_llm", "ls_model_name": "gemma-3-270m",
                                    "ls_model_type": "chat", "ls_temperature": 0.5, "ls_max_tokens": 7,
                                    "ls_stop": ["END"]}
    ls = llm._get_ls_params(stop=["S"], model="/m", max_tokens=3)
    assert (ls["ls_model_name"], ls["ls_max_tokens"], ls["ls_stop"]) == ("/m", 3, ["S"])


# ---- rendering ---------------------------------------------------------------------------------


def test_messages_become_engine_dicts_with_structured_tool_calls():
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}
    bad = {"name": "add", "args": '{"a": 1', "id": "c2", "error": "bad JSON", "type": "invalid_tool_call"}
    msgs = [SystemMessage("sys"), HumanMessage([{"type": "text", "text": "a"}, "b"], name="ann"),
            AIMessage("let me add", tool_calls=[call]), ToolMessage("3", tool_call_id="c1"),
            AIMessage([{"type": "text", "text": "again"}, {"type": "tool_use", "id": "c2", "name": "add", "input": {}}],
                      tool_calls=[{**call, "args": {"s": "你好"}}], invalid_tool_calls=[bad]),
            AIMessage("")]
    def fn(call_id: str, arguments: str) -> dict:
        return {"id": call_id, "type": "function", "function": {"name": "add", "arguments": arguments}}

    assert to_engine_messages(msgs) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "let me add", "tool_calls": [fn("c1", '{"a": 1, "b": 2}')]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
        {"role": "assistant", "content": "again", "tool_calls": [fn("c1", '{"s": "你好"}'), fn("c2", '{"a": 1')]},
        {"role": "assistant", "content": ""},
    ]


def test_non_text_content_is_refused(tiny_llm):
    image = {"type": "image", "url": "https://example.com/x.png"}
    with pytest.raises(ValueError, match="text content only"):
        tiny_llm.invoke([HumanMessage([{"type": "text", "text": "look"}, image])])


def test_tool_history_renders_into_the_chat_template(tiny_llm, tiny_dir):
    call = {"name": "add", "args": {"a": 1}, "id": "c1", "type": "tool_call"}
    msgs = [HumanMessage("add"), AIMessage("", tool_calls=[call]), ToolMessage("41", tool_call_id="c1")]
    engine = tiny_llm._engine()
    text = engine.tokenizer.decode(engine.render(to_engine_messages(msgs)))
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>' in text
    assert "<|im_start|>tool\n41<|im_end|>" in text
    assert isinstance(tiny_llm.invoke(msgs), AIMessage)
    assert isinstance(tiny_llm.bind_tools([_add]).invoke(msgs), AIMessage)


# ---- generation on the tiny model ------------------------------------------------------------


def test_invoke_reports_usage_cache_read_and_engine_stats(tiny_llm):
    msg = tiny_llm.invoke("Hello there", schedule="full")
    assert isinstance(msg.content, str) and msg.content
    usage = msg.usage_metadata
    stats = msg.response_metadata["relay"]
    assert usage["input_tokens"] == stats["prompt_tokens"] > 0
    assert usage["output_tokens"] == stats["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_token_details"] == {"cache_read": 0}  # schedule full reuses nothing
    assert stats["schedule"] == "full" and stats["ttft_s"] > 0
    assert msg.response_metadata["model_name"] == tiny_llm.model
    assert msg.response_metadata["finish_reason"] == "length"
    again = tiny_llm.invoke("Hello there")  # default schedule: the prompt is an exact-prefix hit now
    assert again.usage_metadata["input_token_details"]["cache_read"] == usage["input_tokens"] - 1


def test_stream_matches_invoke_with_metadata_on_the_last_chunk_only(tiny_llm):
    text = tiny_llm.invoke("Stream me", schedule="full").content
    chunks = list(tiny_llm.stream("Stream me", schedule="full"))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == text
    assert [c.chunk_position for c in chunks] == [None] * (len(chunks) - 1) + ["last"]
    assert all(c.usage_metadata is None and not c.response_metadata.get("model_name") for c in chunks[:-1])
    full = _merge(chunks)
    assert full.usage_metadata["output_tokens"] == 12
    assert full.response_metadata["model_name"] == tiny_llm.model
    assert full.response_metadata["relay"]["completion_tokens"] == 12


def test_stop_sequences_end_generation(tiny_llm):
    text = tiny_llm.invoke("Stop me", schedule="full", max_tokens=24).content
    start = next(i for i in range(len(text) // 3, len(text) - 3) if text[i:i + 3].isascii())
    stop = text[start:start + 3]
    expected = text[: text.find(stop)]
    msg = tiny_llm.invoke("Stop me", schedule="full", max_tokens=24, stop=[stop])
    assert msg.content == expected and msg.response_metadata["finish_reason"] == "stop"
    assert "".join(c.content for c in tiny_llm.stream("Stop me", schedule="full", max_tokens=24, stop=[stop])) \
        == expected
    fielded = ChatRelayLLM(model=tiny_llm.model, max_tokens=24, stop=[stop], schedule="full")
    assert fielded.invoke("Stop me").content == expected


def test_logprobs_in_response_metadata_equal_the_engine(tiny_dir):
    llm = ChatRelayLLM(model=tiny_dir, max_tokens=8, temperature=0, schedule="full", logprobs=True, top_logprobs=2)
    msg = llm.invoke("Logprobs")
    direct = llm._engine().chat(to_engine_messages([HumanMessage("Logprobs")]), max_new_tokens=8, temperature=0,
                                schedule="full", logprobs=2)
    content = msg.response_metadata["logprobs"]["content"]
    assert [t["token"] for t in content] == [e["token"] for e in direct.logprobs]
    assert [t["logprob"] for t in content] == pytest.approx([e["logprob"] for e in direct.logprobs], abs=1e-4)
    assert [[a["token"] for a in t["top_logprobs"]] for t in content] == [
        [a for _, a, _ in e["top"]] for e in direct.logprobs]
    assert all(bytes(t["bytes"]).decode("utf-8") == t["token"] for t in content)
    streamed = _merge(llm.stream("Logprobs")).response_metadata["logprobs"]["content"]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]
    assert "logprobs" not in ChatRelayLLM(model=tiny_dir, max_tokens=4).invoke("Logprobs").response_metadata


async def test_astream_and_ainvoke_on_the_tiny_model(tiny_llm):
    text = tiny_llm.invoke("Async", schedule="full").content
    chunks = [c async for c in tiny_llm.astream("Async", schedule="full")]
    assert "".join(c.content for c in chunks) == text and chunks[-1].chunk_position == "last"
    msg = await tiny_llm.ainvoke("Async", schedule="full")
    assert msg.content == text and msg.usage_metadata["output_tokens"] == 12


def test_instances_of_one_model_share_one_engine_and_its_cache(tiny_dir):
    a = ChatRelayLLM(model=tiny_dir, max_tokens=16)
    b = ChatRelayLLM(model=tiny_dir, max_tokens=4, temperature=0.7, seed=3)
    assert a._engine() is b._engine()
    first = [SystemMessage("You are the architect."), HumanMessage("Plan a cache for the agents.")]
    out = a.invoke(first)
    prompt_tokens = len(a._engine().render(to_engine_messages(first)))
    second = b.invoke([*first, out, HumanMessage("Now the developer writes it.")])
    assert second.usage_metadata["input_token_details"]["cache_read"] >= prompt_tokens


def test_model_override_per_call(tiny_llm):
    other = tiny_model_dir("qwen2")
    msg = tiny_llm.invoke("Hi", model=other)
    assert msg.response_metadata["model_name"] == other
    assert tiny_llm._engine(other) is not tiny_llm._engine()


def test_token_counting_uses_the_model_tokenizer(tiny_llm):
    tok = tiny_llm._engine().tokenizer
    text = "The architect writes a specification."
    assert tiny_llm.get_token_ids(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert tiny_llm.get_num_tokens(text) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert tiny_llm.get_token_ids("") == []
    msgs = [SystemMessage("s"), HumanMessage("hello")]
    assert tiny_llm.get_num_tokens_from_messages(msgs) == len(tiny_llm._engine().render(to_engine_messages(msgs)))


# ---- callbacks, async and cancellation on the fake engine -------------------------------------


def test_on_llm_new_token_fires_once_per_token(slow):
    rec = TokenRecorder()
    msg = ChatRelayLLM(streaming=True).invoke("hi", config={"callbacks": [rec]})
    assert rec.tokens == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 ", ""]  # five tokens, then the usage chunk
    assert msg.content == "t0 t1 t2 t3 t4 " and msg.usage_metadata["input_token_details"]["cache_read"] == 2
    rec.tokens.clear()
    list(ChatRelayLLM().stream("hi", config={"callbacks": [rec]}))
    assert rec.tokens == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 ", ""]


def test_generation_options_reach_the_engine(slow):
    llm = ChatRelayLLM(temperature=0.3, max_tokens=9, top_p=0.8, seed=4, stop=["a"], schedule="prefix")
    llm.invoke("hi")
    llm.invoke("hi", stop=["b"], max_tokens=2, top_k=5)
    assert slow.requests[0] == ([{"role": "user", "content": "hi"}],
                                {"temperature": 0.3, "max_new_tokens": 9, "top_p": 0.8, "seed": 4,
                                 "schedule": "prefix", "stop": ["a"]})
    assert slow.requests[1][1] == {"temperature": 0.3, "max_new_tokens": 2, "top_p": 0.8, "top_k": 5, "seed": 4,
                                   "schedule": "prefix", "stop": ["b"]}


PENALTIES = [("presence_penalty", 2.0), ("frequency_penalty", 2.0), ("repetition_penalty", 1.5)]


@pytest.mark.parametrize("field, value", PENALTIES)
def test_penalties_reach_the_engine(tiny_dir, field, value):
    """Each penalty, as a field or per call, gives the engine's own output with that penalty (which differs)."""
    messages = [HumanMessage("The architect writes a specification for the developer.")]
    llm = ChatRelayLLM(model=tiny_dir, max_tokens=16, temperature=0, schedule="full")
    engine, request = llm._engine(), to_engine_messages(messages)
    direct = engine.chat(request, max_new_tokens=16, schedule="full", **{field: value}).text
    assert direct != engine.chat(request, max_new_tokens=16, schedule="full").text
    assert ChatRelayLLM(model=tiny_dir, max_tokens=16, temperature=0, schedule="full",
                        **{field: value}).invoke(messages).content == direct
    assert llm.invoke(messages, **{field: value}).content == direct
    assert ChatRelayLLM(**{field: value})._identifying_params[field] == value


async def _ticks_during(coro) -> tuple[object, int]:
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        return await coro, ticks
    finally:
        task.cancel()


async def test_ainvoke_does_not_block_the_event_loop(slow):
    msg, ticks = await _ticks_during(ChatRelayLLM().ainvoke("hi"))  # 0.2 s "load" + 5 x 0.05 s tokens
    assert msg.content == "t0 t1 t2 t3 t4 " and msg.usage_metadata["output_tokens"] == 5
    assert ticks >= 15


async def test_astream_does_not_block_the_event_loop(slow):
    async def collect():
        return [c async for c in ChatRelayLLM().astream("hi")]

    chunks, ticks = await _ticks_during(collect())
    assert [c.content for c in chunks] == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 ", ""]
    assert chunks[-1].usage_metadata["input_tokens"] == 3 and ticks >= 15


async def test_leaving_astream_early_cancels_the_generation(slow):
    slow.n = 100
    stream = ChatRelayLLM().astream("hi")
    async for _ in stream:
        break
    await stream.aclose()
    assert await asyncio.to_thread(slow.closed.wait, 5)
    assert slow.produced < 10


def test_leaving_stream_early_cancels_the_generation(slow):
    slow.n = 100
    stream = ChatRelayLLM().stream("hi")
    next(stream)
    stream.close()
    assert slow.closed.is_set() and slow.produced == 1


# ---- tools -------------------------------------------------------------------------------------


@tool
def _add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    """A person."""

    name: str


def test_bind_tools_converts_specs_and_tool_choice():
    llm = ChatRelayLLM()
    bound = llm.bind_tools([_add, Person], tool_choice="any")
    assert isinstance(bound, RunnableBinding)
    tools = bound.kwargs["tools"]
    assert [t["function"]["name"] for t in tools] == ["_add", "Person"]
    assert tools[0]["function"]["parameters"]["required"] == ["a", "b"]
    assert bound.kwargs["tool_choice"] == "required"
    assert llm.bind_tools([_add], tool_choice="_add").kwargs["tool_choice"] == {
        "type": "function", "function": {"name": "_add"}}
    assert llm.bind_tools([_add], tool_choice="auto").kwargs["tool_choice"] == "auto"
    assert "tool_choice" not in llm.bind_tools([_add]).kwargs
    with pytest.raises(ValueError, match="not 'auto'"):
        llm.bind_tools([_add], tool_choice="missing")


ADD_CALL = {"id": "call_1", "type": "function", "function": {"name": "_add", "arguments": '{"a": 1, "b": 2}'}}
NO_ARGS_CALL = {"id": "call_2", "type": "function", "function": {"name": "_now", "arguments": ""}}
BAD_JSON_CALL = {"id": "call_3", "type": "function", "function": {"name": "_add", "arguments": '{"a": 1'}}
NOT_AN_OBJECT_CALL = {"id": "call_4", "type": "function", "function": {"name": "_add", "arguments": "[1, 2]"}}


class ToolEngine:
    """Stands in for RelayEngine: replies with text then tool calls, streamed as the engine streams them."""

    def __init__(self, calls: list[dict] | None = None, text: str = "", deltas: list[list[dict]] | None = None):
        self.calls = [ADD_CALL] if calls is None else calls
        self.text = text
        self.deltas = deltas if deltas is not None else [
            [{"index": 0, "id": "call_1", "name": "_add", "arguments": ""}],
            [{"index": 0, "id": None, "name": None, "arguments": '{"a": 1, '}],
            [{"index": 0, "id": None, "name": None, "arguments": '"b": 2}'}]]
        self.requests: list[tuple[list[dict], dict]] = []

    def stream(self, request, **opts):
        self.requests.append((request, opts))
        finish = "tool_calls" if self.calls else "stop"
        stats = RequestStats(prompt_tokens=30, completion_tokens=20, reused_tokens=4)
        chunks = [Chunk(self.text)] if self.text else []
        chunks += [Chunk("", tool_call_deltas=d) for d in self.deltas[:-1]]
        chunks.append(Chunk("", finish_reason=finish, stats=stats, tool_call_deltas=self.deltas[-1] or None,
                            tool_calls=list(self.calls)))
        return (c for c in chunks)  # a generator: the face closes the engine's stream

    def chat(self, request, **opts) -> Result:
        chunks = list(self.stream(request, **opts))
        last = chunks[-1]
        return Result("".join(c.text for c in chunks), last.finish_reason, [], last.stats, last.tool_calls)


@pytest.fixture
def tool_engine(monkeypatch) -> ToolEngine:
    engine = ToolEngine()
    monkeypatch.setattr(ChatRelayLLM, "_engine", lambda self, model=None: engine)
    return engine


def test_tool_options_reach_the_engine(tool_engine):
    llm = ChatRelayLLM(max_tokens=5)
    llm.bind_tools([_add], tool_choice="_add", parallel_tool_calls=True).invoke("add")
    llm.bind_tools([_add], tool_choice="any").invoke("add")
    llm.bind_tools([_add]).invoke("add")
    llm.bind_tools([_add], tool_choice="none").invoke("add")
    spec = convert_to_openai_tool(_add)
    assert [opts for _, opts in tool_engine.requests] == [
        {"max_new_tokens": 5, "tools": [spec], "tool_choice": {"type": "function", "function": {"name": "_add"}},
         "parallel_tool_calls": True},
        {"max_new_tokens": 5, "tools": [spec], "tool_choice": "required"},
        {"max_new_tokens": 5, "tools": [spec]},
        {"max_new_tokens": 5, "tools": [spec], "tool_choice": "none"},
    ]


def test_engine_tool_calls_become_tool_calls_and_invalid_tool_calls(tool_engine):
    tool_engine.calls = [ADD_CALL, NO_ARGS_CALL, BAD_JSON_CALL, NOT_AN_OBJECT_CALL]
    tool_engine.text = "Let me add."
    bound = ChatRelayLLM().bind_tools([_add], parallel_tool_calls=True)
    for msg in (bound.invoke("add 1 and 2"), asyncio.run(bound.ainvoke("add 1 and 2"))):
        assert msg.content == "Let me add." and msg.response_metadata["finish_reason"] == "tool_calls"
        assert msg.tool_calls == [{"name": "_add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"},
                                  {"name": "_now", "args": {}, "id": "call_2", "type": "tool_call"}]
        assert [(c["id"], c["args"]) for c in msg.invalid_tool_calls] == [("call_3", '{"a": 1'), ("call_4", "[1, 2]")]
        assert all(c["error"] for c in msg.invalid_tool_calls)
        assert msg.usage_metadata["input_token_details"]["cache_read"] == 4


def test_streamed_tool_call_deltas_become_tool_call_chunks(tool_engine):
    tool_engine.text = "Sure."
    bound = ChatRelayLLM().bind_tools([_add])
    for chunks in (list(bound.stream("add")), asyncio.run(_alist(bound.astream("add")))):
        assert [c.content for c in chunks] == ["Sure.", "", "", ""]
        assert [[(t["index"], t["id"], t["name"], t["args"]) for t in c.tool_call_chunks] for c in chunks] == [
            [], [(0, "call_1", "_add", "")], [(0, None, None, '{"a": 1, ')], [(0, None, None, '"b": 2}')]]
        assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] == 20
        full = _merge(chunks)
        assert full.content == "Sure." and full.invalid_tool_calls == []
        assert full.tool_calls == [{"name": "_add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}]
        assert full.response_metadata["finish_reason"] == "tool_calls"


async def _alist(aiter) -> list:
    return [x async for x in aiter]


class Pick(BaseModel):
    """A choice."""

    pick: Literal["yes", "no"]
    ok: bool


class PickDict(TypedDict):
    """A choice."""

    pick: Literal["yes", "no"]
    ok: bool


PICK_SCHEMA = {"type": "object", "properties": {"pick": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
               "required": ["pick", "ok"]}


@pytest.mark.parametrize("schema", [Pick, PickDict, PICK_SCHEMA], ids=["pydantic", "typeddict", "json_schema"])
def test_structured_output_methods_reach_the_engine_and_parse(tool_engine, schema):
    llm = ChatRelayLLM()
    expected = Pick(pick="yes", ok=True) if schema is Pick else {"pick": "yes", "ok": True}
    tool_engine.calls, tool_engine.deltas, tool_engine.text = [], [[]], '{"pick": "yes", "ok": true}'
    assert llm.with_structured_output(schema).invoke("choose") == expected
    assert llm.with_structured_output(schema, method="json_mode").invoke("choose") == expected
    fmt = tool_engine.requests[0][1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["properties"]["pick"]["enum"] == ["yes", "no"]
    assert tool_engine.requests[1][1]["response_format"] == {"type": "json_object"}
    if schema is PICK_SCHEMA:
        assert fmt["json_schema"] == {"name": "response", "schema": PICK_SCHEMA}  # a JSON Schema goes as is
    if schema is PICK_SCHEMA:
        schema = {**PICK_SCHEMA, "title": "pick_tool"}  # a tool needs a name
    name = schema["title"] if isinstance(schema, dict) else schema.__name__
    tool_engine.calls = [{"id": "call_9", "type": "function",
                          "function": {"name": name, "arguments": '{"pick": "yes", "ok": true}'}}]
    tool_engine.text, tool_engine.deltas = "", [[{"index": 0, "id": "call_9", "name": name, "arguments": ""}],
                                                [{"index": 0, "id": None, "name": None,
                                                  "arguments": '{"pick": "yes", "ok": true}'}]]
    chat = llm.with_structured_output(schema, method="function_calling")
    assert chat.invoke("choose") == expected
    assert list(chat.stream("choose"))[-1] == expected
    opts = tool_engine.requests[-1][1]
    assert opts["tool_choice"] == {"type": "function", "function": {"name": name}}
    assert [t["function"]["name"] for t in opts["tools"]] == [name] and "response_format" not in opts


def test_structured_output_include_raw_keeps_the_message_and_the_parsing_error(tool_engine):
    tool_engine.calls, tool_engine.deltas, tool_engine.text = [], [[]], '{"pick": "maybe", "ok": true}'
    out = ChatRelayLLM().with_structured_output(Pick, include_raw=True).invoke("choose")
    assert isinstance(out["raw"], AIMessage) and out["parsed"] is None and out["parsing_error"] is not None
    tool_engine.text = '{"pick": "no", "ok": false}'
    out = ChatRelayLLM().with_structured_output(Pick, include_raw=True).invoke("choose")
    assert out["parsed"] == Pick(pick="no", ok=False) and out["parsing_error"] is None
    with pytest.raises(ValueError, match="method must be"):
        ChatRelayLLM().with_structured_output(Pick, method="xml")
    with pytest.raises(ValueError, match="unsupported arguments"):
        ChatRelayLLM().with_structured_output(Pick, temperature=1)


# ---- tools on the tiny model (random weights: the grammar makes the shape; enums bound the values) -------


@tool
def weather(city: Literal["paris", "tokyo"]) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_forced_tool_call_on_the_tiny_model(tiny_dir):
    llm = ChatRelayLLM(model=tiny_dir, max_tokens=96).bind_tools([weather, _add], tool_choice="weather")
    msg = llm.invoke("What is the weather in Paris?")
    assert msg.response_metadata["finish_reason"] == "tool_calls" and msg.content == ""
    assert len(msg.tool_calls) == 1 and msg.invalid_tool_calls == []
    call = msg.tool_calls[0]
    assert call["name"] == "weather" and call["args"]["city"] in ("paris", "tokyo") and call["id"].startswith("call_")
    chunks = list(llm.stream("What is the weather in Paris?"))
    assert sum(len(c.tool_call_chunks) for c in chunks) > 2  # the arguments arrive in pieces
    full = _merge(chunks)
    assert full.tool_calls == msg.tool_calls and full.response_metadata["finish_reason"] == "tool_calls"


def test_a_generated_tool_call_goes_back_into_the_prompt_as_generated(tiny_dir):
    llm = ChatRelayLLM(model=tiny_dir, max_tokens=96).bind_tools([weather], tool_choice="any")
    question = HumanMessage("Weather in Tokyo, please.")
    first = llm.invoke([question], schedule="full")
    call = first.tool_calls[0]
    result = weather.invoke(call)
    history = [question, first, result]
    engine = ChatRelayLLM(model=tiny_dir)._engine()
    prompt = engine.tokenizer.decode(engine.render(to_engine_messages(history), llm.kwargs["tools"], "required"))
    second = llm.invoke(history)
    # the call goes back as the text the model generated (the engine renders it), and the prompt is reused
    call_text = f'<tool_call>\n{{"name": "weather", "arguments": {json.dumps(call["args"])}}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call_text}<|im_end|>" in prompt
    assert second.usage_metadata["input_token_details"]["cache_read"] > first.usage_metadata["input_tokens"]


def test_structured_output_on_the_tiny_model(tiny_dir):
    llm = ChatRelayLLM(model=tiny_dir, max_tokens=96)
    for method in ("json_schema", "function_calling"):
        for schema in (Pick, PickDict, PICK_SCHEMA if method == "json_schema" else {**PICK_SCHEMA, "title": "pick"}):
            out = llm.with_structured_output(schema, method=method).invoke("Choose.")
            if schema is Pick:
                assert isinstance(out, Pick)
            else:
                assert out.keys() == {"pick", "ok"} and out["pick"] in ("yes", "no")
    streamed = list(llm.with_structured_output(Pick).stream("Choose."))
    assert streamed and streamed[-1] == llm.with_structured_output(Pick).invoke("Choose.")


def test_bad_tool_schema_is_a_value_error_before_generating(tiny_dir):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "not": {"const": 1}}}}}}
    with pytest.raises(ValueError, match="not supported"):
        ChatRelayLLM(model=tiny_dir).bind_tools([bad], tool_choice="f").invoke("hi")


class ChatStarts(BaseCallbackHandler):
    """The messages of every chat-model call."""

    def __init__(self):
        self.calls: list[list] = []

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.calls.append(messages[0])


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")  # langchain's create_agent is not installed
def test_langgraph_react_agent_tool_round_trip_on_the_tiny_model(tiny_dir):
    from langgraph.prebuilt import create_react_agent

    llm = ChatRelayLLM(model=tiny_dir, max_tokens=96)

    def model(state, runtime):
        """Call a tool first; once a tool result is in, answer in text (a random model would never stop)."""
        answered = any(isinstance(m, ToolMessage) for m in state["messages"])
        return llm.bind_tools([weather], tool_choice="none" if answered else "any")

    starts = ChatStarts()
    agent = create_react_agent(model, [weather])
    out = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]}, {"callbacks": [starts]})
    human, call, result, answer = out["messages"]
    assert call.tool_calls[0]["name"] == "weather" and call.tool_calls[0]["args"]["city"] in ("paris", "tokyo")
    assert isinstance(result, ToolMessage) and result.content == f"sunny in {call.tool_calls[0]['args']['city']}"
    assert result.tool_call_id == call.tool_calls[0]["id"]
    assert isinstance(answer, AIMessage) and not answer.tool_calls and answer.content
    assert len(starts.calls) == 2 and starts.calls[1][-1].content == result.content  # the result went back in
    assert answer.usage_metadata["input_token_details"]["cache_read"] > 0  # the call's K/V was reused


async def test_abatch_calls_share_the_engines_decode_steps(tiny_llm, monkeypatch):
    """abatch / ainvoke run concurrently: the engine decodes the three calls in one batch, and each gets the
    text it gets alone."""
    engine = tiny_llm._engine()
    prompts = [f"Agent {i} writes the plan." for i in range(3)]
    alone = [tiny_llm.invoke(p, schedule="full").content for p in prompts]
    sizes = record_batch_sizes(engine, monkeypatch)
    (got,) = await run_once_queued(engine, [tiny_llm.abatch(prompts, schedule="full")], queued=3)
    assert max(sizes) == 3
    assert [m.content for m in got] == alone


def test_a_call_cut_by_max_tokens_is_an_invalid_tool_call(tiny_dir):
    """finish_reason "length" with a cut call: LangChain gets it in invalid_tool_calls, not as a valid call
    (the tiny model's call block alone is longer than 20 tokens)."""

    @tool
    def vote(pick: Literal["yes", "no"], ok: bool) -> str:
        """Cast a vote."""
        return pick

    llm = ChatRelayLLM(model=tiny_dir, max_tokens=20, temperature=0).bind_tools([vote], tool_choice="vote")
    msg = llm.invoke("Vote now.", schedule="full")
    assert msg.response_metadata["finish_reason"] == "length"
    assert msg.tool_calls == [] and len(msg.invalid_tool_calls) == 1
    bad = msg.invalid_tool_calls[0]
    assert bad["name"] == "vote" and "cut off by the token budget" in bad["error"]
