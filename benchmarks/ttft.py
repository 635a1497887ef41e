"""TTFT of `full`, `prefix` and `naive` prefill when a relayed span reappears under a new prefix.

The setting is one hand-off of a multi-agent chain (DESIGN.md section 2): an upstream agent produced
a span of text; a downstream agent's prompt is

    <bos> + NEW_PREFIX (~100 tokens of other instructions) + span + QUESTION (~15 tokens)

so the span sits at a new position (its keys must be rotated) behind text the upstream call never
saw. For each dtype and span length the script times the prefill up to the first token (engine
`RequestStats.ttft_s`, one generated token) for every schedule, interleaved per repeat, after a
warm-up, and reports medians.

Where the span's K/V come from (shown per row):

* ``prefill`` (the 500 / 1000 / 2000-token rows): decoding thousands of tokens on a 2-core CPU is too
  slow, so the span's K/V are made by one full prefill of ``<bos> + UPSTREAM_PREFIX + span`` at the
  span's original positions (`Executor.run`), sliced out (`KVBuffers.slice`) and stored as a
  `Segment` (kind "decode", with its captured hidden states), i.e. exactly what the engine stores for
  an output it generated, up to the decode-vs-prefill float noise (DESIGN.md: 1.2e-4 in fp32). The
  span text is a synthetic design specification built from a fixed seed (reproducible anywhere).
* ``decode`` (the ``--generate`` row): the engine really generates the span (sampled, fixed seed)
  and stores it itself; this row shows the real relay path end to end.

Fairness. Before every measurement the prefix cache is reset to what a real pipeline holds at that
point - the exact K/V of the whole upstream sequence (upstream prompt + span) - and the segment store
to that one span; nothing the previous measurement added survives. `full` computes every token;
`prefix` may skip the longest exact-prefix hit, which with a different prefix in front is only the
<bos> token; `naive` skips that hit and the rotated span. The table reports each schedule's hit.

Fidelity. On one setting the script teacher-forces full prefill's greedy continuation through
`full` and `naive` (`RelayEngine.teacher_force`) and reports mean KL(full || naive) per step and top-1
agreement.

Usage (from the repository root):

    PYTHONPATH=. python benchmarks/ttft.py [--dtypes float32,bfloat16] [--spans 500,1000,2000] [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from relay_llm.engine import RelayEngine
from relay_llm.matcher import context_sketch
from relay_llm.stats import RequestStats
from relay_llm.store import Segment

SCHEDULES = ("full", "prefix", "naive")

UPSTREAM_PREFIX = "Design document drafted by the Architect agent for the platform team.\n\n"
NEW_PREFIX = (
    "You are the Reviewer agent of a small software team. The Architect agent has written the design "
    "specification below. Read it carefully, check it for gaps, contradictions and missing failure "
    "handling, and answer the team's questions about it precisely. Quote the specification where you "
    "can, keep every answer short, and never invent components, numbers or endpoints that the document "
    "does not mention. If the specification does not answer a question, say so plainly and do not "
    "guess.\n\n"
    "Specification:\n"
)
QUESTION = "\n\nQuestion: What is the main purpose of the text above?\nAnswer:"
GENERATION_PROMPT = UPSTREAM_PREFIX + "# Rate limiter service\n\n## 1. Overview\n\nThe rate limiter"


# ---- the relayed text ---------------------------------------------------------------------------------

_COMPONENTS = [
    "ingest gateway", "session manager", "rate limiter", "billing ledger", "search indexer",
    "notification service", "audit log", "cache layer", "job scheduler", "auth proxy",
    "metrics exporter", "config store", "upload service", "feature flag service",
]
_TEMPLATES = [
    "The {c} must {action} within {n} milliseconds at the 99th percentile.",
    "When the {c2} is unavailable, the {c} retries up to {k} times with exponential backoff "
    "starting at {m} ms.",
    "All writes to the {c} are idempotent and keyed by the {key}.",
    "The {c} exposes an {proto} endpoint at /{path} that returns {payload}.",
    "Operators can change the {setting} of the {c} without a restart; the change takes effect within "
    "{k} seconds.",
    "Each request to the {c} carries a trace identifier, which the {c2} propagates downstream.",
    "Data held by the {c} is encrypted at rest, with keys rotated every {d} days.",
    "If more than {k} percent of requests fail over {w} minutes, the {c} opens its circuit breaker "
    "and pages the on-call engineer.",
    "The {c} keeps at most {n} entries per tenant and evicts the least recently used one first.",
    "Before the {c} accepts traffic, it checks that the {c2} reports a healthy status.",
]
_FILL = {
    "action": ["acknowledge a request", "persist an event", "answer a lookup", "validate a token",
               "publish a message", "refresh its snapshot"],
    "key": ["request identifier", "tenant and day", "client token", "order number", "upload checksum"],
    "proto": ["HTTP", "gRPC", "internal HTTP"],
    "path": ["v1/status", "v1/limits", "admin/reload", "v2/events", "health", "v1/quota"],
    "payload": ["a JSON summary of its state", "the remaining quota per client", "a list of pending jobs",
                "the current configuration version", "an empty body with status 204"],
    "setting": ["log level", "quota table", "timeout", "replica count", "retention period"],
}


def spec_text(min_words: int, seed: int = 0) -> str:
    """A synthetic design specification of at least `min_words` words (deterministic for `seed`)."""
    rng = random.Random(seed)
    parts: list[str] = []
    words = 0
    section = 1
    while words < min_words:
        comp = rng.choice(_COMPONENTS)
        lines = [f"## {section}. The {comp}"]
        for _ in range(rng.randint(4, 7)):
            values = {name: rng.choice(options) for name, options in _FILL.items()}
            others = [c for c in _COMPONENTS if c != comp]
            sentence = rng.choice(_TEMPLATES).format(
                c=comp, c2=rng.choice(others), n=rng.choice([5, 20, 50, 120, 250, 1000]),
                k=rng.randint(2, 9), m=rng.choice([10, 50, 100, 200]), d=rng.choice([7, 30, 90]),
                w=rng.choice([1, 5, 15]), **values,
            )
            lines.append(sentence)
        text = lines[0] + "\n\n" + " ".join(lines[1:])
        parts.append(text)
        words += len(text.split())
        section += 1
    return "\n\n".join(parts)


# ---- settings -----------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One (dtype, span) cell: the downstream prompt and the engine state a real pipeline would hold."""

    dtype: str
    span_tokens: int
    source: str  # "prefill" (synthesised from prefill K/V) or "decode" (really generated)
    prompt_ids: list[int]
    segment: Segment
    upstream_ids: list[int]  # the upstream sequence whose exact K/V sit in the prefix cache
    upstream_keys: torch.Tensor
    upstream_values: torch.Tensor
    times: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SCHEDULES})
    stats: dict[str, RequestStats] = field(default_factory=dict)


def tokens(engine: RelayEngine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def bos(engine: RelayEngine) -> list[int]:
    return [engine.tokenizer.bos_token_id] if engine.tokenizer.bos_token_id is not None else []


def capture_layer(engine: RelayEngine) -> int:
    """The layer whose residual-stream input the engine stores per generated token."""
    layer = getattr(engine, "capture_layer", None)  # newer engines resolve it from the model's profile
    return layer if layer is not None else engine.config.capture_layer or 0


def downstream_prompt(engine: RelayEngine, span_ids: list[int]) -> list[int]:
    return bos(engine) + tokens(engine, NEW_PREFIX) + span_ids + tokens(engine, QUESTION)


def prefill_settings(engine: RelayEngine, dtype: str, spans: list[int]) -> list[Setting]:
    """Settings whose span K/V come from one full prefill of the upstream sequence (see module doc)."""
    span_all = tokens(engine, spec_text(min_words=max(spans)))[: max(spans)]
    if len(span_all) < max(spans):
        raise RuntimeError(f"spec text too short: {len(span_all)} tokens")
    head = bos(engine) + tokens(engine, UPSTREAM_PREFIX)
    upstream = head + span_all
    ex = engine.executor
    kv = ex.new_buffers(len(upstream))
    layer = capture_layer(engine)
    run = ex.run(torch.tensor(upstream, device=ex.device), 0, kv, capture_layer=layer)
    out = []
    for n in spans:
        keys, values = kv.slice(len(head), len(head) + n)
        seg = Segment(
            token_ids=torch.tensor(span_all[:n], dtype=torch.long), keys=keys, values=values,
            start_pos=len(head), fingerprint=engine.store_fingerprint, kind="decode",
            hidden=run.captured[len(head) : len(head) + n].clone(), hidden_layer=layer, context=context_sketch(head),
        )
        up_keys, up_values = kv.slice(0, len(head) + n)
        out.append(Setting(dtype, n, "prefill", downstream_prompt(engine, span_all[:n]), seg,
                           head + span_all[:n], up_keys, up_values))
    return out


def generated_setting(engine: RelayEngine, dtype: str, max_new_tokens: int) -> Setting | None:
    """A setting whose span the engine really generated (and stored itself)."""
    engine.prefix_cache.clear()
    engine.store.clear()
    prompt = bos(engine) + tokens(engine, GENERATION_PROMPT)
    res = engine.complete(prompt, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=0,
                          schedule="full")
    body = [t for t in res.token_ids if t not in engine.eos_ids]
    matches = engine.store.find(body, 0, len(body))
    if not body or len(matches) != 1 or matches[0].length != len(body):
        print(f"[{dtype}] generated span of {len(body)} tokens was not stored; skipping the decode row",
              file=sys.stderr)
        return None
    seg = engine.store.get(matches[0].segment_id)
    full_seq = prompt + res.token_ids
    hit, keys, values = engine.prefix_cache.lookup(full_seq, engine.store_fingerprint)
    print(f"[{dtype}] generated {len(body)} tokens in {res.stats.decode_s + res.stats.ttft_s:.1f} s: "
          f"{engine.tokenizer.decode(body)[:120]!r}...", file=sys.stderr)
    return Setting(dtype, len(body), "decode", downstream_prompt(engine, body), seg, full_seq[:hit],
                   keys, values)


# ---- measuring ----------------------------------------------------------------------------------------


def reset(engine: RelayEngine, s: Setting) -> None:
    """Engine state of a real pipeline right after the upstream call, and nothing else."""
    engine.prefix_cache.clear()
    engine.prefix_cache.add(s.upstream_ids, s.upstream_keys, s.upstream_values, engine.store_fingerprint)
    engine.store.clear()
    engine.store.add(s.segment)


def measure(engine: RelayEngine, s: Setting, schedule: str) -> RequestStats:
    reset(engine, s)
    gc.collect()
    stats = engine.complete(s.prompt_ids, max_new_tokens=1, temperature=0.0, schedule=schedule).stats
    if schedule == "naive" and stats.span_tokens != s.span_tokens:
        print(f"WARNING [{s.dtype}, {s.span_tokens}]: naive found {stats.span_tokens} span tokens",
              file=sys.stderr)
    return stats


def fidelity(engine: RelayEngine, s: Setting, steps: int) -> dict:
    """KL(full || naive) and top-1 agreement over full prefill's greedy continuation."""
    reset(engine, s)
    cont = engine.complete(s.prompt_ids, max_new_tokens=steps, temperature=0.0, schedule="full").token_ids
    logprobs = {}
    for schedule in ("full", "naive"):
        reset(engine, s)
        logprobs[schedule] = engine.teacher_force(s.prompt_ids, cont, schedule=schedule)
    full, naive = logprobs["full"], logprobs["naive"]
    kl = (full.exp() * (full - naive)).sum(-1)
    agree = full.argmax(-1) == naive.argmax(-1)
    first_miss = int((~agree).nonzero()[0]) if not bool(agree.all()) else len(cont)
    return {"dtype": s.dtype, "span_tokens": s.span_tokens, "source": s.source, "steps": len(cont),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(agree.float().mean()),
            "identical_greedy_prefix": first_miss}


# ---- reporting ----------------------------------------------------------------------------------------


def table(settings: list[Setting]) -> str:
    head = ("| dtype | span tokens | span K/V from | prompt tokens | full TTFT (s) | prefix TTFT (s) "
            "| naive TTFT (s) | naive speed-up | prefix speed-up | naive reuse rate | prefix hit (tokens) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in settings:
        med = {k: statistics.median(v) for k, v in s.times.items()}
        rows.append(
            f"| {s.dtype} | {s.span_tokens} | {s.source} | {len(s.prompt_ids)} | {med['full']:.3f} "
            f"| {med['prefix']:.3f} | {med['naive']:.3f} | {med['full'] / med['naive']:.1f}x "
            f"| {med['full'] / med['prefix']:.2f}x | {s.stats['naive'].reuse_rate:.3f} "
            f"| {s.stats['prefix'].prefix_hit_tokens} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--spans", default="500,1000,2000", help="reused span lengths in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--generate", type=int, default=100,
                   help="also time a span the engine really generates (this many tokens; 0 = skip)")
    p.add_argument("--fidelity-steps", type=int, default=20, help="0 = skip the fidelity check")
    p.add_argument("--fidelity-span", type=int, default=None, help="span of the fidelity check "
                   "(default: 1000 if measured, else the longest); run on the first dtype")
    p.add_argument("--json", default=None, help="also write every raw time and stat to this file")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    spans = sorted({int(x) for x in args.spans.split(",") if x.strip()})

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    engines: dict[str, RelayEngine] = {}
    settings: list[Setting] = []
    for dtype in dtypes:
        t = time.perf_counter()
        engines[dtype] = RelayEngine.load(args.model, dtype=dtype)
        made = prefill_settings(engines[dtype], dtype, spans)
        if args.generate:
            gen = generated_setting(engines[dtype], dtype, args.generate)
            made = ([gen] if gen else []) + made
        settings += made
        print(f"[{dtype}] loaded and prepared {len(made)} settings in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)

    # Warm-up: every schedule once per dtype on its smallest setting (discarded).
    for dtype, engine in engines.items():
        first = min((s for s in settings if s.dtype == dtype), key=lambda s: s.span_tokens)
        for schedule in SCHEDULES:
            measure(engine, first, schedule)

    for r in range(args.repeats):
        order = SCHEDULES[r % 3 :] + SCHEDULES[: r % 3]  # rotate so no schedule always runs first
        for s in settings:
            for schedule in order:
                stats = measure(engines[s.dtype], s, schedule)
                s.times[schedule].append(stats.ttft_s)
                s.stats[schedule] = stats
        print(f"repeat {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    fid = None
    if args.fidelity_steps:
        target = args.fidelity_span or (1000 if 1000 in spans else max(spans))
        s = next(s for s in settings
                 if s.dtype == dtypes[0] and s.source == "prefill" and s.span_tokens == target)
        fid = fidelity(engines[s.dtype], s, args.fidelity_steps)

    any_engine = next(iter(engines.values()))
    print(f"## TTFT: relayed span under a new {len(tokens(any_engine, NEW_PREFIX))}-token prefix\n")
    print(f"model {args.model} ({any_engine.model_name}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.machine()}); "
          f"median of {args.repeats} interleaved repeats after warm-up; "
          f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end.\n")
    print(table(settings))
    print("\nspan K/V from: `prefill` = one full prefill of the upstream sequence at the span's original "
          "positions, stored as a Segment; `decode` = generated by the engine and stored by it.")
    print("Before each measurement the prefix cache holds exactly the upstream sequence and the store "
          "exactly that span; `prefix hit` is what the exact-prefix cache matched (only <bos>).")
    if fid:
        print(f"\n### Fidelity of naive vs full ({fid['dtype']}, {fid['span_tokens']}-token span, "
              f"{fid['steps']} teacher-forced steps of full's greedy continuation)\n")
        print(f"mean KL(full || naive) = {fid['mean_kl']:.4f} nats (max {fid['max_kl']:.4f}); "
              f"top-1 agreement = {fid['top1_agreement']:.0%}; identical greedy prefix = "
              f"{fid['identical_greedy_prefix']} / {fid['steps']} tokens")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    if args.json:
        data = {
            "args": vars(args),
            "load_average": [load_start[0], os.getloadavg()[0]],
            "settings": [
                {"dtype": s.dtype, "span_tokens": s.span_tokens, "source": s.source,
                 "prompt_tokens": len(s.prompt_ids), "ttft_s": s.times,
                 "stats": {k: v.to_dict() for k, v in s.stats.items()}}
                for s in settings
            ],
            "fidelity": fid,
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
