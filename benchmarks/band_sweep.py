"""Sweep the relay band (start_layer, det_layer) on one relayed span: fidelity vs reuse.

The data behind the profiler's band rule (relay_llm/profiler.py, docs/profile.md). One span of N
tokens (default 1000) of a synthetic design spec, made upstream after a short prefix, reappears after
~500 tokens of other text; for each band the span's segment is re-made with its hidden states
captured at that band's start layer. Reports mean/max KL(full || schedule) over 20 teacher-forced
steps and the reuse rate (compute proxy; timings are in benchmarks/fidelity.py).

    python benchmarks/band_sweep.py [--span 1000]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity import QUESTION, long_prefix, make_segment  # noqa: E402
from ttft import bos, spec_text, tokens  # noqa: E402

from relay_llm import RelayEngine  # noqa: E402

BANDS = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (6, 7)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--span", type=int, default=1000)
    args = ap.parse_args(argv)
    e = RelayEngine.load("default", dtype="float32")
    last = e.executor.num_layers - 1
    span = tokens(e, spec_text(min_words=args.span))[: args.span]
    prompt = bos(e) + tokens(e, long_prefix()) + span + tokens(e, QUESTION)
    segments = {}

    def reset(layer: int) -> None:
        if layer not in segments:
            e.capture_layer = layer
            segments[layer] = make_segment(e, span)
        e.store.clear()
        e.prefix_cache.clear()
        e.store.add(segments[layer])

    reset(0)
    cont = e.complete(prompt, max_new_tokens=20, schedule="full").token_ids
    reset(0)
    full = e.teacher_force(prompt, cont, schedule="full")
    print(f"prompt {len(prompt)} tokens, span {len(span)}\n")
    print("| schedule | settings | mean KL | max KL | reuse |\n|---|---|---|---|---|")

    def row(name: str, settings: dict | None = None, layer: int = 0) -> None:
        reset(layer)
        lp = e.teacher_force(prompt, cont, schedule=name, relay=settings)
        kl = (full.exp() * (full - lp)).sum(-1)
        reset(layer)
        stats = e.complete(prompt, max_new_tokens=1, schedule=name, relay=settings).stats
        if stats.span_tokens == 0:
            raise RuntimeError(f"{name} {settings}: the stored span was not found in the prompt")
        print(f"| {name} | {settings or ''} | {kl.mean():.4f} | {kl.max():.3f} | {stats.reuse_rate:.0%} |", flush=True)

    row("naive")
    row("cacheblend")
    row("cacheblend", {"ratio": 0.25})
    for start, det in BANDS:
        band = {"start_layer": start, "det_layer": det, "end_layer": last}
        row("relay", band, layer=start)
        row("relay", {**band, "recompute_budget": 0.15}, layer=start)


if __name__ == "__main__":
    with torch.inference_mode():
        main(sys.argv[1:])
