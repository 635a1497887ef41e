"""Prometheus text-format metrics (exposition format 0.0.4), kept by hand: no extra dependency."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from relay_llm.stats import RequestStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, n in zip((*map(_num, self.buckets), "+Inf"), self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {_num(self.sum)}", f"{name}_count {total}"]


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# One metric: (name, type, help, samples). Samples: a value (one unlabelled sample), a Histogram, or ready lines.
_Row = tuple[str, str, str, int | float | Histogram | list[str]]


def _render(rows: list[_Row]) -> list[str]:
    """The # HELP / # TYPE / sample lines of each row, in order."""
    lines: list[str] = []
    for name, kind, help, samples in rows:
        if isinstance(samples, Histogram):
            samples = samples.lines(name)
        elif not isinstance(samples, list):
            samples = [f"{name} {samples}"]
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples])
    return lines


class Metrics:
    """Request counts, token counters, TTFT and duration histograms; store gauges read at scrape time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.generated_tokens = 0
        self.recomputed_cells = 0
        self.reusable_cells = 0
        self.generations = 0
        self.cancelled = 0
        self.in_flight = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1
            self.duration.observe(seconds)

    def generation_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def generation_ended(self, stats: RequestStats | None) -> None:
        """`stats` of a finished generation, or None if it was cancelled or failed."""
        with self._lock:
            self.in_flight -= 1
            if stats is None:
                self.cancelled += 1
                return
            self.generations += 1
            self.prompt_tokens += stats.prompt_tokens
            self.reused_tokens += stats.reused_tokens
            self.generated_tokens += stats.completion_tokens
            self.recomputed_cells += stats.recomputed_cells
            self.reusable_cells += stats.reusable_cells
            self.ttft.observe(stats.ttft_s)

    def render(self, store_stats=None, prefix_bytes: int | None = None, load: dict | None = None,
               shared=None) -> str:
        """The exposition text: this object's metrics, then the store's, the prefix cache's, the scheduler's
        (`RelayEngine.load_stats()`) and a shared store's (`redis_store.SharedStats`) where given."""
        with self._lock:
            rows: list[_Row] = [
                ("relay_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                 [f'relay_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]),
                ("relay_request_duration_seconds", "histogram", "HTTP request duration (streams: until the end).",
                 self.duration),
                ("relay_generations_total", "counter", "Generations that ran to the end.", self.generations),
                ("relay_generations_cancelled_total", "counter", "Generations cancelled (client gone) or failed.",
                 self.cancelled),
                ("relay_generations_in_flight", "gauge", "Generations running or queued on the engine.",
                 self.in_flight),
                ("relay_prompt_tokens_total", "counter", "Prompt tokens of finished generations.", self.prompt_tokens),
                ("relay_reused_tokens_total", "counter", "Prompt tokens whose stored K/V was reused.",
                 self.reused_tokens),
                ("relay_generated_tokens_total", "counter", "Generated (completion) tokens.", self.generated_tokens),
                ("relay_recomputed_cells_total", "counter", "Recomputed (token, layer) cells of reusable content.",
                 self.recomputed_cells),
                ("relay_reusable_cells_total", "counter", "All (token, layer) cells of reusable content.",
                 self.reusable_cells),
                ("relay_ttft_seconds", "histogram", "Engine time to first token (from the start of the job).",
                 self.ttft),
            ]
            lines = _render(rows)  # histograms are read here, under the lock
        read_now: list[_Row] = []  # the store and prefix cache, read at scrape time
        if store_stats is not None:
            read_now += [
                ("relay_store_bytes", "gauge", "Bytes the segment store's budget counts (K/V, hidden states, ids, "
                 "k-gram index).", store_stats.bytes),
                ("relay_store_budget_bytes", "gauge", "Byte budget of the segment store.", store_stats.budget_bytes),
                ("relay_store_segments", "gauge", "Segments held in the segment store.", store_stats.segments),
                ("relay_store_evictions_total", "counter", "Segments evicted from the store.", store_stats.evictions),
            ]
        if prefix_bytes is not None:
            read_now.append(("relay_prefix_cache_bytes", "gauge", "Bytes of K/V held in the exact-prefix cache.",
                             prefix_bytes))
        if load is not None:
            read_now += [
                ("relay_queue_depth", "gauge", "Generations waiting to be admitted to the batch.", load["waiting"]),
                ("relay_running_sequences", "gauge", "Generations admitted (prefilling or decoding).", load["running"]),
                ("relay_batch_size", "gauge", "Sequences in the last decode step.", load["batch_size"]),
                ("relay_decode_steps_total", "counter", "Batched decode steps run.", load["decode_steps"]),
                ("relay_kv_reserved_bytes", "gauge", "Bytes of K/V buffers held by admitted generations.",
                 load["kv_reserved_bytes"]),
            ]
        if shared is not None:
            read_now += [
                ("relay_shared_store_connected", "gauge", "1 if the shared (Redis) store is reachable now.",
                 int(shared.connected)),
                ("relay_shared_store_published_total", "counter", "Segments this replica wrote to the shared store.",
                 shared.published),
                ("relay_shared_store_announced_total", "counter", "Segments of other replicas added to the index.",
                 shared.announced),
                ("relay_shared_store_fetched_total", "counter", "Blobs fetched from the shared store on a match.",
                 shared.fetched),
                ("relay_shared_store_fetched_bytes_total", "counter", "Bytes of blobs fetched.", shared.fetched_bytes),
                ("relay_shared_store_gone_total", "counter", "Matched blobs the shared store had evicted (misses).",
                 shared.gone),
                ("relay_shared_store_bad_total", "counter", "Blobs skipped as truncated, corrupt or foreign.",
                 shared.bad),
                ("relay_shared_store_disconnects_total", "counter", "Times the shared store became unreachable.",
                 shared.disconnects),
            ]
        return "\n".join([*lines, *_render(read_now)]) + "\n"

