"""The paper's 5-agent chain, every prefill schedule side by side in one run: per-agent TTFT, reuse and KL.

Analyst -> Architect -> Developer -> Reviewer -> Manager (the prompts of `benchmarks/decode.py`): each
agent's prompt pastes every earlier output behind its own system prompt. The outputs are generated once,
greedily (repetition penalty 1.1, `--tokens` each), so the store holds their decode-phase K/V as the
engine kept it; prompts are not stored (only generated outputs are relayed). Then, for agents 2-5 and
every schedule, on the same prompt ids:

* TTFT: a one-token call with an empty prefix cache, median of `--repeats`;
* reuse rate (DESIGN.md definition, the engine's stats) and recomputed cells;
* mean KL(full || schedule) over 20 teacher-forced steps of full prefill's greedy continuation.

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python benchmarks/chain.py [--tokens 128] [--repeats 2] [--json docs/chain.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import AGENTS, agent_messages, mean_kl  # noqa: E402

from relay_llm import EngineConfig, RelayEngine  # noqa: E402
from relay_llm.kernels import cpu_flags  # noqa: E402

SCHEDULES = {  # label -> (schedule, per-call settings)
    "full": ("full", None),
    "naive": ("naive", None),
    "cacheblend": ("cacheblend", None),
    "epic": ("epic", None),
    "relay": ("relay", None),  # the shipped profile: edges alone where the context ahead barely changed
    "relay (detect all)": ("relay", {"detect_changed": 0}),  # the detection on every span
    "relay (edges only)": ("relay", {"detect": False}),  # no detection pass: the piece edges at every layer
}
STEPS = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    e = RelayEngine.load("default", dtype="float32", config=EngineConfig(store_prompt=False))
    outputs: list[str] = []
    for k in range(len(AGENTS)):
        res = e.chat(agent_messages(k, outputs), max_new_tokens=args.tokens, repetition_penalty=1.1)
        outputs.append(res.text)
        print(f"# {AGENTS[k][0]}: {res.stats.completion_tokens} tokens", file=sys.stderr, flush=True)
    rows = []
    for k in range(1, len(AGENTS)):
        ids = e.render(agent_messages(k, outputs))
        e.prefix_cache.clear()
        cont = e.complete(ids, max_new_tokens=STEPS, schedule="full").token_ids
        e.prefix_cache.clear()
        ref = e.teacher_force(ids, cont, schedule="full")
        for label, (name, settings) in SCHEDULES.items():
            times, stats = [], None
            for _ in range(args.repeats):
                e.prefix_cache.clear()
                r = e.complete(ids, max_new_tokens=1, schedule=name, relay=settings)
                times.append(r.stats.ttft_s)
                stats = r.stats
            e.prefix_cache.clear()
            got = e.teacher_force(ids, cont, schedule=name, relay=settings)
            rows.append({"agent": k + 1, "name": AGENTS[k][0], "schedule": label, "prompt_tokens": len(ids),
                         "ttft_s": statistics.median(times), "reuse_rate": stats.reuse_rate,
                         "span_tokens": stats.span_tokens, "recomputed_cells": stats.recomputed_cells,
                         "kl": mean_kl(ref, got)})
            print(f"# agent {k + 1} {label}: {rows[-1]['ttft_s']:.3f} s, reuse {stats.reuse_rate:.1%}, "
                  f"KL {rows[-1]['kl']:.4f}", file=sys.stderr, flush=True)
    e.close()
    full = {r["agent"]: r["ttft_s"] for r in rows if r["schedule"] == "full"}
    naive = {r["agent"]: r["kl"] for r in rows if r["schedule"] == "naive"}
    print("| agent | prompt | schedule | TTFT (s) | vs full | reuse | KL | KL / naive's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["kl"] / naive[r["agent"]] if naive[r["agent"]] > 0 else float("nan")
        print(f"| {r['agent']} {r['name']} | {r['prompt_tokens']} | {r['schedule']} | {r['ttft_s']:.3f} "
              f"| {full[r['agent']] / r['ttft_s']:.2f}x | {r['reuse_rate']:.1%} | {r['kl']:.4f} | {ratio:.2f} |")
    print("\nmean speed-up vs full over agents 2-5:")
    for label in SCHEDULES:
        mine = [r for r in rows if r["schedule"] == label]
        print(f"  {label}: {statistics.mean(full[r['agent']] / r['ttft_s'] for r in mine):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                   "features": sorted(cpu_flags())}, "tokens": args.tokens, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
