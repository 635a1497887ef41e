"""Fixtures for the LangChain face: a tiny-model ChatRelayLLM (fast, random weights)."""

from __future__ import annotations

import pytest
from langchain_relay import ChatRelayLLM

from ._models import tiny_model_dir


@pytest.fixture
def tiny_dir() -> str:
    return tiny_model_dir("llama")


@pytest.fixture
def tiny_llm(tiny_dir) -> ChatRelayLLM:
    """Greedy, 12 new tokens, on the shared engine of a tiny llama model."""
    return ChatRelayLLM(model=tiny_dir, max_tokens=12, temperature=0)
