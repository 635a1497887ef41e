"""RelayLLM contract tests (LlamaIndex ships no standard suite), on a tiny random model or a scripted fake engine."""

from __future__ import annotations

import asyncio
import dataclasses

import llama_index.llms.relay.base as base
import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatResponse, CompletionResponse, ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.llms import ChatMessage
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import FunctionTool
from llama_index.llms.relay import RelayLLM, to_engine_messages

from relay_llm.engine import GenerationOptions

from ..held import record_batch_sizes, run_once_queued
from ._fakes import text_reply, tool_reply

HI = [ChatMessage(role="user", content="Hello there")]


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


def set_light(on: bool) -> str:
    """Switch the light on or off."""
    return "light on" if on else "light off"


def _structured_generation() -> None:
    """Skip unless the engine does tool calls (the structured-generation feature, relay_llm.structured)."""
    pytest.importorskip("relay_llm.structured", reason="the engine has no structured generation (relay_llm.structured)")
    pytest.importorskip("xgrammar", reason="constrained decoding needs xgrammar")
    if "tools" not in {f.name for f in dataclasses.fields(GenerationOptions)}:
        pytest.skip("the engine does not accept tools= yet (structured generation)")


# ---- class, construction, metadata -------------------------------------------------------------


def test_is_a_function_calling_llm_that_never_loads_at_construction(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(base, "shared_engine", refuse)
    llm = RelayLLM(model="/nowhere", dtype="float32", temperature=0.2, max_tokens=5, top_p=0.9, top_k=4, seed=1,
                   stop=["x"], schedule="full", context_window=1000)
    assert isinstance(llm, FunctionCallingLLM) and RelayLLM.class_name() == "RelayLLM"
    meta = llm.metadata
    assert (meta.context_window, meta.num_output, meta.model_name) == (1000, 5, "/nowhere")
    assert meta.is_chat_model and meta.is_function_calling_model


def test_metadata_reads_the_model_config_without_loading(monkeypatch, tiny_dir):
    monkeypatch.setattr(base, "shared_engine", lambda *a, **k: pytest.fail("loaded a model"))
    meta = RelayLLM(model=tiny_dir).metadata
    assert meta.context_window == 2048 and meta.num_output == GenerationOptions.max_new_tokens
    assert RelayLLM(context_window=8).metadata.model_name == "gemma-3-270m"


def test_instances_of_one_model_share_one_engine(tiny_dir):
    a, b = RelayLLM(model=tiny_dir), RelayLLM(model=tiny_dir, temperature=0.5)
    assert a.engine is b.engine


# ---- sync / async x chat / complete x streaming / not, on the tiny model --------------------------


def _check_final(response: ChatResponse | CompletionResponse, max_tokens: int = 12) -> None:
    stats, usage = response.raw["relay"], response.raw["usage"]
    assert response.raw["finish_reason"] in ("stop", "length") and response.raw["model"]
    assert usage["prompt_tokens"] == stats["prompt_tokens"] > 0
    assert usage["completion_tokens"] == stats["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["reused_tokens"] == stats["reused_tokens"]
    assert response.additional_kwargs == usage


async def _run(llm: RelayLLM, kind: str, streaming: bool, asynchronous: bool, **kwargs) -> list:
    """All responses of one call (one for a non-streaming call)."""
    name = ("a" if asynchronous else "") + ("stream_" if streaming else "") + kind
    arg = HI if kind == "chat" else "The architect writes"
    result = getattr(llm, name)(arg, **kwargs)
    if asynchronous:
        result = await result
    if not streaming:
        return [result]
    return [r async for r in result] if asynchronous else list(result)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["chat", "complete"])
async def test_every_entry_point_generates_and_reports_stats(tiny_llm, kind, streaming, asynchronous):
    responses = await _run(tiny_llm, kind, streaming, asynchronous)
    final = responses[-1]
    text = final.message.content if kind == "chat" else final.text
    assert text
    _check_final(final)
    if kind == "chat":
        assert final.message.role == "assistant"
    if streaming:
        assert "".join(r.delta for r in responses) == text
        assert all(r.raw is None for r in responses[:-1])
    # the same greedy generation whatever the entry point
    (whole,) = await _run(tiny_llm, kind, False, False)
    assert text == (whole.message.content if kind == "chat" else whole.text)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["chat", "complete"])
async def test_logprobs_fill_the_response(tiny_dir, kind, streaming, asynchronous):
    llm = RelayLLM(model=tiny_dir, max_tokens=6, temperature=0, schedule="full", logprobs=True, top_logprobs=2)
    final = (await _run(llm, kind, streaming, asynchronous))[-1]
    assert len(final.logprobs) == final.raw["usage"]["completion_tokens"]
    assert all(len(top) == 2 and top[0].logprob >= top[1].logprob for top in final.logprobs)
    assert (await _run(RelayLLM(model=tiny_dir, max_tokens=4), kind, streaming, asynchronous))[
        -1].logprobs is None


def test_complete_continues_the_raw_prompt_while_chat_uses_the_template(tiny_llm):
    complete = tiny_llm.complete("The architect writes")
    chat = tiny_llm.chat([ChatMessage(role="user", content="The architect writes")])
    assert complete.raw["usage"]["prompt_tokens"] < chat.raw["usage"]["prompt_tokens"]
    formatted = RelayLLM(model=tiny_llm.model, max_tokens=3, completion_to_prompt=lambda p: f"Q: {p}\nA:")
    assert formatted.complete("x").raw["usage"]["prompt_tokens"] > formatted.complete("x", formatted=True).raw[
        "usage"]["prompt_tokens"]


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_per_call_kwargs_override_the_instance(tiny_llm, streaming, asynchronous):
    (base_reply,) = await _run(tiny_llm, "chat", False, False, schedule="full")
    full_text = base_reply.message.content
    final = (await _run(tiny_llm, "chat", streaming, asynchronous, max_tokens=3, schedule="full"))[-1]
    assert final.raw["usage"]["completion_tokens"] == 3 and final.raw["relay"]["schedule"] == "full"
    assert full_text.startswith(final.message.content)
    stop = full_text[len(full_text) // 2:][:2]
    final = (await _run(tiny_llm, "chat", streaming, asynchronous, stop=[stop]))[-1]
    assert final.message.content == full_text[: full_text.index(stop)] and final.raw["finish_reason"] == "stop"
    sampled = [(await _run(tiny_llm, "chat", streaming, asynchronous, temperature=1.5, top_k=50, seed=s))[-1]
               for s in (1, 1, 2)]
    texts = [r.message.content for r in sampled]
    assert texts[0] == texts[1]  # the seed makes sampling reproducible
    assert texts != [full_text] * 3  # and temperature 1.5 really samples


def test_generation_options_reach_the_engine(fake):
    llm = RelayLLM(temperature=0.3, max_tokens=9, top_p=0.9, top_k=5, seed=7, stop=["a"], schedule="naive")
    llm.chat(HI)
    llm.chat(HI, temperature=0, max_tokens=2, stop="b", schedule="prefix", seed=None, unknown_kwarg=1)
    llm.complete("hi", relay={"tau_dev": 2.0}, top_p=0.5)
    assert fake.requests[0] == ([{"role": "user", "content": "Hello there"}],
                                {"temperature": 0.3, "max_new_tokens": 9, "top_p": 0.9, "top_k": 5, "seed": 7,
                                 "schedule": "naive", "stop": ["a"]})
    assert fake.requests[1][1] == {"temperature": 0, "max_new_tokens": 2, "top_p": 0.9, "top_k": 5, "seed": 7,
                                   "schedule": "prefix", "stop": ["b"]}
    assert fake.requests[2] == ("hi", {**fake.requests[0][1], "top_p": 0.5, "relay": {"tau_dev": 2.0}})


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.0), ("frequency_penalty", 2.0),
                                          ("repetition_penalty", 1.5)])
def test_penalties_reach_the_engine(tiny_dir, field, value):
    """Each penalty, as a field or per call, gives the engine's own output with that penalty (which differs)."""
    llm = RelayLLM(model=tiny_dir, max_tokens=16, temperature=0, schedule="full")
    request = to_engine_messages(HI)
    direct = llm.engine.chat(request, max_new_tokens=16, schedule="full", **{field: value}).text
    assert direct != llm.engine.chat(request, max_new_tokens=16, schedule="full").text
    assert RelayLLM(model=tiny_dir, max_tokens=16, temperature=0, schedule="full",
                    **{field: value}).chat(HI).message.content == direct
    assert llm.chat(HI, **{field: value}).message.content == direct
    prompt = "The architect writes"
    assert llm.complete(prompt, **{field: value}).text == llm.engine.complete(
        prompt, max_new_tokens=16, schedule="full", **{field: value}).text


def test_outputs_relayed_between_instances_are_reused(tiny_dir):
    writer = RelayLLM(model=tiny_dir, max_tokens=32, temperature=0)
    reader = RelayLLM(model=tiny_dir, max_tokens=4, temperature=0, schedule="naive")
    spec = writer.chat([ChatMessage(role="user", content="Write a specification for the cache.")]).message.content
    review = reader.chat([ChatMessage(role="system", content="You are the reviewer."),
                          ChatMessage(role="user", content=f"Review this:\n{spec}\nList problems.")])
    assert review.raw["relay"]["span_tokens"] >= 16 and review.raw["relay"]["reused_tokens"] > 0


# ---- real async ----------------------------------------------------------------------------------


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


@pytest.mark.parametrize("kind", ["chat", "complete"])
async def test_async_calls_do_not_block_the_event_loop(fake, kind):
    # 0.2 s "load" + 6 x 0.05 s chunks, all blocking: the loop must keep running meanwhile
    (response,), ticks = await _ticks_during(_run(RelayLLM(), kind, False, True))
    assert (response.message.content if kind == "chat" else response.text) == "t0 t1 t2 t3 t4 "
    assert ticks >= 10

    responses, ticks = await _ticks_during(_run(RelayLLM(), kind, True, True))
    assert [r.delta for r in responses] == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 ", ""] and ticks >= 10
    assert responses[-1].raw["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                                          "reused_tokens": 4}


async def test_leaving_astream_early_cancels_the_generation(fake):
    fake.replies = [text_reply(*["t "] * 100)]
    stream = await RelayLLM().astream_chat(HI)
    async for _ in stream:
        break
    await stream.aclose()
    assert await asyncio.to_thread(fake.closed.wait, 5)
    assert fake.produced < 10


def test_leaving_stream_early_cancels_the_generation(fake):
    fake.replies = [text_reply(*["t "] * 100)]
    stream = RelayLLM().stream_complete("hi")
    next(stream)
    stream.close()
    assert fake.closed.is_set() and fake.produced < 10


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["chat", "stream_chat", "achat", "astream_chat"])
async def test_bad_messages_are_clear_value_errors(fake, method):
    async def call(messages):
        result = getattr(RelayLLM(), method)(messages)
        return await result if asyncio.iscoroutine(result) else result

    with pytest.raises(ValueError, match="at least one message"):
        await call([])
    narrator = ChatMessage.model_construct(role="narrator", blocks=[TextBlock(text="Once upon a time")],
                                           additional_kwargs={})
    with pytest.raises(ValueError, match="role 'narrator'"):
        await call([narrator])
    with pytest.raises(ValueError, match="text content only"):
        await call([ChatMessage(role="user", blocks=[TextBlock(text="look"), ImageBlock(url="https://x/y.png")])])
    with pytest.raises(ValueError, match="must be a llama_index ChatMessage"):
        await call([{"role": "user", "content": "hi"}])
    assert fake.requests == []


@pytest.mark.parametrize("method", ["complete", "stream_complete", "acomplete", "astream_complete"])
async def test_an_empty_prompt_is_a_value_error(fake, method):
    with pytest.raises(ValueError, match="non-empty prompt"):
        result = getattr(RelayLLM(), method)("")
        if asyncio.iscoroutine(result):
            await result


def test_engine_errors_surface_as_value_errors(tiny_llm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_llm.chat(HI, max_tokens=-1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_llm.complete("x", max_tokens=5000)


# ---- messages and tools (translation) -----------------------------------------------------------


def test_messages_translate_to_engine_roles_with_tool_calls():
    msgs = [ChatMessage(role="system", content="sys"), ChatMessage(role="developer", content="dev"),
            ChatMessage(role="user", blocks=[TextBlock(text="a"), TextBlock(text="b")]),
            ChatMessage(role="assistant", blocks=[TextBlock(text="let me add"),
                                                  ToolCallBlock(tool_call_id="c1", tool_name="add",
                                                                tool_kwargs={"a": 1, "b": 2})]),
            ChatMessage(role="tool", content="3", additional_kwargs={"tool_call_id": "c1"}),
            ChatMessage(role="model", content="The sum is 3."), ChatMessage(role="function", content="f")]
    assert to_engine_messages(msgs) == [
        {"role": "system", "content": "sys"},
        {"role": "system", "content": "dev"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "let me add", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "The sum is 3."},
        {"role": "tool", "content": "f"},
    ]


def test_prepare_chat_with_tools_builds_engine_kwargs():
    llm, tool = RelayLLM(), FunctionTool.from_defaults(add)
    kwargs = llm._prepare_chat_with_tools([tool], user_msg="2 + 3?", chat_history=[HI[0]])
    assert [m.content for m in kwargs["messages"]] == ["Hello there", "2 + 3?"]
    (spec,) = kwargs["tools"]
    assert spec["type"] == "function" and spec["function"]["name"] == "add"
    assert spec["function"]["parameters"]["required"] == ["a", "b"]
    assert kwargs["tool_choice"] is None and kwargs["parallel_tool_calls"] is False
    assert llm._prepare_chat_with_tools([tool], user_msg="x", tool_required=True)["tool_choice"] == "required"
    assert llm._prepare_chat_with_tools([tool], user_msg="x", tool_choice="add", allow_parallel_tool_calls=True)[
        "tool_choice"] == "add"
    assert llm._prepare_chat_with_tools([], user_msg="x", tool_required=True)["tools"] is None


def test_get_tool_calls_from_response_tolerates_partial_and_missing_calls():
    llm = RelayLLM()

    def response(*calls) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", blocks=[TextBlock(text="hm"), *calls]))

    (sel,) = llm.get_tool_calls_from_response(response(ToolCallBlock(tool_call_id="c", tool_name="add",
                                                                     tool_kwargs={"a": 1})))
    assert (sel.tool_id, sel.tool_name, sel.tool_kwargs) == ("c", "add", {"a": 1})
    partial = [ToolCallBlock(tool_call_id="c", tool_name="add", tool_kwargs=s) for s in ('{"a": 1, "b', '', '{"')]
    assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(response(*partial))] == [{"a": 1}, {}, {}]
    assert llm.get_tool_calls_from_response(response(), error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="expected at least one tool call"):
        llm.get_tool_calls_from_response(response())


def test_tool_calls_stream_as_tool_call_blocks(fake):
    fake.replies = [tool_reply("add", '{"a": 1, "b": 2}', text="Adding.")] * 2
    llm, tool = RelayLLM(), FunctionTool.from_defaults(add)
    chunks = list(llm.stream_chat_with_tools([tool], user_msg="1 + 2?", tool_choice="add"))
    assert fake.requests[0][1]["tools"][0]["function"]["name"] == "add" and fake.requests[0][1]["tool_choice"] == "add"
    mid = chunks[1].message.blocks
    assert isinstance(mid[1], ToolCallBlock) and mid[1].tool_kwargs == '{"a": 1,'  # the partial JSON so far
    assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(chunks[1])] == [{"a": 1}]
    final = chunks[-1]
    assert final.message.content == "Adding." and final.raw["finish_reason"] == "tool_calls"
    (call,) = llm.get_tool_calls_from_response(final)
    assert (call.tool_id, call.tool_name, call.tool_kwargs) == ("call_1", "add", {"a": 1, "b": 2})
    whole = llm.chat_with_tools([tool], user_msg="1 + 2?")
    assert [b.tool_kwargs for b in whole.message.blocks if isinstance(b, ToolCallBlock)] == [{"a": 1, "b": 2}]


def test_only_the_first_call_is_kept_unless_parallel_calls_are_allowed():
    calls = [ToolCallBlock(tool_call_id=f"c{i}", tool_name="add", tool_kwargs={"a": i}) for i in range(2)]
    llm = RelayLLM()

    def response() -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", blocks=list(calls)))

    assert len(llm.get_tool_calls_from_response(llm._validate_chat_with_tools_response(response(), []))) == 1
    kept = llm._validate_chat_with_tools_response(response(), [], allow_parallel_tool_calls=True)
    assert len(llm.get_tool_calls_from_response(kept)) == 2


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "whole"])
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")  # llama-index's own inspect use
async def test_function_agent_round_trip_on_a_scripted_engine(fake, streaming):
    fake.replies = [tool_reply("add", '{"a": 1, "b": 2}'), text_reply("The sum ", "is 3.")]
    fake.delay = 0.0
    agent = FunctionAgent(tools=[add], llm=RelayLLM(), streaming=streaming, allow_parallel_tool_calls=False)
    handler = agent.run("What is 1 + 2?")
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    output = await handler
    assert [(r.tool_name, r.tool_kwargs, r.tool_output.content) for r in results] == [("add", {"a": 1, "b": 2}, "3")]
    assert str(output) == "The sum is 3."
    history = fake.requests[1][0]
    assert history[-2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
    assert history[-1] == {"role": "tool", "content": "3"}
    assert fake.requests[1][1]["tools"][0]["function"]["name"] == "add"


# ---- constrained tool calls on the tiny model -----------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "stream"])
def test_required_tool_calls_are_valid_on_the_tiny_model(tiny_dir, streaming):
    _structured_generation()
    llm, tool = RelayLLM(model=tiny_dir, max_tokens=96, temperature=0), FunctionTool.from_defaults(set_light)
    if streaming:
        response = list(llm.stream_chat_with_tools([tool], user_msg="Lights!", tool_required=True))[-1]
    else:
        response = llm.chat_with_tools([tool], user_msg="Lights!", tool_required=True)
    (call,) = llm.get_tool_calls_from_response(response)  # random weights, but the grammar forces a valid call
    assert call.tool_name == "set_light" and set(call.tool_kwargs) == {"on"}
    assert isinstance(call.tool_kwargs["on"], bool) and response.raw["finish_reason"] == "tool_calls"


async def test_gathered_async_calls_share_the_engines_decode_steps(tiny_llm, monkeypatch):
    """acomplete / achat under asyncio.gather run concurrently: one decode batch, each its own text."""
    engine = tiny_llm.engine
    prompts = [f"Step {i} of the workflow." for i in range(3)]
    alone = [tiny_llm.complete(p, schedule="full").text for p in prompts]
    sizes = record_batch_sizes(engine, monkeypatch)
    calls = [tiny_llm.acomplete(prompts[0], schedule="full"), tiny_llm.acomplete(prompts[1], schedule="full"),
             tiny_llm.achat([ChatMessage(role="user", content=prompts[2])], schedule="full")]
    a, b, c = await run_once_queued(engine, calls, queued=3)
    assert max(sizes) == 3
    assert [a.text, b.text] == alone[:2] and c.message.content
