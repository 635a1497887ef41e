"""LangChain face: ChatRelayLLM (see issue 6)."""
