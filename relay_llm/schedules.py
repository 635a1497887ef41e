"""Prefill schedules: each decides, per layer, which prompt tokens are computed.

A `PrefillPlan` says what the engine found for a prompt: an exact-prefix hit and reused spans
(stored K/V already spliced into the buffers, rotated to their new positions). A `Schedule` turns a
plan into a `LayerPlan` for the executor. Tokens outside the prefix hit and the spans ("new tokens")
are computed at every layer by every schedule.

full    every token at every layer (nothing reused)
prefix  the exact-prefix hit is not computed; spans are computed (lossless)
naive   prefix hit and spans are not computed (rotate + splice, no repair)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .executor import AllTokens, LayerPlan, LayerState
from .store import Match


@dataclass
class PrefillPlan:
    """What can be reused in a prompt of `n_tokens` tokens, all indices into the prompt.

    prefix_hit: tokens [0, prefix_hit) have exact-prefix K/V. spans: stored stretches whose K/V
    (rotated) are in the buffers. num_layers: of the model.
    """

    n_tokens: int
    num_layers: int
    prefix_hit: int = 0
    spans: list[Match] = field(default_factory=list)

    def span_mask(self) -> torch.Tensor:
        """[n_tokens] bool: token lies in a reused span."""
        m = torch.zeros(self.n_tokens, dtype=torch.bool)
        for s in self.spans:
            m[s.start : s.end] = True
        return m

    def reusable_mask(self) -> torch.Tensor:
        """[n_tokens] bool: prefix-hit or span token (the "reusable content" of the reuse rate)."""
        m = self.span_mask()
        m[: self.prefix_hit] = True
        return m


class Schedule:
    """Base: decides which reusable content is spliced and the per-layer active sets.

    splice_prefix / splice_spans: whether the engine writes that stored K/V into the buffers before
    the run. A subclass overrides `layer_plan`; rectifying schedules (relay, cacheblend, epic) return
    a `LayerPlan` whose `active` looks at the run's state.
    """

    name = "base"
    splice_prefix = True
    splice_spans = True

    def layer_plan(self, plan: PrefillPlan, device: torch.device) -> LayerPlan:
        raise NotImplementedError


class StaticPlan:
    """The same active token set at every layer."""

    def __init__(self, idx: torch.Tensor):
        self.idx = idx

    def active(self, state: LayerState) -> torch.Tensor:
        return self.idx

    def after_layer(self, state: LayerState) -> None:
        pass


class Full(Schedule):
    name = "full"
    splice_prefix = False
    splice_spans = False

    def layer_plan(self, plan, device):
        return AllTokens(plan.n_tokens, device)


class Prefix(Schedule):
    name = "prefix"
    splice_spans = False

    def layer_plan(self, plan, device):
        return StaticPlan(torch.arange(plan.prefix_hit, plan.n_tokens, device=device))


class Naive(Schedule):
    name = "naive"

    def layer_plan(self, plan, device):
        return StaticPlan((~plan.reusable_mask()).nonzero().flatten().to(device))


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (Full, Prefix, Naive)}


def get_schedule(name: str | Schedule) -> Schedule:
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()
