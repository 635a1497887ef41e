"""Token selector: which reused span tokens to recompute, from deviation and influence at det_layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SelectorConfig:
    """Thresholds of the RelayCaching selector (per span, relative to the span's mean).

    tau_dev: select d_j >= tau_dev * mean(d). tau_inf: select s_j >= tau_inf * mean(s).
    suffix: always select the last `suffix` tokens of a span that goes through the detection. prefix: always
    select its first `prefix` tokens: they sit right after text the stored copy never saw, so their K/V carry
    the old context (a span found in a prompt usually starts after a header such as "Review:" where the
    stored copy had "Specification:"; see docs/fidelity.md, "Span edges"). recompute_budget: cap on the selected
    fraction of a span's tokens (1.0 = no cap); over the cap, the prefix and suffix are kept first, then
    the tokens with the highest d/mean(d) + s/mean(s). max_span_deviation: quality guard; a span whose
    mean deviation exceeds it is recomputed in full. min_span_tokens: shorter spans are not reused.
    dev_floor: absolute deviation below which the relative rules select nothing (0 = off, the paper's
    rule): where the context barely changed the span's values, nothing stands out for real, and the
    top tau-fraction would be recomputed for nothing. The edge rules still apply.
    detect: run the detection (all span tokens through the layers before det_layer; at det_layer, their
    fresh values and keys from the k/v-projections alone: the deviation and influence rules pick the tokens
    computed from det_layer on); False: recompute only the edge tokens, at every layer of the band, with no
    detection pass. The prefix rule applies at every piece of a span (after re-tokenisation holes too), the
    suffix at its end. detect_changed: with detect, only a span with at least this many changed k-grams ahead
    of it (k-grams of the prompt before it that its segment never saw before it, `matcher.changed_grams`)
    goes through the detection; the others get the prefix edges alone (0 = every span, the paper).
    """

    tau_dev: float = 1.5
    tau_inf: float = 1.45
    suffix: int = 10
    prefix: int = 4
    recompute_budget: float = 1.0
    max_span_deviation: float = 0.25
    min_span_tokens: int = 16
    dev_floor: float = 0.0
    detect: bool = True
    detect_changed: int = 0

    def updated(self, overrides: dict | None) -> SelectorConfig:
        if not overrides:
            return self
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown relay settings {sorted(unknown)}; known: {sorted(self.__dataclass_fields__)}")
        for key, value in overrides.items():
            if key == "detect":
                if not isinstance(value, bool):
                    raise ValueError(f"relay setting detect must be true or false, got {value!r}")
                continue
            kind = int if key in ("suffix", "prefix", "min_span_tokens", "detect_changed") else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"relay setting {key} must be a number{' (integer)' if kind is int else ''}, "
                                 f"got {value!r}")
            if kind is int and value < 0:
                raise ValueError(f"relay setting {key} must be >= 0, got {value}")
        return SelectorConfig(**{**self.__dict__, **overrides})


def value_deviation(reused: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """d_j = 1 - cos(v_reused_j, v_fresh_j), over all KV heads. reused, fresh: [kv_heads, n, head_dim]."""
    a = reused.float().transpose(0, 1).flatten(1)
    b = fresh.float().transpose(0, 1).flatten(1)
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).clamp_min(0)


def select(deviation: torch.Tensor, influence: torch.Tensor, cfg: SelectorConfig) -> torch.Tensor:
    """Selected tokens of ONE span: [n] bool from deviation [n] and influence [n] (both >= 0)."""
    n = deviation.numel()
    d_mean = deviation.mean().clamp_min(1e-12)
    s_mean = influence.mean().clamp_min(1e-12)
    chosen = (deviation >= cfg.tau_dev * d_mean) | (influence >= cfg.tau_inf * s_mean)
    if cfg.dev_floor > 0:
        chosen &= deviation >= cfg.dev_floor
    edges = torch.zeros(n, dtype=torch.bool, device=deviation.device)
    edges[max(0, n - cfg.suffix) :] = True
    edges[: cfg.prefix] = True
    chosen |= edges
    cap = int(cfg.recompute_budget * n)
    if chosen.sum() > cap:
        score = deviation / d_mean + influence / s_mean
        score = torch.where(edges, torch.full_like(score, float("inf")), score)
        score = torch.where(chosen, score, torch.full_like(score, float("-inf")))
        keep = torch.topk(score, cap).indices
        chosen = torch.zeros_like(chosen)
        chosen[keep] = True
    return chosen
