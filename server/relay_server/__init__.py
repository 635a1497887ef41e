"""OpenAI-compatible server (see issue 8)."""
