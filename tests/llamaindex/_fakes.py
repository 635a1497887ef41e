"""Scripted engine replies for RelayLLM tests that need no model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from relay_llm import Chunk, RequestStats, Result


def text_reply(*pieces: str) -> list[Chunk]:
    """Engine chunks of a plain-text reply: one chunk per piece, then the final chunk with stats."""
    stats = RequestStats(schedule="relay", prompt_tokens=7, completion_tokens=len(pieces), reused_tokens=4)
    return [Chunk(p) for p in pieces] + [Chunk("", finish_reason="stop", stats=stats)]


def tool_reply(name: str, arguments: str, call_id: str = "call_1", text: str = "") -> list[Chunk]:
    """Engine chunks of a reply with one tool call, streamed in two argument deltas (as ToolCallStream does)."""
    half = len(arguments) // 2
    chunks = [Chunk(text)] if text else []
    chunks += [Chunk("", tool_call_deltas=[{"index": 0, "id": call_id, "name": name, "arguments": arguments[:half]}]),
               Chunk("", tool_call_deltas=[{"index": 0, "id": None, "name": None, "arguments": arguments[half:]}])]
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    stats = RequestStats(schedule="relay", prompt_tokens=9, completion_tokens=20)
    return chunks + [Chunk("", finish_reason="tool_calls", stats=stats, tool_calls=[call])]


class FakeEngine:
    """Stands in for RelayEngine.stream / .chat / .complete: replays scripted replies, one per call, each chunk
    after a blocking sleep (like real decoding), and records every request."""

    def __init__(self, *replies: list[Chunk], delay: float = 0.05):
        self.replies = list(replies) or [text_reply("t0 ", "t1 ", "t2 ", "t3 ", "t4 ")]
        self.delay = delay
        self.requests: list[tuple[object, dict]] = []
        self.produced = 0
        self.closed = threading.Event()

    def stream(self, request, **opts) -> Iterator[Chunk]:
        self.requests.append((request, opts))
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]

        def gen():
            try:
                for c in reply:
                    time.sleep(self.delay)
                    self.produced += 1
                    yield c
            finally:
                self.closed.set()

        return gen()

    def chat(self, messages, **opts) -> Result:
        chunks = list(self.stream(messages, **opts))
        last = chunks[-1]
        return Result("".join(c.text for c in chunks), last.finish_reason, [], last.stats, last.tool_calls or [])

    complete = chat
