"""RelayLLM on the packaged gemma-3-270m: a FunctionAgent tool round trip, and both LlamaIndex examples end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
from llama_index.core.agent.workflow import AgentInput, AgentOutput, FunctionAgent, ToolCallResult
from llama_index.llms.relay import RelayLLM

from relay_llm.engine import EngineConfig, GenerationOptions

pytestmark = pytest.mark.real_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


@pytest.fixture
def load_example(monkeypatch):
    """An example script as a module (registered, so LlamaIndex can resolve its type hints)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")  # llama-index's own inspect use
@pytest.mark.filterwarnings("ignore:is_running called from within a step:DeprecationWarning")
async def test_function_agent_tool_round_trip_with_constrained_decoding():
    pytest.importorskip("relay_llm.structured", reason="the engine has no structured generation (relay_llm.structured)")
    if "tools" not in {f.name for f in dataclasses.fields(GenerationOptions)}:
        pytest.skip("the engine does not accept tools= yet (structured generation)")
    llm = RelayLLM(max_tokens=40, temperature=0)
    agent = FunctionAgent(tools=[add], llm=llm, system_prompt="You are a calculator.", initial_tool_choice="add",
                          allow_parallel_tool_calls=False)
    handler = agent.run("What is 2 + 3?", max_iterations=3)
    events = []
    async for ev in handler.stream_events():
        events.append(ev)
        if sum(isinstance(e, AgentOutput) for e in events) == 2:  # the model's turn after the tool result
            break  # the base model keeps calling tools: stop here, not at max_iterations
    await handler.cancel_run()
    results = [ev for ev in events if isinstance(ev, ToolCallResult)]
    first = results[0]  # the grammar forced a call of `add` with integer arguments
    assert first.tool_name == "add" and set(first.tool_kwargs) == {"a", "b"}
    assert all(isinstance(v, int) for v in first.tool_kwargs.values())
    assert first.tool_output.content == str(first.tool_kwargs["a"] + first.tool_kwargs["b"])
    # the tool's result went back to the model in the next call, after the call it made
    second = [ev for ev in events if isinstance(ev, AgentInput)][1].input
    assert second[-2].role == "assistant" and second[-1].role == "tool"
    assert second[-1].content == first.tool_output.content
    reply = [ev for ev in events if isinstance(ev, AgentOutput)][1]
    assert reply.raw["relay"]["prompt_tokens"] > 0  # a real generation, with the engine's stats


def test_workflow_example_reuses_earlier_agents_outputs(load_example, capsys):
    # 24 tokens per agent: a relayed output must be longer than the engine's min_match_tokens (16)
    result = load_example("llamaindex_workflow").main(["--max-tokens", "24", "--quiet"])
    runs = result["runs"]
    assert [r["agent"] for r in runs] == ["architect", "developer", "reviewer"]
    for r in runs[1:]:
        assert r["reused_tokens"] > 0 and r["span_tokens"] > 0, r  # reused from the relayed outputs
    table = capsys.readouterr().out
    assert "reviewer" in table and "total TTFT" in table


def test_rag_example_reuses_retrieved_chunks_from_the_second_query_on(load_example, capsys):
    if not any(f.name == "store_prompt" for f in dataclasses.fields(EngineConfig)):
        pytest.xfail("the engine does not store prompt chunks as prefill segments yet (drop-in reuse, issue 4)")
    records = load_example("llamaindex_rag").main(["--max-tokens", "8", "--questions", "3", "--quiet"])
    assert len(records) == 3
    seen = set(records[0]["sources"])
    for r in records[1:]:
        assert seen & set(r["sources"]), r  # the questions retrieve overlapping chunks...
        assert r["reused_tokens"] > 0 and r["span_kinds"].get("prefill", 0) > 0, r  # ...found again and reused
        seen |= set(r["sources"])
    assert "Q3" in capsys.readouterr().out
