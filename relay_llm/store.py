"""Stored K/V: `Segment`s in a byte-budgeted `SegmentStore`, and the radix exact-prefix `PrefixCache`.

Segments
    A segment is a stretch of text the engine processed: its generated output (kind "decode") or a chunk
    of a prompt it prefilled (kind "prefill"). Keys are stored as produced (post-RoPE) with the position of
    their first token (`Segment.start_pos`; tokens are contiguous); splicing rotates them by
    `new_pos - start_pos`. Every segment carries a fingerprint (model weights, dtype and profile version,
    see `RelayEngine.store_fingerprint`); the engine only splices segments whose fingerprint equals its own.

Budget
    `SegmentStore.budget_bytes` (default 2 GiB) bounds `Segment.charged_bytes` summed over the stored
    segments: their tensors (token ids, keys, values, hidden states) plus INDEX_BYTES_PER_TOKEN per token
    for the matcher's k-gram index entry and id copy (measured with tracemalloc at 160-200 bytes per token;
    tests/test_store.py checks the charge covers it). It is never exceeded: a segment larger than the whole
    budget is refused, and others are evicted before one is added. Python object headers are not counted.
    With persistence on, the folder mirrors the store, so it follows the same budget (plus a few hundred
    bytes of header per file and the index).

Eviction policy (GreedyDual-Size-Frequency, adapted)
    Each segment has a priority H = L + credit, set when it is added and whenever a request reuses it;
    the segment with the lowest H is evicted first (ties: least recently used first). L is the store's
    "age floor": it starts at 0 and rises to the H of each evicted segment, so anything not reused for a
    while falls below newcomers: plain LRU when nothing is reused. The credit weighs length against
    hotness:

        credit = base(kind) + log2(1 + reused_tokens / length)

    reused_tokens counts the tokens of this segment that requests have spliced in, so the credit is reuse
    per stored byte: a segment reused whole once earns +1, three times +2; a long segment of which only a
    16-token quote was reused earns almost nothing for the memory it holds. The log makes a once-hot
    segment age out in a few rounds of turnover rather than never. base is 1.0 for decode (generated) text
    and 0.5 for prefill (prompt) chunks, which are more speculative: among segments of one age, prompt
    chunks go first.

Exact-prefix cache
    `PrefixCache` is a radix tree over token ids (one tree per fingerprint); each node holds the K/V of its
    edge's tokens, so shared prefixes (system prompts, earlier turns) are stored once. Lookup walks the
    tree: O(prompt length). It has its own byte budget; least recently used leaves are evicted first.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .matcher import KGramIndex, Match, bridge, select

__all__ = ["Match", "PrefixCache", "Segment", "SegmentStore", "StoreStats"]

log = logging.getLogger(__name__)

KIND_BASE_CREDIT = {"decode": 1.0, "prefill": 0.5}
INDEX_BYTES_PER_TOKEN = 256  # what the budget charges per stored token for its k-gram entry and id copy


@dataclass(eq=False)
class Segment:
    """A stretch of text the engine processed, with its K/V.

    token_ids: [n] int64. keys, values: [num_layers, kv_heads, n, head_dim] (keys post-RoPE at
    positions start_pos .. start_pos + n - 1). hidden: [n, hidden_size] residual-stream input of
    `hidden_layer` for each token (None if not captured). kind: "decode" (generated) or "prefill".
    fingerprint: model weights + dtype + profile version the K/V were made with. context: sorted k-gram
    hashes of the tokens ahead of it when it was made (`matcher.context_sketch`), or None (unknown).
    """

    token_ids: torch.Tensor
    keys: torch.Tensor | None  # None (with values and hidden): an index entry whose K/V live in a shared store
    values: torch.Tensor | None
    start_pos: int
    fingerprint: str
    kind: str = "decode"
    hidden: torch.Tensor | None = None
    hidden_layer: int = 0
    id: int = -1
    hits: int = 0
    reused_tokens: int = 0  # tokens of this segment spliced into requests, summed over hits
    priority: float = field(default=0.0, repr=False)
    context: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the segment's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def index_bytes(self) -> int:
        """What the store's budget charges for its k-gram index entries and id copy."""
        return INDEX_BYTES_PER_TOKEN * len(self)

    @property
    def charged_bytes(self) -> int:
        """What the store's budget counts: its tensors, its share of the k-gram index, its context sketch."""
        return self.nbytes + self.index_bytes + (self.context.nbytes if self.context is not None else 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"token_ids": self.token_ids, "keys": self.keys, "values": self.values, "hidden": self.hidden}
        return {name: t for name, t in out.items() if t is not None}

    @property
    def content_key(self) -> str:
        """Hex digest of (fingerprint, token ids): equal keys = duplicate content."""
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(self.token_ids.to(torch.int64).cpu().numpy().tobytes())
        return h.hexdigest()[:32]


@dataclass
class StoreStats:
    """Counters of a `SegmentStore`. Read fields directly, or call it for a dict snapshot.

    bytes: what the budget counts (`Segment.charged_bytes` summed), of which index_bytes for the k-gram
    index. hits / misses: lookups (`find`) that returned at least one / no match. reused_tokens: tokens of
    stored segments handed to requests. evictions: segments evicted for space. rejected: segments refused
    (larger than the budget, or shorter than min_match_tokens). duplicates: adds of content already stored.
    """

    segments: int = 0
    bytes: int = 0
    index_bytes: int = 0
    budget_bytes: int = 0
    tokens: int = 0
    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    evictions: int = 0
    rejected: int = 0
    duplicates: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # kind -> segments

    def __call__(self) -> dict:
        """A snapshot: entries (= segments), bytes, hits, misses, evictions, ..., bytes_per_token."""
        d = asdict(self)
        d["entries"] = self.segments
        d["bytes_per_token"] = self.bytes / self.tokens if self.tokens else 0.0
        return d


class SegmentStore:
    """Segments under a byte budget, evicted by the policy in the module docstring, found by k-grams.

    budget_bytes: bound on the stored segments' `charged_bytes`. min_match_tokens: k of the k-gram index,
    and the shortest match `find` returns. persist_dir: if given, a folder that mirrors the store (see `persist`); call
    `load_persisted(fingerprint)` to reload it. Thread-safe.
    """

    def __init__(self, budget_bytes: int = 2 << 30, min_match_tokens: int = 16, persist_dir: str | Path | None = None,
                 max_candidates: int = 32):
        self.budget_bytes = budget_bytes
        self.k = min_match_tokens
        self._segments: dict[int, Segment] = {}
        self._tokens: dict[int, np.ndarray] = {}  # seg id -> token ids as int64 numpy (for matching)
        self._by_content: dict[str, int] = {}
        self._content_of: dict[int, str] = {}
        self._index = KGramIndex(min_match_tokens, max_candidates)
        self._heap: list[tuple[float, int, int]] = []  # (priority, tick, seg id); stale entries skipped
        self._floor = 0.0  # L of the eviction policy
        self._ids = itertools.count()
        self._ticks = itertools.count()
        self._lock = threading.RLock()
        self.stats = StoreStats(budget_bytes=budget_bytes)
        self.files = None
        if persist_dir is not None:
            from .persist import SegmentFiles

            self.files = SegmentFiles(persist_dir)

    def __len__(self) -> int:
        return len(self._segments)

    def __iter__(self):
        with self._lock:
            return iter(list(self._segments.values()))

    def get(self, seg_id: int) -> Segment | None:
        return self._segments.get(seg_id)

    # ---- adding and evicting -------------------------------------------------------------------

    def add(self, seg: Segment, persist: bool = True) -> bool:
        """Store `seg`, evicting by priority as needed. False if refused (larger than the budget, shorter
        than min_match_tokens) or if the same content with the same fingerprint is stored already (that
        one is kept and refreshed). persist: write it to the persist folder (if any)."""
        with self._lock:
            self.stats.budget_bytes = self.budget_bytes
            if seg.charged_bytes > self.budget_bytes or len(seg) < self.k:
                self.stats.rejected += 1
                return False
            key = seg.content_key
            if key in self._by_content:
                self.stats.duplicates += 1
                self._set_priority(self._segments[self._by_content[key]])
                return False
            evicted = self._make_room(seg.charged_bytes)
            seg.id = next(self._ids)
            self._segments[seg.id] = seg
            ids = seg.token_ids.to(torch.int64).cpu().numpy()
            self._tokens[seg.id] = ids
            self._by_content[key] = seg.id
            self._content_of[seg.id] = key
            self._index.add(seg.id, ids)
            self._account(seg, +1)
            self._set_priority(seg)
            if self.files is not None and (persist or evicted):
                if persist:
                    self.files.write(seg, key)
                self.files.commit(removed=evicted)
            return True

    def _account(self, seg: Segment, sign: int) -> None:
        s = self.stats
        s.bytes += sign * seg.charged_bytes
        s.index_bytes += sign * seg.index_bytes
        s.tokens += sign * len(seg)
        s.segments = len(self._segments)
        s.by_kind[seg.kind] = s.by_kind.get(seg.kind, 0) + sign
        if not s.by_kind[seg.kind]:
            del s.by_kind[seg.kind]

    def _set_priority(self, seg: Segment) -> None:
        credit = KIND_BASE_CREDIT.get(seg.kind, 1.0) + math.log2(1 + seg.reused_tokens / max(len(seg), 1))
        seg.priority = self._floor + credit
        heapq.heappush(self._heap, (seg.priority, next(self._ticks), seg.id))

    def _make_room(self, nbytes: int) -> list[str]:
        """Evict lowest-priority segments until `nbytes` more fit. Returns their content keys."""
        evicted = []
        while self.stats.bytes + nbytes > self.budget_bytes and self._heap:
            prio, _, seg_id = heapq.heappop(self._heap)
            seg = self._segments.get(seg_id)
            if seg is None or seg.priority != prio:
                continue  # stale heap entry
            self._floor = max(self._floor, prio)
            evicted.append(self._remove(seg_id))
            self.stats.evictions += 1
        self._compact_heap()
        return evicted

    def _remove(self, seg_id: int) -> str:
        """Drop a segment from memory and the index; returns its content key."""
        seg = self._segments.pop(seg_id)
        ids = self._tokens.pop(seg_id)
        key = self._content_of.pop(seg_id)
        self._by_content.pop(key, None)
        self._index.remove(seg_id, ids)
        self._account(seg, -1)
        return key

    def _compact_heap(self) -> None:
        if len(self._heap) > 4 * len(self._segments) + 64:
            self._heap = [e for e in self._heap if e[2] in self._segments and self._segments[e[2]].priority == e[0]]
            heapq.heapify(self._heap)

    def remove(self, seg_id: int) -> None:
        """Drop one segment (and its file)."""
        with self._lock:
            if seg_id in self._segments:
                key = self._remove(seg_id)
                if self.files is not None:
                    self.files.commit(removed=[key])

    def clear(self) -> None:
        """Drop every segment (and every persisted file). Counters other than sizes are kept."""
        with self._lock:
            for seg_id in list(self._segments):
                self._remove(seg_id)
            self._heap.clear()
            self._floor = 0.0
            if self.files is not None:
                self.files.clear()

    # ---- finding -------------------------------------------------------------------------------

    def find(self, ids: list[int], lo: int = 0, hi: int | None = None, fingerprint: str | None = None,
             touch: bool = True) -> list[Match]:
        """Non-overlapping stored stretches inside `ids[lo:hi]`, sorted by start: each >= min_match_tokens,
        or a piece past a re-tokenisation hole next to one (`matcher.bridge`, >= MIN_PIECE tokens).

        Each match is token-for-token equal to its segment, so the K/V spliced at a position always
        belongs to the id there. fingerprint: only segments with this fingerprint (None: any). touch:
        count the matches as reuse (hits, priority); pass False and call `touch` for the ones used.
        """
        hi = len(ids) if hi is None else hi
        with self._lock:
            prompt = np.asarray(ids, dtype=np.int64)
            accept = self._acceptor(fingerprint)
            runs = self._index.runs(prompt, lo, hi, self._tokens.get, accept)
            out = select(runs, self.k)
            for m in out:
                m.segment = self._segments[m.segment_id]
            out = bridge(out, prompt, lo, hi, self._tokens.get)
            if touch:
                self.touch(out)
            return out

    def _acceptor(self, fingerprint: str | None):
        """The test `find` applies to candidate segment ids (None: every segment)."""
        if fingerprint is None:
            return None
        segs = self._segments
        return lambda sid: segs[sid].fingerprint == fingerprint

    def touch(self, matches: list[Match]) -> None:
        """Record that `matches` were reused: hit counters and eviction priority."""
        with self._lock:
            if matches:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
            for m in matches:
                seg = self._segments.get(m.segment_id)
                if seg is None:
                    continue
                seg.hits += 1
                seg.reused_tokens += m.length
                self.stats.reused_tokens += m.length
                self._set_priority(seg)

    # ---- shared backends (relay_llm.redis_store) ------------------------------------------------

    def connect(self, fingerprint: str) -> None:
        """Start sharing segments made with `fingerprint` (a shared backend); the in-memory store has none."""

    def close(self) -> None:
        """Stop any background work of a shared backend."""

    # ---- persistence ---------------------------------------------------------------------------

    def load_persisted(self, fingerprint: str) -> int:
        """Load the persist folder's segments made with `fingerprint`, oldest first. Returns how many.

        Entries with another fingerprint, and unreadable files, are skipped with a warning and removed.
        """
        if self.files is None:
            return 0
        loaded = 0
        with self._lock:
            for key, seg in self.files.load(fingerprint):
                if self.add(seg, persist=False):
                    loaded += 1
                elif key not in self._by_content:
                    self.files.commit(removed=[key])
        return loaded


# ---- exact-prefix cache --------------------------------------------------------------------------


class _Node:
    """A radix-tree node: the K/V of `tokens`, the edge from its parent."""

    __slots__ = ("tokens", "keys", "values", "children", "parent", "last_used")

    def __init__(self, tokens: list[int], keys: torch.Tensor | None, values: torch.Tensor | None,
                 parent: _Node | None, last_used: int):
        self.tokens = tokens
        self.keys = keys  # [num_layers, kv_heads, len(tokens), head_dim]
        self.values = values
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.last_used = last_used

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()


class PrefixCache:
    """Exact-prefix K/V of earlier sequences (lossless: same tokens at the same positions), as a radix tree.

    One tree per fingerprint; a node stores the K/V of its edge, so common prefixes are held once. Lookup
    and insertion are O(sequence length). Least recently used leaves are evicted to stay within
    `budget_bytes` (counted as keys + values bytes).
    """

    def __init__(self, budget_bytes: int = 512 << 20):
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.nodes = 0
        self.hits = self.misses = self.hit_tokens = self.evictions = 0
        self._roots: dict[str, _Node] = {}
        self._clock = itertools.count(1)
        self._lock = threading.RLock()

    def stats(self) -> dict:
        return {"nodes": self.nodes, "bytes": self.bytes, "budget_bytes": self.budget_bytes, "hits": self.hits,
                "misses": self.misses, "hit_tokens": self.hit_tokens, "evictions": self.evictions}

    def add(self, token_ids: list[int], keys: torch.Tensor, values: torch.Tensor, fingerprint: str = "") -> int:
        """Insert a sequence with its K/V ([num_layers, kv_heads, >= len(token_ids), head_dim]; only the part
        not stored yet is copied). Returns how many tokens were newly stored (0 if it cannot fit)."""
        ids = list(token_ids)
        with self._lock:
            root = self._roots.get(fingerprint)
            if root is None:
                root = self._roots[fingerprint] = _Node([], None, None, None, 0)
            now = next(self._clock)
            node, pos, path = root, 0, [root]
            while pos < len(ids):
                child = node.children.get(ids[pos])
                if child is None:
                    break
                m = _common(child.tokens, ids, pos)
                if m < len(child.tokens):
                    child = self._split(child, m)
                child.last_used = now
                path.append(child)
                node, pos = child, pos + m
            if pos == len(ids):
                return 0
            rest = ids[pos:]
            per_token = 2 * keys[:, :, :1].numel() * keys.element_size()
            need = per_token * len(rest)
            if need > self.budget_bytes:
                return 0
            self._evict_until(self.budget_bytes - need, protect=set(map(id, path)))
            leaf = _Node(rest, keys[:, :, pos : len(ids)].clone(), values[:, :, pos : len(ids)].clone(), node, now)
            node.children[rest[0]] = leaf
            self.bytes += leaf.nbytes
            self.nodes += 1
            return len(rest)

    def _split(self, child: _Node, m: int) -> _Node:
        """Cut `child`'s edge after m tokens; returns the new upper node (which keeps child below it)."""
        upper = _Node(child.tokens[:m], child.keys[:, :, :m].clone(), child.values[:, :, :m].clone(), child.parent,
                      child.last_used)
        child.parent.children[upper.tokens[0]] = upper
        child.tokens = child.tokens[m:]
        child.keys, child.values = child.keys[:, :, m:].clone(), child.values[:, :, m:].clone()
        child.parent = upper
        upper.children[child.tokens[0]] = child
        self.nodes += 1
        return upper

    def _evict_until(self, limit: int, protect: set[int]) -> None:
        while self.bytes > limit:
            leaves = [n for n in self._walk() if not n.children and id(n) not in protect and n.parent is not None]
            if not leaves:
                return
            victim = min(leaves, key=lambda n: n.last_used)
            del victim.parent.children[victim.tokens[0]]
            self.bytes -= victim.nbytes
            self.nodes -= 1
            self.evictions += 1

    def _walk(self):
        stack = list(self._roots.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def lookup(self, token_ids: list[int], fingerprint: str | None = "", limit: int | None = None,
               touch: bool = True) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """(n, keys[:, :, :n], values[:, :, :n]) of the longest stored prefix of `token_ids` (at most `limit`
        tokens). fingerprint: the tree to search; None searches every tree. touch: count the lookup (hits,
        misses) and refresh the nodes' LRU clock; False leaves the cache as it was."""
        ids = list(token_ids if limit is None else token_ids[:limit])
        with self._lock:
            roots = list(self._roots.values()) if fingerprint is None else [self._roots.get(fingerprint)]
            best: list[tuple[_Node, int]] = []
            for root in roots:
                if root is None:
                    continue
                pieces, node, pos = [], root, 0
                while pos < len(ids):
                    child = node.children.get(ids[pos])
                    if child is None:
                        break
                    m = _common(child.tokens, ids, pos)
                    pieces.append((child, m))
                    pos += m
                    if m < len(child.tokens):
                        break
                    node = child
                if sum(m for _, m in pieces) > sum(m for _, m in best):
                    best = pieces
            n = sum(m for _, m in best)
            if not n:
                self.misses += touch
                return 0, None, None
            if touch:
                now = next(self._clock)
                for node, _ in best:
                    node.last_used = now
                self.hits += 1
                self.hit_tokens += n
            keys = torch.cat([node.keys[:, :, :m] for node, m in best], dim=2)
            values = torch.cat([node.values[:, :, :m] for node, m in best], dim=2)
            return n, keys, values

    def clear(self) -> None:
        with self._lock:
            self._roots.clear()
            self.bytes = 0
            self.nodes = 0


def _common(edge: list[int], ids: list[int], pos: int) -> int:
    """Length of the common prefix of `edge` and ids[pos:]."""
    n = min(len(edge), len(ids) - pos)
    if edge[:n] == ids[pos : pos + n]:
        return n
    for i in range(n):
        if edge[i] != ids[pos + i]:
            return i
    return n
