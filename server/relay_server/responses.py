"""OpenAI response bodies: whole responses and stream chunks for chat and text completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from relay_llm.logprobs import openai_chat_logprobs, openai_completion_logprobs
from relay_llm.stats import RequestStats


def usage(stats: RequestStats) -> dict:
    """OpenAI usage; `cached_tokens` = prompt tokens whose stored K/V was reused (prefix hit + spans)."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},
    }


def relay_stats(stats: RequestStats) -> dict:
    """The `relay` extension object: everything the engine measured for the request."""
    return stats.to_dict()


def _or_none(shape: Callable[[list[dict]], dict], entries: list[dict] | None) -> dict | None:
    """The engine's logprob entries in an OpenAI shape, or None when logprobs were not asked for."""
    return None if entries is None else shape(entries)


@dataclass
class _Shape:
    """One response's identity (id, created, model) and how its whole body and stream chunks look."""

    model: str
    system_fingerprint: str
    include_usage: bool = False  # stream_options.include_usage: "usage": null on chunks, then a usage chunk
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    chunk_object = ""  # the "object" of stream chunks (a class constant, not a field)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}

    def _chunk(self, choices: list) -> dict:
        body = {**self._head(self.chunk_object), "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, stats: RequestStats) -> dict:
        """The last chunk when `stream_options.include_usage`: empty choices, the usage and relay stats."""
        return {**self._head(self.chunk_object), "choices": [], "usage": usage(stats), "relay": relay_stats(stats)}


@dataclass
class ChatShape(_Shape):
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    chunk_object = "chat.completion.chunk"

    def full(self, text: str, finish_reason: str, stats: RequestStats, tool_calls: list[dict] | None = None,
             logprobs: list[dict] | None = None) -> dict:
        """The whole response; with `tool_calls` (engine shape = OpenAI shape), content is null when empty.

        logprobs: the engine's per-token entries (relay_llm.logprobs), or None when not asked for."""
        message = {"role": "assistant", "content": text or (None if tool_calls else ""), "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "logprobs": _or_none(openai_chat_logprobs, logprobs),
                  "finish_reason": finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(stats),
                "relay": relay_stats(stats)}

    def start_chunk(self) -> dict | None:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def delta_chunk(self, text: str, logprobs: list[dict] | None = None) -> dict:
        return self._chunk([{"index": 0, "delta": {"content": text},
                             "logprobs": _or_none(openai_chat_logprobs, logprobs), "finish_reason": None}])

    def tool_delta_chunk(self, deltas: list[dict]) -> dict:
        """OpenAI tool-call deltas from the engine's [{"index", "id", "name", "arguments"}]: a call's first
        delta carries its id, type and name, later ones only arguments text."""
        calls = []
        for d in deltas:
            call: dict = {"index": d["index"], "function": {"arguments": d["arguments"]}}
            if d.get("id"):
                call.update(id=d["id"], type="function")
                call["function"]["name"] = d["name"]
            calls.append(call)
        return self._chunk([{"index": 0, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}])

    def finish_chunk(self, finish_reason: str, stats: RequestStats) -> dict:
        body = self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
        body["relay"] = relay_stats(stats)
        return body


@dataclass
class CompletionShape(_Shape):
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    chunk_object = "text_completion"

    def full(self, text: str, finish_reason: str, stats: RequestStats, tool_calls: list[dict] | None = None,
             logprobs: list[dict] | None = None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": _or_none(openai_completion_logprobs, logprobs),
                  "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(stats),
                "relay": relay_stats(stats)}

    def start_chunk(self) -> dict | None:
        return None  # text completions have no role chunk

    def delta_chunk(self, text: str, logprobs: list[dict] | None = None) -> dict:
        return self._chunk([{"index": 0, "text": text, "logprobs": _or_none(openai_completion_logprobs, logprobs),
                             "finish_reason": None}])

    def finish_chunk(self, finish_reason: str, stats: RequestStats) -> dict:
        body = self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}])
        body["relay"] = relay_stats(stats)
        return body


Shape = ChatShape | CompletionShape
