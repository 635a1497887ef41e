"""OpenAI-compatible server for relay-llm (FastAPI + uvicorn, installed by the `server` extra)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
