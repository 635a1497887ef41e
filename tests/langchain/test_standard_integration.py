"""LangChain's standard integration suite for ChatRelayLLM.

Run twice: on a tiny random model (fast plumbing check, every run) and on the real default model
(gemma-3-270m, marked real_model). Capability flags come from langchain_relay.TOOL_CALLING.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_relay import TOOL_CALLING, ChatRelayLLM
from langchain_tests.integration_tests import ChatModelIntegrationTests

from ._models import tiny_model_dir

CACHED_PROMPT = "Relay caching keeps the keys and values of the text a model generated, for the next agent. " * 3


class _RelayFlags:
    """What ChatRelayLLM supports today; tool calling and structured output wait on the engine."""

    @property
    def chat_model_class(self) -> type[ChatRelayLLM]:
        return ChatRelayLLM

    @property
    def has_tool_calling(self) -> bool:
        return TOOL_CALLING

    @property
    def has_structured_output(self) -> bool:
        return TOOL_CALLING

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """The same prompt twice: the second call reads the first one's prompt K/V from the cache."""
        llm = ChatRelayLLM(**{**self.chat_model_params, "max_tokens": 2})
        prompt = [HumanMessage(CACHED_PROMPT)]
        llm.invoke(prompt)
        if stream:
            msg: AIMessageChunk | None = None
            for chunk in llm.stream(prompt):
                msg = chunk if msg is None else msg + chunk
        else:
            msg = llm.invoke(prompt)
        assert msg is not None and msg.usage_metadata["input_token_details"]["cache_read"] > 0
        return msg


class TestChatRelayLLMTiny(_RelayFlags, ChatModelIntegrationTests):
    """The suite on a tiny random llama: every code path, in seconds; the text is noise."""

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_model_dir("llama"), "max_tokens": 8}

    @property
    def model_override_value(self) -> str:
        return tiny_model_dir("qwen2")


@pytest.mark.real_model
class TestChatRelayLLMIntegration(_RelayFlags, ChatModelIntegrationTests):
    """The suite on the packaged gemma-3-270m; the per-call model override goes to a tiny model."""

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 8}

    @property
    def model_override_value(self) -> str:
        return tiny_model_dir("llama")
