"""Helpers for tests of concurrent calls: hold the engine's model thread until calls are queued, and record
the rows of every decode step."""

from __future__ import annotations

import asyncio
import threading


def record_batch_sizes(engine, monkeypatch) -> list[int]:
    """A list that gets the number of sequences of every decode step the engine runs from now on."""
    scheduler = engine._worker
    sizes: list[int] = []
    decode = scheduler._decode
    monkeypatch.setattr(scheduler, "_decode", lambda seqs: (sizes.append(len(seqs)), decode(seqs))[1])
    return sizes


async def run_once_queued(engine, calls, queued: int):
    """Gather the coroutines `calls` while the model thread is held, release it once `queued` generations
    wait, and return their results: the calls start together whatever the event loop's timing."""
    gate = threading.Event()
    engine._worker.submit(lambda emit, cancel: gate.wait(30))
    task = asyncio.ensure_future(asyncio.gather(*calls))
    try:
        for _ in range(3000):
            if engine.load_stats()["waiting"] == queued:
                break
            await asyncio.sleep(0.01)
    finally:
        gate.set()
    return await task
