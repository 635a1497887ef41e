"""relay-llm: a local LLM that reuses the KV cache of text it generated (RelayCaching)."""

from .engine import Chunk, EngineConfig, RelayEngine, Result, shared_engine
from .loading import UnsupportedModelError
from .stats import RequestStats

__all__ = ["Chunk", "EngineConfig", "RelayEngine", "RequestStats", "Result", "UnsupportedModelError", "shared_engine"]
