"""Bridge the engine's blocking chunk iterator to asyncio, and write OpenAI server-sent events.

The engine batches generations on its own model thread; `engine.stream(...)` returns an iterator that
blocks until the next chunk. A `ChunkPump` iterates it on a dedicated thread and hands the chunks to the
event loop, so the loop stays free (health, metrics and other requests are served meanwhile).
Cancelling the pump closes the engine iterator at the next chunk, which cancels the generation at the
next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from fastapi import Request

from relay_llm import Chunk

from .errors import error_body, error_type
from .responses import ChatShape, Shape

log = logging.getLogger("relay_server")

DISCONNECT_POLL_S = 0.5
_END = object()


class ClientDisconnected(Exception):
    """The client went away before the generation finished."""


class ChunkPump:
    """Iterates an engine chunk iterator on its own thread; `await get()` returns the next chunk."""

    def __init__(self, chunks: Iterator[Chunk]):
        self._chunks = chunks
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        self.closed = threading.Event()  # set once the engine iterator is closed (generation over or cancelled)
        self._polled = time.monotonic()  # when the client connection was last checked
        threading.Thread(target=self._run, name="relay-server-pump", daemon=True).start()

    def _run(self) -> None:
        last: object = _END
        try:
            for chunk in self._chunks:
                if self._stop.is_set():
                    break
                self._put(chunk)
        except BaseException as exc:  # handed to the event loop
            last = exc
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()  # sets the engine's cancel flag if the generation is still running
            self.closed.set()
            self._put(last)

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        """Stop at the next chunk: the engine iterator is closed and the generation cancelled.

        If the engine's iterator has a thread-safe `cancel()` (a stream handle), it is called at once too,
        so a generation still waiting for a place in the batch never starts.
        """
        self._stop.set()
        cancel = getattr(self._chunks, "cancel", None)
        if callable(cancel):
            cancel()

    async def get(self, request: Request | None = None) -> Chunk | None:
        """The next chunk, or None at the end. Raises the engine's exception, or ClientDisconnected."""
        while True:
            # Poll for a disconnect at least every DISCONNECT_POLL_S, also while chunks keep arriving.
            if request is not None and time.monotonic() - self._polled >= DISCONNECT_POLL_S:
                self._polled = time.monotonic()
                if await request.is_disconnected():
                    raise ClientDisconnected()
            try:
                item = await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL_S if request else None)
            except asyncio.TimeoutError:
                continue
            if item is _END:
                return None
            if isinstance(item, BaseException):
                raise item
            return item


async def collect(pump: ChunkPump, request: Request) -> tuple[str, Chunk]:
    """Join a whole generation: (text, last chunk). Cancels it if the client disconnects."""
    parts: list[str] = []
    last = None
    try:
        while (chunk := await pump.get(request)) is not None:
            parts.append(chunk.text)
            last = chunk
    finally:
        pump.cancel()
    if last is None or last.stats is None:
        raise RuntimeError("the engine ended the generation without final statistics")
    return "".join(parts), last


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


DONE = sse("[DONE]")


async def sse_events(pump: ChunkPump, request: Request, shape: Shape,
                     on_finish: Callable[[Chunk], None]) -> AsyncIterator[str]:
    """OpenAI stream: [role chunk], content and tool-call deltas, finish chunk, [usage chunk], [DONE].

    With logprobs, every token's entry comes on one content chunk (its text may be empty) before the finish chunk.

    A failure after the response started becomes an error event followed by [DONE]. A client
    disconnect (Starlette cancels this generator, or a poll notices it) cancels the generation.
    """
    try:
        start = shape.start_chunk()
        if start is not None:
            yield sse(start)
        while (chunk := await pump.get(request)) is not None:
            if chunk.text or chunk.logprobs is not None:  # logprobs: the last chunk, before the finish chunk
                yield sse(shape.delta_chunk(chunk.text, chunk.logprobs))
            if chunk.tool_call_deltas and isinstance(shape, ChatShape):
                yield sse(shape.tool_delta_chunk(chunk.tool_call_deltas))
            if chunk.finish_reason is not None and chunk.stats is not None:
                on_finish(chunk)
                yield sse(shape.finish_chunk(chunk.finish_reason, chunk.stats))
                if shape.include_usage:
                    yield sse(shape.usage_chunk(chunk.stats))
        yield DONE
    except ClientDisconnected:
        return
    except Exception as exc:
        log.exception("generation failed mid-stream", exc_info=exc)
        status = 400 if isinstance(exc, ValueError) else 500
        yield sse(error_body(f"generation failed: {exc}", error_type(status), None,
                             "invalid_value" if status == 400 else "internal_error"))
        yield DONE
    finally:
        pump.cancel()
