"""Fixtures for the LlamaIndex face: a tiny-model RelayLLM (fast, random weights) and a scripted fake engine."""

from __future__ import annotations

import time

import pytest
from llama_index.llms.relay import RelayLLM

from ..tiny import make_model
from ._fakes import FakeEngine


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """Folder of a tiny random llama model (tests/tiny.py), made once per session."""
    return str(make_model("llama", tmp_path_factory.mktemp("llamaindex") / "llama"))


@pytest.fixture
def tiny_llm(tiny_dir) -> RelayLLM:
    """Greedy, 12 new tokens, on the shared engine of the tiny llama model."""
    return RelayLLM(model=tiny_dir, max_tokens=12, temperature=0)


@pytest.fixture
def fake(monkeypatch) -> FakeEngine:
    """A fake engine behind every RelayLLM; getting it blocks too, like a first model load."""
    engine = FakeEngine()

    def get(self):
        time.sleep(0.2)
        return engine

    monkeypatch.setattr(RelayLLM, "engine", property(get))
    return engine
