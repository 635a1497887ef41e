"""relay_llm.aio.iterate_in_thread: a blocking iterator consumed from asyncio, for real (threads, no mocks)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from relay_llm.aio import iterate_in_thread


class Ticks:
    """An endless blocking iterator of 0, 1, 2, ... (one per `delay_s`) that records `close()`."""

    def __init__(self, delay_s: float = 0.001):
        self.delay_s = delay_s
        self.produced = 0
        self.closed = threading.Event()

    def __iter__(self) -> Ticks:
        return self

    def __next__(self) -> int:
        if self.closed.is_set():
            raise StopIteration
        time.sleep(self.delay_s)
        self.produced += 1
        return self.produced - 1

    def close(self) -> None:
        self.closed.set()


async def test_items_arrive_in_order_from_a_named_thread():
    threads = []

    def make():
        threads.append(threading.current_thread())
        return iter(range(200))  # no close(): a plain iterator is fine too

    assert [x async for x in iterate_in_thread(make, thread_name="relay-test")] == list(range(200))
    assert threads[0] is not threading.current_thread() and threads[0].name == "relay-test"


async def test_an_exception_of_the_producer_reaches_the_consumer():
    def failing():
        yield 1
        yield 2
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        async for x in iterate_in_thread(failing):
            got.append(x)
    assert got == [1, 2]


async def test_an_exception_of_make_reaches_the_consumer():
    def make():
        raise RuntimeError("no model")

    with pytest.raises(RuntimeError, match="no model"):
        async for _ in iterate_in_thread(make):
            pass


async def test_breaking_out_early_closes_the_iterator():
    ticks = Ticks()
    stream = iterate_in_thread(lambda: ticks)
    async for x in stream:
        if x == 2:
            break
    await stream.aclose()
    assert await asyncio.to_thread(ticks.closed.wait, 5)
    produced = ticks.produced
    await asyncio.sleep(0.05)
    assert ticks.produced == produced  # the producer stopped


async def test_cancelling_the_consumer_closes_the_iterator():
    ticks = Ticks(delay_s=0.01)
    first = asyncio.Event()

    async def consume():
        async for _ in iterate_in_thread(lambda: ticks):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(ticks.closed.wait, 5)
