"""ChatRelayLLM on the packaged gemma-3-270m: per-token callbacks and the LangGraph example end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_relay import ChatRelayLLM

pytestmark = pytest.mark.real_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "langgraph_pipeline.py"


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def test_on_llm_new_token_fires_once_per_generated_token():
    rec = TokenRecorder()
    msg = ChatRelayLLM(max_tokens=8, streaming=True).invoke("The capital of France is", config={"callbacks": [rec]})
    text_tokens = [t for t in rec.tokens if t]
    assert len(text_tokens) == msg.usage_metadata["output_tokens"] - (msg.response_metadata["finish_reason"] == "stop")
    assert "".join(text_tokens) == msg.content and rec.tokens[-1] == ""  # the last, empty chunk carries usage


@pytest.fixture
def example(monkeypatch):
    """examples/langgraph_pipeline.py as a module (registered, so LangGraph can resolve its type hints)."""
    spec = importlib.util.spec_from_file_location("langgraph_pipeline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_langgraph_pipeline_reuses_earlier_agents_outputs(example, capsys):
    # 16 tokens per agent: a relayed output must be at least the engine's min_match_tokens (16) long
    state = example.main(["--max-tokens", "16", "--quiet"])
    runs = state["runs"]
    reviewers = {"reviewer (correctness)", "reviewer (style)", "reviewer (tests)"}
    agents = [r["agent"] for r in runs]
    assert agents[:2] == ["architect", "developer"] and set(agents[2:5]) == reviewers
    assert agents[5] == "developer (revision)" and set(agents[6:]) == reviewers
    for r in runs[1:]:
        assert r["reused_tokens"] > 0 and r["span_tokens"] > 0, r  # cache_read > 0, from relayed outputs
    fanout = runs[-3:]  # the three reviews overlapped in time: each started before any other ended
    assert max(r["start"] for r in fanout) < min(r["end"] for r in fanout)
    table = capsys.readouterr().out
    assert "developer (revision)" in table and "total TTFT" in table and "in sequence" in table
