"""Stored K/V: `Segment`s of generated text in a byte-budgeted LRU `SegmentStore`, and a `PrefixCache`.

Keys are stored as produced (post-RoPE) together with the position of their first token
(`Segment.start_pos`; tokens are contiguous). Splicing rotates them by `new_pos - start_pos`.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class Segment:
    """A stretch of text the engine processed, with its K/V.

    token_ids: [n] int64. keys, values: [num_layers, kv_heads, n, head_dim] (keys post-RoPE at
    positions start_pos .. start_pos + n - 1). hidden: [n, hidden_size] residual-stream input of
    `hidden_layer` for each token (None if not captured). kind: "decode" (generated) or "prefill".
    """

    token_ids: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    start_pos: int
    fingerprint: str
    kind: str = "decode"
    hidden: torch.Tensor | None = None
    hidden_layer: int = 0
    id: int = -1
    hits: int = 0

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def nbytes(self) -> int:
        tensors = [self.token_ids, self.keys, self.values] + ([self.hidden] if self.hidden is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StoreStats:
    segments: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    evictions: int = 0
    rejected: int = 0


class SegmentStore:
    """Segments under a byte budget, LRU-evicted, with a k-gram index for finding them in prompts.

    The index maps every k consecutive token ids of every segment (k = `min_match_tokens`) to
    (segment id, offset), so a lookup costs O(prompt length), independent of how many segments exist.
    The budget is never exceeded: a segment larger than the whole budget is refused.
    """

    def __init__(self, budget_bytes: int = 2 << 30, min_match_tokens: int = 16):
        self.budget_bytes = budget_bytes
        self.k = min_match_tokens
        self._segments: OrderedDict[int, Segment] = OrderedDict()  # LRU order: oldest first
        self._index: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self.stats = StoreStats(budget_bytes=budget_bytes)

    def __len__(self) -> int:
        return len(self._segments)

    def add(self, seg: Segment) -> bool:
        """Store `seg` (evicting least-recently-used segments as needed). False if it can never fit."""
        with self._lock:
            if seg.nbytes > self.budget_bytes or len(seg) < self.k:
                self.stats.rejected += 1
                return False
            while self.stats.bytes + seg.nbytes > self.budget_bytes:
                self._evict(next(iter(self._segments)))
            seg.id = next(self._ids)
            self._segments[seg.id] = seg
            self.stats.bytes += seg.nbytes
            self.stats.segments = len(self._segments)
            for off, gram in enumerate(self._grams(seg.token_ids.tolist())):
                self._index.setdefault(gram, []).append((seg.id, off))
            return True

    def _evict(self, seg_id: int) -> None:
        seg = self._segments.pop(seg_id)
        self.stats.bytes -= seg.nbytes
        self.stats.evictions += 1
        self.stats.segments = len(self._segments)
        for gram in self._grams(seg.token_ids.tolist()):
            entries = [e for e in self._index.get(gram, ()) if e[0] != seg_id]
            if entries:
                self._index[gram] = entries
            else:
                self._index.pop(gram, None)

    def clear(self) -> None:
        with self._lock:
            for seg_id in list(self._segments):
                self._evict(seg_id)

    def _grams(self, ids: list[int]):
        return (tuple(ids[i : i + self.k]) for i in range(len(ids) - self.k + 1))

    def get(self, seg_id: int) -> Segment | None:
        return self._segments.get(seg_id)

    def find(self, ids: list[int], lo: int, hi: int) -> list[Match]:
        """Non-overlapping stored stretches inside `ids[lo:hi]`, longest-first greedy, left to right.

        Each match is token-for-token equal, so the K/V spliced at a position always belongs to the id
        there. Touches (LRU) the segments it returns.
        """
        with self._lock:
            out: list[Match] = []
            i = lo
            while i + self.k <= hi:
                best: Match | None = None
                for seg_id, off in self._index.get(tuple(ids[i : i + self.k]), ()):
                    seg = self._segments[seg_id]
                    sid = seg.token_ids
                    n = self.k
                    while i + n < hi and off + n < len(seg) and ids[i + n] == int(sid[off + n]):
                        n += 1
                    if best is None or n > best.length:
                        best = Match(i, seg_id, off, n)
                if best is None:
                    i += 1
                    continue
                out.append(best)
                seg = self._segments[best.segment_id]
                seg.hits += 1
                self._segments.move_to_end(best.segment_id)
                i += best.length
            return out


@dataclass
class Match:
    """Prompt tokens [start, start + length) equal segment tokens [offset, offset + length)."""

    start: int
    segment_id: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class _PrefixEntry:
    token_ids: list[int]
    keys: torch.Tensor  # [num_layers, kv_heads, n, head_dim]
    values: torch.Tensor
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = 2 * self.keys.numel() * self.keys.element_size()


class PrefixCache:
    """Exact-prefix K/V of earlier prompts (lossless: same tokens at the same positions).

    Entries are LRU under their own byte budget. `lookup` returns the longest common prefix.
    """

    def __init__(self, budget_bytes: int = 512 << 20):
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, _PrefixEntry] = OrderedDict()
        self._ids = itertools.count()
        self._lock = threading.RLock()

    def add(self, token_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        with self._lock:
            entry = _PrefixEntry(list(token_ids), keys, values)
            if entry.nbytes > self.budget_bytes or not token_ids:
                return
            for eid, e in list(self._entries.items()):  # a longer entry supersedes its own prefixes
                if len(e.token_ids) <= len(token_ids) and token_ids[: len(e.token_ids)] == e.token_ids:
                    self._drop(eid)
            while self.bytes + entry.nbytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[next(self._ids)] = entry
            self.bytes += entry.nbytes

    def _drop(self, eid: int) -> None:
        self.bytes -= self._entries.pop(eid).nbytes

    def lookup(self, token_ids: list[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """(n, keys[:, :, :n], values[:, :, :n]) of the longest stored prefix of `token_ids`."""
        with self._lock:
            best_n, best_id = 0, None
            for eid, e in self._entries.items():
                n = _common_prefix(e.token_ids, token_ids)
                if n > best_n:
                    best_n, best_id = n, eid
            if best_id is None:
                return 0, None, None
            self._entries.move_to_end(best_id)
            e = self._entries[best_id]
            return best_n, e.keys[:, :, :best_n], e.values[:, :, :best_n]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
