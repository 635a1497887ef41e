"""Spans across re-tokenisation holes: a sampled output quoted in the next prompt, reused whole or in pieces.

An output sampled at temperature 1.0 is made of the ids the model sampled; quoted in the next prompt it
is re-tokenised from its text, and the tokenizer writes some stretches differently ("ISSU"+"E" sampled,
"ISS"+"UE" re-encoded). The k-gram lookup then finds the output as several pieces. The script prints,
for the same prompt, the pieces found and what relay reuses and costs:

* "pieces": each piece on its own, as before spans survived holes (no bridging, edge rule per piece);
* "spans": pieces bridged across holes and grouped into one span (edge rule at its real edges);
* "full": full prefill, the reference for TTFT and KL.

KL(full || relay) is the mean over 20 teacher-forced steps of full prefill's greedy continuation. TTFT is
the prefill time of a one-token call (median of 3). Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python benchmarks/retokenise.py [--tokens 320] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import mean_kl  # noqa: E402

from relay_llm import EngineConfig, RelayEngine, schedules, store  # noqa: E402

STEPS = 20


@contextlib.contextmanager
def pieces_only(on: bool):
    """While on: no bridging across holes, and every piece a span of its own (the rules before)."""
    if not on:
        yield
        return
    saved = store.bridge, schedules.span_groups, schedules.Relay.keep_spans
    store.bridge = lambda matches, *a: matches
    schedules.span_groups = lambda spans: [[i] for i in range(len(spans))]
    schedules.Relay.keep_spans = lambda self, found: [m for m in found if m.length >= self.selector.min_span_tokens]
    try:
        yield
    finally:
        store.bridge, schedules.span_groups, schedules.Relay.keep_spans = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    # Only generated outputs are stored: the quoting prompt's own chunks would otherwise be found in it.
    e = RelayEngine.load("default", dtype="float32", config=EngineConfig(store_prompt=False))
    ask = [{"role": "user", "content": "Write a detailed bug report for a crash in a text editor."}]
    out = e.chat(ask, max_new_tokens=args.tokens, temperature=1.0, seed=args.seed)
    quoted = [{"role": "system", "content": "You are the triage lead."},
              {"role": "user", "content": f"Here is a report from QA:\n\n{out.text}\n\nWhat is the first step?"}]
    ids = e.render(quoted)
    cont = e.complete(ids, max_new_tokens=STEPS, schedule="full").token_ids
    full = e.teacher_force(ids, cont, schedule="full")
    rows = {}
    for name in ("pieces", "spans", "full"):
        with pieces_only(name == "pieces"):
            sched = "full" if name == "full" else "relay"
            times, stats = [], None
            for _ in range(3):
                e.prefix_cache.clear()
                r = e.complete(ids, max_new_tokens=1, schedule=sched)
                times.append(r.stats.ttft_s)
                stats = r.stats
            e.prefix_cache.clear()
            got = e.teacher_force(ids, cont, schedule=sched)
            found = e.store.find(ids, touch=False, fingerprint=e.store_fingerprint)
            rows[name] = {"ttft_s": statistics.median(times), "kl": mean_kl(full, got), "spans": stats.spans,
                          "span_tokens": stats.span_tokens, "reused_tokens": stats.reused_tokens,
                          "reuse_rate": stats.reuse_rate, "pieces_found": len(found),
                          "groups": len(schedules.span_groups(found))}
    e.close()
    print(f"output: {len(out.token_ids)} sampled tokens; prompt: {len(ids)} tokens")
    print("| reuse | pieces found | spans reused | span tokens | reused tokens | reuse rate | TTFT (s) | "
          "vs full | mean KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['pieces_found']} | {r['spans']} | {r['span_tokens']} | {r['reused_tokens']} "
              f"| {r['reuse_rate']:.1%} | {r['ttft_s']:.3f} | {rows['full']['ttft_s'] / r['ttft_s']:.2f}x "
              f"| {r['kl']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
