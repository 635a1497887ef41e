"""LangChain face of relay-llm: `ChatRelayLLM`, a drop-in chat model (see issue 6)."""

from .chat_models import TOOL_CALLING, ChatRelayLLM

__all__ = ["TOOL_CALLING", "ChatRelayLLM"]
