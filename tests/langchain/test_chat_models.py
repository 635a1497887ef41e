"""ChatRelayLLM behaviour beyond the standard suites, on a tiny random model or a fake engine."""

from __future__ import annotations

import asyncio
import threading
import time

import langchain_relay.chat_models as chat_models
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import tool
from langchain_relay import ChatRelayLLM
from langchain_relay.chat_models import render_tool_calls, to_engine_messages
from pydantic import BaseModel

from relay_llm import Chunk, RequestStats, Result

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


def test_messages_render_to_engine_roles_with_tool_calls_as_text():
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}
    msgs = [SystemMessage("sys"), HumanMessage([{"type": "text", "text": "a"}, "b"], name="ann"),
            AIMessage("let me add", tool_calls=[call]), ToolMessage("3", tool_call_id="c1"), AIMessage("")]
    assert to_engine_messages(msgs) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": 'let me add\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}'
                                         "\n</tool_call>"},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": ""},
    ]
    assert render_tool_calls([call, {**call, "args": {"s": "你好"}}]).count("<tool_call>") == 2
    assert "你好" in render_tool_calls([{"name": "f", "args": {"s": "你好"}}])


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


def test_calling_with_tools_says_the_engine_cannot_yet(slow):
    bound = ChatRelayLLM().bind_tools([_add])
    with pytest.raises(NotImplementedError, match="structured-generation"):
        bound.invoke("add 1 and 2")
    with pytest.raises(NotImplementedError, match="structured-generation"):
        list(bound.stream("add 1 and 2"))
    with pytest.raises(NotImplementedError, match="structured-generation"):
        asyncio.run(bound.ainvoke("add 1 and 2"))
    assert slow.requests == []
    # tool_choice="none" forbids tool calls: plain text generation works
    assert ChatRelayLLM().bind_tools([_add], tool_choice="none").invoke("hi").content == "t0 t1 t2 t3 t4 "
