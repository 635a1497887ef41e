"""What ChatRelayLLM supports, for LangChain's standard suites (unit and integration)."""

from __future__ import annotations

from langchain_relay import TOOL_CALLING, ChatRelayLLM


class RelayCapabilities:
    """Text only; tool calling, tool choice, structured output (all three methods) and JSON mode by
    grammar-constrained decoding (all on langchain_relay.TOOL_CALLING). Put it before the suite's base class."""

    @property
    def chat_model_class(self) -> type[ChatRelayLLM]:
        return ChatRelayLLM

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
