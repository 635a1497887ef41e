"""relay-llm for LlamaIndex: `from llama_index.llms.relay import RelayLLM`."""

from llama_index.llms.relay.base import RelayLLM, to_engine_messages

__all__ = ["RelayLLM", "to_engine_messages"]
