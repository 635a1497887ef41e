"""One prompt's prefill: plan reuse (prefix hit, stored spans), splice the reused K/V, then run it in steps.

A prompt with no reused span is computed from its first uncached token by plain all-token runs of as many
tokens as each `step` is given, so the scheduler can run decode steps of other sequences in between. A
prompt with spans runs its schedule's layer plan in one step: its per-layer active sets span the whole prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .executor import KVBuffers
from .matcher import changed_grams
from .rope import rotate_layers
from .schedules import PrefillPlan, Schedule
from .stats import RequestStats

if TYPE_CHECKING:
    from .engine import RelayEngine


class Prefill:
    """The prefill of `ids` into fresh buffers of `capacity` slots.

    After the last `step()`: `logits` [vocab] fp32 of the last prompt token, `kv` holds slots [0, len(ids)),
    `captured` [len(ids), hidden] the capture layer's input (rows of reused tokens are stale), `plan`.
    touch: count the reused spans and prefix as hits (False for measurements such as `teacher_force`).
    """

    def __init__(self, engine: RelayEngine, ids: list[int], capacity: int, schedule: Schedule,
                 stats: RequestStats, touch: bool = True):
        ex = engine.executor
        self.engine, self.ids, self.schedule, self.stats = engine, ids, schedule, stats
        n = len(ids)
        self.kv: KVBuffers = ex.new_buffers(capacity)
        self.plan = plan = PrefillPlan(n_tokens=n, num_layers=ex.num_layers)
        fp = engine.store_fingerprint  # only K/V made by this model, dtype and profile are ever spliced
        # The last prompt token is always computed: we need its logits.
        hit, pk, pv = engine.prefix_cache.lookup(ids, fp, limit=n - 1, touch=touch)
        plan.prefix_hit = hit
        if schedule.splice_prefix and hit:
            self.kv.write(0, pk, pv)
        found = []
        if all(spec.composable for spec in ex.rope):
            found = engine.store.find(ids, hit, n - 1, fingerprint=fp, touch=False)
        elif len(engine.store):
            stats.fallback = f"RoPE type {ex.rope[0].rope_type!r} cannot be rotated; spans recomputed"
        plan.spans = schedule.keep_spans(found)
        if touch:
            engine.store.touch(plan.spans)
        self.notes = [f"{len(found) - len(plan.spans)} span(s) too short to reuse: computed"] if len(found) > len(
            plan.spans) else []
        plan.span_hidden = [engine._span_hidden(m) for m in plan.spans]
        plan.span_changed = [changed_grams(ids[: m.start], getattr(m.segment, "context", None)) for m in plan.spans]
        if schedule.splice_spans:
            for m in plan.spans:
                seg = m.segment
                keys = seg.keys[:, :, m.offset : m.offset + m.length]
                delta = m.start - (seg.start_pos + m.offset)
                if delta:
                    keys = rotate_layers(keys, delta, ex.rope)
                self.kv.write(m.start, keys, seg.values[:, :, m.offset : m.offset + m.length])
        self.capture = engine.capture_layer if engine.config.store_prompt else None
        # Without spans every schedule computes the same tokens, [first, n) at every layer: plain chunked runs.
        self._first = first = hit if schedule.splice_prefix else 0
        self._next = first  # the next token to compute (chunked runs, no spans)
        self._captured: list[torch.Tensor] = []
        self.token_layers = torch.zeros(n, dtype=torch.long, device=ex.device)
        self.token_layers[first:] = ex.num_layers
        self.logits: torch.Tensor | None = None
        self.captured: torch.Tensor | None = None
        self.done = False

    def step(self, budget: int) -> int:
        """Compute up to `budget` more prompt tokens (a prompt with spans: all of it); returns how many tokens
        were computed. `done` is set after the last step."""
        ex, ids, n = self.engine.executor, self.ids, self.plan.n_tokens
        if not self.plan.spans:
            s, e = self._next, min(self._next + max(1, budget), n)
            res = ex.run(torch.tensor(ids[s:e], dtype=torch.long, device=ex.device), s, self.kv,
                         capture_layer=self.capture)
            self._next = e
            if res.captured is not None:
                self._captured.append(res.captured)
            if e < n:
                return e - s
            self.logits = res.logits[0]
            if self._captured:
                head = self._captured[0].new_zeros(self._first, self._captured[0].shape[1])  # not computed here
                self.captured = torch.cat([head, *self._captured])
            used = e - s
        else:
            layer_plan = self.schedule.layer_plan(self.plan, ex)
            ids_t = torch.tensor(ids, dtype=torch.long, device=ex.device)
            res = ex.run(ids_t, 0, self.kv, layer_plan, capture_layer=self.capture)
            self.logits, self.captured, self.token_layers = res.logits[0], res.captured, res.token_layers
            self.notes += getattr(layer_plan, "notes", [])
            used = max(1, int((~self.plan.reusable_mask()).sum()))  # the new tokens; spans cost a fraction
        self._finish_stats()
        self.done = True
        return used

    def run(self, chunk: int) -> Prefill:
        """Every step at once, `chunk` tokens each."""
        while not self.done:
            self.step(chunk)
        return self

    def _finish_stats(self) -> None:
        stats, plan, ex = self.stats, self.plan, self.engine.executor
        if self.notes:
            stats.fallback = "; ".join(([stats.fallback] if stats.fallback else []) + self.notes)
        layers = self.token_layers[plan.reusable_mask().to(ex.device)]
        stats.prompt_tokens = plan.n_tokens
        stats.prefix_hit_tokens = plan.prefix_hit
        stats.spans = len(plan.spans)
        stats.span_tokens = sum(m.length for m in plan.spans)
        for m in plan.spans:
            stats.span_kinds[m.segment.kind] = stats.span_kinds.get(m.segment.kind, 0) + m.length
        stats.reusable_cells = int(layers.numel()) * ex.num_layers
        stats.recomputed_cells = int(layers.sum())
        stats.reused_tokens = int((layers < ex.num_layers).sum())
        stats.reuse_rate = 1 - stats.recomputed_cells / stats.reusable_cells if stats.reusable_cells else 0.0
