"""LangChain's standard unit suite for ChatRelayLLM. No model is ever loaded here."""

from __future__ import annotations

import langchain_relay.chat_models as chat_models
import pytest
from langchain_relay import TOOL_CALLING, ChatRelayLLM
from langchain_tests.unit_tests import ChatModelUnitTests


class TestChatRelayLLMUnit(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _no_model_load(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise AssertionError("a unit test loaded a model")

        monkeypatch.setattr(chat_models, "shared_engine", refuse)

    @property
    def chat_model_class(self) -> type[ChatRelayLLM]:
        return ChatRelayLLM

    @property
    def chat_model_params(self) -> dict:
        return {"model": "default"}

    @property
    def has_tool_calling(self) -> bool:
        return TOOL_CALLING

    @property
    def has_tool_choice(self) -> bool:
        return TOOL_CALLING

    @property
    def has_structured_output(self) -> bool:
        return TOOL_CALLING

    @property
    def structured_output_kwargs(self) -> dict:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return TOOL_CALLING

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}
