"""LangChain's standard integration suite for ChatRelayLLM.

Run twice: on a tiny random model (fast plumbing check, every run) and on the real default model
(gemma-3-270m, marked real_model). The capability flags (tests/langchain/_flags.py) are the unit suite's.

The plain tests run with max_tokens=8 for speed; a test whose output must be a whole tool call or JSON
object gets `tool_max_tokens` / `json_max_tokens` instead (a call or an object cut off at 8 tokens is not
one). Tests a model cannot pass for capability reasons, not plumbing, are in its class's `xfails`.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_relay import ChatRelayLLM
from langchain_tests.integration_tests import ChatModelIntegrationTests

from ._flags import RelayCapabilities
from ._models import tiny_model_dir

# Tests that need a whole tool call / JSON object in the output, by name prefix (test_tool_message_histories_*,
# test_tool_message_error_status and test_structured_few_shot_examples only check that a message comes back).
TOOL_TESTS = ("test_tool_calling", "test_bind_runnables_as_tools", "test_tool_choice", "test_agent_loop",
              "test_unicode_tool_call_integration")
JSON_TESTS = ("test_structured_output", "test_json_mode")

_NOISE = "random weights: the grammar makes the shape, but "

CACHED_PROMPT = "Relay caching keeps the keys and values of the text a model generated, for the next agent. " * 3


class _RelaySuite(RelayCapabilities):
    """The capability flags, plus per-test token budgets, capability xfails and the cache-read check."""

    @pytest.fixture
    def model(self, request: pytest.FixtureRequest) -> ChatRelayLLM:
        """The suite's model fixture, with room for a whole tool call / JSON object where the test needs one."""
        params = {**self.standard_chat_model_params, **self.chat_model_params,
                  **(getattr(request, "param", None) or {})}
        name = request.node.originalname
        if name.startswith(TOOL_TESTS):
            params["max_tokens"] = self.tool_max_tokens
        elif name.startswith(JSON_TESTS):
            params["max_tokens"] = self.json_max_tokens
        return self.chat_model_class(**params)

    tool_max_tokens = 96  # gemma-3-270m's calls take 25-55 tokens; 160 rescued none of the xfails below
    json_max_tokens = 64

    xfails: dict[str, str] = {}
    """Standard tests this model cannot pass for capability reasons (not plumbing): test name, or name with
    its parameters ("test_x[pydantic]"), -> reason."""

    @pytest.fixture(autouse=True)
    def _capability_xfails(self, request: pytest.FixtureRequest) -> None:
        # not strict: the reuse state (what the segment store holds) depends on which tests ran before, and
        # relay reuse is approximate, so a marginal output may differ between a full run and a selected one
        if reason := self.xfails.get(request.node.name) or self.xfails.get(request.node.originalname):
            request.applymarker(pytest.mark.xfail(reason=reason, strict=False))

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


class TestChatRelayLLMTiny(_RelaySuite, ChatModelIntegrationTests):
    """The suite on a tiny random llama: every code path, in seconds; the text is noise."""

    tool_max_tokens = json_max_tokens = 160  # its 512-token BPE vocabulary spends 65 tokens on one call

    # The free-string xfails (bind_runnables_as_tools, tool_choice, structured output [pydantic] and
    # pydantic_2_v1) pass since replies end within the budget (relay_llm.closing, issue 15).
    xfails = {
        "test_tool_calling": _NOISE + "the argument is noise (magic_function(3) -> {'input': 128})",
        "test_tool_calling_async": _NOISE + "the argument is noise (magic_function(3) -> {'input': 128})",
        "test_unicode_tool_call_integration": _NOISE + "a free string argument never closes within the token budget",
        "test_json_mode": _NOISE + "json_object mode leaves the keys free: it answers {} (no setup / punchline)",
        "test_agent_loop": "random weights: with tool_choice auto the model never chooses to open a <tool_call>",
    }

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_model_dir("llama"), "max_tokens": 8}

    @property
    def model_override_value(self) -> str:
        return tiny_model_dir("qwen2")


@pytest.mark.real_model
class TestChatRelayLLMIntegration(_RelaySuite, ChatModelIntegrationTests):
    """The suite on the packaged gemma-3-270m; the per-call model override goes to a tiny model."""

    # The free-string xfails (tool_choice, unicode_tool_call, structured output [pydantic] and pydantic_2_v1)
    # pass since replies end within the budget (relay_llm.closing, issue 15).
    xfails = {
        "test_tool_calling": "gemma-3-270m fills the grammar-forced call with the wrong value: "
                             "magic_function(3) -> {'input': 300}",
        "test_tool_calling_async": "gemma-3-270m fills the grammar-forced call with the wrong value: "
                                   "magic_function(3) -> {'input': 300}",
        "test_json_mode": "gemma-3-270m in json_object mode writes some other object "
                          "({'name': 'cat', 'image': ...}), not the asked-for setup / punchline keys",
        "test_agent_loop": "gemma-3-270m does not choose to call the tool with tool_choice auto: it answers in text",
    }

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 8}

    @property
    def model_override_value(self) -> str:
        return tiny_model_dir("llama")
