"""One generation request as the scheduler runs it: its prompt, its options and its decode state.

A `Sequence` turns each step's logits into its next token (penalties, grammar mask, its own seeded
generator, logprobs) and its text into streamed `Chunk`s (stop strings, held-back UTF-8). It owns no
model code: the scheduler feeds it logits, the engine prefills it and stores what it generated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

import torch

from .logprobs import LogprobRecorder
from .sampling import Penalties, sample
from .stats import RequestStats

if TYPE_CHECKING:
    from .engine import Chunk, GenerationOptions
    from .executor import KVBuffers
    from .prefill import Prefill
    from .schedules import Schedule


class State(Enum):
    WAITING = "waiting"  # queued, no buffers yet
    PREFILLING = "prefilling"  # buffers allocated, prompt chunks running
    DECODING = "decoding"  # `next_token` is fed at the next step, its logits wanted
    CLOSING = "closing"  # finished: the last token is fed once more (layers only) so every token has K/V
    DONE = "done"  # finished or failed: out of the scheduler


class Sequence:
    """The decode state of one request. `emit` sends a Chunk to the caller; `cancel` is set by the caller."""

    def __init__(self, ids: list[int], options: GenerationOptions, schedule: Schedule, emit: Callable,
                 cancel: threading.Event, decode: Callable[[list[int]], str], eos_ids: set[int],
                 chunk: type[Chunk], closer: Callable | None = None):
        """closer: constraint -> `closing.Closer`, for grammar-constrained requests that end JSON in budget."""
        self.ids, self.options, self.schedule = ids, options, schedule
        self.emit, self.cancel, self._decode, self._eos, self._chunk = emit, cancel, decode, eos_ids, chunk
        self.state = State.WAITING
        self.stats = RequestStats(schedule=schedule.name)
        self.t0 = time.perf_counter()  # submission: TTFT counts the time queued
        self._admitted_at = self.t0
        self.kv_bytes = 0  # of the buffers it is admitted with (set by the scheduler)
        self.prefill: Prefill | None = None
        self.generated: list[int] = []
        self.hidden: list[torch.Tensor] = []  # capture-layer input of each fed generated token, [1, hidden] each
        self.kept: int | None = None  # with a stop string: how many generated ids the returned text holds
        self.finish = "length"
        self._emitted = 0  # characters of the decoded text already emitted
        self._hold = max((len(s) for s in options.stop), default=1) - 1
        self._gen: torch.Generator | None = None
        self._constraint = None
        self._make_closer = closer
        self.closer = None
        self._penalties: Penalties | None = None
        self.recorder = LogprobRecorder(options.logprobs) if options.logprobs is not None else None

    @property
    def capacity(self) -> int:
        """KV slots this sequence may fill: prompt + max_new_tokens."""
        return len(self.ids) + self.options.max_new_tokens

    @property
    def kv(self) -> KVBuffers:
        """The sequence's K/V buffers (its prefill's)."""
        return self.prefill.kv

    @property
    def next_token(self) -> int:
        return self.generated[-1]

    def admitted(self) -> None:
        """The scheduler took it from the queue: its prefill starts."""
        self._admitted_at = time.perf_counter()
        self.stats.queued_s = self._admitted_at - self.t0

    def start_decoding(self, logits: torch.Tensor) -> None:
        """After prefill: set up sampling state and take the first token from the last prompt logits [vocab]."""
        opts = self.options
        self.stats.prefill_s = time.perf_counter() - self._admitted_at
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(opts.seed if opts.seed is not None else torch.seed())
        self._constraint = opts.grammar.matcher() if opts.grammar is not None else None
        if self._constraint is not None and self._make_closer is not None:
            self.closer = self._make_closer(self._constraint)
        if Penalties.active(opts):
            self._penalties = Penalties(opts, self.ids, logits.numel(), logits.device)
        self.accept(logits)

    def accept(self, logits: torch.Tensor) -> None:
        """Sample the next token from `logits` [vocab] (fp32, changed in place) and stream its text.

        Leaves the state DECODING (another step wanted) or CLOSING (eos, grammar end, stop string, length).
        """
        opts, constraint, penalties, recorder = self.options, self._constraint, self._penalties, self.recorder
        if recorder is not None:
            recorder.observe(logits)  # before penalties and the mask change the logits in place
        if penalties is not None:
            penalties.apply(logits)
        if constraint is not None:
            constraint.mask(logits)  # tokens the grammar forbids next -> -inf
        forced = self.closer.choose(opts.max_new_tokens - len(self.generated), logits) if self.closer else None
        tok = forced if forced is not None else sample(logits, opts, self._gen)
        if recorder is not None:
            recorder.record(tok)
        if penalties is not None:
            penalties.update(tok)
        if not self.generated:
            self.stats.ttft_s = time.perf_counter() - self.t0
        self.generated.append(tok)
        self.state = State.CLOSING
        if constraint is not None and not constraint.accept(tok):
            raise RuntimeError(f"the grammar rejected token {tok} although it was sampled under its mask")
        if self.closer is not None:
            self.closer.observe(tok)
        if tok in self._eos or (constraint is not None and constraint.terminated):
            self.finish = "stop"
            return
        text = self._decode(self.generated)
        cut = min((i for i in (text.find(s) for s in opts.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            self.emit(self._chunk(text[self._emitted : cut]))
            self.finish = "stop"
            self.kept = ids_before(self._decode, self.generated, cut)
            return
        safe = len(text) - self._hold
        while safe > self._emitted and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            safe -= 1
        if safe > self._emitted:
            self.emit(self._chunk(text[self._emitted : safe]))
            self._emitted = safe
        if len(self.generated) == opts.max_new_tokens:
            self.emit(self._chunk(text[self._emitted :]))
            return
        self.state = State.DECODING

    def body(self) -> list[int]:
        """The generated ids the returned text holds (all of them, unless a stop string cut the text)."""
        return self.generated[: self.kept] if self.kept is not None else self.generated

    def close_stats(self) -> RequestStats:
        self.stats.completion_tokens = len(self.generated)
        self.stats.decode_s = time.perf_counter() - self.t0 - self.stats.ttft_s
        return self.stats


def ids_before(decode: Callable[[list[int]], str], generated: list[int], cut: int) -> int:
    """How many leading ids of `generated` decode to at most `cut` characters: the tokens of the text before a
    stop string (a token that holds the stop string's first characters is not counted)."""
    j = len(generated)
    while j and len(decode(generated[:j])) > cut:
        j -= 1
    return j
