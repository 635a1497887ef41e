"""Prefill schedules: each decides, per layer, which prompt tokens are computed.

A `PrefillPlan` says what the engine found for a prompt: an exact-prefix hit and reused spans
(stored K/V already spliced into the buffers, rotated to their new positions). A `Schedule` turns a
plan into a `LayerPlan` for the executor. Tokens outside the prefix hit and the spans ("new tokens")
are computed at every layer by every schedule.

full        every token at every layer (nothing reused)
prefix      the exact-prefix hit is not computed; spans are computed (lossless)
naive       prefix hit and spans are not computed (rotate + splice, no repair)
relay       RelayCaching: span tokens enter at start_layer (stored upstream hidden states); a span whose
            context ahead changed (`detect_changed`) is recomputed up to det_layer, detected there from
            k/v-projections alone, then only its selected tokens run through end_layer (the paper's mode,
            `detect`); the other spans (all of them without detection): only their edge tokens, through the band
cacheblend  span tokens through layers 0..check_layer, then the top `ratio` by K/V deviation
epic        the first k tokens of each span at every layer
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .executor import AllTokens, Executor, LayerPlan, LayerState
from .matcher import Match, span_groups
from .selector import SelectorConfig, select, value_deviation


@dataclass
class PrefillPlan:
    """What can be reused in a prompt of `n_tokens` tokens, all indices into the prompt.

    prefix_hit: tokens [0, prefix_hit) have exact-prefix K/V. spans: stored stretches whose K/V
    (rotated) are in the buffers. span_hidden: per span, (layer, [length, hidden_size] residual-stream
    input of that layer from the upstream decode) or None. span_changed: per span, how many k-grams of the
    prompt ahead of it its segment never saw ahead of it (`matcher.changed_grams`). num_layers: of the model.
    """

    n_tokens: int
    num_layers: int
    prefix_hit: int = 0
    spans: list[Match] = field(default_factory=list)
    span_hidden: list[tuple[int, torch.Tensor] | None] = field(default_factory=list)
    span_changed: list[int] = field(default_factory=list)

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

    def keep_spans(self, found: list[Match]) -> list[Match]:
        """The found spans (sorted by start) this schedule reuses (the others' tokens are new): all of them."""
        return list(found)

    def layer_plan(self, plan: PrefillPlan, ex: Executor) -> LayerPlan:
        raise NotImplementedError


class StaticPlan:
    """The same active token set at every layer."""

    notes: list[str] = []

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

    def layer_plan(self, plan, ex):
        return AllTokens(plan.n_tokens, ex.device)


class Prefix(Schedule):
    name = "prefix"
    splice_spans = False

    def layer_plan(self, plan, ex):
        return StaticPlan(torch.arange(plan.prefix_hit, plan.n_tokens, device=ex.device))


class Naive(Schedule):
    name = "naive"

    def layer_plan(self, plan, ex):
        return StaticPlan(_new_tokens(plan, ex))


def _new_tokens(plan: PrefillPlan, ex: Executor) -> torch.Tensor:
    """Indices of the tokens computed at every layer by every schedule: neither prefix hit nor span."""
    return (~plan.reusable_mask()).nonzero().flatten().to(ex.device)


class _SpanPlan:
    """Active sets = new tokens at every layer + per-layer span tokens (`span_active`)."""

    def __init__(self, plan: PrefillPlan, ex: Executor):
        self.plan, self.ex = plan, ex
        self.new = _new_tokens(plan, ex)
        self.span_idx = plan.span_mask().nonzero().flatten().to(ex.device)  # [S] sorted prompt indices
        self.notes: list[str] = []

    def span_active(self, state: LayerState) -> torch.Tensor:
        """[S] bool: which span tokens to compute at `state.layer`."""
        raise NotImplementedError

    def active(self, state: LayerState) -> torch.Tensor:
        if not self.span_idx.numel():
            return self.new
        picked = self.span_idx[self.span_active(state)]
        return torch.cat([self.new, picked]).sort().values

    def after_layer(self, state: LayerState) -> None:
        pass

    def span_slices(self):
        """(span number, slice into span_idx) for each span."""
        at = 0
        for i, m in enumerate(self.plan.spans):
            yield i, slice(at, at + m.length)
            at += m.length

    def group_slices(self):
        """(group number, slice into span_idx) for each logical span: pieces of one stored segment split only
        by re-tokenisation holes (`matcher.span_groups`) form one, so span edges are its real edges."""
        bounds = dict(self.span_slices())
        for g, members in enumerate(span_groups(self.plan.spans)):
            yield g, slice(bounds[members[0]].start, bounds[members[-1]].stop)


class Relay(Schedule):
    """RelayCaching (DESIGN.md section 2) over the band [start_layer, end_layer], detecting at det_layer.

    An empty band (start_layer > end_layer) recomputes nothing: it is `naive`.
    """

    name = "relay"

    def __init__(self, start_layer: int, det_layer: int, end_layer: int, selector: SelectorConfig | None = None):
        if start_layer <= end_layer and not start_layer <= det_layer <= end_layer:
            raise ValueError(f"need start_layer <= det_layer <= end_layer, got {start_layer}, {det_layer}, {end_layer}")
        self.start, self.det, self.end = start_layer, det_layer, end_layer
        self.selector = selector or SelectorConfig()

    def keep_spans(self, found: list[Match]) -> list[Match]:
        """Pieces of one span split by re-tokenisation holes (`matcher.span_groups`) count together."""
        keep = [g for g in span_groups(found) if sum(found[i].length for i in g) >= self.selector.min_span_tokens]
        return [found[i] for g in keep for i in g]

    def layer_plan(self, plan, ex):
        return _RelayPlan(plan, ex, self)


class _RelayPlan(_SpanPlan):
    def __init__(self, plan: PrefillPlan, ex: Executor, sched: Relay):
        super().__init__(plan, ex)
        self.s = sched
        self.empty = sched.start > sched.end
        # Entry layer per span token: start_layer where upstream hidden states for it are stored, else 0.
        self.entry = torch.zeros(self.span_idx.numel(), dtype=torch.long, device=ex.device)
        for (_, sl), hid in zip(self.span_slices(), plan.span_hidden, strict=True):
            if self._enters_at_start(hid):
                self.entry[sl] = sched.start
        self.detecting = self._detecting(sched.selector)
        self.edges = self._edges(sched.selector)
        self.selected = self.edges & ~self.detecting  # the detecting spans' selection is made at det_layer
        self.guarded = torch.zeros_like(self.selected)  # spans the quality guard recomputes in full

    def _detecting(self, cfg: SelectorConfig) -> torch.Tensor:
        """[S] bool: tokens of the logical spans that go through the detection: with `detect`, each span with at
        least `detect_changed` changed k-grams ahead of it (`PrefillPlan.span_changed`, of its first piece;
        unknown: every span); the others get the edge rule alone."""
        out = torch.zeros(self.span_idx.numel(), dtype=torch.bool, device=self.ex.device)
        if not cfg.detect:
            return out
        changed = self.plan.span_changed
        starts = dict(self.span_slices())
        for members in span_groups(self.plan.spans):
            if not changed or changed[members[0]] >= cfg.detect_changed:
                out[starts[members[0]].start : starts[members[-1]].stop] = True
        return out

    def _edges(self, cfg: SelectorConfig) -> torch.Tensor:
        """[S] bool: the first `prefix` tokens of every span piece (each follows text the stored copy never saw
        next to it: a header, or a re-tokenisation hole) and the last `suffix` tokens of every logical span that
        goes through the detection (the paper's suffix rule belongs to its selection)."""
        edges = torch.zeros(self.span_idx.numel(), dtype=torch.bool, device=self.ex.device)
        for _, sl in self.span_slices():
            edges[sl.start : min(sl.stop, sl.start + cfg.prefix)] = True
        for _, sl in self.group_slices():
            if self.detecting[sl.start]:
                edges[max(sl.start, sl.stop - cfg.suffix) : sl.stop] = True
        return edges

    def _enters_at_start(self, hid: tuple[int, torch.Tensor] | None) -> bool:
        return hid is not None and hid[0] == self.s.start

    def span_active(self, state):
        layer, s = state.layer, self.s
        if self.empty:
            return self.selected  # all False
        if layer == s.start:
            self._inject(state)
        if layer < s.det:
            return (self.selected | self.detecting) & (self.entry <= layer)
        if layer == s.det:
            return self._detect(state)
        if layer <= s.end:
            return self.selected
        return self.guarded

    def _inject(self, state: LayerState) -> None:
        """Place the stored upstream residual stream of spans that enter at start_layer."""
        for (_, sl), hid in zip(self.span_slices(), self.plan.span_hidden, strict=True):
            if self._enters_at_start(hid):
                state.hidden[self.span_idx[sl]] = hid[1].to(state.hidden.device, state.hidden.dtype)

    def _detect(self, state: LayerState) -> torch.Tensor:
        """The detection at det_layer, before the layer runs; returns the span tokens computed from it on.

        The tokens computed so far (new tokens, the detecting spans, the other spans' edges) go through the
        layer's k/v-projections alone (`Executor.keys_values`), from their fresh input: the deviation compares
        each detecting span token's value with the stored one, and the influence is the attention of the new
        tokens after the first span to each span token, over these fresh keys (stored keys elsewhere). Then
        the quality guard and the selection rules, per detecting logical span. The stored K/V of the tokens
        not selected stay in use, at det_layer too.
        """
        if not self.detecting.any():
            return self.selected
        cfg, kv, layer, pos = self.s.selector, state.kv, state.layer, state.positions
        fresh = torch.cat([self.new, self.span_idx[self.detecting | self.selected]]).sort().values
        keys, values = self.ex.keys_values(layer, state.hidden[fresh], pos[fresh])
        tested = self.span_idx[self.detecting]
        dev = torch.zeros(self.span_idx.numel(), device=self.ex.device)
        dev[self.detecting] = value_deviation(kv.values[layer][:, pos[tested]],
                                              values[:, torch.searchsorted(fresh, tested)])
        q_idx = self.new[self.new > self.span_idx[0]]
        if q_idx.numel():
            length = int(pos[-1]) + 1
            all_keys = kv.keys[layer][:, :length].clone()
            all_keys[:, pos[fresh]] = keys
            probs = self.ex.attention_probs(layer, state.hidden[q_idx], pos[q_idx], all_keys)
            infl = probs[:, pos[self.span_idx]].sum(0)
        else:
            infl = torch.zeros_like(dev)
        for i, sl in self.group_slices():
            if not self.detecting[sl.start]:
                continue
            mean_dev = float(dev[sl].mean())
            if mean_dev > cfg.max_span_deviation:
                self.guarded[sl] = True
                self.notes.append(f"span {i}: mean deviation {mean_dev:.3f} > {cfg.max_span_deviation}: "
                                  f"recomputed at every layer from {self.s.start}")
            self.selected[sl] = self.guarded[sl] | self.edges[sl] | select(dev[sl], infl[sl], cfg)
        return self.selected


class CacheBlend(Schedule):
    """CacheBlend: all span tokens through layers 0..check_layer; at check_layer keep the top `ratio`
    by K/V deviation (squared L2 of the key and value change, summed over heads) for every later layer."""

    name = "cacheblend"

    def __init__(self, ratio: float = 0.15, check_layer: int = 1):
        if not 0 <= ratio <= 1:
            raise ValueError(f"cacheblend ratio must be in [0, 1], got {ratio}")
        self.ratio, self.check = ratio, check_layer

    def layer_plan(self, plan, ex):
        return _CacheBlendPlan(plan, ex, self)


class _CacheBlendPlan(_SpanPlan):
    def __init__(self, plan, ex, sched: CacheBlend):
        super().__init__(plan, ex)
        self.s = sched
        self.selected = torch.zeros(self.span_idx.numel(), dtype=torch.bool, device=ex.device)
        self._reused = None

    def span_active(self, state):
        if state.layer == self.s.check:
            kv, i = state.kv, state.layer
            self._reused = (kv.keys[i][:, self.span_idx].clone(), kv.values[i][:, self.span_idx].clone())
        if state.layer <= self.s.check:
            return torch.ones_like(self.selected)
        return self.selected

    def after_layer(self, state):
        if state.layer != self.s.check or not self.span_idx.numel():
            return
        kv, i = state.kv, state.layer
        k_old, v_old = self._reused
        dk = (kv.keys[i][:, self.span_idx].float() - k_old.float()).pow(2).sum((0, 2))
        dv = (kv.values[i][:, self.span_idx].float() - v_old.float()).pow(2).sum((0, 2))
        dev = dk + dv
        keep = torch.topk(dev, int(round(self.s.ratio * dev.numel()))).indices
        self.selected[keep] = True


class Epic(Schedule):
    """EPIC: the first k tokens of each span are recomputed at every layer; the rest are reused."""

    name = "epic"

    def __init__(self, k: int = 16):
        self.k = k

    def layer_plan(self, plan, ex):
        p = _SpanPlan(plan, ex)
        first = torch.zeros(p.span_idx.numel(), dtype=torch.bool, device=ex.device)
        for _, sl in p.span_slices():
            first[sl.start : min(sl.stop, sl.start + self.k)] = True
        p.span_active = lambda state: first
        return p


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (Full, Prefix, Naive, Relay, CacheBlend, Epic)}


def get_schedule(name: str | Schedule, settings: dict | None = None, band: tuple[int, int, int] | None = None,
                 selector: SelectorConfig | None = None) -> Schedule:
    """A schedule by name. settings: per-call knobs (relay: SelectorConfig fields; cacheblend: ratio,
    check_layer; epic: k). band: (start, det, end) layers for relay, from the model's profile."""
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    settings = dict(settings or {})
    if name == "relay":
        if band is None:
            raise ValueError("the relay schedule needs a layer band (a profile of the model)")
        return Relay(*band, selector=(selector or SelectorConfig()).updated(settings))
    try:
        return SCHEDULES[name](**settings)
    except TypeError as exc:
        raise ValueError(f"bad settings for schedule {name!r}: {exc}") from exc
