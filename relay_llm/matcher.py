"""Find stored token stretches inside a new prompt's token ids: hash of k-grams -> candidates -> extend.

Every window of k consecutive ids of every stored segment is indexed by a 64-bit polynomial hash
(k = `min_match_tokens`). A lookup hashes every window of the prompt (k vectorised numpy passes), probes
the index once per window, and extends each candidate left and right over equal ids. A candidate that
lies on a diagonal (segment, offset - position) already being followed is skipped, so each reused stretch
is extended once. The cost grows with the prompt's length (and the length of what is found), not with the
number of stored segments; a k-gram that occurs in very many stored places (repetitive text) is only
followed for its `max_candidates` newest occurrences.

Found stretches ("runs") may overlap, e.g. the same output stored twice, or a quote that spans two stored
chunks. `select` keeps non-overlapping pieces, longest first, trimming later runs around earlier ones;
a piece shorter than k is dropped. Every returned `Match` is token-for-token equal to its segment, so the
K/V spliced at a prompt position always belongs to the id actually at that position: where re-tokenisation
changes ids (at a span's edges or inside it), the changed tokens are simply not matched, i.e. new tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier: the hash is sum(id_j * B^(k-1-j)) mod 2^64
_MIX = np.uint64(0xBF58476D1CE4E5B9)


@dataclass
class Match:
    """Prompt tokens [start, start + length) equal segment tokens [offset, offset + length).

    segment: the stored `Segment` itself (so a later eviction cannot pull it away mid-request).
    """

    start: int
    segment_id: int
    offset: int
    length: int
    segment: Any = field(default=None, repr=False, compare=False)

    @property
    def end(self) -> int:
        return self.start + self.length


def window_hashes(ids: np.ndarray, k: int) -> np.ndarray:
    """[n - k + 1] uint64 hashes of every window of k ids of `ids` ([n] int64); empty if n < k."""
    n = ids.shape[0]
    if n < k:
        return np.empty(0, dtype=np.uint64)
    a = ids.astype(np.uint64)
    m = n - k + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * _BASE + a[j : j + m]  # wraps modulo 2^64
        h ^= h >> np.uint64(31)
        h *= _MIX
    return h


CONTEXT_K = 4  # k-grams of 4 ids: long enough that different texts rarely share one, short enough to see edits


def context_sketch(ids: Sequence[int]) -> np.ndarray:
    """Sorted unique hashes of the CONTEXT_K-grams of `ids`: what a segment saw before it ([m] uint64)."""
    return np.unique(window_hashes(np.asarray(ids, dtype=np.int64), CONTEXT_K))


def changed_grams(before: Sequence[int], sketch: np.ndarray | None) -> int:
    """How many CONTEXT_K-grams of `before` (the prompt ahead of a span) the span's segment never saw ahead of
    it (`sketch`, from `context_sketch`; None = unknown: all of them)."""
    grams = window_hashes(np.asarray(before, dtype=np.int64), CONTEXT_K)
    return int(grams.size if sketch is None else (~np.isin(grams, sketch)).sum())


class KGramIndex:
    """k-gram hash -> [(segment id, offset)] for the token ids of stored segments.

    Memory: one dict entry per stored token (about 100 bytes), independent of the model.
    """

    def __init__(self, k: int, max_candidates: int = 32):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.max_candidates = max_candidates
        self._table: dict[int, list[tuple[int, int]]] = {}
        self.entries = 0

    def __len__(self) -> int:
        return self.entries

    def add(self, seg_id: int, ids: np.ndarray) -> None:
        """Index every k-gram of `ids` ([n] int64) as (seg_id, offset)."""
        table = self._table
        for off, h in enumerate(window_hashes(ids, self.k).tolist()):
            bucket = table.get(h)
            if bucket is None:
                table[h] = [(seg_id, off)]
            else:
                bucket.append((seg_id, off))
            self.entries += 1

    def remove(self, seg_id: int, ids: np.ndarray) -> None:
        table = self._table
        for h in set(window_hashes(ids, self.k).tolist()):
            bucket = table.get(h)
            if bucket is None:
                continue
            kept = [e for e in bucket if e[0] != seg_id]
            self.entries -= len(bucket) - len(kept)
            if kept:
                table[h] = kept
            else:
                del table[h]

    def clear(self) -> None:
        self._table.clear()
        self.entries = 0

    def runs(self, prompt: np.ndarray, lo: int, hi: int, tokens: Callable[[int], np.ndarray | None],
             accept: Callable[[int], bool] | None = None) -> list[tuple[int, int, int, int]]:
        """Maximal equal stretches between `prompt[lo:hi]` and stored segments.

        prompt: [n] int64. tokens(seg_id): that segment's ids ([m] int64), None if gone. accept(seg_id):
        whether the segment may be used (fingerprint). Returns (start, end, seg_id, offset_at_start)
        tuples, each at least k long, in order of discovery (left to right).
        """
        k = self.k
        if hi - lo < k:
            return []
        hashes = window_hashes(prompt[lo:hi], k).tolist()
        table = self._table
        followed: dict[tuple[int, int], int] = {}  # (seg_id, offset - position) -> end of the run there
        out: list[tuple[int, int, int, int]] = []
        for j, h in enumerate(hashes):
            bucket = table.get(h)
            if bucket is None:
                continue
            i = lo + j
            for seg_id, off in bucket[-self.max_candidates :]:
                diag = (seg_id, off - i)
                if followed.get(diag, -1) > i:
                    continue  # inside a run already found on this diagonal
                if accept is not None and not accept(seg_id):
                    continue
                seg = tokens(seg_id)
                if seg is None:
                    continue
                end = i + _equal_run(prompt, i, hi, seg, off)
                if end - i < k:
                    continue  # hash collision
                start, o = i, off
                while start > lo and o > 0 and prompt[start - 1] == seg[o - 1]:
                    start -= 1
                    o -= 1
                followed[diag] = end
                out.append((start, end, seg_id, o))
        return out


def _equal_run(a: np.ndarray, i: int, hi: int, b: np.ndarray, j: int) -> int:
    """How many ids a[i:], b[j:] have equal from the start (a bounded by hi)."""
    n = min(hi - i, b.shape[0] - j)
    if n <= 0:
        return 0
    neq = np.flatnonzero(a[i : i + n] != b[j : j + n])
    return int(neq[0]) if neq.size else n


def select(runs: Iterable[tuple[int, int, int, int]], min_len: int,
           rank: Callable[[int], Any] | None = None) -> list[Match]:
    """Non-overlapping pieces of `runs` covering as much as greedily possible, sorted by start.

    Longest run first (ties: higher `rank(seg_id)`, default the newer segment id); each later run is trimmed
    around the pieces already taken, and only its pieces of at least `min_len` tokens are kept.
    """
    order = sorted(runs, key=lambda r: (-(r[1] - r[0]), _neg(rank(r[2]) if rank else r[2]), r[0]))
    starts: list[int] = []  # sorted starts of taken pieces
    taken: list[Match] = []  # parallel to starts
    for s, e, seg_id, off in order:
        for ps, pe in _gaps(starts, taken, s, e):
            if pe - ps >= min_len:
                at = bisect.bisect_left(starts, ps)
                starts.insert(at, ps)
                taken.insert(at, Match(ps, seg_id, off + (ps - s), pe - ps))
    return taken


MAX_HOLE = 4  # prompt and stored tokens a re-tokenisation may change between two pieces of one span
MIN_PIECE = 3  # the shortest piece past such a hole that is matched


def bridge(matches: list[Match], prompt: np.ndarray, lo: int, hi: int,
           tokens: Callable[[int], np.ndarray | None]) -> list[Match]:
    """`matches` (sorted, disjoint) plus the pieces of their segments found across re-tokenisation holes.

    A stored output re-tokenised in a prompt ("ISSU"+"E" written as "ISS"+"UE") differs in a few ids here
    and there; the k-gram lookup finds only the long stretches between such holes. From each match's
    edges this looks past up to MAX_HOLE differing ids on either side for the segment to go on (at least
    MIN_PIECE equal ids), and takes that piece too, as long as it stays clear of the other matches. The
    pieces of one segment that follow each other across holes are one span to the schedules (`span_groups`).
    """
    out = list(matches)
    at = 0
    while at < len(out):
        m = out[at]
        seg = tokens(m.segment_id)
        if seg is None:
            at += 1
            continue
        right = out[at + 1].start if at + 1 < len(out) else hi
        end_off = m.offset + m.length
        piece = _across(prompt[m.end : right], seg[end_off:])
        if piece is not None:
            dp, dq, length = piece
            out.insert(at + 1, Match(m.end + dp, m.segment_id, end_off + dq, length, m.segment))
        left = out[at - 1].end if at > 0 else lo
        piece = _across(prompt[left : m.start][::-1], seg[: m.offset][::-1])  # leftwards: both reversed
        if piece is not None:
            dp, dq, length = piece
            out.insert(at, Match(m.start - dp - length, m.segment_id, m.offset - dq - length, length, m.segment))
            continue  # look past the new piece's left edge too
        at += 1
    return out


def _across(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int] | None:
    """The nearest piece past a hole: a, b are the prompt's and the segment's ids going away from a match's
    edge. Returns (hole in a, hole in b, piece length) for holes of at most MAX_HOLE ids each and a piece of
    at least MIN_PIECE equal ids (smallest hole first, then the longest piece), else None."""
    best = None
    for dp in range(MAX_HOLE + 1):
        for dq in range(MAX_HOLE + 1):
            if dp == dq == 0:
                continue
            length = _equal_run(a, dp, a.shape[0], b, dq)
            if length >= MIN_PIECE and (best is None or (dp + dq, -length) < best[0]):
                best = ((dp + dq, -length), (dp, dq, length))
    return best[1] if best is not None else None


def span_groups(spans: Sequence[Match]) -> list[list[int]]:
    """Indices of `spans` (sorted by start) grouped into logical spans: consecutive pieces of one segment,
    in order, with at most MAX_HOLE ids between them in the prompt and in the segment."""
    groups: list[list[int]] = []
    for i, m in enumerate(spans):
        if groups:
            prev = spans[groups[-1][-1]]
            gap = m.offset - (prev.offset + prev.length)
            if m.segment_id == prev.segment_id and 0 <= m.start - prev.end <= MAX_HOLE and 0 <= gap <= MAX_HOLE:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _neg(x):
    return tuple(-v for v in x) if isinstance(x, tuple) else -x


def _gaps(starts: list[int], taken: list[Match], s: int, e: int) -> list[tuple[int, int]]:
    """Parts of [s, e) not covered by the (disjoint, sorted) taken pieces."""
    out = []
    at = max(bisect.bisect_right(starts, s) - 1, 0)
    cur = s
    while at < len(taken) and taken[at].start < e:
        m = taken[at]
        if m.end > cur:
            if m.start > cur:
                out.append((cur, m.start))
            cur = max(cur, m.end)
        at += 1
    if cur < e:
        out.append((cur, e))
    return out


def chunk_bounds(ids: Sequence[int], computed: Sequence[bool], boundaries: set[int], min_tokens: int,
                 max_tokens: int) -> list[tuple[int, int]]:
    """Stretches of a prompt worth storing as prefill segments: [(start, end)].

    A stretch is a maximal run of tokens that were computed in this prefill (`computed[i]`: neither an
    exact-prefix hit nor a reused span, i.e. not stored already) and are not boundary tokens (special and
    turn-marker ids, so stretches follow chat messages). Stretches shorter than `min_tokens` are skipped;
    longer ones than `max_tokens` are cut into near-equal chunks of at most `max_tokens`.
    """
    out: list[tuple[int, int]] = []
    n = len(ids)
    i = 0
    while i < n:
        if not computed[i] or ids[i] in boundaries:
            i += 1
            continue
        j = i
        while j < n and computed[j] and ids[j] not in boundaries:
            j += 1
        length = j - i
        if length >= min_tokens:
            parts = -(-length // max_tokens)
            step = -(-length // parts)
            out.extend((s, min(s + step, j)) for s in range(i, j, step))
        i = j
    return out
