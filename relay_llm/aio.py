"""Iterate a blocking iterator from asyncio: plain asyncio + threading, no framework.

The engine's `stream(...)` (model load, tokenisation, generation) blocks; the faces' async methods run it
on a thread through `iterate_in_thread`, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class _End:
    """Queued by the producer after the last item."""


async def iterate_in_thread(make: Callable[[], Iterator[T]], thread_name: str = "relay-llm") -> AsyncIterator[T]:
    """Call `make()` and iterate its result on a daemon thread, yielding the items here.

    An exception raised by `make()` or the iterator is re-raised in the consumer. Leaving early (break,
    cancellation, `aclose()`) closes the iterator at its next item, which cancels an engine generation.
    If the event loop closes, the producer stops.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[T | _End | BaseException] = asyncio.Queue()
    stop = threading.Event()

    def put(item: T | _End | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            stop.set()

    def produce() -> None:
        try:
            it = make()
            try:
                for item in it:
                    if stop.is_set():
                        break
                    put(item)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            put(_End())
        except BaseException as exc:  # handed to the consumer
            put(exc)

    threading.Thread(target=produce, name=thread_name, daemon=True).start()
    try:
        while not isinstance(item := await items.get(), _End):
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
