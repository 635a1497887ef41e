"""LangChain's standard unit suite for ChatRelayLLM. No model is ever loaded here."""

from __future__ import annotations

import langchain_relay.chat_models as chat_models
import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from ._flags import RelayCapabilities


class TestChatRelayLLMUnit(RelayCapabilities, ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _no_model_load(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise AssertionError("a unit test loaded a model")

        monkeypatch.setattr(chat_models, "shared_engine", refuse)

    @property
    def chat_model_params(self) -> dict:
        return {"model": "default"}
