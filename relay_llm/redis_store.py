"""A segment store shared by replicas through Redis: what one replica generates, every replica reuses.

Chosen by `EngineConfig(store_url="redis://host:port/db")` (`relay-llm serve --store ...`); the `redis`
package is imported only then.

Keys (ns = first 16 hex digits of sha256(store fingerprint): another model's, dtype's or profile's K/V
is never read)

    relay:<ns>:seg:<content key>   one blob per segment (`wire.pack`: header + safetensors), written with SET NX
    relay:<ns>:new                 a Stream announcing each new blob: key, token ids (int32), start, kind, origin

Index sync
    Every replica keeps its own k-gram index (`SegmentStore`), so lookups stay local. A follower thread reads
    the stream from its start when the store connects (bootstrap) and then blocks on it (XREAD BLOCK): each
    announcement from another replica becomes an index entry without K/V (a "stub", `Segment.keys` None,
    charged only its ids and index share). The stream is trimmed (XADD MAXLEN ~ stream_maxlen).

Local blobs
    The local byte budget holds the index and a cache of hot blobs. When the budget is short, the
    lowest-priority segment (the eviction policy of `store`) loses its blob if Redis has it (it becomes a
    stub) and is dropped otherwise. A match on a stub fetches its blob (one MGET per prompt) and keeps it.
    A blob Redis no longer has (allkeys-lru evicted it), or one that is truncated, corrupt or of another
    fingerprint, is a miss: the entry is dropped and those tokens are computed.

Faults
    No Redis error reaches a request. If Redis is unreachable (at start or later) the store logs it once,
    keeps serving from its local segments (stubs are not matched while offline), and the follower
    reconnects with exponential backoff (0.1 s to 5 s), then reads the stream on from where it stopped.
    Segments made while offline wait in a bounded outbox and are published after reconnecting. Two
    replicas writing the same segment: SET NX keeps the first blob (the same tokens and K/V) and only the
    writer that set it announces it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import torch

from . import wire
from .store import Match, Segment, SegmentStore

log = logging.getLogger(__name__)

STREAM_MAXLEN = 10_000  # announcements kept in the stream (approximate trim)
OUTBOX = 256  # segments waiting to be published while Redis is unreachable (oldest dropped beyond)
BACKOFF = (0.1, 5.0)  # reconnect delay: first, most (doubling)


@dataclass
class SharedStats:
    """Counters of the shared store. connected: Redis reachable now. published: blobs this replica set;
    announced: stubs added from other replicas' announcements; fetched / fetched_bytes: blobs read on a match;
    gone: matched blobs Redis no longer had; bad: blobs skipped as truncated, corrupt or foreign; demoted:
    local blobs dropped for space whose entry was kept; unpublished: segments never published (outbox full);
    disconnects: times Redis became unreachable."""

    connected: bool = False
    published: int = 0
    announced: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    gone: int = 0
    bad: int = 0
    demoted: int = 0
    unpublished: int = 0
    disconnects: int = 0


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials (for logs)."""
    u = urlsplit(url)
    return f"{u.hostname}:{u.port or 6379}{u.path or '/0'}"


class RedisSegmentStore(SegmentStore):
    """A `SegmentStore` whose segments are shared with every replica on the same Redis (module docstring).

    url: redis://[user:password@]host:port/db. client: a ready client instead (tests pass fakeredis).
    Call `connect(fingerprint)` to start, `close()` to stop.
    """

    def __init__(self, url: str, budget_bytes: int = 2 << 30, min_match_tokens: int = 16,
                 persist_dir=None, max_candidates: int = 32, *, stream_maxlen: int = STREAM_MAXLEN,
                 client=None, socket_timeout: float = 10.0):
        super().__init__(budget_bytes, min_match_tokens, persist_dir=persist_dir, max_candidates=max_candidates)
        if client is None:
            import redis  # only when a redis:// store is configured

            client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=socket_timeout)
        self.url, self.client, self.stream_maxlen = url, client, stream_maxlen
        self.replica = uuid.uuid4().hex[:12]  # announcements carry it; a replica skips its own
        self.shared = SharedStats()
        self.fingerprint: str | None = None
        self._remote: set[int] = set()  # ids of segments whose blob Redis has (stubs and published ones)
        self._pinned: set[int] = set()  # never evicted (matches being fetched)
        self._skip: set[int] = set()  # not matched by the `find` in progress
        self._outbox: queue.Queue[Segment] = queue.Queue(OUTBOX)
        self._online = threading.Event()
        self._synced = threading.Event()  # the first pass over the stream is done
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._last_id = b"0"
        self._threads: list[threading.Thread] = []

    # ---- keys ----------------------------------------------------------------------------------

    def _ns(self) -> str:
        return "relay:" + hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]

    def blob_key(self, content_key: str) -> str:
        return f"{self._ns()}:seg:{content_key}"

    @property
    def stream_key(self) -> str:
        return f"{self._ns()}:new"

    # ---- lifecycle -----------------------------------------------------------------------------

    def connect(self, fingerprint: str, wait_s: float = 2.0) -> None:
        """Start following and publishing segments made with `fingerprint`; wait up to `wait_s` for the
        first pass over the stream (a replica starting next to running ones sees their segments at once)."""
        if self._threads:
            return
        self.fingerprint = fingerprint
        for name, target in (("follow", self._follow), ("publish", self._publish_loop)):
            t = threading.Thread(target=target, name=f"relay-redis-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._synced.wait(wait_s)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        try:
            self.client.close()
        except Exception:  # closing a broken connection
            pass

    @property
    def connected(self) -> bool:
        return self._online.is_set()

    def _went_offline(self, exc: BaseException) -> None:
        with self._state_lock:  # the follower, the publisher and a request may all see it: log once
            if self._online.is_set() or not self.shared.disconnects:
                log.warning("relay-llm: Redis at %s unreachable (%s): serving from the local store, reconnecting "
                            "with backoff", _where(self.url), exc)
                self.shared.disconnects += 1
            self._online.clear()
            self.shared.connected = False

    # ---- follower: bootstrap, then follow the stream -------------------------------------------

    def _follow(self) -> None:
        import redis

        delay = BACKOFF[0]
        while not self._stop.is_set():
            try:
                if not self._online.is_set():
                    self.client.ping()
                    log.info("relay-llm: shared segment store on Redis at %s (%s)", _where(self.url),
                             "reconnected" if self.shared.disconnects else "connected")
                    self._online.set()
                    self.shared.connected = True
                got = self.client.xread({self.stream_key: self._last_id}, count=256, block=500)
                for _, entries in got or ():
                    for entry_id, fields in entries:
                        self._announced(fields)
                        self._last_id = entry_id
                if not got:
                    self._synced.set()
                delay = BACKOFF[0]
            except (redis.RedisError, OSError) as exc:
                self._went_offline(exc)
                self._synced.set()
                self._stop.wait(delay)
                delay = min(2 * delay, BACKOFF[1])

    def _announced(self, fields: dict) -> None:
        """Index another replica's new segment (a stub), unless it is ours or known."""
        try:
            if fields[b"origin"].decode() == self.replica:
                return
            ids = torch.from_numpy(np.frombuffer(fields[b"ids"], dtype="<i4").astype(np.int64))
            stub = Segment(token_ids=ids, keys=None, values=None, start_pos=int(fields[b"start"]),
                           fingerprint=self.fingerprint, kind=fields[b"kind"].decode(),
                           hidden_layer=int(fields[b"layer"]))
            key = fields[b"key"].decode()
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            log.warning("relay-llm: skipping a malformed segment announcement (%s)", exc)
            return
        if stub.content_key != key:
            log.warning("relay-llm: skipping announcement %s: its token ids do not match its key", key)
            return
        with self._lock:
            if key not in self._by_content and super().add(stub, persist=False):
                self._remote.add(stub.id)
                self.shared.announced += 1

    # ---- publishing ----------------------------------------------------------------------------

    def add(self, seg: Segment, persist: bool = True) -> bool:
        with self._lock:
            held = self._by_content.get(seg.content_key)
            if held is not None and self._segments[held].keys is None and seg.keys is not None:
                self._fill(held, seg)  # we made what another replica announced: keep our K/V
                return False
            added = super().add(seg, persist)
        if added and seg.keys is not None and self.fingerprint is not None and seg.fingerprint == self.fingerprint:
            self._post(seg)
        return added

    def _post(self, seg: Segment) -> None:
        while True:
            try:
                self._outbox.put_nowait(seg)
                return
            except queue.Full:
                try:
                    self._outbox.get_nowait()
                    self.shared.unpublished += 1
                except queue.Empty:
                    pass

    def _publish_loop(self) -> None:
        import redis

        while not self._stop.is_set():
            try:
                seg = self._outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            while not self._stop.is_set():
                if not self._online.wait(0.5):
                    continue
                try:
                    self.publish(seg)
                    break
                except (redis.RedisError, OSError) as exc:
                    self._went_offline(exc)

    def publish(self, seg: Segment) -> bool:
        """SET NX the blob of `seg` and, if this call set it, announce it. True if it was set here."""
        key = seg.content_key
        blob = wire.pack(seg)
        fresh = bool(self.client.set(self.blob_key(key), blob, nx=True))
        if fresh:
            ids = seg.token_ids.to(torch.int32).numpy().astype("<i4").tobytes()
            self.client.xadd(self.stream_key, {"key": key, "ids": ids, "start": seg.start_pos, "kind": seg.kind,
                                               "layer": seg.hidden_layer, "bytes": len(blob), "origin": self.replica},
                             maxlen=self.stream_maxlen, approximate=True)
            self.shared.published += 1
        with self._lock:
            sid = self._by_content.get(key)
            if sid is not None:
                self._remote.add(sid)
        return fresh

    # ---- finding: fetch the blobs of matched stubs ---------------------------------------------

    def _acceptor(self, fingerprint: str | None):
        segs, skip, online = self._segments, self._skip, self._online.is_set()

        def accept(sid: int) -> bool:
            seg = segs[sid]
            if sid in skip or (seg.keys is None and not online):
                return False
            return fingerprint is None or seg.fingerprint == fingerprint

        return accept

    def find(self, ids: list[int], lo: int = 0, hi: int | None = None, fingerprint: str | None = None,
             touch: bool = True) -> list[Match]:
        """As `SegmentStore.find`; matched stubs get their blobs from Redis first. A stub whose blob cannot be
        had is left out and the prompt is matched again without it (its tokens may match elsewhere)."""
        with self._lock:
            try:
                for _ in range(4):
                    out = super().find(ids, lo, hi, fingerprint, touch=False)
                    stubs = sorted({m.segment_id for m in out if self._segments[m.segment_id].keys is None})
                    if not stubs or not self._fetch(stubs, {m.segment_id for m in out}):
                        break
                else:
                    out = []
                for m in out:
                    m.segment = self._segments[m.segment_id]
                out = [m for m in out if m.segment.keys is not None]
            finally:
                self._skip.clear()
            if touch:
                self.touch(out)
            return out

    def _fetch(self, stubs: list[int], matched: set[int]) -> bool:
        """Fill `stubs` from Redis. True if any could not be filled (they are then skipped or dropped)."""
        import redis

        if not self._online.is_set():
            self._skip.update(stubs)
            return True
        try:
            blobs = self.client.mget([self.blob_key(self._content_of[sid]) for sid in stubs])
        except (redis.RedisError, OSError) as exc:
            self._went_offline(exc)
            self._skip.update(stubs)
            return True
        failed = False
        self._pinned = set(matched)
        try:
            for sid, blob in zip(stubs, blobs, strict=True):
                stub = self._segments[sid]
                try:
                    full = wire.unpack(blob, stub.fingerprint)
                    if not torch.equal(full.token_ids, stub.token_ids):
                        raise wire.BadBlob("its token ids are not the announced ones")
                except wire.BadBlob as exc:
                    failed = True
                    if blob is None:
                        self.shared.gone += 1
                    else:
                        self.shared.bad += 1
                        log.warning("relay-llm: skipping shared segment %s: %s", self._content_of[sid], exc)
                        self._delete(self._content_of[sid])
                    self._remove(sid)
                    continue
                self.shared.fetched += 1
                self.shared.fetched_bytes += len(blob)
                if not self._fill(sid, full):
                    failed = True
                    self._skip.add(sid)
        finally:
            self._pinned = set()
        return failed

    def _fill(self, sid: int, full: Segment) -> bool:
        """Give index entry `sid` the K/V of `full` (same tokens), making room. False if it cannot fit."""
        stub = self._segments[sid]
        seg = dataclasses.replace(stub, keys=full.keys, values=full.values, hidden=full.hidden, context=full.context,
                                  start_pos=full.start_pos, hidden_layer=full.hidden_layer)
        extra = seg.charged_bytes - stub.charged_bytes
        pinned = sid in self._pinned
        self._pinned.add(sid)
        try:
            self._make_room(extra)
        finally:
            if not pinned:
                self._pinned.discard(sid)
        if self.stats.bytes + extra > self.budget_bytes:
            return False
        self._replace(sid, seg)
        return True

    def _delete(self, content_key: str) -> None:
        try:
            self.client.delete(self.blob_key(content_key))
        except Exception:  # best effort: the next SET NX of this content would be refused, nothing worse
            pass

    # ---- eviction: drop blobs Redis holds before dropping entries ------------------------------

    def _replace(self, sid: int, seg: Segment) -> None:
        """Swap the object of entry `sid` (a new object: matches holding the old one keep their tensors)."""
        self._account(self._segments[sid], -1)
        self._segments[sid] = seg
        self._account(seg, +1)

    def _make_room(self, nbytes: int) -> list[str]:
        """Free blobs by priority first (a blob Redis has is dropped, its entry kept; one it lacks is
        evicted with its entry); only if that is not enough, drop entries without blobs, by priority."""
        evicted: list[str] = []
        for entries_too in (False, True):
            kept = []
            while self.stats.bytes + nbytes > self.budget_bytes and self._heap:
                entry = heapq.heappop(self._heap)
                prio, _, sid = entry
                seg = self._segments.get(sid)
                if seg is None or seg.priority != prio:
                    continue
                if sid in self._pinned or (seg.keys is None and not entries_too):
                    kept.append(entry)
                    continue
                self._floor = max(self._floor, prio)
                if seg.keys is not None and sid in self._remote:
                    self._replace(sid, dataclasses.replace(seg, keys=None, values=None, hidden=None))
                    self.shared.demoted += 1
                    evicted.append(self._content_of[sid])
                    kept.append(entry)
                    continue
                evicted.append(self._remove(sid))
                self.stats.evictions += 1
            for entry in kept:
                heapq.heappush(self._heap, entry)
            if self.stats.bytes + nbytes <= self.budget_bytes:
                break
        self._compact_heap()
        return evicted

    def _remove(self, seg_id: int) -> str:
        self._remote.discard(seg_id)
        return super()._remove(seg_id)
