"""The methods compared, and one measurement of every method on one downstream prompt ("probe").

Every method runs through the engine's one executor on the same prompt ids, with the segment store holding
the upstream outputs the pipeline generated. The prefix cache is set before every call:

* `full`: empty (a standard pipeline prefills everything);
* `prefix`, `naive`, `cacheblend`, `epic`, `relay` and the relay variants: what a real pipeline's
  exact-prefix cache would hold, i.e. the longest common prefix of this prompt with the earlier agents'
  sequences (`Probe.shared_prefix`; with a different system prompt per agent that is the BOS and turn
  marker), made by one full prefill of those tokens;
* `ideal`, the cost floor: `naive` (every span token reused, nothing recomputed) with the prefix cache
  holding the whole prompt up to its first reused span (made by one naive call beforehand). Its K/V are
  exactly naive's, so its fidelity is naive's; its TTFT is what zero repair with a warm prefix costs.

Fidelity: mean and max over `steps` teacher-forced steps of KL(full || method) on full prefill's greedy
continuation, top-1 agreement on those steps, and the identical greedy continuation: the leading steps
where the method's argmax equals full's token, which is exactly how many leading tokens of the method's
own greedy output equal full's (greedy, no penalty).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

METHODS: dict[str, tuple[str, dict | None]] = {  # label -> (schedule, per-call settings)
    "full": ("full", None),
    "prefix": ("prefix", None),
    "naive": ("naive", None),
    "cacheblend": ("cacheblend", {"ratio": 0.15}),
    "epic": ("epic", {"k": 16}),
    "relay": ("relay", None),  # the shipped profile
    "ideal": ("naive", None),  # with the prefix cached up to the first span: the cost floor
}

ABLATIONS: dict[str, dict] = {  # Q3: relay without one part (label -> relay settings)
    "relay w/o layer band (all layers)": {"start_layer": 0, "det_layer": 1, "end_layer": -1},  # end: last layer
    "relay w/o deviation rule": {"tau_dev": 1e9},
    "relay w/o influence rule": {"tau_inf": 1e9},
    "relay w/o suffix rule": {"suffix": 0},
}


@dataclass
class Probe:
    """One downstream prompt measured under every method.

    gen: tokens each method generates for the task answer (1 = TTFT only); stop: stop strings of that
    generation; shared_prefix: tokens of `ids` an exact-prefix cache would hold from earlier agents.
    """

    key: str
    ids: list[int]
    gen: int = 1
    stop: list[str] = field(default_factory=list)
    shared_prefix: int = 0
    meta: dict = field(default_factory=dict)


def resolve(settings: dict | None, num_layers: int) -> dict | None:
    """Settings with end_layer -1 meaning the last layer."""
    if not settings or settings.get("end_layer") != -1:
        return settings
    return {**settings, "end_layer": num_layers - 1}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def set_prefix_cache(engine, probe: Probe, label: str) -> None:
    """The prefix cache a call of method `label` starts from (module docstring)."""
    engine.prefix_cache.clear()
    if label == "full":
        return
    if label == "ideal":
        warm = engine.complete(probe.ids, max_new_tokens=1, schedule="naive")
        if warm.stats.span_tokens == 0:  # nothing reusable: caching "up to the first span" would be the whole prompt
            engine.prefix_cache.clear()
        return
    if probe.shared_prefix > 1:
        engine.complete(probe.ids[: probe.shared_prefix], max_new_tokens=1, schedule="full")


def kl_stats(ref, got) -> dict:
    """Fidelity of log-probs `got` against `ref` (both [steps, vocab])."""
    kl = (ref.exp() * (ref - got)).sum(-1)
    agree = (got.argmax(-1) == ref.argmax(-1)).tolist()
    identical = next((i for i, a in enumerate(agree) if not a), len(agree))
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": sum(agree) / len(agree),
            "identical": identical, "steps": len(agree)}


def measure(engine, probe: Probe, methods: dict[str, tuple[str, dict | None]], steps: int = 20,
            repeats: int = 1) -> dict[str, dict]:
    """Every method on `probe`: {label: record}. `full` runs first and gives the reference continuation."""
    layers = engine.executor.num_layers
    engine.prefix_cache.clear()
    cont = engine.complete(probe.ids, max_new_tokens=steps, schedule="full").token_ids
    if not cont:
        cont = [engine.tokenizer.eos_token_id]
    engine.prefix_cache.clear()
    ref = engine.teacher_force(probe.ids, cont, schedule="full")
    out: dict[str, dict] = {}
    for label, (schedule, settings) in methods.items():
        settings = resolve(settings, layers)
        ttfts = []
        res = None
        for r in range(repeats):
            set_prefix_cache(engine, probe, label)
            run = engine.complete(probe.ids, max_new_tokens=probe.gen if r == 0 else 1, schedule=schedule,
                                  relay=settings, **({"stop": probe.stop} if probe.stop else {}))
            ttfts.append(run.stats.ttft_s)
            res = res or run
        set_prefix_cache(engine, probe, label)
        got = engine.teacher_force(probe.ids, cont, schedule=schedule, relay=settings)
        s = res.stats
        out[label] = {"ttft_s": statistics.median(ttfts), "ttft_all": ttfts, "prompt_tokens": s.prompt_tokens,
                      "prefix_hit": s.prefix_hit_tokens, "span_tokens": s.span_tokens, "reuse_rate": s.reuse_rate,
                      "recomputed_cells": s.recomputed_cells, "fallback": s.fallback, "text": res.text,
                      "decode_s": s.decode_s, "new_tokens": s.completion_tokens, **kl_stats(ref, got)}
    return out
