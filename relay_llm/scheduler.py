"""The engine's model thread: continuous batching of generations, with plain calls run in between.

Every loop turn takes what arrived (calls run at once, in order; sequences join the waiting queue),
then prefills: it admits waiting sequences one after another while `max_batch` and the KV budget allow
and computes their prompts, up to `prefill_chunk_tokens` tokens in all (several short prompts, or one
chunk of a long one, see `prefill.Prefill`); then one decode step batches every running sequence's next
token (`Executor.step`). A long prompt thus delays running decodes by one chunk at a time, and a new
request waits only for the prefill work queued ahead of it plus one decode step per chunk.

The thread also loads the model (`RelayEngine.load`): libgomp throttles its threads' spin-waiting once
more threads than cores are in OpenMP teams, and every thread that runs a parallel torch op keeps a team,
so a model loaded on the caller's thread and run on this one decoded ~30 % slower (measured, 2 cores).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

import torch

from .executor import Executor
from .sequence import Sequence, State


class QueueFull(RuntimeError):
    """More generations are waiting than `max_queue` allows: retry later (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Done:
    """Queued to a caller after its job's last item."""


class Failed:
    """Queued to a caller instead of items when its job raised: `exc` is re-raised on the caller's thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Runner(Protocol):
    """What the scheduler needs from the engine."""

    executor: Executor
    capture_layer: int

    def begin(self, seq: Sequence) -> None:
        """Plan the sequence's prefill and allocate its buffers (`seq.prefill`)."""

    def finish(self, seq: Sequence) -> None:
        """Store what the sequence generated and emit its last chunk."""


class Scheduler:
    """One thread that owns the model. Limits are set by `configure` (the engine's config)."""

    def __init__(self):
        self.max_batch, self.max_queue, self.kv_budget_bytes, self.prefill_chunk_tokens = 8, 64, 4 << 30, 512
        self._runner: Runner | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: Sequence | None = None
        self._running: list[Sequence] = []
        self._queued = 0  # sequences added and not yet admitted (the inbox's and the waiting queue's)
        self._lock = threading.Lock()
        self._reserved = 0  # KV bytes of the admitted sequences' buffers
        self.last_batch = 0  # rows of the last decode step
        self.steps = 0  # decode steps run
        self.peak_batch = 0  # most rows of one decode step so far
        self._thread = threading.Thread(target=self._loop, name="relay-llm-worker", daemon=True)
        self._thread.start()

    def configure(self, runner: Runner, max_batch: int, max_queue: int, kv_budget_bytes: int,
                  prefill_chunk_tokens: int) -> None:
        if min(max_batch, max_queue, kv_budget_bytes, prefill_chunk_tokens) < 1:
            raise ValueError("max_batch, max_queue, kv_budget_bytes and prefill_chunk_tokens must be >= 1")
        self._runner = runner
        self.max_batch, self.max_queue, self.kv_budget_bytes = max_batch, max_queue, kv_budget_bytes
        self.prefill_chunk_tokens = prefill_chunk_tokens

    # ---- any thread ----------------------------------------------------------------------------

    def submit(self, fn: Callable) -> tuple[queue.Queue, threading.Event]:
        """Run `fn(emit, cancel)` on the thread, between steps; its items, then Done, go to the queue."""
        out: queue.Queue = queue.Queue()
        cancel = threading.Event()
        self._inbox.put((fn, out, cancel))
        return out, cancel

    def call(self, fn: Callable):
        """Run `fn()` on the thread and return its result (or raise its exception)."""
        out, _ = self.submit(lambda emit, c: emit(fn()))
        item = out.get()
        if isinstance(item, Failed):
            raise item.exc
        return item

    def add(self, seq: Sequence, kv_bytes: int) -> None:
        """Queue a generation needing `kv_bytes` of buffers. Raises ValueError if it can never fit the KV
        budget, QueueFull if `max_queue` sequences are waiting already."""
        if kv_bytes > self.kv_budget_bytes:
            raise ValueError(f"the request needs {kv_bytes} bytes of K/V buffers (prompt + max_new_tokens = "
                             f"{seq.capacity} tokens), more than the engine's KV budget of {self.kv_budget_bytes} "
                             "bytes: shorten the prompt or max_new_tokens")
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} generations are waiting (max_queue={self.max_queue}); retry later")
            self._queued += 1
        seq.kv_bytes = kv_bytes
        self._inbox.put(seq)

    def load(self) -> dict:
        """Queue depth (waiting sequences), running sequences, decode batch sizes, reserved KV bytes."""
        return {"waiting": self._queued, "running": len(self._running) + (self._prefilling is not None),
                "batch_size": self.last_batch, "peak_batch": self.peak_batch, "decode_steps": self.steps,
                "kv_reserved_bytes": self._reserved}

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=60)

    # ---- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            busy = bool(self._waiting or self._prefilling or self._running)
            for item in self._take(block=not busy):
                if item is None:
                    self._close_all()
                    return
                if isinstance(item, Sequence):
                    self._waiting.append(item)
                else:
                    self._run_call(*item)
            if self._runner is not None:
                self._step()

    def _take(self, block: bool) -> list:
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    @staticmethod
    def _run_call(fn: Callable, out: queue.Queue, cancel: threading.Event) -> None:
        try:
            if not cancel.is_set():
                fn(out.put, cancel)
            out.put(Done())
        except BaseException as exc:  # handed to the caller's thread
            out.put(Failed(exc))

    def _step(self) -> None:
        self._drop_cancelled()
        budget = self.prefill_chunk_tokens
        while budget > 0:
            self._admit()
            seq = self._prefilling
            if seq is None:
                break
            try:
                budget -= seq.prefill.step(budget)
                if seq.prefill.done:
                    self._prefilling = None
                    self._running.append(seq)
                    seq.start_decoding(seq.prefill.logits)
            except BaseException as exc:
                self._fail(seq, exc)
                break
        if self._running:
            self._decode(list(self._running))

    def _admit(self) -> None:
        while self._prefilling is None and self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            if self._running and self._reserved + seq.kv_bytes > self.kv_budget_bytes:
                return  # wait until running sequences free their buffers
            self._waiting.popleft()
            with self._lock:
                self._queued -= 1
            self._reserved += seq.kv_bytes
            self._prefilling = seq
            try:
                self._runner.begin(seq)
            except BaseException as exc:
                self._fail(seq, exc)

    def _decode(self, seqs: list[Sequence]) -> None:
        """Feed every running sequence's next token in one step; sample the ones still decoding."""
        runner = self._runner
        tokens = torch.tensor([s.next_token for s in seqs], dtype=torch.long)
        wanted = [i for i, s in enumerate(seqs) if s.state is State.DECODING]
        try:
            res = runner.executor.step(tokens, [s.kv for s in seqs], logit_rows=torch.tensor(wanted, dtype=torch.long),
                                       capture_layer=runner.capture_layer)
        except BaseException as exc:
            for s in seqs:
                self._fail(s, exc)
            return
        self.last_batch, self.steps, self.peak_batch = len(seqs), self.steps + 1, max(self.peak_batch, len(seqs))
        row = 0
        for i, s in enumerate(seqs):
            if res.captured is not None:
                s.hidden.append(res.captured[i : i + 1])
            try:
                if s.state is State.CLOSING:
                    self._leave(s)
                    runner.finish(s)
                    s.emit(Done())
                else:
                    s.accept(res.logits[row])
                    row += 1
            except BaseException as exc:
                self._fail(s, exc)

    def _leave(self, seq: Sequence) -> None:
        """Take `seq` out of the scheduler and release its buffers' reservation."""
        if seq.state is State.DONE:
            return
        if seq in self._waiting:
            self._waiting.remove(seq)
            with self._lock:
                self._queued -= 1
        else:
            self._reserved -= seq.kv_bytes
        if self._prefilling is seq:
            self._prefilling = None
        if seq in self._running:
            self._running.remove(seq)
        seq.state = State.DONE

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._leave(seq)
        seq.emit(Failed(exc))

    def _drop_cancelled(self) -> None:
        """Cancelled sequences leave at once; nothing of theirs is stored (their stream has ended already)."""
        for seq in [*self._waiting, *([self._prefilling] if self._prefilling else []), *self._running]:
            if seq.cancel.is_set():
                self._leave(seq)

    def _close_all(self) -> None:
        for seq in [*self._waiting, *([self._prefilling] if self._prefilling else []), *self._running]:
            self._fail(seq, RuntimeError("the engine was closed"))
