"""RedisSegmentStore against a real redis-server: sync between stores, eviction, faults, concurrent writers."""

from __future__ import annotations

import threading

import pytest
import torch

from relay_llm import wire
from relay_llm.redis_store import RedisSegmentStore

from .conftest import RedisServer, free_port, unique_fingerprint
from .helpers import make_segment, prompt_with, wait_for


@pytest.fixture
def fp() -> str:
    return unique_fingerprint()


@pytest.fixture
def open_store():
    """open_store(url, fp, **kw) -> a connected store, closed after the test."""
    stores = []

    def make(url, fp, **kw):
        store = RedisSegmentStore(url, min_match_tokens=8, **kw)
        store.connect(fp)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


def test_a_segment_added_on_one_store_is_reused_on_another(redis_db, fp, open_store):
    a, b = open_store(redis_db, fp), open_store(redis_db, fp)
    seg = make_segment(fp, n=40)
    assert a.add(seg)
    wait_for(lambda: b.shared.announced == 1, what="the announcement")
    assert a.shared.published == 1 and a.shared.announced == 0  # a skips its own announcement
    (m,) = b.find(prompt_with(seg), fingerprint=fp)
    assert (m.start, m.length) == (7, 40) and b.shared.fetched == 1
    assert torch.equal(m.segment.keys, seg.keys) and torch.equal(m.segment.values, seg.values)
    assert m.segment.start_pos == seg.start_pos and b.stats.hits == 1
    (again,) = b.find(prompt_with(seg), fingerprint=fp)  # the blob is cached locally now
    assert again.segment.keys is not None and b.shared.fetched == 1


def test_a_store_started_later_bootstraps_from_the_stream(redis_db, fp, open_store):
    a = open_store(redis_db, fp)
    segs = [make_segment(fp, seed=i) for i in range(3)]
    for s in segs:
        a.add(s)
    wait_for(lambda: a.shared.published == 3, what="publishing")
    late = open_store(redis_db, fp)  # connect() waits for its first pass over the stream
    assert len(late) == 3 and late.shared.announced == 3
    assert {s.content_key for s in late} == {s.content_key for s in segs}


def test_other_fingerprints_are_never_read(redis_db, fp, open_store):
    a, other = open_store(redis_db, fp), open_store(redis_db, unique_fingerprint())
    a.add(make_segment(fp))
    wait_for(lambda: a.shared.published == 1, what="publishing")
    b = open_store(redis_db, fp)
    assert len(b) == 1 and len(other) == 0


def test_the_stream_is_trimmed(redis_db, fp, open_store):
    a = open_store(redis_db, fp, stream_maxlen=20)
    for i in range(300):
        a.publish(make_segment(fp, n=8, seed=i, layers=1, heads=1, dim=4, hidden=False))
    assert a.client.xlen(a.stream_key) < 200  # approximate trimming (~ MAXLEN) cuts whole stream nodes


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "foreign", "garbage"])
def test_bad_blobs_are_skipped_and_dropped(redis_db, fp, open_store, damage):
    a, b = open_store(redis_db, fp), open_store(redis_db, fp)
    seg = make_segment(fp, n=30)
    a.add(seg)
    wait_for(lambda: b.shared.announced == 1, what="the announcement")
    key = a.blob_key(seg.content_key)
    blob = a.client.get(key)
    foreign = make_segment(unique_fingerprint(), n=30)
    foreign.token_ids = seg.token_ids
    bad = {"truncated": blob[: len(blob) - 100], "corrupt": blob[:-50] + bytes(50), "foreign": wire.pack(foreign),
           "garbage": b"not a segment"}[damage]
    a.client.set(key, bad)
    assert b.find(prompt_with(seg), fingerprint=fp) == []
    assert b.shared.bad == 1 and len(b) == 0  # the entry is dropped, the tokens are computed
    assert a.client.get(key) is None  # and the bad blob deleted, so the next writer can set a good one


def test_local_budget_keeps_entries_and_refetches_blobs(redis_db, fp, open_store):
    segs = [make_segment(fp, n=32, seed=i) for i in range(5)]
    budget = 2 * segs[0].charged_bytes + 5 * segs[0].index_bytes + 2048  # two blobs plus every entry
    a = open_store(redis_db, fp, budget_bytes=budget)
    for i, s in enumerate(segs):
        a.add(s)
        wait_for(lambda i=i: a.shared.published == i + 1, what="publishing")
    assert len(a) == 5 and a.stats.bytes <= budget and a.shared.demoted == 3 and a.stats.evictions == 0
    assert sum(s.keys is not None for s in a) == 2
    (m,) = a.find(prompt_with(segs[0]), fingerprint=fp)  # its blob was dropped locally: fetched again
    assert torch.equal(m.segment.keys, segs[0].keys) and a.shared.fetched == 1 and a.stats.bytes <= budget


def test_a_blob_evicted_by_redis_is_a_miss(fp, open_store):
    with RedisServer(maxmemory="4mb") as server:
        a, b = open_store(server.url, fp), open_store(server.url, fp)
        segs = [make_segment(fp, n=64, seed=i, layers=4, dim=64) for i in range(40)]  # ~270 KB each
        for i, s in enumerate(segs):  # b reads each announcement as it comes, as a running replica does: under
            a.publish(s)  # allkeys-lru, Redis may later evict the announcement stream itself, not only blobs
            wait_for(lambda i=i: b.shared.announced == i + 1, what=f"announcement {i + 1}")
        info = a.client.info("memory")
        assert info["maxmemory_policy"] == "allkeys-lru" and info["used_memory"] <= 4 << 20
        blobs = [a.client.exists(a.blob_key(s.content_key)) for s in segs]
        assert sum(blobs) < 20 and blobs[-1] == 1  # most went; the newest is there
        gone = blobs.index(0)
        assert b.find(prompt_with(segs[gone]), fingerprint=fp) == []
        assert b.shared.gone == 1 and len(b) == 39  # its entry is dropped, its tokens computed
        (m,) = b.find(prompt_with(segs[-1]), fingerprint=fp)
        assert torch.equal(m.segment.keys, segs[-1].keys)


def test_redis_unreachable_at_start_then_up(fp, open_store):
    port = free_port()
    a = open_store(f"redis://127.0.0.1:{port}/0", fp)
    assert not a.connected and a.shared.disconnects == 1
    seg = make_segment(fp)
    assert a.add(seg)
    assert len(a.find(prompt_with(seg), fingerprint=fp)) == 1  # local segments serve meanwhile
    with RedisServer(port=port) as server:
        wait_for(lambda: a.connected, what="reconnecting")
        wait_for(lambda: a.shared.published == 1, what="the outbox to be published")
        b = open_store(server.url, fp)
        assert len(b) == 1


def test_redis_killed_mid_run(fp, open_store):
    server = RedisServer().start()
    try:
        a, b = open_store(server.url, fp), open_store(server.url, fp)
        first = make_segment(fp, seed=1)
        a.add(first)
        wait_for(lambda: b.shared.announced == 1, what="the announcement")
        server.kill()
        second = make_segment(fp, seed=2)
        assert a.add(second)  # made while Redis is down: kept locally, queued for publishing
        assert b.find(prompt_with(first), fingerprint=fp) == []  # its blob cannot be had: computed instead
        wait_for(lambda: not b.connected, what="b to notice")
        assert b.find(prompt_with(first), fingerprint=fp) == [] and len(b) == 1  # kept: Redis may come back
        assert len(a.find(prompt_with(first), fingerprint=fp)) == 1  # a's own blob is local
        server = RedisServer(port=server.port).start()  # back, empty (no persistence)
        wait_for(lambda: a.connected and b.connected, what="reconnecting")
        wait_for(lambda: b.shared.announced == 2, what="the queued segment's announcement")
        (m,) = b.find(prompt_with(second), fingerprint=fp)
        assert torch.equal(m.segment.keys, second.keys)
        assert b.find(prompt_with(first), fingerprint=fp) == [] and b.shared.gone == 1  # lost with Redis: a miss
        assert a.shared.disconnects == 1 and b.shared.disconnects == 1
    finally:
        server.kill()


def test_two_stores_writing_the_same_segment_at_once(redis_db, fp, open_store):
    stores = [open_store(redis_db, fp) for _ in range(4)]
    seg = make_segment(fp, n=48)
    barrier, fresh = threading.Barrier(len(stores)), []

    def write(store):
        barrier.wait()
        fresh.append(store.publish(seg))

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(fresh) == [False, False, False, True]
    assert stores[0].client.xlen(stores[0].stream_key) == 1
    assert torch.equal(wire.unpack(stores[0].client.get(stores[0].blob_key(seg.content_key)), fp).keys, seg.keys)
