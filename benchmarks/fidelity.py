"""Fidelity vs speed of every prefill schedule on relayed spans, side by side in one run.

For spans of 200, 500, 1000 and 2000 tokens under a short (~100-token) and a long (~600-token, past
the 512-token sliding window) different downstream prefix, each schedule (full, naive, cacheblend,
epic, relay) is measured on the same prompt:

* TTFT (prefill + first token, engine stats) and speed-up vs full, median over repeats, schedules
  interleaved per repeat;
* reuse rate (DESIGN.md definition, from the engine's stats);
* mean and max KL(full || schedule) over 20 teacher-forced steps of full prefill's greedy continuation;
* top-1 agreement on those steps, and the length of the identical greedy continuation (each schedule
  decodes 20 tokens greedily on its own; the count of leading tokens equal to full's).

The span's K/V come from one full prefill of the upstream sequence at the span's original positions
(stored as a Segment exactly as the engine stores a generated output, with its captured hidden
states): decoding 2000 tokens per setting on 2 CPU cores is too slow, and decode- and prefill-phase
K/V agree to float noise (DESIGN.md). Before every measurement the store holds exactly that span and
the prefix cache is empty, so every schedule sees the same reusable content.

Usage (from the repository root):

    python benchmarks/fidelity.py [--spans 200,500,1000,2000] [--repeats 2] [--out docs]

writes docs/fidelity.md (the table) and docs/fidelity_pareto.png (speed-up vs KL).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ttft import UPSTREAM_PREFIX, bos, spec_text, tokens  # noqa: E402

from relay_llm import RelayEngine  # noqa: E402
from relay_llm.store import Segment  # noqa: E402

SCHEDULES = {  # label -> (schedule, per-call settings)
    "full": ("full", None),
    "naive": ("naive", None),
    "cacheblend": ("cacheblend", None),
    "epic": ("epic", None),
    "relay": ("relay", None),  # the shipped profile
    "relay (no suffix)": ("relay", {"suffix": 0}),  # without the paper's suffix rule
    "relay (floor 0.03)": ("relay", {"dev_floor": 0.03}),  # nothing selected below that deviation
    "relay (edges only)": ("relay", {"detect": False}),  # no detection pass: the piece edges at every layer
}
SHORT_PREFIX = (
    "You are the Reviewer agent of a small software team. The Architect agent has written the design "
    "specification below. Check it for gaps, contradictions and missing failure handling, quote it where "
    "you can, and never invent components or numbers that it does not mention.\n\nSpecification:\n"
)
QUESTION = "\n\nQuestion: Which component does the specification above describe first?\nAnswer:"
STEPS = 20


def long_prefix() -> str:
    data = json.loads((Path(__file__).parents[1] / "relay_llm" / "data" / "calibration.json").read_text())
    return "Background reading for the review:\n" + data["long_context"][:2600] + "\n\n" + SHORT_PREFIX


def make_segment(engine: RelayEngine, span: list[int]) -> Segment:
    head = bos(engine) + tokens(engine, UPSTREAM_PREFIX)
    ex = engine.executor
    kv = ex.new_buffers(len(head) + len(span))
    run = ex.run(torch.tensor(head + span, device=ex.device), 0, kv, capture_layer=engine.capture_layer)
    keys, values = kv.slice(len(head), len(head) + len(span))
    return engine._segment(span, keys, values, len(head), run.captured[len(head):], "decode", head)


def fresh(engine: RelayEngine, seg: Segment) -> None:
    engine.prefix_cache.clear()
    engine.store.clear()
    engine.store.add(seg)


def measure_setting(engine: RelayEngine, prompt: list[int], seg: Segment, repeats: int) -> dict:
    fresh(engine, seg)
    ref = engine.complete(prompt, max_new_tokens=STEPS, schedule="full").token_ids
    rows: dict[str, dict] = {}
    full_lp = None
    for label, (name, settings) in SCHEDULES.items():
        fresh(engine, seg)
        lp = engine.teacher_force(prompt, ref, schedule=name, relay=settings)
        if full_lp is None:
            full_lp = lp
        kl = (full_lp.exp() * (full_lp - lp)).sum(-1)
        fresh(engine, seg)
        own = engine.complete(prompt, max_new_tokens=STEPS, schedule=name, relay=settings)
        if name != "full" and own.stats.span_tokens == 0:
            raise RuntimeError(f"{label}: the stored span was not found in the prompt")
        pairs = zip(own.token_ids, ref, strict=False)
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref), len(own.token_ids)))
        rows[label] = {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                       "top1": float((lp.argmax(-1) == full_lp.argmax(-1)).float().mean()),
                       "identical": same, "reuse_rate": own.stats.reuse_rate, "ttft": [],
                       "span_tokens": own.stats.span_tokens, "fallback": own.stats.fallback}
    for r in range(repeats + 1):  # the first round warms up and is dropped
        order = list(SCHEDULES.items())
        order = order[r % len(order):] + order[: r % len(order)]
        for label, (name, settings) in order:
            fresh(engine, seg)
            stats = engine.complete(prompt, max_new_tokens=1, schedule=name, relay=settings).stats
            if r:
                rows[label]["ttft"].append(stats.ttft_s)
    for row in rows.values():
        row["ttft_median"] = statistics.median(row["ttft"])
    for row in rows.values():
        row["speedup"] = rows["full"]["ttft_median"] / row["ttft_median"]
    return rows


def report(results: list[dict], out: Path, cmd: str, elapsed: float) -> None:
    lines = [
        "# Fidelity and speed of prefill schedules on relayed spans",
        "",
        f"Command: `{cmd}` (from the repository root).",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, torch "
        f"{torch.__version__}; default model gemma-3-270m, fp32. Wall time {elapsed / 60:.0f} min.",
        "TTFT is the median over repeats with schedules interleaved; KL is KL(full || schedule) in nats over "
        f"{STEPS} teacher-forced steps of full prefill's greedy continuation; 'identical' counts the leading "
        f"tokens of the schedule's own greedy output equal to full's (of {STEPS}).",
        "",
        "| prefix | span | prompt | schedule | TTFT (s) | speed-up | reuse | mean KL | max KL | top-1 | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for label, row in res["rows"].items():
            lines.append(
                f"| {res['prefix']} | {res['span']} | {res['prompt']} | {label} | {row['ttft_median']:.2f} | "
                f"{row['speedup']:.1f}x | {row['reuse_rate']:.0%} | {row['mean_kl']:.4f} | {row['max_kl']:.3f} | "
                f"{row['top1']:.0%} | {row['identical']} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    (out / "fidelity.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = dict(zip(SCHEDULES, "o^sDvPXh", strict=True))
    for label in SCHEDULES:
        if label == "full":
            continue
        xs = [r["rows"][label]["speedup"] for r in results]
        ys = [max(r["rows"][label]["mean_kl"], 1e-5) for r in results]
        ax.scatter(xs, ys, label=label, marker=markers[label])
    ax.set_xlabel("TTFT speed-up vs full prefill")
    ax.set_ylabel("mean KL(full || schedule), nats (log)")
    ax.set_yscale("log")
    ax.set_title("Speed vs fidelity (each point: one span length x prefix)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fidelity_pareto.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spans", default="200,500,1000,2000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    t0 = time.time()
    engine = RelayEngine.load("default", dtype="float32")
    spans = [int(s) for s in args.spans.split(",")]
    span_all = tokens(engine, spec_text(min_words=max(spans)))[: max(spans)]
    prefixes = {"short": SHORT_PREFIX, "long": long_prefix()}
    results = []
    for n in spans:
        seg = make_segment(engine, span_all[:n])
        for pname, text in prefixes.items():
            prompt = bos(engine) + tokens(engine, text) + span_all[:n] + tokens(engine, QUESTION)
            rows = measure_setting(engine, prompt, seg, args.repeats)
            results.append({"prefix": pname, "span": n, "prompt": len(prompt), "rows": rows})
            brief = ", ".join(f"{k} {v['speedup']:.1f}x KL {v['mean_kl']:.4f}" for k, v in rows.items())
            print(f"[{pname} prefix, span {n}, {time.time() - t0:.0f}s] {brief}", file=sys.stderr, flush=True)
    cmd = "python benchmarks/fidelity.py" + (f" {' '.join(argv)}" if argv else "")
    report(results, Path(args.out), cmd, time.time() - t0)
    print((Path(args.out) / "fidelity.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
